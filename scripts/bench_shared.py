"""python scripts/bench_shared.py --impls=auto,scan --steps=80 --rounds=2

Times `scripts/train.py` (the README quickstart's model, training tokens/s as it logs them) on
a machine it shares: quiet, and beside a neighbour process that keeps one core busy; with
torch not importable (as without the [dev] extra), installed but not imported (what jaxrnn
does), and imported by the user before jaxrnn (its OpenMP runtime then loads first). Each cell
runs in a fresh process; rounds are interleaved and the median is shown. A run sharing its
cores should slow down in proportion to its share of the CPU (here: about 2x beside one busy
core of two), not 15x.
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

from jaxrnn import cli, metrics, provenance

flags.DEFINE_string("impls", "auto,scan", "Comma list of model.impl values.")
flags.DEFINE_integer("steps", 80, "Training steps per run (a row every 10; the first is dropped).")
flags.DEFINE_integer("rounds", 2, "Interleaved rounds; the median is reported.")
FLAGS = flags.FLAGS

ROOT = pathlib.Path(__file__).resolve().parent.parent
# How the training process meets torch: what runs before scripts/train.py in it.
TORCH = {"absent": "import sys; sys.modules['torch'] = None",
         "installed": "pass",
         "imported first": "import torch"}
NEIGHBOUR = [sys.executable, "-c", "while True: pass"]  # one core kept busy


def _train(impl: str, torch_mode: str, workdir: pathlib.Path) -> float:
  """Median logged training tokens/s of one scripts/train.py run, after its first row."""
  code = (f"{TORCH[torch_mode]}; import runpy, sys; sys.argv = ['train.py'] + sys.argv[1:]; "
          "runpy.run_path('scripts/train.py', run_name='__main__')")
  proc = subprocess.run(
      [sys.executable, "-c", code, f"--workdir={workdir}", f"--config.model.impl={impl}",
       f"--config.train.steps={FLAGS.steps}", "--config.train.log_every=10",
       "--config.train.eval_every=0", f"--config.train.ckpt_every={FLAGS.steps}"],
      cwd=ROOT, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"train.py failed: {proc.stderr.strip().splitlines()[-1]}")
  rows = [r for r in metrics.read_rows(workdir / "metrics.jsonl")[0] if r["split"] == "train"]
  return statistics.median(r["tokens_per_s"] for r in rows[1:])


def main(argv: list[str]) -> None:
  del argv
  impls = [s for s in FLAGS.impls.split(",") if s]
  cells = [(impl, t, busy) for impl in impls for t in TORCH for busy in (False, True)]
  results = {cell: [] for cell in cells}
  with tempfile.TemporaryDirectory() as tmp:
    for round_ in range(FLAGS.rounds):
      for i, (impl, torch_mode, busy) in enumerate(cells):
        neighbour = subprocess.Popen(NEIGHBOUR) if busy else None
        try:
          results[(impl, torch_mode, busy)].append(
              _train(impl, torch_mode, pathlib.Path(tmp) / f"{round_}-{i}"))
        finally:
          if neighbour:
            neighbour.kill()
            neighbour.wait()
  print(f"machine: {provenance.cpu_name()}, {os.cpu_count()} cores")
  print(f"{'impl':6s} {'torch':15s} {'quiet tok/s':>12s} {'busy tok/s':>11s} {'slowdown':>9s}")
  table = {}
  for impl in impls:
    for torch_mode in TORCH:
      quiet = statistics.median(results[(impl, torch_mode, False)])
      busy = statistics.median(results[(impl, torch_mode, True)])
      table[f"{impl}, torch {torch_mode}"] = {"quiet": quiet, "busy": busy}
      print(f"{impl:6s} {torch_mode:15s} {quiet:12,.0f} {busy:11,.0f} {quiet / busy:8.2f}x")
  print(json.dumps(table))


if __name__ == "__main__":
  cli.run(main)
