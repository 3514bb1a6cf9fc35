"""The run's metrics log: rows in `<workdir>/metrics.jsonl`, TensorBoard, progress on stderr.

One JSON object per line with `step`, `split` and `elapsed_s` (the run's wall time, summed
over resumed sessions); train rows carry loss, grad_norm, lr and tokens_per_s, evaluation
rows the task's figures. `Log` is the one place rows go: the JSONL file always, and the same
numbers as TensorBoard scalars (`<split>/<figure>` against step) in event files beside it when
tensorboardX is installed (`train.tensorboard`). Progress is a tqdm bar on a terminal and
plain lines otherwise.
"""

import json
import os
import pathlib
import sys
import time
from typing import Any

from jaxrnn import UserError

EVENTS = "events.out.tfevents.*"  # TensorBoard's event file names, in the workdir


def read_rows(path: pathlib.Path) -> tuple[list[dict[str, Any]], int]:
  """(rows, lines dropped) of a metrics.jsonl: a line that is not a JSON object (one cut short
  by a crash or a full disk mid-write) is dropped rather than jamming every later start."""
  rows, dropped = [], 0
  for line in pathlib.Path(path).read_text(errors="replace").splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      row = None
    if isinstance(row, dict) and "step" in row:
      rows.append(row)
    elif line.strip():
      dropped += 1
  return rows, dropped


def _write_atomically(path: pathlib.Path, text: str) -> None:
  """Replaces `path` with `text` in one rename, so a crash leaves the old file or the new one."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def scalars(row: dict[str, Any]) -> dict[str, float]:
  """A row's TensorBoard scalars: every number but the step (the x axis) and elapsed_s (the
  event's wall time), tagged `<split>/<figure>`."""
  return {f"{row['split']}/{k}": v for k, v in row.items() if k not in ("step", "elapsed_s")
          and isinstance(v, (int, float)) and not isinstance(v, bool)}


def open_events(workdir: pathlib.Path, wanted: bool | None) -> Any:
  """A tensorboardX SummaryWriter on `workdir`, its earlier event files removed (the caller
  writes the rows it keeps again), or None when TensorBoard is off (`wanted` False) or
  tensorboardX is missing and was not required (`wanted` None, said once on stderr)."""
  if wanted is False:
    return None
  try:
    import tensorboardX  # the [tensorboard] extra: event files without TensorFlow
  except ImportError:
    if wanted:
      raise UserError("train.tensorboard=True needs tensorboardX: pip install -e '.[tensorboard]'"
                      ", or set train.tensorboard=False") from None
    print("note: no TensorBoard curves (metrics.jsonl only): pip install -e '.[tensorboard]' to "
          "write them, or set train.tensorboard=False to silence this", file=sys.stderr)
    return None
  for old in workdir.glob(EVENTS):
    old.unlink()
  return tensorboardX.SummaryWriter(str(workdir), flush_secs=10)


class Log:
  """Context manager over metrics.jsonl, TensorBoard events and the progress display, closed
  on every path.

  On resume, rows past the restored step (written after the last checkpoint) are dropped,
  since those steps run again; the event files are written anew from the rows kept, so a
  curve continues without a point twice. Only the main process of a multi-host run writes
  (`enabled`). `tensorboard`: `train.tensorboard` (None: when tensorboardX is installed).
  """

  def __init__(self, workdir: pathlib.Path, steps: int, resumed_at: int = 0, enabled: bool = True,
               tensorboard: bool | None = None):
    self.path, self.steps, self.resumed_at, self.enabled = (
        pathlib.Path(workdir) / "metrics.jsonl", steps, resumed_at, enabled)
    self.tensorboard = tensorboard
    self.file, self.bar, self.events = None, None, None
    self.start, self.elapsed_before = time.perf_counter(), 0.0

  def __enter__(self) -> "Log":
    if not self.enabled:
      return self
    kept = []
    if self.path.exists():
      rows, dropped = read_rows(self.path)
      if dropped:
        print(f"note: dropped {dropped} unreadable line(s) of {self.path} (a write cut short)",
              file=sys.stderr)
      kept = [r for r in rows if r["step"] <= self.resumed_at]
      _write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
      self.elapsed_before = max((r.get("elapsed_s", 0.0) for r in kept), default=0.0)
    self.file = open(self.path, "a")
    self.events = open_events(self.path.parent, self.tensorboard)
    self.wall_start = time.time() - self.elapsed_before  # events' wall time: start + elapsed_s
    for row in kept:
      self._add_scalars(row)
    if sys.stderr.isatty():
      import tqdm  # the usual progress bar; only on an interactive terminal
      self.bar = tqdm.tqdm(total=self.steps, initial=self.resumed_at, file=sys.stderr,
                           dynamic_ncols=True)
    return self

  def __exit__(self, *exc: Any) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.events is not None:
      self.events.close()
    if self.file is not None:
      self.file.close()

  def _add_scalars(self, row: dict[str, Any]) -> None:
    if self.events is not None:
      for tag, value in scalars(row).items():
        self.events.add_scalar(tag, value, row["step"],
                               walltime=self.wall_start + row.get("elapsed_s", 0.0))

  def note(self, text: str) -> None:
    """A line of progress (above the bar, if there is one)."""
    if self.enabled:
      (self.bar.write if self.bar else lambda s: print(s, file=sys.stderr))(text)

  def write(self, row: dict[str, Any]) -> None:
    """Appends one row (with `elapsed_s`) and shows it."""
    if not self.enabled:
      return
    row = {**row, "elapsed_s": round(self.elapsed_before + time.perf_counter() - self.start, 3)}
    self.file.write(json.dumps(row) + "\n")
    self.file.flush()
    self._add_scalars(row)
    if row["split"] == "train" and self.bar is not None:
      self.bar.update(row["step"] - self.bar.n)
      self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
    else:
      self.note(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in row.items()))
