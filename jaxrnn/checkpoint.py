"""Checkpoints with orbax: everything a run needs to continue exactly, restored safely.

`<workdir>/checkpoints/<step>/` holds two items:
  state  the train state (its PRNG key as raw key data), the carried hidden state of every
         training lane, and the data iterator's position;
  meta   JSON: the config, the vocabulary, the step and the run's history (`HISTORY`: its
         validation rows, the validation losses NT-ASGD reads, the divergence guard's running
         level), so a run restores and continues from its workdir alone.
Orbax writes each checkpoint into a temporary directory and renames it once complete, so a
crash mid-save never leaves a partial checkpoint behind as the latest one. `resume` continues
a run in its workdir; `load_run` reads a run back for evaluation and sampling.
"""

import contextlib
import copy
import dataclasses
import json
import logging
import os
import pathlib
import signal
import socket
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from jaxrnn import UserError, blocks, config as config_lib, data, kernels, layers

# Config fields a resumed run must keep although they may leave every shape as it was: the
# model's kind, what the saved data position (batches drawn) points at, the optimizer's kind.
# Every field that shapes the params, the optimizer state or the carried state is found by
# `check_compatible` from the shapes themselves, so that no new field can be forgotten here.
FROZEN_FIELDS = ("task", "model.cell", "model.block", "data.corpus", "data.tokens",
                 "data.batch_size", "data.seq_len", "train.optimizer", "train.asgd_patience")
Shapes = Callable[[ml_collections.ConfigDict], Any]  # config -> its abstract state (config.shapes)
HISTORY = ("val_rows", "val_losses", "guard")  # meta lists a resumed run continues


class _NoMetricsNote(logging.Filter):
  """Drops orbax's "Requested `tracked_metric`; did not provide metrics" warning: a checkpoint
  saved without a validation (ckpt_every off the eval_every grid) is meant to have none."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoMetricsNote())


def manager(workdir: str | os.PathLike, keep: int = 3) -> ocp.CheckpointManager:
  """The run's checkpoint manager: keeps the `keep` latest steps plus the best by val loss.

  Safe to build beside a run training in the same workdir (see `_listed`).
  """
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=keep),
      checkpoint_managers.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, best_fn=lambda m: m["val_loss"], best_mode="min",
      # Synchronous: the next train step donates the state's buffers.
      enable_async_checkpointing=False)
  directory = pathlib.Path(workdir).resolve() / "checkpoints"
  return _listed(lambda: ocp.CheckpointManager(directory, options=options,
                                               item_names=("state", "meta")), directory)


def _saved_form(state: Any, carry: Any) -> dict[str, Any]:
  """The state item: the PRNG key as raw key data, which orbax can store."""
  return {"train": state.replace(rng=jax.random.key_data(state.rng)), "carry": carry}


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """A checkpoint's contents as host copies, taken at its step and written later (`write`)."""
  step: int
  arrays: Any
  meta: dict[str, Any]
  val_loss: float | None


def snapshot(state: Any, carry: Any, position: int, config: Any, vocab: data.Vocab,
             val_loss: float | None = None, history: dict[str, Any] | None = None) -> Snapshot:
  """The checkpoint of `state.step`, copied to the host now (the next train step may donate
  the state's buffers). `val_loss` (if measured at this step) ranks the best; `history` is the
  run's record that resuming needs besides the state (`RunHistory` fields: the validation
  rows, NT-ASGD's validation losses, the guard's running level)."""
  step = int(state.step)
  meta = {"step": step, "position": position, "config": json.loads(config.to_json()),
          "vocab": json.loads(vocab.to_json()), **(history or {})}
  arrays = jax.tree.map(lambda x: np.array(x, copy=True),
                        jax.device_get(_saved_form(state, carry)))
  return Snapshot(step, arrays, meta, val_loss)


def write(mngr: ocp.CheckpointManager, snap: Snapshot) -> None:
  """Writes a snapshot as the checkpoint of its step (orbax writes from process 0)."""
  try:
    mngr.save(snap.step, args=ocp.args.Composite(state=ocp.args.StandardSave(snap.arrays),
                                                 meta=ocp.args.JsonSave(snap.meta)),
              metrics=None if snap.val_loss is None else {"val_loss": snap.val_loss}, force=True)
  except Exception as e:  # orbax wraps the OSError of a full or read-only disk in other types
    if not _caused_by_os_error(e):
      raise
    raise UserError(f"could not write the checkpoint at step {snap.step} in {mngr.directory} "
                    f"({e}); the checkpoints before it are intact: free space (or fix "
                    "permissions) and run the same command again") from None


def save(mngr: ocp.CheckpointManager, state: Any, carry: Any, position: int, config: Any,
         vocab: data.Vocab, val_loss: float | None = None,
         history: dict[str, Any] | None = None) -> None:
  """`write(mngr, snapshot(...))`: saves a checkpoint at `state.step` now."""
  write(mngr, snapshot(state, carry, position, config, vocab, val_loss, history))


def _caused_by_os_error(e: BaseException | None) -> bool:
  while e is not None:
    if isinstance(e, OSError) or "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def _warn(message: str) -> None:
  print(message, file=sys.stderr)


def _candidates(mngr: ocp.CheckpointManager, step: int | str, flag: str = "--step") -> list[int]:
  """Steps to try, newest first: all of them for 'latest', just one for 'best' or a number.

  `flag`: how the user asked for `step`, for the errors."""
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    raise UserError(f"no checkpoint in {mngr.directory}; train first, or check --workdir")
  if step == "latest":
    return steps
  if step != "best" and not str(step).isdigit():
    raise UserError(f"{flag} must be a step number, 'best' or 'latest', got {step!r}")
  if step == "best" and mngr.best_step() is None:
    raise UserError(f"no checkpoint in {mngr.directory} has been validated yet, so none is the "
                    f"best; use {flag} latest (or a step number: saved steps {steps})")
  wanted = mngr.best_step() if step == "best" else int(step)
  if wanted not in steps:
    raise UserError(f"no checkpoint for step {step} in {mngr.directory}; saved steps: {steps}")
  return [wanted]


def _is_closed_loop(exc: BaseException) -> bool:
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _silence_closed_loop_errors() -> None:
  """During and after a failed restore, tensorstore's I/O threads still finishing report to orbax's
  already-closed asyncio loop, and each prints a 'RuntimeError: Event loop is closed'
  traceback (over a hundred lines, all harmless). Drop exactly those from this process."""
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook
  if getattr(excepthook, "_jaxrnn_filter", False):
    return

  def quiet_excepthook(kind, value, tb):
    if not _is_closed_loop(value):
      excepthook(kind, value, tb)

  def quiet_unraisablehook(unraisable):
    if not _is_closed_loop(unraisable.exc_value):
      unraisablehook(unraisable)

  quiet_excepthook._jaxrnn_filter = True
  sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook


def _listed(list_steps: Callable[[], Any], where: Any) -> Any:
  """`list_steps()` (a manager built or reloaded), tried again while a run training in the
  workdir rotates a step away between orbax's listing of the step directories and its stat of
  one (a FileNotFoundError)."""
  for _ in range(5):
    try:
      return list_steps()
    except FileNotFoundError:
      time.sleep(0.2)
  raise UserError(f"the checkpoints in {where} kept changing while they were listed (a run is "
                  "saving there); try again")


def _first_readable(mngr: ocp.CheckpointManager, step: int | str, args: Any,
                    flag: str = "--step") -> dict[str, Any]:
  """Restores `args` from the newest readable candidate step, reporting each damaged one.

  A step that disappears while being read was rotated away by a run still training in this
  workdir: it is passed over quietly (and the steps listed again if every candidate went).
  """
  _silence_closed_loop_errors()  # before the first try: a failing one prints while it fails
  for _ in range(3):
    candidates, vanished = _candidates(mngr, step, flag), False
    for s in candidates:
      try:
        restored = mngr.restore(s, args=args)
      except Exception as e:  # orbax and tensorstore raise many types for damaged files
        if not (pathlib.Path(mngr.directory) / str(s)).exists():
          vanished = True
          continue
        _warn(f"checkpoint at step {s} is unreadable ({type(e).__name__}: {str(e)[:200]})")
        continue
      if s != candidates[0]:
        _warn(f"restored the older checkpoint at step {s}")
      return restored
    if not vanished:
      break
    _listed(mngr.reload, mngr.directory)
  raise UserError(f"no readable checkpoint in {mngr.directory} (tried steps {candidates}); if a "
                  "run is training in this workdir, try again once it has saved, else train "
                  "afresh in a new --workdir")


def _move_aside_newer(mngr: ocp.CheckpointManager, step: int, why: str) -> None:
  """Moves the step directories newer than `step` into <workdir>/damaged/, so that training
  can write those steps again; says where each went, and `why`."""
  directory = pathlib.Path(mngr.directory)
  for newer in sorted(s for s in mngr.all_steps() if s > step):
    target = directory.parent / "damaged" / str(newer)
    while target.exists():
      target = target.with_name(target.name + "+")
    target.parent.mkdir(exist_ok=True)
    os.replace(directory / str(newer), target)
    _warn(f"moved the {why} checkpoint at step {newer} to {target}")
  mngr.reload()


def restore(mngr: ocp.CheckpointManager, state: Any, carry: Any, step: int | str = "latest",
            flag: str = "--step") -> tuple[Any, Any, dict[str, Any]]:
  """(state, carry, meta) of a checkpoint, shaped like `state` and `carry` (arrays or abstract).

  With step 'latest', an unreadable checkpoint (truncated or corrupt files) is reported and
  the next older one is tried.
  """
  template = jax.eval_shape(_saved_form, state, carry)
  restored = _first_readable(mngr, step, ocp.args.Composite(
      state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()), flag)
  saved = restored["state"]
  train = saved["train"].replace(rng=jax.random.wrap_key_data(saved["train"].rng))
  return train, saved["carry"], restored["meta"]


def read_meta(mngr: ocp.CheckpointManager, step: int | str = "latest",
              flag: str = "--step") -> dict[str, Any]:
  """The JSON item (step, position, config, vocab, history) of a checkpoint."""
  return _first_readable(mngr, step, ocp.args.Composite(meta=ocp.args.JsonRestore()),
                         flag)["meta"]


def config_and_vocab(meta: dict[str, Any]) -> tuple[ml_collections.ConfigDict, data.Vocab]:
  """The run's config (merged onto today's defaults) and vocabulary from a checkpoint's meta."""
  return (config_lib.from_saved(meta["config"]),
          data.Vocab.from_json(json.dumps(meta["vocab"])))


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """Every field of `config` by its dotted name."""
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _shaped(shapes: Shapes, config: ml_collections.ConfigDict) -> Any:
  """The structure, shapes and dtypes of what `config` trains; None if it cannot be built."""
  try:
    abstract = shapes(config)
  except Exception:  # a field changed alone may leave no valid model: it shapes one
    return None
  return jax.tree.structure(abstract), [(x.shape, x.dtype) for x in jax.tree.leaves(abstract)]


def check_compatible(saved: ml_collections.ConfigDict, config: Any, shapes: Shapes) -> None:
  """Refuses to resume with a config that changes one of FROZEN_FIELDS, or any field that
  changes the shape of the params, the optimizer state or the carried state (each
  field that differs is tried alone on the saved config); names the field and both values."""
  before_all, now_all = _leaves(saved), _leaves(config)
  changed = [f for f in now_all if f in before_all and before_all[f] != now_all[f]]
  shaping = [f for f in changed if f in FROZEN_FIELDS]
  if not shaping and changed:
    want = _shaped(shapes, saved)
    if _shaped(shapes, config) != want:
      for field in changed:
        alone = copy.deepcopy(saved)
        *path, leaf = field.split(".")
        node = alone
        for part in path:
          node = node[part]
        with node.ignore_type():
          node[leaf] = now_all[field]
        if _shaped(shapes, alone) != want:
          shaping.append(field)
      shaping = shaping or changed  # only together: name them all
  if shaping:
    field = shaping[0]
    also = f" (and {', '.join(shaping[1:])})" if shaping[1:] else ""
    raise UserError(f"{field} is {now_all[field]!r}{also} but the checkpoint in this workdir was "
                    f"trained with {before_all[field]!r}; keep it, or use a new --workdir")


def resume(mngr: ocp.CheckpointManager, state: Any, carry: Any, config: Any,
           vocab: data.Vocab, shapes: Shapes) -> tuple[Any, Any, int, dict[str, list]]:
  """(state, carry, data position, history) of the checkpoint to continue from; the inputs, 0
  and an empty history if there is none. `history` has a list per HISTORY key.

  That checkpoint is the latest readable one, or `train.resume_step` ('best' or a step number)
  when the latest was not itself written by a run started from there: then the steps after
  it are moved aside (into <workdir>/damaged/, by the main process), so that the run trains
  past them, and later runs of the same command resume from the latest again. Refuses a
  config or vocabulary the checkpoint was not trained with (`check_compatible`; `shapes` gives
  a config's abstract params, optimizer state and carry). Unreadable steps newer than the one
  restored are moved aside too.
  """
  if mngr.latest_step() is None:
    return state, carry, 0, {key: [] for key in HISTORY}
  flag = "train.resume_step"
  latest_config, saved_vocab = config_and_vocab(read_meta(mngr, "latest", flag))
  check_compatible(latest_config, config, shapes)
  if saved_vocab.tokens != vocab.tokens:
    raise UserError("the corpus' vocabulary differs from the one this workdir's checkpoint was "
                    "trained with; use the same corpus, or a new --workdir")
  wanted = config.train.resume_step
  if latest_config.train.resume_step == wanted:
    wanted = "latest"  # a run started from train.resume_step wrote the latest: go on from it
  state, carry, meta = restore(mngr, state, carry, wanted, flag)
  if jax.process_index() == 0:
    _move_aside_newer(mngr, meta["step"], "unreadable" if wanted == "latest" else
                      f"newer (train.resume_step={wanted})")
  _warn(f"resuming from the checkpoint at step {meta['step']}")
  return state, carry, meta["position"], {key: list(meta.get(key, [])) for key in HISTORY}


def load_run(workdir: str | os.PathLike, step: int | str = "latest"
             ) -> tuple[ml_collections.ConfigDict, data.Vocab, Any, int]:
  """(config, vocab, params, step) of a saved run, from its workdir alone.

  The whole checkpoint is read (so damage anywhere in it is found, and with step 'latest' the
  next older one is tried), in the structure it was saved in; the params are returned, or
  their NT-ASGD average once averaging has started (what the run evaluated). Parameters that
  are not all finite (a checkpoint of a run that diverged, written before the guard) are
  refused in one line.
  """
  if not pathlib.Path(workdir, "checkpoints").is_dir():
    raise UserError(f"no checkpoints in {workdir}: not a jaxrnn workdir, or it never saved one")
  mngr = manager(workdir)
  restored = _first_readable(mngr, step, ocp.args.Composite(
      state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  config, vocab = config_and_vocab(restored["meta"])
  saved_step = restored["meta"]["step"]
  _impl_here(config)
  train = restored["state"]["train"]
  averaged = train["opt_state"] if config.train.asgd_patience > 0 else {}
  params = averaged["mean"] if averaged.get("count", 0) > 0 else train["params"]
  if not all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params)):
    older = sorted(s for s in mngr.all_steps() if s < saved_step)
    raise UserError(f"the checkpoint at step {saved_step} in {mngr.directory} has non-finite "
                    "parameters (its run diverged); "
                    + (f"read an older one with --step (saved: {older})" if older else
                       "no older checkpoint is saved: train again"))
  params = jax.tree.map(jnp.asarray, params)
  return config, vocab, params, saved_step


def _impl_here(config: ml_collections.ConfigDict) -> None:
  """A saved model.impl this machine cannot run (cudnn trained on a GPU, read on a CPU; onednn
  where the kernel is not built) becomes auto, with one note: the implementations agree to
  1e-5. A kernel missing here is said by `kernels.warn_fallback`, which auto then leaves unsaid."""
  cell, impl = blocks.cell(config.model), config.model.impl
  try:
    layers.check(cell, impl)
  except UserError as e:
    if impl in kernels.LAYERS and kernels.unavailable(impl):
      kernels.warn_fallback(impl)
    else:
      print(f"note: {e}; running this checkpoint with model.impl=auto", file=sys.stderr)
    config.model.impl = "auto"


def prepare_workdir(workdir: str | os.PathLike) -> pathlib.Path:
  """The run's directory, created if need be; a UserError if it cannot hold a run."""
  if not str(workdir).strip():
    raise UserError("--workdir is empty; name a directory for the run, e.g. runs/lstm")
  path = pathlib.Path(workdir)
  for part, what in ((path, "--workdir"), (path / "checkpoints", "its checkpoints")):
    if part.exists() and not part.is_dir():
      raise UserError(f"{what} {part} is a file, not a directory; use another --workdir")
  try:
    path.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=path).close()  # a unique name: every process of a run checks
  except OSError as e:
    raise UserError(f"cannot write to --workdir {path} ({e.strerror}); use a writable "
                    "directory") from None
  return path


def _try_lock(f: Any) -> bool:
  """Locks the open file `f` for this process without waiting: False if another holds it.
  flock on Linux and macOS, msvcrt on Windows; where neither exists, a note and no lock."""
  try:
    import fcntl
  except ImportError:  # Windows
    fcntl = None
  if fcntl is not None:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return True
    except BlockingIOError:
      return False
  try:
    import msvcrt
  except ImportError:
    _warn("note: this platform has no file locks: make sure one run at a time trains in a "
          "workdir")
    return True
  f.seek(0)
  try:
    msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    return True
  except OSError:
    return False


@contextlib.contextmanager
def workdir_lock(workdir: pathlib.Path, enabled: bool = True) -> Iterator[None]:
  """Holds <workdir>/lock while one run trains there: a second run is refused, naming the
  first. The OS drops the lock when its holder exits, however it exits (SIGKILL, a crash), so
  a dead run's lock never blocks the next one. Only the main process of a run locks."""
  if not enabled:
    yield
    return
  with open(workdir / "lock", "a+") as f:
    if not _try_lock(f):
      f.seek(0)
      try:
        holder = f.read().strip() or "another process"
      except OSError:  # Windows: the locked byte cannot be read
        holder = "another process"
      raise UserError(f"{workdir} is in use by a training run ({holder}); wait for it to end, "
                      "or use another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    yield  # closing the file releases the lock


class Preemption:
  """Context: the first SIGTERM/SIGINT sets `requested` (save, then stop); a second exits now."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.requested:
      os._exit(128 + signum)
    self.requested = True
    _warn(f"received {signal.Signals(signum).name}: saving a checkpoint after this step "
          "(send it again to exit at once)")

  def __enter__(self) -> "Preemption":
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
