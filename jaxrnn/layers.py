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


def row_keys(rng: jax.Array, rows: int) -> jax.Array:
  """keys<key>[b]: `rng` itself if it already holds one key per row, else fold_in(rng, row)."""
  if rng.ndim == 1:
    return rng
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(rows))


def split_rows(rng: jax.Array, num: int, rows: int) -> list[jax.Array]:
  """`num` independent keys<key>[b], split row by row from `rng` (see `row_keys`)."""
  keys = jax.vmap(lambda k: jax.random.split(k, num))(row_keys(rng, rows))  # [b, num]
  return [keys[:, i] for i in range(num)]


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout on x[b, ...]; the identity when `rng` is None (evaluation) or `rate` is 0.

  Each row draws its mask from its own key (`row_keys`), so a row's mask is the same however
  the batch is split across devices.
  """
  if rng is None or rate == 0.0:
    return x
  keep = jax.vmap(lambda k, row: jax.random.bernoulli(k, 1.0 - rate, row.shape))(
      row_keys(rng, x.shape[0]), x)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def run_stack(cell: Cell, layer_params: Sequence[Params], carries: Sequence[Carry], xs: jax.Array,
              *, dropout_rate: float = 0.0, rng: jax.Array | None = None,
              reset: jax.Array | None = None, unroll: int = 1) -> tuple[list[Carry], jax.Array]:
  """Runs stacked layers over xs<float>[b, t, d] -> (carries, ys<float>[b, t, h]).

  Dropout is applied between layers (to the input of layers 2..n) when `rng` (one key, or
  keys<key>[b]) is given.
  """
  n = len(layer_params)
  keys = split_rows(rng, n, xs.shape[0]) if rng is not None else [None] * n
  new_carries = []
  for i, (params, carry) in enumerate(zip(layer_params, carries)):
    if i > 0:
      xs = dropout(xs, dropout_rate, keys[i])
    carry, xs = run(cell, params, carry, xs, reset=reset, unroll=unroll)
    new_carries.append(carry)
  return new_carries, xs
