"""The GPU check: every GPU-marked test, the GPU bench and a GPU recipe, one JSON summary.

  python scripts/gpu_check.py --prepare                 # on your machine: .gpu/ (data, wheels)
  python3 scripts/gpu_check.py --out=OUT                # on the GPU machine: about 8 minutes
  python3 scripts/gpu_check.py --out=OUT --phases=recipes --recipes=ptb_medium
  python scripts/gpu_check.py --dry_run --out=/tmp/check  # on a CPU: every phase at toy sizes

On a machine with one NVIDIA GPU and JAX's CUDA wheels (docs/devices.md says how to get the
repository, its data and the missing wheels there), in three phases, each a subprocess with a
time limit so that one stuck phase cannot eat the others' minutes:
  tests    tests/test_gpu.py (every test marked gpu) and tests/test_pallas.py (the Pallas
           kernels, compiled for the GPU);
  bench    scripts/bench.py --device=gpu: LSTM and GRU, 2 x 256, 2 x 512, 2 x 1024, float32 and
           bfloat16 compute, jaxrnn's fused scan, cuDNN and Pallas rows against PyTorch's cuDNN
           (`auto` picks one of these; the summary says which);
  recipes  scripts/train.py on configs/<name>.py to its end (name@impl: with that model.impl).
It writes OUT/gpu_check.json (the card, the versions, tests passed / failed / skipped, every
bench row with its ratio to PyTorch, each recipe's final figures and wall time, each phase's
seconds) and OUT/bench.txt (the table). The device tool brings back at most 8 files: the rest
(bench JSON per shape, the tests' XML) stays in --work.
"""

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from typing import Any

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
PREPARED = ROOT / ".gpu"  # git-ignored: what --prepare lays out for the device machine
# (hidden, batch, seq) of the bench: the sizes docs/speed.md's GPU table compares at.
SHAPES = ((256, 64, 128), (512, 64, 256), (1024, 128, 256))
DTYPES = ("float32", "bfloat16")
DRY_SHAPES = ((32, 4, 8),)
# The packages the device machine lacks (docs/devices.md), as wheels for its Python.
WHEELS = ("ml_collections==1.1.0",)
VERSIONS = ("jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint", "torch",
            "triton", "nvidia-cudnn-cu13", "numpy")

_OUT = flags.DEFINE_string("out", "gpu_check", "Directory for gpu_check.json and bench.txt.")
_WORK = flags.DEFINE_string("work", "", "Directory for runs and per-phase files ('': a temp dir).")
_PHASES = flags.DEFINE_list("phases", ["tests", "bench", "recipes"], "Which phases to run.")
_RECIPES = flags.DEFINE_list("recipes", ["shakespeare_gpu", "shakespeare_gpu@pallas"],
                             "configs/<name>.py to train to the end; name@impl sets model.impl.")
_IMPLS = flags.DEFINE_list("impls", ["fused", "cudnn", "pallas"],
                           "jaxrnn rows of the bench (those not known here are left out).")
_BUDGET = flags.DEFINE_integer("budget_s", 480, "Seconds for all phases; each gets what is left.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "On a CPU: toy sizes, the device the CPU.")
_PREPARE = flags.DEFINE_bool("prepare", False, "Lay out .gpu/ (the corpora, the wheels) here.")


def prepare() -> None:
  """.gpu/data (a copy of the corpora) and .gpu/whl (the wheels the device machine lacks)."""
  data = pathlib.Path(os.environ.get("JAXRNN_DATA_DIR", ROOT.parent / "shared" / "data"))
  shutil.rmtree(PREPARED, ignore_errors=True)
  shutil.copytree(data, PREPARED / "data")
  subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                  "--only-binary=:all:", "-d", str(PREPARED / "whl"), *WHEELS], check=True)
  size = sum(f.stat().st_size for f in PREPARED.rglob("*") if f.is_file()) / 2**20
  print(f"prepared {PREPARED} ({size:.0f} MiB): carry it, see docs/devices.md")


class Clock:
  """The check's budget: each phase's subprocess gets what is left of it."""

  def __init__(self, budget_s: float):
    self.end = time.monotonic() + budget_s

  def left(self) -> float:
    return max(0.0, self.end - time.monotonic())


def run(cmd: list[str], clock: Clock, log: pathlib.Path,
        env: dict[str, str] | None = None) -> dict[str, Any]:
  """Runs `cmd` from the repository root within the budget left, its output to `log`:
  {"rc", "seconds", "timed_out"}."""
  start = time.monotonic()
  with open(log, "w") as f:
    try:
      proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                            timeout=max(clock.left(), 1.0))
      rc, timed_out = proc.returncode, False
    except subprocess.TimeoutExpired:
      rc, timed_out = None, True
  return {"rc": rc, "seconds": round(time.monotonic() - start, 1), "timed_out": timed_out,
          "log": str(log)}


def junit_counts(path: pathlib.Path) -> dict[str, Any]:
  """passed / failed / skipped from pytest's JUnit XML, with each failure's name and message."""
  if not path.exists():
    return {"passed": 0, "failed": 0, "skipped": 0, "failures": ["no report: pytest did not end"]}
  counts, failures = {"passed": 0, "failed": 0, "skipped": 0}, []
  for case in ElementTree.parse(path).getroot().iter("testcase"):
    bad = case.find("failure")
    bad = case.find("error") if bad is None else bad
    if bad is not None:
      counts["failed"] += 1
      first = (bad.get("message") or "").strip().split("\n")[0][:300]
      failures.append(f"{case.get('classname')}::{case.get('name')}: {first}")
    elif case.find("skipped") is not None:
      counts["skipped"] += 1
    else:
      counts["passed"] += 1
  return {**counts, "failures": failures}


def bench_rows(bench: dict[str, Any], shape: str, dtype: str) -> list[dict[str, Any]]:
  """One row per (cell, measure, impl) of a bench.py JSON: median, unit, ms per call, x PyTorch,
  % of the card's peak."""
  peak = bench["peak"]["gflops"]
  rows = []
  for cell, measures in bench["results"].items():
    for measure, by_impl in measures.items():
      torch = by_impl.get("torch", {}).get("median")
      for impl, r in by_impl.items():
        rows.append({"shape": shape, "dtype": dtype, "cell": cell, "measure": measure,
                     "impl": impl, "median": r["median"], "unit": r["unit"],
                     "ms_per_call": r["ms_per_call"],
                     "x_torch": r["median"] / torch if torch and impl != "torch" else None,
                     "pct_peak": 100 * r["gflops"] / peak if r.get("gflops") and peak else None})
  return rows


def table(rows: list[dict[str, Any]], auto: dict[str, str]) -> str:
  """The bench rows as aligned text, `auto`'s choice per (shape, dtype, cell) beneath."""
  lines = [f"{'shape':18} {'dtype':9} {'cell':5} {'measure':8} {'impl':14} {'median':>12} "
           f"{'unit':6} {'ms/call':>8} {'x torch':>7} {'%peak':>6}"]
  for r in rows:
    ratio = f"{r['x_torch']:7.2f}" if r["x_torch"] else " " * 7
    pct = f"{r['pct_peak']:6.1f}" if r["pct_peak"] else ""
    lines.append(f"{r['shape']:18} {r['dtype']:9} {r['cell']:5} {r['measure']:8} {r['impl']:14} "
                 f"{r['median']:>12,.0f} {r['unit']:6} {r['ms_per_call']:8.2f} {ratio} "
                 f"{pct}".rstrip())
  lines += [f"auto: {key} -> {impl}" for key, impl in auto.items()]
  return "\n".join(lines) + "\n"


def tests_phase(work: pathlib.Path, clock: Clock, env: dict[str, str]) -> dict[str, Any]:
  xml = work / "gpu_tests.xml"
  # Every test marked gpu is in test_gpu.py; test_pallas.py runs the Pallas kernels compiled
  # where there is a GPU (in the interpreter elsewhere).
  cmd = [sys.executable, "-m", "pytest", "-n", "0", "-q", "-rfEs", f"--junitxml={xml}",
         "tests/test_gpu.py", "tests/test_pallas.py"]
  return {**run(cmd, clock, work / "tests.log", env), **junit_counts(xml)}


def bench_phase(work: pathlib.Path, clock: Clock, env: dict[str, str],
                dry: bool) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, str]]:
  from jaxrnn import layers  # imports jax without starting a backend: no GPU memory taken here
  impls = [i for i in _IMPLS.value if i in layers.runnable_impls("cpu" if dry else "gpu")]
  runs, rows, auto = {}, [], {}
  shapes = DRY_SHAPES if dry else SHAPES
  for hidden, batch, seq in shapes:
    for dtype in DTYPES:
      shape = f"2x{hidden} b{batch} s{seq}"
      out = work / f"bench_{hidden}_{dtype}.json"
      # Sampling at the largest float32 size only (docs/speed.md's figure): it is the slowest
      # row to time and the same loop at every size.
      sampled = hidden == shapes[-1][0] and dtype == "float32"
      measures = "train,eval,sample" if sampled else "train,eval"
      cmd = [sys.executable, "scripts/bench.py", f"--device={'cpu' if dry else 'gpu'}",
             "--cells=lstm,gru", "--layers=2", f"--hidden={hidden}", "--embed=256",
             f"--batch={batch}", f"--seq={seq}", f"--compute_dtype={dtype}",
             f"--impls={','.join(impls)}", "--peers=torch", "--seq_sweep=", "--memory_seqs=",
             f"--measures={measures}", "--steps=5", "--rounds=3", "--warmup=2", f"--out={out}"]
      runs[f"{shape} {dtype}"] = run(cmd, clock, work / f"bench_{hidden}_{dtype}.log", env)
      if out.exists():
        bench = json.loads(out.read_text())
        rows += bench_rows(bench, shape, dtype)
        auto.update({f"{shape} {dtype} {cell}": impl for cell, impl in bench["auto"].items()})
  return runs, rows, auto


def recipe_phase(work: pathlib.Path, clock: Clock, env: dict[str, str],
                 dry: bool) -> dict[str, Any]:
  """Each recipe trained to its end: the final JSON line, tokens/s and wall time."""
  from jaxrnn import layers
  results = {}
  for spec in _RECIPES.value:
    name, _, impl = spec.partition("@")
    if dry and impl and impl not in layers.runnable_impls("cpu"):
      continue  # a GPU kernel: nothing of the script's own to check on a CPU
    workdir = work / "runs" / spec.replace("@", "_")
    shutil.rmtree(workdir, ignore_errors=True)
    cmd = [sys.executable, "scripts/train.py", f"--config=configs/{name}.py",
           f"--workdir={workdir}", *([f"--config.model.impl={impl}"] if impl else [])]
    if dry:
      cmd += ["--config.train.steps=4", "--config.model.hidden_size=32",
              "--config.model.embed_dim=16", "--config.data.batch_size=4",
              "--config.data.seq_len=16", "--config.train.eval_every=4",
              "--config.train.ckpt_every=4", "--config.train.warmup_steps=0",
              "--config.train.log_every=2", "--config.train.eval_lanes=4"]
    result = run(cmd, clock, work / f"recipe_{spec.replace('@', '_')}.log", env)
    log = pathlib.Path(result["log"]).read_text().strip().splitlines()
    try:
      result["final"] = json.loads(log[-1]) if result["rc"] == 0 else None
    except json.JSONDecodeError:
      result["final"] = None
    metrics = workdir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() \
        else []
    speeds = [r["tokens_per_s"] for r in rows if r.get("split") == "train"][1:]  # past compiling
    result["tokens_per_s"] = sorted(speeds)[len(speeds) // 2] if speeds else None
    results[spec] = result
  return results


def machine(env: dict[str, str]) -> dict[str, Any]:
  """The card (from a child process, so that this one never holds GPU memory) and versions."""
  probe = subprocess.run([sys.executable, "-c", "import jax; d = jax.devices()[0]; "
                          "print(d.platform, '|', d.device_kind, '|', jax.device_count())"],
                         capture_output=True, text=True, env=env, cwd=ROOT)
  dev = probe.stdout.strip().split(" | ") if probe.returncode == 0 else ["?", probe.stderr[-300:]]
  smi = shutil.which("nvidia-smi") and subprocess.run(
      ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
      capture_output=True, text=True).stdout.strip()
  versions = {}
  for name in VERSIONS:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                       cwd=ROOT)
  return {"platform": dev[0], "device": dev[1] if len(dev) > 1 else None, "nvidia_smi": smi,
          "python": platform.python_version(), "versions": versions,
          "git_commit": git.stdout.strip() or None,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _PREPARE.value:
    prepare()
    return
  if unknown := set(_PHASES.value) - {"tests", "bench", "recipes"}:
    raise app.UsageError(f"--phases: unknown {', '.join(sorted(unknown))}; "
                         "choose from tests, bench, recipes")
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  work = pathlib.Path(_WORK.value or tempfile.mkdtemp(prefix="gpu_check_"))
  work.mkdir(parents=True, exist_ok=True)
  env = {**os.environ, "PYTHONUNBUFFERED": "1",
         # This repository importable without installing it (nothing is built on the device).
         "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
         # Several processes share the one GPU (pytest and its scripts, bench rows).
         "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  if (PREPARED / "data").exists():
    env.setdefault("JAXRNN_DATA_DIR", str(PREPARED / "data"))
  if _DRY_RUN.value:
    env["JAX_PLATFORMS"] = "cpu"
  clock = Clock(_BUDGET.value)
  summary: dict[str, Any] = {"machine": machine(env), "dry_run": _DRY_RUN.value, "phases": {}}
  print(f"gpu_check on {summary['machine']['device']} -> {out}", file=sys.stderr)
  if "tests" in _PHASES.value:
    summary["tests"] = tests_phase(work, clock, env)
    print(f"tests: {summary['tests']['passed']} passed, {summary['tests']['failed']} failed, "
          f"{summary['tests']['skipped']} skipped", file=sys.stderr)
  if "bench" in _PHASES.value:
    runs, rows, auto = bench_phase(work, clock, env, _DRY_RUN.value)
    summary.update(bench_runs=runs, bench=rows, auto=auto)
    (out / "bench.txt").write_text(table(rows, auto))
    print(table(rows, auto), file=sys.stderr)
  if "recipes" in _PHASES.value:
    summary["recipes"] = recipe_phase(work, clock, env, _DRY_RUN.value)
    for spec, r in summary["recipes"].items():
      print(f"recipe {spec}: {r['final']} in {r['seconds']} s", file=sys.stderr)
  summary["seconds"] = round(_BUDGET.value - clock.left(), 1)
  (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
  print(json.dumps({"seconds": summary["seconds"], "out": str(out)}))


if __name__ == "__main__":
  app.run(main)
