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
  # embed 32, hidden 32 (mingru: 48), 2 layers, vocab 65: 2 per weight-matrix entry.
  by_hand = {"lstm": 2 * (32 + 32) * 128 + 2 * (32 + 32) * 128 + 2 * 32 * 65,  # 4 gates
             "mingru:48": 2 * 32 * 96 + 2 * 48 * 96 + 2 * 48 * 65,  # w_ih only: z and h~
             "indrnn": 2 * 32 * 32 + 2 * 32 * 32 + 2 * 32 * 65}  # the recurrence is elementwise
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


def _gpu_check():
  """scripts/gpu_check.py as a module (its flags defined once per test process)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_gpu_check_counts_tests_and_tabulates_the_bench(tmp_path):
  """The GPU check's summary: pytest's JUnit XML counted (a failure named with its message's
  first line), and each bench row's ratio to PyTorch and share of the card's peak."""
  check = _gpu_check()
  xml = tmp_path / "t.xml"
  xml.write_text(
      '<testsuites><testsuite><testcase classname="tests.test_gpu" name="a"/>'
      '<testcase classname="tests.test_gpu" name="b"><failure message="assert 1 == 2&#10;more"/>'
      '</testcase><testcase classname="tests.test_gpu" name="c"><skipped message="no"/>'
      '</testcase><testcase classname="tests.test_gpu" name="d"><error message="boom"/>'
      '</testcase></testsuite></testsuites>')
  counts = check.junit_counts(xml)
  assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 2, 1)
  assert counts["failures"] == ["tests.test_gpu::b: assert 1 == 2", "tests.test_gpu::d: boom"]
  assert check.junit_counts(tmp_path / "missing.xml")["failures"] == [
      "no report: pytest did not end"]
  bench = {"peak": {"gflops": 1000.0}, "results": {"lstm": {"train": {
      "jaxrnn[fused]": {"median": 300.0, "unit": "tok/s", "ms_per_call": 2.0, "gflops": 250.0},
      "torch": {"median": 200.0, "unit": "tok/s", "ms_per_call": 3.0, "gflops": 100.0}}}}}
  rows = check.bench_rows(bench, "2x256 b64 s128", "float32")
  assert [(r["impl"], r["x_torch"], r["pct_peak"]) for r in rows] == [
      ("jaxrnn[fused]", 1.5, 25.0), ("torch", None, 10.0)]
  text = check.table(rows, {"2x256 b64 s128 float32 lstm": "fused"})
  assert "jaxrnn[fused]" in text and "1.50" in text and text.endswith("-> fused\n")


@pytest.mark.slow  # three minutes on 2 cores: a pytest collection, two benches, a recipe
def test_gpu_check_dry_run_writes_its_summary(tmp_path):
  """--dry_run on a CPU: every phase runs at toy sizes, the GPU tests counted as skipped, and
  gpu_check.json and bench.txt are written."""
  proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry_run",
                         f"--out={tmp_path / 'out'}", f"--work={tmp_path / 'work'}"],
                        capture_output=True, text=True, timeout=900, cwd=REPO)
  assert proc.returncode == 0, proc.stderr
  summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
  assert summary["tests"]["skipped"] > 0 and summary["tests"]["failed"] == 0
  assert {r["cell"] for r in summary["bench"]} == {"lstm", "gru"}
  assert summary["recipes"]["shakespeare_gpu"]["final"]["step"] == 4
  assert "x torch" in (tmp_path / "out" / "bench.txt").read_text()


def _bench(tmp_path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  """scripts/bench.py with `args`, compiling with less optimization, as the --quick test does."""
  xla_flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE",
         "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()}
  return subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), *args,
                         f"--out={tmp_path / 'b.json'}"], capture_output=True, text=True,
                        timeout=timeout, cwd=REPO, env=env)


def test_quick_bench_runs_mamba_beside_a_peer(tmp_path):
  """--quick in the default suite: lstm beside torch, and mamba, whose stack needs its embedding
  as wide as its hidden size (--quick's sizes satisfy every cell), time every measure."""
  proc = _bench(tmp_path, "--quick", "--cells=lstm,mamba", "--peers=torch", "--seq_sweep=",
                "--memory_seqs=")
  assert proc.returncode == 0, proc.stderr
  results = json.loads((tmp_path / "b.json").read_text())["results"]
  for measure in ("train", "eval", "sample"):
    assert set(results["lstm"][measure]) == {"jaxrnn", "torch"}
    assert set(results["mamba"][measure]) == {"jaxrnn"}  # no peer has a mamba
    for impls in (results["lstm"][measure], results["mamba"][measure]):
      assert all(r["median"] > 0 for r in impls.values())


def _has_gpu() -> bool:
  """Whether JAX finds a GPU here (where --device=gpu is no error)."""
  import jax
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


@pytest.mark.parametrize("flag, named", [
    ("--hidden=0", "--hidden"), ("--batch=-1", "--batch"), ("--layers=0", "--layers"),
    ("--rounds=0", "--rounds"), ("--steps=0", "--steps"), ("--warmup=-1", "--warmup"),
    ("--seq_sweep=abc", "--seq_sweep"), ("--memory_seqs=abc", "--memory_seqs"),
    ("--measures=foo", "--measures"), ("--compute_dtype=float16", "--compute_dtype"),
    ("--device=gpu", "--device"), ("--impls=cudnn", "auto, fused, scan"),
    ("--impls=foo", "--impls"), ("--cells=foo", "--cells"), ("--cells=mamba:48", "--embed"),
    ("stray", "unexpected arguments")])
def test_bad_flags_are_one_line_before_any_row_starts(tmp_path, flag, named):
  """Each bad flag: exit 2, one line on stderr naming it (for --impls=cudnn on a CPU, the impls
  that run here), no traceback, nothing written: checked before any row's process starts."""
  if flag == "--device=gpu" and _has_gpu():
    pytest.skip("this machine has a GPU: --device=gpu is no error here")
  proc = _bench(tmp_path, "--quick", "--cells=lstm", "--peers=", flag, timeout=120)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and named in lines[0], proc.stderr
  assert not (tmp_path / "b.json").exists()
