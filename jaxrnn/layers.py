"""Running cells over time: `jax.lax.scan` with the input projection hoisted, stacks, dropout.

This is the only module that loops over time. Public functions take batch-major arrays
(xs<float>[b, t, d]); inside, the scan runs time-major ([t, b, ...]). Cells whose step is
linear in the state (`Cell.log_linear`) run as a parallel scan instead.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxrnn.cells import Carry, Cell, Params


def run(cell: Cell, params: Params, carry: Carry, xs: jax.Array, *,
        reset: jax.Array | None = None, unroll: int = 1) -> tuple[Carry, jax.Array]:
  """Runs `cell` over xs<float>[b, t, d] -> (final carry, ys<float>[b, t, h]).

  reset<bool>[b, t], optional: where True, the carry is zeroed (the initial carry) before that
  step, e.g. at a document boundary. `unroll` is passed to `lax.scan`. A cell with `log_linear`
  runs as a parallel scan (`linear_scan`) over more than one step; one step (sampling) is a
  plain `recur`.
  """
  gx = cell.project(params, jnp.swapaxes(xs, 0, 1))  # [t, b, g]: one product for all steps
  if cell.log_linear is not None and gx.shape[0] > 1:
    hs = linear_scan(*cell.log_linear(gx), carry,
                     None if reset is None else jnp.swapaxes(reset, 0, 1))
    return hs[-1], jnp.swapaxes(hs, 0, 1)
  if reset is None:
    carry, ys = jax.lax.scan(lambda c, g: cell.recur(params, c, g), carry, gx, unroll=unroll)
  else:
    def body(c, inputs):
      g, r = inputs
      c = jax.tree.map(lambda a: jnp.where(r[:, None], jnp.zeros_like(a), a), c)
      return cell.recur(params, c, g)
    carry, ys = jax.lax.scan(body, carry, (gx, jnp.swapaxes(reset, 0, 1)), unroll=unroll)
  return carry, jnp.swapaxes(ys, 0, 1)


def linear_scan(log_a: jax.Array, log_b: jax.Array, h0: jax.Array,
                reset: jax.Array | None = None) -> jax.Array:
  """The states hs<float>[t, b, h] of h_t = a_t * h_{t-1} + b_t from h0<float>[b, h].

  log_a, log_b<float>[t, b, h] (b_t > 0). `jax.lax.associative_scan` composes the steps in
  O(log t) depth, each run of steps kept in log space as (log of its product of a, log of its
  input-driven sum) and composed with logaddexp: nothing overflows, a long product of small
  a_t underflows to 0 as it should, and no large cumulative sums are subtracted (the cumsum /
  logcumsumexp form of Feng et al. 2024's appendix loses precision that way on long
  sequences). h0 is added in linear space because a carried state may be negative.
  reset<bool>[t, b]: a_t = 0 there, so that step starts from a zero state.
  """
  if reset is not None:
    log_a = jnp.where(reset[..., None], -jnp.inf, log_a)

  def compose(earlier, later):
    (a1, b1), (a2, b2) = earlier, later
    return a1 + a2, jnp.logaddexp(a2 + b1, b2)

  log_prod_a, log_sum = jax.lax.associative_scan(compose, (log_a, log_b))
  return jnp.exp(log_prod_a) * h0 + jnp.exp(log_sum)


def reverse_valid(xs: jax.Array, lengths: jax.Array) -> jax.Array:
  """xs<[b, t, ...]> with each row's first lengths[b] steps in reverse order; padding stays put."""
  t = jnp.arange(xs.shape[1])
  source = jnp.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)  # [b, t]
  return jnp.take_along_axis(xs, source.reshape(source.shape + (1,) * (xs.ndim - 2)), axis=1)


def run_bidirectional(cell: Cell, params: dict[str, Params], carry: tuple[Carry, Carry],
                      xs: jax.Array, *, lengths: jax.Array,
                      unroll: int = 1) -> tuple[tuple[Carry, Carry], jax.Array]:
  """Runs `cell` both ways over xs<float>[b, t, d] -> (carries, ys<float>[b, t, 2h]).

  params and carry hold one entry per direction ('fwd', 'bwd' and a pair). The backward
  direction reads each row's valid steps lengths[b] - 1, ..., 0, so it never starts on padding;
  its outputs are put back in step order, so ys[:, s] is (forward, backward) at step s. The
  forward direction's outputs at valid steps never depend on the padding after them.
  """
  carry_f, ys_f = run(cell, params["fwd"], carry[0], xs, unroll=unroll)
  carry_b, ys_b = run(cell, params["bwd"], carry[1], reverse_valid(xs, lengths), unroll=unroll)
  return (carry_f, carry_b), jnp.concatenate([ys_f, reverse_valid(ys_b, lengths)], axis=-1)


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
              reset: jax.Array | None = None, unroll: int = 1, bidirectional: bool = False,
              lengths: jax.Array | None = None) -> tuple[list[Carry], jax.Array]:
  """Runs stacked layers over xs<float>[b, t, d] -> (carries, ys<float>[b, t, h]).

  Dropout is applied between layers (to the input of layers 2..n) when `rng` (one key, or
  keys<key>[b]) is given. `bidirectional` layers (`run_bidirectional`: params and carries per
  direction, ys<float>[b, t, 2h]) read each row's first lengths<int>[b] steps backwards (all t
  steps when lengths is None); `reset` is for one direction only.
  """
  if not bidirectional:
    run_layer = functools.partial(run, reset=reset)
  elif reset is None:
    lengths = jnp.full(xs.shape[:1], xs.shape[1]) if lengths is None else lengths
    run_layer = functools.partial(run_bidirectional, lengths=lengths)
  else:
    raise ValueError("reset is not supported for bidirectional layers")
  n = len(layer_params)
  keys = split_rows(rng, n, xs.shape[0]) if rng is not None else [None] * n
  new_carries = []
  for i, (params, carry) in enumerate(zip(layer_params, carries)):
    if i > 0:
      xs = dropout(xs, dropout_rate, keys[i])
    carry, xs = run_layer(cell, params, carry, xs, unroll=unroll)
    new_carries.append(carry)
  return new_carries, xs
