"""Test setup: the shared data directory, unless the environment names one."""

import os
import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def pytest_configure(config):
  del config
  os.environ.setdefault("JAXRNN_DATA_DIR", str(REPO_ROOT.parent / "shared" / "data"))
