"""Plots learning curves of one or more runs from their metrics.jsonl.

  python scripts/plot.py --workdir runs/lstm runs/gru --out docs/curves.png

The validation figure of the runs' task (perplexity for a language model, accuracy for a
classifier) and the training loss, each against step and against wall time; runs are
labelled by cell, block (unless the default stack) and size from their config.json. `--out`'s
missing directories are created; an existing directory takes curves.png. Needs matplotlib (the
[plot] extra).
"""

import json
import pathlib
import sys

from absl import flags

from jaxrnn import UserError, cli, metrics

_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir; more may follow as arguments.",
                               required=True)
_OUT = flags.DEFINE_string("out", "curves.png", "Where to write the PNG; a directory that "
                           "exists: curves.png in it.")

# The validation figure plotted for each task, and its axis label.
VAL_FIGURE = {"lm": ("perplexity", "validation perplexity"),
              "classify": ("accuracy", "validation accuracy")}


def _config(workdir: pathlib.Path) -> dict:
  path = workdir / "config.json"
  if not path.is_file():
    raise UserError(f"no config.json in {workdir}: not a jaxrnn workdir")
  return json.loads(path.read_text())


def _label(config: dict, workdir: pathlib.Path) -> str:
  model = config["model"]
  # A residual LSTM is no stack of LSTMs; a config.json from before model.block is a stack.
  block = "" if model.get("block", "stack") == "stack" else f" {model['block']}"
  return f"{model['cell']}{block} {model['num_layers']}x{model['hidden_size']} ({workdir.name})"


def _rows(workdir: pathlib.Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  rows = metrics.read_rows(path)[0] if path.is_file() else []
  if not rows:
    raise UserError(f"no metrics in {workdir}: expected {path} from scripts/train.py")
  return rows


def main(argv: list[str]) -> None:
  workdirs = [pathlib.Path(w) for w in [_WORKDIR.value, *argv[1:]]]
  runs, task_names = {}, set()
  for w in workdirs:
    rows = _rows(w)  # first: a workdir without metrics is the error to report
    config = _config(w)
    task_names.add(config.get("task", "lm"))
    runs[_label(config, w)] = rows
  if len(task_names) > 1:
    raise UserError(f"the runs are of different tasks ({', '.join(sorted(task_names))}): plot "
                    "each task's runs separately")
  try:
    import matplotlib
  except ImportError:
    raise UserError("scripts/plot.py needs matplotlib: pip install -e '.[plot]'") from None
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  val_key, val_label = VAL_FIGURE[task_names.pop()]
  fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharey="row")
  for label, rows in runs.items():
    for row_axes, split, key in ((axes[0], "val", val_key), (axes[1], "train", "loss")):
      picked = [r for r in rows if r["split"] == split and isinstance(r.get(key), (int, float))]
      marker = "o" if len(picked) == 1 else None  # a run validated once: a point, not a line
      for ax, x in zip(row_axes, ("step", "elapsed_s")):
        ax.plot([r.get(x, 0.0) for r in picked], [r[key] for r in picked], label=label,
                marker=marker)
  for row_axes, name in zip(axes, (val_label, "training loss (nats)")):
    row_axes[0].set_ylabel(name)
    row_axes[0].set_xlabel("step")
    row_axes[1].set_xlabel("wall time (s)")
  axes[0][0].legend()
  fig.tight_layout()
  out = pathlib.Path(_OUT.value)
  if out.is_dir():  # else matplotlib would write <dir>.png beside it
    out /= "curves.png"
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=80)
  print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
