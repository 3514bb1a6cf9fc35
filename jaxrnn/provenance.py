"""What a run ran on, written beside it so that its figures can be reproduced and compared.

`<workdir>/config.json` is the resolved config, `vocab.json` the vocabulary, and `run.json`
the versions (jaxrnn, its git commit, jax, jaxlib), the device kind and count, and the CPU.
"""

import json
import pathlib
import platform
import subprocess
from typing import Any

import jax

from jaxrnn import __version__, data, parallel


def git_commit() -> str | None:
  """The commit of the jaxrnn checkout in use, with "+dirty" for uncommitted changes; None if
  jaxrnn was installed from a wheel rather than run from a git checkout."""
  root = pathlib.Path(__file__).resolve().parent.parent
  if not (root / ".git").exists():
    return None
  git = lambda *args: subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                     text=True, check=True, timeout=30).stdout.strip()
  try:
    head, changes = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
  except (OSError, subprocess.SubprocessError):
    return None
  return head + ("+dirty" if changes else "")


def cpu_name() -> str:
  """The host CPU's model name (device_kind says only "cpu"), for comparing runs' speed."""
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  names = [line.split(":", 1)[1].strip() for line in
           (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
           if line.startswith("model name")]
  return names[0] if names else platform.processor() or platform.machine()


def write_run_files(workdir: pathlib.Path, config: Any, vocab: data.Vocab,
                    devs: parallel.Devices) -> None:
  """config.json, vocab.json and run.json in `workdir`."""
  (workdir / "config.json").write_text(config.to_json(indent=2))
  (workdir / "vocab.json").write_text(vocab.to_json())
  (workdir / "run.json").write_text(json.dumps({
      "jaxrnn": __version__, "git_commit": git_commit(), "jax": jax.__version__,
      "jaxlib": jax.lib.__version__, "device_kind": devs.local[0].device_kind,
      "devices": devs.count, "processes": devs.process_count, "cpu": cpu_name()}))
