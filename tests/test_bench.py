"""Tests for scripts/bench.py, run as a user would, in a subprocess."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_quick_bench_writes_every_figure(tmp_path):
  """--quick: exit 0, positive figures and ratios for jaxrnn, torch and flax on every cell."""
  out = tmp_path / "b.json"
  # Compilation is most of this test's time and never its subject: ask XLA for less optimization.
  # On a loaded machine, OpenMP threads spinning at barriers make tiny torch ops 10x slower.
  xla_flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE",
         "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()}
  proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--quick",
                         f"--out={out}"], capture_output=True, text=True, timeout=300, cwd=REPO,
                        env=env)
  assert proc.returncode == 0, proc.stderr
  bench = json.loads(out.read_text())
  for cell in ("rnn", "gru", "lstm"):
    results = bench["results"][cell]
    assert results["train"]["jaxrnn"]["median"] > 0
    for measure, impls in (("train", ("torch", "flax")), ("eval", ("torch", "flax")),
                           ("sample", ("torch",))):
      for impl in impls:
        assert results[measure][impl]["median"] > 0 and results[measure][impl]["ratio"] > 0
  assert set(bench["seq_sweep"]["jaxrnn"]) == {"8", "16"}
  assert set(bench["memory_mib"]["jaxrnn"]) == {"64", "1024"}
  assert f"{'lstm':5} train" in proc.stdout and "peak:" in proc.stdout
