"""The run's metrics log: rows in `<workdir>/metrics.jsonl`, TensorBoard, progress on stderr.

One JSON object per line with `step`, `split` and `elapsed_s` (the run's wall time, summed
over resumed sessions); train rows carry loss, grad_norm, lr and tokens_per_s, evaluation
rows the task's figures. Every JSON jaxrnn prints or writes is strict JSON (`dumps`): a
figure that is not finite (a gradient norm that overflowed) is written as the string "inf",
"-inf" or "nan", which Python's float() reads back. `Log` is the one place rows go: the JSONL file always, and the same
numbers as TensorBoard scalars (`<split>/<figure>` against step) in event files beside it when
tensorboardX is installed (`train.tensorboard`). Progress is a tqdm bar on a terminal and
plain lines otherwise.
"""

import contextlib
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Iterator

from jaxrnn import UserError

EVENTS = "events.out.tfevents.*"  # TensorBoard's event file names, in the workdir


def finite_json(value: Any) -> Any:
  """`value` with every float that is not finite replaced by its name ("inf", "-inf", "nan")."""
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if isinstance(value, dict):
    return {k: finite_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [finite_json(v) for v in value]
  return value


def dumps(value: Any) -> str:
  """Strict JSON (`finite_json`): what every jaxrnn file and stdout line holds."""
  return json.dumps(finite_json(value), allow_nan=False)


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


@contextlib.contextmanager
def _without_torch() -> Iterator[None]:
  """Makes `import torch` fail inside, unless torch is imported already. tensorboardX imports
  torch when it can (only to accept its tensors, which jaxrnn never passes), and torch would
  bring its own OpenMP runtime into the training process (docs/speed.md: a run sharing its
  cores then slowed 15-fold)."""
  if "torch" in sys.modules:
    yield
    return
  sys.modules["torch"] = None  # the import system's mark for "not importable"
  try:
    yield
  finally:
    del sys.modules["torch"]


def _tensorboardx() -> Any:
  """The tensorboardX module, imported without torch; None when it is not installed."""
  try:
    with _without_torch():
      import tensorboardX  # the [tensorboard] extra: event files without TensorFlow
  except ImportError:
    return None
  return tensorboardX


def check_events(wanted: bool | None) -> None:
  """Refuses `train.tensorboard=True` where tensorboardX is missing, before a run starts."""
  if wanted and _tensorboardx() is None:
    raise UserError("train.tensorboard=True needs tensorboardX: pip install -e '.[tensorboard]'"
                    ", or set train.tensorboard=False")


def open_events(workdir: pathlib.Path, wanted: bool | None) -> Any:
  """A tensorboardX SummaryWriter on `workdir`, its earlier event files removed (the caller
  writes the rows it keeps again), or None when TensorBoard is off (`wanted` False) or
  tensorboardX is missing and was not required (`wanted` None, said once on stderr)."""
  if wanted is False:
    return None
  check_events(wanted)
  tensorboardx = _tensorboardx()
  if tensorboardx is None:
    print("note: no TensorBoard curves (metrics.jsonl only): pip install -e '.[tensorboard]' to "
          "write them, or set train.tensorboard=False to silence this", file=sys.stderr)
    return None
  for old in workdir.glob(EVENTS):
    old.unlink()
  return tensorboardx.SummaryWriter(str(workdir), flush_secs=10)


class Speed:
  """Training tokens/s between train rows, counting only the time spent in training steps."""

  def __init__(self, step: int, tokens_per_step: int):
    self.since, self.tokens_per_step, self.seconds = step, tokens_per_step, 0.0
    self.resume()

  def resume(self) -> None:
    self.mark = time.perf_counter()

  def pause(self) -> None:
    self.seconds += time.perf_counter() - self.mark

  def rate(self, step: int) -> float:
    rate = (step - self.since) * self.tokens_per_step / self.seconds
    self.since, self.seconds = step, 0.0
    return rate


def _with_evaluations(rows: list[dict[str, Any]],
                      evaluations: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """`rows` with each of `evaluations` that they lack put back in step order (after the train
  row of its step)."""
  have = {(r["step"], r["split"]) for r in rows}
  lost = [r for r in evaluations if (r["step"], r["split"]) not in have]
  if not lost:
    return rows
  return sorted(rows + lost, key=lambda r: (r["step"], r["split"] != "train"))


class Log:
  """Context manager over metrics.jsonl, TensorBoard events and the progress display, closed
  on every path.

  On resume, rows past the restored step (written after the last checkpoint) are dropped,
  since those steps run again, and evaluation rows up to it that the file lost (a line torn
  by a crash) are written again from `evaluations`, the checkpoint's copy of them; the event
  files are written anew from the rows kept, so a curve continues without a point twice. Only the main process of a multi-host run writes
  (`enabled`). `tensorboard`: `train.tensorboard` (None: when tensorboardX is installed).
  """

  def __init__(self, workdir: pathlib.Path, steps: int, resumed_at: int = 0, enabled: bool = True,
               tensorboard: bool | None = None, evaluations: list[dict[str, Any]] = ()):
    self.path, self.steps, self.resumed_at, self.enabled = (
        pathlib.Path(workdir) / "metrics.jsonl", steps, resumed_at, enabled)
    self.evaluations = list(evaluations)
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
      kept = _with_evaluations([r for r in rows if r["step"] <= self.resumed_at],
                               [r for r in self.evaluations if r["step"] <= self.resumed_at])
      _write_atomically(self.path, "".join(dumps(r) + "\n" for r in kept))
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

  def write(self, row: dict[str, Any]) -> dict[str, Any]:
    """Appends one row (with `elapsed_s`), shows it, and returns it as written."""
    row = {**row, "elapsed_s": round(self.elapsed_before + time.perf_counter() - self.start, 3)}
    if not self.enabled:
      return row
    self.file.write(dumps(row) + "\n")
    self.file.flush()
    self._add_scalars(row)
    if row["split"] == "train" and self.bar is not None:
      self.bar.update(row["step"] - self.bar.n)
      self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
    else:
      self.note(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in row.items()))
    return row
