"""The divergence guard: which training states are sane enough to become checkpoints, and
the message that stops a run that diverged.

A state (the parameters after step s) is *sane* when the first loss measured with its
parameters is finite and at most

    bound = max(level, chance) + chance

where `chance` is the loss of guessing uniformly (log of the vocabulary or of the classes,
`task.chance_loss`) and `level` the median of the run's last `WINDOW` sane training losses
(its running level, saved with each checkpoint so a resumed run judges as a straight one).
That first loss is the validation loss when the run validates at step s, else the training
loss of step s + 1, which is computed with the parameters of step s. So a checkpoint is
written one step after its state, once that loss is in (`hold`, then `measured`): a state
whose next loss blew up is never written, and the last written checkpoint is one a run can
resume from. A loss of NaN or inf, or an update that leaves a parameter non-finite, stops the
run at once (`Diverged`), naming the checkpoints there are and how to resume.

A healthy run stays far below the bound: its training loss falls from about `chance` and
varies from batch to batch by a fraction of it (the tests run the quickstart, the PTB and
Shakespeare configs shortened, and every healthy case of the suite under it).
"""

import collections
import math
import statistics
from typing import Any, Callable

from jaxrnn import UserError

WINDOW = 50  # training losses in the running level


class Diverged(UserError):
  """The run's loss or parameters turned non-finite: a one-line error with what to do."""


def diverged(what: str, train_config: Any, saved: list[int]) -> Diverged:
  """The guard's error: what diverged, the checkpoints there are, and how to go on."""
  c = train_config
  fix = (f"turn gradient clipping on (--config.train.clip_norm=1.0; 0 is off) or lower "
         f"--config.train.lr (now {c.lr})" if c.clip_norm == 0 else
         f"lower --config.train.lr (now {c.lr}) or --config.train.clip_norm (now {c.clip_norm})")
  if not saved:
    return Diverged(f"{what}; no checkpoint was saved before it: {fix} and run again")
  earlier = (f" (or add --config.train.resume_step=N to resume from an earlier step N of "
             f"{', '.join(map(str, saved[:-1]))})" if len(saved) > 1 else "")
  return Diverged(f"{what}; nothing after the checkpoint of step {saved[-1]} was saved: "
                        f"{fix} and run again to resume from step {saved[-1]}{earlier}")


class Guard:
  """Checks each step's read-back metrics, holds a checkpoint until a loss of its parameters is
  in, then writes it (`write`) if that loss is sane, or says why it is not written (`note`).

  chance: the loss of a uniform guess; recent: the last sane training losses (oldest first),
  from the checkpoint a run resumes from; advice(what) -> the Diverged error for `what`.
  """

  def __init__(self, chance: float, recent: list[float], write: Callable[[Any], None],
               note: Callable[[str], None], advice: Callable[[str], Diverged]):
    self.chance, self.write, self.note, self.advice = chance, write, note, advice
    self.recent = collections.deque(recent, maxlen=WINDOW)
    self.held: tuple[int, Any] | None = None  # (step, snapshot) waiting for a loss

  @property
  def waiting(self) -> bool:
    """A checkpoint is held: the next step's loss must be read back."""
    return self.held is not None

  def bound(self) -> float:
    """The largest sane loss now."""
    level = statistics.median(self.recent) if self.recent else self.chance
    return max(level, self.chance) + self.chance

  def history(self) -> list[float]:
    """The running level's losses, for the checkpoint's meta."""
    return list(self.recent)

  def steps(self, first: int, rows: list[dict[str, Any]]) -> None:
    """The read-back metrics of steps first, first + 1, ... (loss, grad_norm, params_finite).

    Raises Diverged at the first non-finite loss or parameters; each loss otherwise judges the
    held checkpoint of the step before it, then joins the running level if it is sane.
    """
    for step, row in enumerate(rows, first):
      loss = float(row["loss"])
      if not math.isfinite(loss):
        self._diverged(f"the training loss is {loss} at step {step}")
      if not row["params_finite"]:
        self._diverged(f"the update at step {step} made the parameters non-finite (loss "
                       f"{loss:.4g}, gradient norm {float(row['grad_norm']):.4g})")
      sane = self.measured(step - 1, loss, "training loss of step " + str(step))
      if sane:
        self.recent.append(loss)

  def measured(self, step: int, loss: float, what: str) -> bool:
    """A loss of the parameters of `step`: writes that step's held checkpoint if it is sane, or
    drops it with a note. Returns whether the loss is sane."""
    sane = math.isfinite(loss) and loss <= self.bound()
    if self.held is not None and self.held[0] == step:
      _, snapshot = self.held
      self.held = None
      if sane:
        self.write(snapshot)
      else:
        self.note(f"not saving the checkpoint of step {step}: the {what}, {loss:.4g} nats, is "
                  f"far above the run's level (a sane loss is at most {self.bound():.3g})")
    return sane

  def hold(self, step: int, snapshot: Any) -> None:
    """Keeps the checkpoint of `step` until `measured` judges its parameters."""
    self.held = (step, snapshot)

  def _diverged(self, what: str) -> None:
    self.held = None  # its parameters led here: never written
    raise self.advice(what)
