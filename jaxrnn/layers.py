"""Running cells over time: `jax.lax.scan` with the input projection hoisted, stacks, dropout.

This is the only module that loops over time. Public functions take batch-major arrays
(xs<float>[b, t, d]); inside, the scan runs time-major ([t, b, ...]).
"""

from typing import Sequence

import jax
import jax.numpy as jnp

from jaxrnn.cells import Carry, Cell, Params


def run(cell: Cell, params: Params, carry: Carry, xs: jax.Array, *,
        reset: jax.Array | None = None, unroll: int = 1) -> tuple[Carry, jax.Array]:
  """Runs `cell` over xs<float>[b, t, d] -> (final carry, ys<float>[b, t, h]).

  reset<bool>[b, t], optional: where True, the carry is zeroed (the initial carry) before that
  step, e.g. at a document boundary. `unroll` is passed to `lax.scan`.
  """
  gx = cell.project(params, jnp.swapaxes(xs, 0, 1))  # [t, b, g]: one product for all steps
  if reset is None:
    carry, ys = jax.lax.scan(lambda c, g: cell.recur(params, c, g), carry, gx, unroll=unroll)
  else:
    def body(c, inputs):
      g, r = inputs
      c = jax.tree.map(lambda a: jnp.where(r[:, None], jnp.zeros_like(a), a), c)
      return cell.recur(params, c, g)
    carry, ys = jax.lax.scan(body, carry, (gx, jnp.swapaxes(reset, 0, 1)), unroll=unroll)
  return carry, jnp.swapaxes(ys, 0, 1)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity when `rng` is None (evaluation) or `rate` is 0."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def run_stack(cell: Cell, layer_params: Sequence[Params], carries: Sequence[Carry], xs: jax.Array,
              *, dropout_rate: float = 0.0, rng: jax.Array | None = None,
              reset: jax.Array | None = None, unroll: int = 1) -> tuple[list[Carry], jax.Array]:
  """Runs stacked layers over xs<float>[b, t, d] -> (carries, ys<float>[b, t, h]).

  Dropout is applied between layers (to the input of layers 2..n) when `rng` is given.
  """
  keys = jax.random.split(rng, len(layer_params)) if rng is not None else [None] * len(layer_params)
  new_carries = []
  for i, (params, carry) in enumerate(zip(layer_params, carries)):
    if i > 0:
      xs = dropout(xs, dropout_rate, keys[i])
    carry, xs = run(cell, params, carry, xs, reset=reset, unroll=unroll)
    new_carries.append(carry)
  return new_carries, xs
