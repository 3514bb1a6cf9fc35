"""Shared test scaffolding: the data directory, a tiny corpus, tiny configs, a script runner."""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Callable

import pytest

from configs import default

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY_TEXT = "the quick brown fox jumps over the lazy dog.\n" * 40

# The smallest model and batches that still exercise every code path, section by section.
TINY_LM = {"model": {"hidden_size": 16, "embed_dim": 8},
           "data": {"batch_size": 4, "seq_len": 8},
           "train": {"steps": 5, "log_every": 1, "eval_every": 0, "eval_lanes": 2,
                     "eval_chunk": 8}}
TINY_CLASSIFY = {"task": "classify",
                 "model": {"hidden_size": 8, "embed_dim": 8},
                 "data": {"corpus": "rt-polarity", "batch_size": 8, "seq_len": 16,
                          "max_vocab": 300},
                 "train": {"steps": 4, "log_every": 1, "eval_every": 0, "eval_lanes": 256}}


def pytest_configure(config):
  os.environ.setdefault("JAXRNN_DATA_DIR", str(REPO_ROOT.parent / "shared" / "data"))
  # One persistent compilation cache for the session, its workers and the scripts they start:
  # most tests compile the same tiny models again (a training step per script run), and XLA's
  # compilation is most of the suite's time. Set before jax is imported, which reads it.
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    config.jaxrnn_cache = tempfile.mkdtemp(prefix="jaxrnn-test-xla-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=config.jaxrnn_cache,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  # The authors' packages (tests/authors.py), installed once by the xdist controller before its
  # workers start (a no-op once cached); where it cannot, their tests skip at once (fail under CI).
  if not hasattr(config, "workerinput") and getattr(config.option, "numprocesses", None):
    import authors  # pylint: disable=import-outside-toplevel
    authors.preinstall()


def pytest_unconfigure(config):
  if cache := getattr(config, "jaxrnn_cache", None):
    shutil.rmtree(cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  """Tests marked `gpu` are collected everywhere and skipped, saying why, where JAX has none."""
  del config
  import jax  # the test modules, collected by now, have imported it already
  if (platform := jax.default_backend()) != "gpu":
    skip = pytest.mark.skip(reason=f"needs a GPU (JAX's platform here: {platform}); "
                            "scripts/gpu_check.py runs it on one (docs/devices.md)")
    for item in items:
      if "gpu" in item.keywords:
        item.add_marker(skip)


def _overrides(base: dict[str, Any], sections: dict[str, Any]) -> dict[str, Any]:
  """Dotted field -> value: `base`, then `sections` ({"train": {"steps": 3}, "task": ...})."""
  flat = {}
  for part in (base, sections):
    for key, value in part.items():
      if isinstance(value, dict):
        flat.update({f"{key}.{k}": v for k, v in value.items()})
      else:
        flat[key] = value
  return flat


def make_config(base: dict[str, Any], **sections: Any):
  """configs/default.py with `base`'s fields, then `sections`' (e.g. train={"steps": 20})."""
  config = default.get_config()
  for name, value in _overrides(base, sections).items():
    *path, leaf = name.split(".")
    node = config
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
  """A 1,800-character text file: 40 copies of one sentence."""
  path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
  path.write_text(TINY_TEXT)
  return str(path)


@pytest.fixture(scope="session")
def tiny_config(corpus) -> Callable[..., Any]:
  """tiny_config(**sections): a tiny LM config on the tiny corpus, e.g. train={"steps": 20}."""
  return lambda **sections: make_config({**TINY_LM, "data": {**TINY_LM["data"], "corpus": corpus}},
                                        **sections)


@pytest.fixture(scope="session")
def tiny_classify_config() -> Callable[..., Any]:
  """tiny_classify_config(**sections): a tiny sentence classifier on rt-polarity."""
  return lambda **sections: make_config(TINY_CLASSIFY, **sections)


@pytest.fixture(scope="session")
def tiny_flags(corpus) -> Callable[..., list[str]]:
  """tiny_flags(workdir, **sections): scripts/train.py flags for the tiny LM config."""
  def flags(workdir, **sections):
    base = {**TINY_LM, "data": {**TINY_LM["data"], "corpus": corpus}}
    return [f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in _overrides(base, sections).items())]
  return flags


def run_script(name: str, *args: str, devices: int | None = None, timeout: int = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  """scripts/<name> in a subprocess from the repository root; `devices` simulated CPU devices,
  `env` variables added to this process' environment."""
  env = {**os.environ, **(env or {})}
  if devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / name), *args], env=env,
                        capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


@pytest.fixture(scope="session")
def script() -> Callable[..., subprocess.CompletedProcess]:
  """script(name, *args, devices=None): runs one of scripts/*.py as a user would."""
  return run_script


@pytest.fixture(autouse=True)
def healthy_runs_never_trip_the_guard(request, monkeypatch):
  """Every test not marked `diverges`: no state of any run it trains is judged insane by the
  divergence guard (a loss far above the run's level), so the guard never drops a checkpoint of
  the healthy runs of the suite."""
  from jaxrnn import guard
  tripped = []
  measured = guard.Guard.measured

  def recording(self, step, loss, what):
    sane = measured(self, step, loss, what)
    if not sane:
      tripped.append((step, loss, what, self.bound()))
    return sane

  monkeypatch.setattr(guard.Guard, "measured", recording)
  yield
  if request.node.get_closest_marker("diverges") is None:
    assert not tripped, f"the guard judged a healthy run's state insane: {tripped}"


@pytest.fixture
def nan_updates(monkeypatch) -> Callable[[], None]:
  """nan_updates(): from then on every optimizer update is NaN (the schedule returns NaN), a
  fault injected past the config validator (which refuses train.lr=nan) for the NaN guard."""
  import jax.numpy as jnp
  from jaxrnn import optim
  return lambda: monkeypatch.setattr(optim, "learning_rate",
                                     lambda train_config, steps_per_epoch=1: lambda step: jnp.nan)
