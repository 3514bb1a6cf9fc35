"""Tests for scripts/bench.py, run as a user would, in a subprocess."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow  # half a minute of compilation for every cell and peer
def test_quick_bench_writes_every_figure(tmp_path):
  """--quick: exit 0; jaxrnn, torch and flax figures for rnn/gru/lstm; jaxrnn alone on the rest."""
  out = tmp_path / "b.json"
  # Compilation is most of this test's time and never its subject: ask XLA for less optimization.
  # On a loaded machine, OpenMP threads spinning at barriers make tiny torch ops 10x slower.
  xla_flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE",
         "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()}
  proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--quick",
                         "--cells=rnn,gru,lstm,mingru:48,indrnn", f"--out={out}"], capture_output=True, text=True, timeout=300, cwd=REPO,
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
  for cell in ("mingru:48", "indrnn"):  # no torch.nn or flax.linen twin: jaxrnn alone
    assert set(bench["results"][cell]["train"]) == {"jaxrnn"}
    assert bench["results"][cell]["train"]["jaxrnn"]["median"] > 0
  # Training GFLOP/s = tokens/s x 3 x forward FLOPs per token; counted by hand for --quick's
  # embed 16, hidden 32 (mingru: 48), 2 layers, vocab 65: 2 per weight-matrix entry.
  by_hand = {"lstm": 2 * (16 + 32) * 128 + 2 * (32 + 32) * 128 + 2 * 32 * 65,  # 4 gates
             "mingru:48": 2 * 16 * 96 + 2 * 48 * 96 + 2 * 48 * 65,  # w_ih only: z and h~
             "indrnn": 2 * 16 * 32 + 2 * 32 * 32 + 2 * 32 * 65}  # the recurrence is elementwise
  for cell, flops in by_hand.items():
    train = bench["results"][cell]["train"]["jaxrnn"]
    assert abs(train["gflops"] * 1e9 / (3 * train["median"]) - flops) < 1e-6 * flops
  assert set(bench["seq_sweep"]["jaxrnn"]) == {"8", "16"}
  assert set(bench["memory_mib"]["jaxrnn"]) == {"64", "1024"}
  assert f"{'lstm':11} train" in proc.stdout and "peak:" in proc.stdout


def test_malformed_cell_spec_is_a_clear_error(tmp_path):
  """--cells=lstm:big exits 2 with the expected form and no traceback."""
  proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--quick",
                         "--cells=lstm:big", "--peers=", f"--out={tmp_path / 'b.json'}"],
                        capture_output=True, text=True, timeout=300, cwd=REPO)
  assert proc.returncode == 2 and "cell:hidden" in proc.stderr and "Traceback" not in proc.stderr
