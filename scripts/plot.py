"""Plots learning curves of one or more runs from their metrics.jsonl.

  python scripts/plot.py --workdir runs/lstm runs/gru --out docs/curves.png

Validation perplexity and training loss, each against step and against wall time; runs are
labelled by cell and size from their config.json.
"""

import json
import pathlib
import sys

from absl import app, flags

from jaxrnn import metrics

_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir; more may follow as arguments.",
                               required=True)
_OUT = flags.DEFINE_string("out", "curves.png", "Where to write the PNG.")


def _label(workdir: pathlib.Path) -> str:
  config = json.loads((workdir / "config.json").read_text())["model"]
  return f"{config['cell']} {config['num_layers']}x{config['hidden_size']} ({workdir.name})"


def _rows(workdir: pathlib.Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  rows = metrics.read_rows(path)[0] if path.is_file() else []
  if not rows:
    raise ValueError(f"no metrics in {workdir}: expected {path} from scripts/train.py")
  return rows


def main(argv: list[str]) -> None:
  import matplotlib  # the [plot] extra
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  workdirs = [pathlib.Path(w) for w in [_WORKDIR.value, *argv[1:]]]
  try:
    runs = {}
    for w in workdirs:
      rows = _rows(w)  # first: a workdir without metrics is the error to report
      runs[_label(w)] = rows
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharey="row")
  for label, rows in runs.items():
    for row_axes, split, key in ((axes[0], "val", "perplexity"), (axes[1], "train", "loss")):
      picked = [r for r in rows if r["split"] == split]
      for ax, x in zip(row_axes, ("step", "elapsed_s")):
        ax.plot([r.get(x, 0.0) for r in picked], [r[key] for r in picked], label=label)
  for row_axes, name in zip(axes, ("validation perplexity", "training loss (nats/char)")):
    row_axes[0].set_ylabel(name)
    row_axes[0].set_xlabel("step")
    row_axes[1].set_xlabel("wall time (s)")
  axes[0][0].legend()
  fig.tight_layout()
  fig.savefig(_OUT.value, dpi=80)
  print(f"wrote {_OUT.value}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
