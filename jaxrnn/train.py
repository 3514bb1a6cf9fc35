"""Training: the train state, the optimizer, one jit-compiled step, and the loop.

One loop serves every task (`jaxrnn/tasks/`, chosen by `config.task`): a task brings its data,
parameters, carried state, loss and evaluator; this module brings the optimizer (global-norm
clipping first), truncated BPTT with the carry passed from batch to batch, `parallel.pmap`
over the devices, and when to log, evaluate and save. `config` is a whole jaxrnn config;
functions that read one section say so (`train_config`).
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

from jaxrnn import UserError, checkpoint, config as config_lib, metrics, model, parallel, provenance
from jaxrnn import tasks

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


def learning_rate(train_config: Config, steps_per_epoch: int = 1) -> optax.Schedule:
  """The schedule (`train.schedule`), in optimizer steps:
    constant  lr, after an optional linear warmup from 0;
    cosine    linear warmup, then cosine decay to 0 at the last step;
    step      lr * decay_factor ** max(0, epoch + 1 - decay_after), epoch = step // steps_per_epoch
              counted from 0: Zaremba et al. 2014's `lr_decay ** max(i + 1 - max_epoch, 0)`.
  """
  c = train_config
  if c.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, c.lr, c.warmup_steps,
                                              max(c.steps, c.warmup_steps + 1))
  if c.schedule == "step":
    def step_decay(step):
      decays = jnp.maximum(0, step // steps_per_epoch + 1 - c.decay_after)
      return c.lr * jnp.power(jnp.float32(c.decay_factor), decays)
    return step_decay
  if c.warmup_steps:
    return optax.linear_schedule(0.0, c.lr, c.warmup_steps)
  return optax.constant_schedule(c.lr)


@flax.struct.dataclass
class AveragedState:
  """The optimizer state of `averaged`: the inner state and the running mean of the iterates.

  count: -1 before averaging starts (`start_averaging`), then the number of iterates in `mean`.
  """
  inner: Any
  count: jax.Array
  mean: Any


def averaged(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner`, keeping the mean of the parameters after each update once `start_averaging` has
  started it: the averaged SGD of Polyak & Juditsky 1992 as NT-ASGD uses it (torch.optim.ASGD
  with lambd=0, t0 at the trigger). The updates are `inner`'s, unchanged."""
  def init(params):
    # A copy: the mean must not share buffers with the params a donating step hands back.
    return AveragedState(inner.init(params), jnp.full((), -1, jnp.int32),
                         jax.tree.map(jnp.copy, params))

  def update(grads, state, params):
    updates, inner_state = inner.update(grads, state.inner, params)
    new = optax.apply_updates(params, updates)
    count = jnp.maximum(state.count + 1, 1)  # 1 before averaging starts: no division by 0
    mean = jax.tree.map(lambda m, p: jnp.where(count == 1, p, m + (p - m) / count), state.mean, new)
    started = state.count >= 0
    return updates, AveragedState(
        inner_state, jnp.where(started, state.count + 1, state.count),
        jax.tree.map(lambda m, old: jnp.where(started, m, old), mean, state.mean))

  return optax.GradientTransformation(init, update)


def start_averaging(state: TrainState, devs: parallel.Devices | None = None) -> TrainState:
  """The state with averaging started: the next update's parameters are the mean's first iterate.

  `devs`: the devices a replicated state lives on (None: the state is not replicated).
  """
  zero = jnp.zeros((), jnp.int32)
  return state.replace(opt_state=state.opt_state.replace(
      count=zero if devs is None else parallel.replicate(zero, devs)))


def nt_trigger(val_losses: list[float], loss: float, patience: int) -> bool:
  """NT-ASGD's non-monotone trigger (Merity et al. 2018, `main.py`): `loss` is worse than the
  best of the earlier validations `val_losses` other than the last `patience` of them."""
  return len(val_losses) > patience and loss > min(val_losses[:-patience])


def eval_params(state: TrainState) -> Any:
  """The parameters to evaluate and report: the average once averaging has started."""
  opt_state = state.opt_state
  if isinstance(opt_state, AveragedState) and int(opt_state.count) > 0:
    return opt_state.mean
  return state.params


def make_optimizer(train_config: Config, steps_per_epoch: int = 1) -> optax.GradientTransformation:
  """Global-norm clipping first, then adam / adamw / sgd (`config.OPTIMIZERS`) on the schedule;
  all of it `averaged` when `train.asgd_patience` > 0."""
  lr = learning_rate(train_config, steps_per_epoch)
  optimizers = {
      "adam": lambda: optax.adam(lr),
      "adamw": lambda: optax.adamw(lr, weight_decay=train_config.weight_decay),
      "sgd": lambda: optax.sgd(lr),
  }
  clip_norm = train_config.clip_norm
  clip = optax.clip_by_global_norm(clip_norm) if clip_norm > 0 else optax.identity()
  tx = optax.chain(clip, optimizers[train_config.optimizer]())
  return averaged(tx) if train_config.asgd_patience > 0 else tx


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
                  "lr": learning_rate(config.train, steps_per_epoch)(state.step), "params_finite": params_finite}
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


def _diverged(what: str, train_config: Config) -> UserError:
  return UserError(f"{what}; nothing after the last checkpoint was saved: lower train.lr (now "
                   f"{train_config.lr}) or train.clip_norm (now {train_config.clip_norm}) and "
                   "run again to resume from it")


def _read_back(pending: list[dict[str, jax.Array]], step: int,
               train_config: Config) -> dict[str, float]:
  """The metrics of `step` as floats, after checking the steps of `pending` (those since the
  last read-back, ending at `step`): each loss finite, and the parameters after each update."""
  host = jax.device_get([parallel.unreplicate(m) for m in pending])  # one transfer
  for i, step_metrics in enumerate(host):
    at, loss = step - len(pending) + 1 + i, float(step_metrics["loss"])
    if not math.isfinite(loss):
      raise _diverged(f"loss is {loss} at step {at}", train_config)
    if not step_metrics["params_finite"]:
      raise _diverged(f"the update at step {at} made the parameters non-finite (loss {loss:.4g}, "
                      f"gradient norm {float(step_metrics['grad_norm']):.4g})", train_config)
  return {k: float(v) for k, v in host[-1].items()}


def _check_figures(figures: dict[str, dict[str, Any]], step: int, train_config: Config) -> None:
  """Stops a run whose evaluation diverged (a non-finite loss, or a perplexity past float range)
  before its figures are saved or printed."""
  for split, row in figures.items():
    if not (math.isfinite(row["loss"]) and math.isfinite(row.get("perplexity", 0.0))):
      raise _diverged(f"the {split} loss is {row['loss']:.4g} nats at step {step}",
                      train_config)


class _Speed:
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


def _average_when_due(state: TrainState, step: int, evals: dict[str, dict[str, Any]],
                      val_losses: list[float], train_config: Config, log: metrics.Log,
                      devs: parallel.Devices) -> TrainState:
  """NT-ASGD: records the validation loss of a step on the `eval_every` grid (in `val_losses`,
  saved with each checkpoint) while averaging has not started, and starts it when
  `nt_trigger` says so. The last step's off-grid evaluation is left out, so that extending
  a finished run triggers as a straight run would."""
  patience = train_config.asgd_patience
  if patience == 0 or "val" not in evals or step % train_config.eval_every:
    return state
  if int(parallel.unreplicate(state.opt_state.count)) >= 0:
    return state
  loss = evals["val"]["loss"]
  if nt_trigger(val_losses, loss, patience):
    log.note(f"validation loss {loss:.4f} is worse than {min(val_losses[:-patience]):.4f}, the "
             f"best before the last {patience} validations: averaging the iterates after step "
             f"{step} (NT-ASGD)")
    state = start_averaging(state, devs)
  val_losses.append(loss)
  return state


def train_and_evaluate(config: Config, workdir: str) -> dict[str, Any]:
  """Trains per `config` (resuming from `workdir`'s latest checkpoint), logging to metrics.jsonl.

  The step runs under `parallel.pmap` over `train.devices` devices (one included), each with
  its block of the batch's lanes and their carried states. Returns the final validation
  figures, or {"step", "preempted": True} after a SIGTERM/SIGINT. One run at a time trains
  in a workdir (`checkpoint.workdir_lock`).
  """
  config_lib.validate(config)
  workdir = checkpoint.prepare_workdir(workdir)
  with checkpoint.workdir_lock(workdir, enabled=jax.process_index() == 0):
    return _train(config, workdir)


def _train(config: Config, workdir: pathlib.Path) -> dict[str, Any]:
  """`train_and_evaluate` in a validated config and a locked workdir."""
  task = tasks.get(config.task)
  devs = parallel.devices(config.train.devices)
  parallel.check_divisible(config.data.batch_size, devs, "data.batch_size")
  if (lanes := config.data.batch_size // devs.count) % config.train.accumulate:
    raise UserError(f"train.accumulate={config.train.accumulate} must divide each device's "
                    f"{lanes} lanes (data.batch_size={config.data.batch_size} over {devs.count} "
                    "devices); choose a divisor")
  vocab, splits = task.prepare_data(config)
  epoch = task.train_batches(splits["train"], config, 0).batches_per_epoch
  config = config_lib.in_steps(config, epoch)
  evaluate = task.make_evaluator(config, devs)
  tx = make_optimizer(config.train, epoch)
  zeros = task.initial_carry(config.model, config.data.batch_size)
  mngr = checkpoint.manager(workdir, config.train.keep)
  state, carry, position, val_losses = checkpoint.resume(
      mngr, create_train_state(config, len(vocab), tx), zeros, config, vocab)
  if devs.is_main:
    provenance.write_run_files(workdir, config, vocab, devs)
  local = lambda rows: parallel.shard(parallel.process_rows(rows, devs), devs)  # our lanes
  step_fn = parallel.pmap(functools.partial(train_step, config=config, tx=tx,
                                            steps_per_epoch=epoch, across_devices=True),
                          devs, donate_argnums=(0,))
  batches = task.train_batches(splits["train"], config, position)
  first, params_count = int(state.step) + 1, model.num_params(state.params)
  state, carry, zeros = parallel.replicate(state, devs), local(carry), local(zeros)
  start, evals, pending = time.perf_counter(), {}, []
  speed = _Speed(first - 1, config.data.batch_size * config.data.seq_len)  # padding included

  def evaluate_splits(log, step, params, names):  # log None: report without logging again
    figures = {s: evaluate(params, splits[s]) for s in names if task.size(splits[s]) > 0}
    _check_figures(figures, step, config.train)
    for split, row in figures.items() if log is not None else ():
      log.write({"step": step, "split": split, **row})
    return figures

  with metrics.Log(workdir, config.train.steps, first - 1, devs.is_main,
                   config.train.tensorboard) as log, \
      checkpoint.Preemption() as preemption:
    log.note(f"{params_count:,} parameters, vocabulary {len(vocab)}, "
             f"{task.size(splits['train']):,} training {task.UNIT}, "
             f"{devs.count} {devs.local[0].platform} device(s)")
    for step in range(first, config.train.steps + 1):
      reset, batch = next(batches)
      state, carry, step_metrics = step_fn(state, local(batch), zeros if reset else carry)
      pending.append(step_metrics)
      preempted = preemption.requested  # read once: a signal may arrive at any moment
      when = due(step, config.train, preempted)
      if not when:
        continue  # no read-back: the host runs ahead and queues the next step
      # Every log, evaluation and save comes after this read-back of all steps since the last
      # one, which waits for the step and stops a run whose loss or parameters turned
      # non-finite before anything of it is saved.
      step_metrics, pending = _read_back(pending, step, config.train), []
      speed.pause()
      if when.log:
        log.write({"step": step, "split": "train", **{k: step_metrics[k] for k in TRAIN_FIELDS},
                   "tokens_per_s": speed.rate(step)})
      if when.evaluate:
        evals = evaluate_splits(log, step, eval_params(parallel.unreplicate(state)),
                                task.FINAL_SPLITS if step == config.train.steps else ("val",))
        state = _average_when_due(state, step, evals, val_losses, config.train, log, devs)
      if when.save:
        val_loss = evals["val"]["loss"] if when.evaluate and "val" in evals else None
        checkpoint.save(mngr, parallel.unreplicate(state),
                        parallel.all_rows(parallel.unshard(carry), devs), batches.position, config,
                        vocab, val_loss=val_loss, val_losses=val_losses)
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
