"""The optimizer chain: schedules, global-norm clipping, the optimizer, NT-ASGD's averaging.

`make_optimizer(train_config, steps_per_epoch)` builds the whole chain from the `train`
section of a config (`configs/default.py`); `learning_rate` is its schedule, which the train
step also reports. NT-ASGD (Merity et al. 2018) is a wrapper, `averaged`, whose state keeps
the running mean of the iterates once `start_averaging` has started it; `nt_trigger` is its
non-monotone condition and `eval_params` what a run evaluates and saves as its model.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

Config = Any  # ml_collections.ConfigDict


def learning_rate(train_config: Config, steps_per_epoch: int = 1) -> optax.Schedule:
  """The schedule (`train.schedule`), in optimizer steps:
    constant  lr, after an optional linear warmup from 0;
    cosine    linear warmup, then cosine decay to 0 at the last step;
    linear    linear warmup, then linear decay to 0 at the last step;
    step      lr * decay_factor ** max(0, epoch + 1 - decay_after), epoch = step // steps_per_epoch
              counted from 0: Zaremba et al. 2014's `lr_decay ** max(i + 1 - max_epoch, 0)`.
  """
  c = train_config
  if c.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, c.lr, c.warmup_steps,
                                              max(c.steps, c.warmup_steps + 1))
  if c.schedule == "linear":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, c.lr, c.warmup_steps),
         optax.linear_schedule(c.lr, 0.0, max(c.steps - c.warmup_steps, 1))], [c.warmup_steps])
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


def start_averaging(opt_state: AveragedState, count: jax.Array | None = None) -> AveragedState:
  """`opt_state` with averaging started: the next update's parameters are the mean's first
  iterate. `count`: the 0 to store, e.g. replicated over devices (default: a scalar 0)."""
  return opt_state.replace(count=jnp.zeros((), jnp.int32) if count is None else count)


def averaging_started(opt_state: Any) -> bool:
  """Whether `opt_state` (an unreplicated optimizer state) holds a mean of iterates."""
  return isinstance(opt_state, AveragedState) and int(opt_state.count) > 0


def nt_trigger(val_losses: list[float], loss: float, patience: int) -> bool:
  """NT-ASGD's non-monotone trigger (Merity et al. 2018, `main.py`): `loss` is worse than the
  best of the earlier validations `val_losses` other than the last `patience` of them."""
  return len(val_losses) > patience and loss > min(val_losses[:-patience])


def eval_params(params: Any, opt_state: Any) -> Any:
  """The parameters to evaluate and report: the average once averaging has started."""
  return opt_state.mean if averaging_started(opt_state) else params


def make_optimizer(train_config: Config, steps_per_epoch: int = 1) -> optax.GradientTransformation:
  """Global-norm clipping first, then adam / adamw / sgd (`config.OPTIMIZERS`) on the schedule;
  all of it `averaged` when `train.asgd_patience` > 0."""
  lr = learning_rate(train_config, steps_per_epoch)
  optimizers = {
      "adam": lambda: optax.adam(lr, b1=train_config.b1, b2=train_config.b2),
      "adamw": lambda: optax.adamw(lr, b1=train_config.b1, b2=train_config.b2,
                                   weight_decay=train_config.weight_decay),
      "sgd": lambda: optax.sgd(lr),
  }
  clip_norm = train_config.clip_norm
  clip = optax.clip_by_global_norm(clip_norm) if clip_norm > 0 else optax.identity()
  tx = optax.chain(clip, optimizers[train_config.optimizer]())
  return averaged(tx) if train_config.asgd_patience > 0 else tx
