"""Training: the train state, one jit-compiled step, and the loop.

One loop serves every task (`jaxrnn/tasks/`, chosen by `config.task`): a task brings its data,
parameters, carried state, loss and evaluator; `optim.py` the optimizer chain; this module
brings truncated BPTT with the carry passed from batch to batch, `parallel.pmap` over the
devices, and when to log, evaluate and save (each checkpoint once `guard.py` has found its
state sane). `config` is a whole jaxrnn config; functions that read one section say so
(`train_config`).
"""

import dataclasses
import functools
import math
import pathlib
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from jaxrnn import UserError, checkpoint, cli, config as config_lib, guard, metrics, model
from jaxrnn import optim, parallel, provenance, tasks

Config = Any  # ml_collections.ConfigDict
TRAIN_FIELDS = ("loss", "grad_norm", "lr")  # train_step's metrics, in metrics.jsonl's order
SHARED_KEY = 2**32 - 1  # folded into a step's key for its shared masks: past every row index


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def create_train_state(config: Config, vocab_size: int,
                       tx: optax.GradientTransformation) -> TrainState:
  """Fresh parameters and optimizer state from `config.train.seed`."""
  params_key, dropout_key = jax.random.split(jax.random.key(config.train.seed))
  params = tasks.get(config.task).init(params_key, config.model, vocab_size)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=dropout_key)


def train_step(state: TrainState, batch: dict[str, jax.Array], carry: Any, *, config: Config,
               tx: optax.GradientTransformation, steps_per_epoch: int = 1,
               across_devices: bool = False) -> tuple[TrainState, Any, dict[str, jax.Array]]:
  """One optimizer step on a batch of the config's task; the carry enters as a constant.

  Returns the new state, the final carry (for the next batch of the same lanes; gradients
  never flow through it, since it enters as an argument) and metrics: mean loss (nats per
  token or sentence), gradient global norm before clipping, learning rate, and whether the
  updated parameters are all finite (the NaN guard's second half). Under
  `parallel.pmap` with `across_devices`, gradients and loss are averaged over devices, and
  each row's dropout key comes from its global row index and the batch's shared masks from
  one key, so any device count gives the same step. With `train.accumulate` = k > 1 the
  batch runs as k micro-batches (`accumulate`), which changes the memory, not the step.
  """
  rows = batch["inputs"].shape[0]
  first_row = parallel.row_offset(rows) if across_devices else 0
  step_rng = jax.random.fold_in(state.rng, state.step)
  row_keys = jax.vmap(lambda i: jax.random.fold_in(step_rng, i))(first_row + jnp.arange(rows))
  shared_key = jax.random.fold_in(step_rng, SHARED_KEY)

  def loss_and_grad(params, carry, batch, row_keys):
    loss_fn = functools.partial(tasks.get(config.task).loss, carry=carry, batch=batch,
                                model_config=config.model, rng=model.Rngs(row_keys, shared_key))
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, new_carry), grads = accumulate(loss_and_grad, state.params, config.train.accumulate,
                                        carry, batch, row_keys)
  if across_devices:
    loss, grads = parallel.mean((loss, grads))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params_finite = jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(params)]))
  step_metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                  "lr": optim.learning_rate(config.train, steps_per_epoch)(state.step),
                  "params_finite": params_finite}
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, new_carry, step_metrics


def accumulate(loss_and_grad: Callable, params: Any, k: int, carry: Any,
               batch: dict[str, jax.Array], row_keys: jax.Array) -> tuple[tuple[jax.Array, Any], Any]:
  """((mean loss, carry), mean gradient) of `loss_and_grad(params, carry, batch, row_keys)`
  over k micro-batches: rows [i b/k, (i + 1) b/k) of every leaf <b, ...>, one after another in
  a `lax.scan`, so that only one micro-batch's activations are alive at a time. Each lane keeps
  its carry and dropout key, and a task's loss is a mean over equal-sized micro-batches, so
  the result is the whole batch's up to float rounding. k = 1 calls `loss_and_grad` once."""
  if k == 1:
    return loss_and_grad(params, carry, batch, row_keys)
  split = lambda tree: jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), tree)

  def micro_step(total, xs):
    (loss, carry), grads = loss_and_grad(params, *xs)
    return jax.tree.map(jnp.add, total, (loss, grads)), carry

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, grads), carries = jax.lax.scan(micro_step, zeros, split((carry, batch, row_keys)))
  carry = jax.tree.map(lambda c: c.reshape(-1, *c.shape[2:]), carries)  # lanes back in order
  return (loss / k, carry), jax.tree.map(lambda g: g / k, grads)


@dataclasses.dataclass(frozen=True)
class Due:
  """What follows a step: a train row, an evaluation, a checkpoint; false when none is."""
  log: bool
  evaluate: bool
  save: bool

  def __bool__(self) -> bool:
    return self.log or self.evaluate or self.save


def due(step: int, train_config: Config, preempted: bool = False) -> Due:
  """What is due after `step`: each every so many steps, all of them after the last."""
  last = step == train_config.steps
  every = lambda n: n > 0 and step % n == 0
  return Due(log=last or every(train_config.log_every),
             evaluate=last or every(train_config.eval_every),
             save=last or preempted or every(train_config.ckpt_every))


def _read_back(pending: list[dict[str, jax.Array]]) -> list[dict[str, float]]:
  """The metrics of the steps since the last read-back, as floats, in one transfer."""
  host = jax.device_get([parallel.unreplicate(m) for m in pending])
  return [{k: float(v) for k, v in m.items()} for m in host]


def _average_when_due(state: TrainState, step: int, evals: dict[str, dict[str, Any]],
                      val_losses: list[float], train_config: Config, log: metrics.Log,
                      devs: parallel.Devices) -> TrainState:
  """NT-ASGD: records the validation loss of a step on the `eval_every` grid (in `val_losses`,
  saved with each checkpoint) while averaging has not started, and starts it when
  `optim.nt_trigger` says so. The last step's off-grid evaluation is left out, so that
  extending a finished run triggers as a straight run would."""
  patience = train_config.asgd_patience
  if patience == 0 or "val" not in evals or step % train_config.eval_every:
    return state
  if int(parallel.unreplicate(state.opt_state.count)) >= 0:
    return state
  loss = evals["val"]["loss"]
  if optim.nt_trigger(val_losses, loss, patience):
    log.note(f"validation loss {loss:.4f} is worse than {min(val_losses[:-patience]):.4f}, the "
             f"best before the last {patience} validations: averaging the iterates after step "
             f"{step} (NT-ASGD)")
    zero = parallel.replicate(jnp.zeros((), jnp.int32), devs)
    state = state.replace(opt_state=optim.start_averaging(state.opt_state, zero))
  val_losses.append(loss)
  return state


def eval_params(state: TrainState) -> Any:
  """What an (unreplicated) state evaluates and saves as its model (`optim.eval_params`)."""
  return optim.eval_params(state.params, state.opt_state)


@dataclasses.dataclass(frozen=True)
class Run:
  """What a run needs before it touches its workdir: checked config, devices, data."""
  config: Config  # in steps (`config.in_steps`)
  task: Any
  devs: parallel.Devices
  vocab: Any
  splits: dict[str, Any]
  steps_per_epoch: int


def prepare(config: Config) -> Run:
  """Validates `config` and loads its data: everything that can refuse a run, before the
  run creates anything in its workdir."""
  config_lib.validate(config)
  metrics.check_events(config.train.tensorboard)
  task = tasks.get(config.task)
  devs = parallel.devices(config.train.devices)
  parallel.check_divisible(config.data.batch_size, devs, "data.batch_size")
  if (lanes := config.data.batch_size // devs.count) % config.train.accumulate:
    raise UserError(f"train.accumulate={config.train.accumulate} must divide each device's "
                    f"{lanes} lanes (data.batch_size={config.data.batch_size} over {devs.count} "
                    "devices); choose a divisor")
  vocab, splits = task.prepare_data(config)
  epoch = task.train_batches(splits["train"], config, 0).batches_per_epoch
  return Run(config_lib.in_steps(config, epoch), task, devs, vocab, splits, epoch)


def train_and_evaluate(config: Config, workdir: str) -> dict[str, Any]:
  """Trains per `config` (resuming from `workdir`'s checkpoint), logging to metrics.jsonl.

  The step runs under `parallel.pmap` over `train.devices` devices (`jax.jit` on one), each
  with its block of the batch's lanes and their carried states. Returns the final validation
  figures, or {"step", "preempted": True} after a SIGTERM/SIGINT. One run at a time trains
  in a workdir (`checkpoint.workdir_lock`); a run refused by its config or data creates nothing.
  """
  run = prepare(config)
  workdir = checkpoint.prepare_workdir(workdir)
  with checkpoint.workdir_lock(workdir, enabled=jax.process_index() == 0):
    return _train(run, workdir)


def _train(run: Run, workdir: pathlib.Path) -> dict[str, Any]:
  """`train_and_evaluate` of a prepared run in a locked workdir."""
  config, task, devs, vocab, splits = run.config, run.task, run.devs, run.vocab, run.splits
  evaluate = task.make_evaluator(config, devs)
  tx = optim.make_optimizer(config.train, run.steps_per_epoch)
  zeros = task.initial_carry(config.model, config.data.batch_size)
  mngr = checkpoint.manager(workdir, config.train.keep)
  shapes = functools.partial(config_lib.shapes, vocab_size=len(vocab),
                             steps_per_epoch=run.steps_per_epoch)
  state, carry, position, history = checkpoint.resume(
      mngr, create_train_state(config, len(vocab), tx), zeros, config, vocab, shapes)
  if devs.is_main:
    provenance.write_run_files(workdir, config, vocab, devs)
  local = lambda rows: parallel.shard(parallel.process_rows(rows, devs), devs)  # our lanes
  step_fn = parallel.pmap(functools.partial(train_step, config=config, tx=tx,
                                            steps_per_epoch=run.steps_per_epoch,
                                            across_devices=not devs.single),
                          devs, donate_argnums=(0,))
  batches = task.train_batches(splits["train"], config, position)
  first, params_count = int(state.step) + 1, model.num_params(state.params)
  state, carry, zeros = parallel.replicate(state, devs), local(carry), local(zeros)
  start, evals, pending = time.perf_counter(), {}, []
  speed = metrics.Speed(first - 1, config.data.batch_size * config.data.seq_len)  # padding included
  val_rows, val_losses = history["val_rows"], history["val_losses"]
  advice = lambda what: guard.diverged(what, config.train, sorted(mngr.all_steps()))

  def evaluate_splits(log, step, params, names):  # log None: report without logging again
    figures = {s: evaluate(params, splits[s]) for s in names if task.size(splits[s]) > 0}
    for split, row in figures.items():
      if not (math.isfinite(row["loss"]) and math.isfinite(row.get("perplexity", 0.0))):
        raise advice(f"the {split} loss is {row['loss']:.4g} nats at step {step}")
      if log is not None:
        val_rows.append(log.write({"step": step, "split": split, **row}))
    cli.release_freed_memory()  # the evaluation's buffers, kept since (cli.keep_freed_memory)
    return figures

  def snapshot(step_evals):
    history = {"val_rows": list(val_rows), "val_losses": list(val_losses),
               "guard": sane.history()}
    val_loss = step_evals["val"]["loss"] if "val" in step_evals else None
    return checkpoint.snapshot(parallel.unreplicate(state),
                               parallel.all_rows(parallel.unshard(carry), devs),
                               batches.position, config, vocab, val_loss, history)

  with metrics.Log(workdir, config.train.steps, first - 1, devs.is_main,
                   config.train.tensorboard, val_rows) as log, \
      checkpoint.Preemption() as preemption:
    sane = guard.Guard(task.chance_loss(config, len(vocab)), history["guard"],
                       lambda snap: checkpoint.write(mngr, snap), log.note, advice)
    log.note(f"{params_count:,} parameters, vocabulary {len(vocab)}, "
             f"{task.size(splits['train']):,} training {task.UNIT}, "
             f"{devs.count} {devs.local[0].platform} device(s)")
    for step in range(first, config.train.steps + 1):
      reset, batch = next(batches)
      state, carry, step_metrics = step_fn(state, local(batch), zeros if reset else carry)
      pending.append(step_metrics)
      preempted = preemption.requested  # read once: a signal may arrive at any moment
      when = due(step, config.train, preempted)
      if not when and not sane.waiting:
        continue  # no read-back: the host runs ahead and queues the next step
      # Every log, evaluation and save comes after this read-back of all steps since the last
      # one, which waits for the step; the guard stops a run whose loss or parameters turned
      # non-finite, and writes a held checkpoint once the loss of its parameters is in.
      rows, pending = _read_back(pending), []
      speed.pause()
      sane.steps(step - len(rows) + 1, rows)
      if when.log:
        log.write({"step": step, "split": "train", **{k: rows[-1][k] for k in TRAIN_FIELDS},
                   "tokens_per_s": speed.rate(step)})
      step_evals = {}
      if when.evaluate:
        step_evals = evals = evaluate_splits(
            log, step, eval_params(parallel.unreplicate(state)),
            task.FINAL_SPLITS if step == config.train.steps else ("val",))
        state = _average_when_due(state, step, evals, val_losses, config.train, log, devs)
      if when.save:
        sane.hold(step, snapshot(step_evals))
        if "val" in step_evals:
          sane.measured(step, step_evals["val"]["loss"], "validation loss")
        elif preempted:  # no later loss will come: saved if the run's last loss was sane
          sane.measured(step, rows[-1]["loss"], f"training loss of step {step}")
      if preempted:
        return {"step": step, "preempted": True}
      speed.resume()
    if not evals:  # the workdir's run had already finished: report it again, logged once
      evals = evaluate_splits(None, first - 1, eval_params(parallel.unreplicate(state)),
                              task.FINAL_SPLITS)

  result = {"step": int(parallel.unreplicate(state.step)), "params": params_count,
            "devices": devs.count, "seconds": round(time.perf_counter() - start, 1)}
  for split, figures in evals.items():
    result.update(task.summary(split, figures))
  return result
