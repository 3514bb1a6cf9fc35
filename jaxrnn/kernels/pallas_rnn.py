"""A whole-layer recurrence for GPUs in Pallas (Triton): lstm, gru, rnn_tanh, rnn_relu.

`pallas_layer` follows the kernel contract of `jaxrnn.kernels` (batch-major xs<float>[b, t, d]
-> (carry, ys<float>[b, t, h]), PyTorch's equations, products with `dtype` operands and float32
sums) and splits the work as jaxrnn's CPU core does: everything parallel in time is one large
product in XLA (gx = xs W_ih + b before the kernel; dW_ih, dW_hh, db, dx after it), and only
the sequential part runs in the kernel, under one custom VJP.

Forward. One `pallas_call` per layer: its grid runs over tiles of `block_b` rows of the batch
(rows never meet, so the programs never wait for each other) and each program loops over all
t steps inside the kernel. A step computes gh = h_prev W_hh (operands in `dtype`, float32
sums), adds gx[t], applies the gates and writes h_t (and c_t) and the gate values the
backward needs. The state lives in the outputs themselves: hs[:, s] is h_s (hs[:, 0] the
carry in), so each step reads slot s and writes slot s + 1. That double buffer lets a step
that does not fit one program's registers loop over chunks of `block_h` units (the columns
of W_hh for those units in every gate, the contraction over h in slices of `block_h` as well)
without any chunk reading a half-updated state; a barrier between steps makes the threads'
writes visible to each other. Where one chunk covers the layer, W_hh is loaded once before
the time loop and held on chip (in registers, where Triton keeps loop-invariant values);
otherwise every step reads it again (from L2, where it fits). Two things this form does not
do: spread one batch tile's step over several thread blocks (that needs a grid-wide barrier
per step) and split the batch finer than 16 rows (Triton's dot needs every side >= 16), so a
small batch keeps few of the GPU's SMs busy.

Backward. A second kernel of the same form runs time in reverse: per step, first the gates'
gradients dG[:, t] for all units (pointwise, from the saved gate values), then, after a
barrier, the recurrent gradient dh_prev = dG_h[:, t] W_hh^T + (the GRU's) dh z, into the other
slot of a two-slot buffer. Then dW_ih = X^T dG, dW_hh = H_prev^T dG_h, db = sum dG (the GRU's
b_hn = sum of dG_h's n block) and dx = dG W_ih^T are single products over all b * t rows in
XLA. The GRU's dG_h differs from dG in its n block (r * dn), as in the core.

Shapes for Triton: every loaded block is a power of two, so h is padded to hp (a power of two,
at least 16) in every gate, and the batch to a multiple of `block_b`, with zeros (see `_pad`);
the outputs are sliced back. float32 products, in the kernels and in XLA, ask for IEEE
float32 (a GPU's default for float32 is TF32, 10 bits of mantissa). On a CPU the same kernels
run in Pallas' interpreter.
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxrnn.cells import Carry, Params

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
# The gate values a training forward keeps per unit and step for the backward: the LSTM's
# (i, f, g, o), the GRU's (r, z, n, W_hn h + b_hn); an Elman RNN's h_t is enough.
SAVED = {"lstm": 4, "gru": 4, "rnn_tanh": 0, "rnn_relu": 0}
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
BLOCK_B = 16  # batch rows per program: the least a Triton dot takes
# Units per chunk (and the contraction's slice). Compiled for sm_90a by Triton 3.9 and ptxas
# 13 (outside jax, no GPU needed), every kernel at 32 keeps within its registers (at most 197
# a thread, 4 warps); at 64 the float32 forwards of the LSTM and GRU spill (in chunks; the
# LSTM resident at h = 64 too).
BLOCK_H = 32
_WHOLE = ("w", "b_hn")  # inputs every program reads whole; the rest are tiled by batch rows


class _Layout(NamedTuple):
  """The static plan of one layer's kernels."""
  family: str
  dtype: jnp.dtype  # the products' operands
  interpret: bool
  bb: int  # batch rows per program
  hp: int  # h padded: a power of two >= 16
  bh: int  # units per chunk (divides hp)

  @property
  def resident(self) -> bool:
    """One chunk covers the layer: W_hh stays in registers for the whole time loop."""
    return self.bh == self.hp


# ----------------------------------------------------------------------------- the kernels

def _loop(lay: _Layout, n: int, body: Callable, init: Any = None) -> Any:
  """init after body(i * bh, carry) for i < n: unrolled with static offsets when the layer
  is resident (n is 1 or the gate count), else a loop in the kernel."""
  if lay.resident:
    for i in range(n):
      init = body(i * lay.bh, init)
    return init
  return jax.lax.fori_loop(0, n, lambda i, c: body(pl.multiple_of(i * lay.bh, lay.bh), c), init)


def _weights(lay: _Layout, ref) -> Callable:
  """tile(row, col) -> the [bh, bh] block of `ref` at those offsets: loaded once, before the
  time loop, where the layer is resident (offsets then static), else read where it is used."""
  if not lay.resident:
    return lambda r, c: ref[pl.ds(r, lay.bh), pl.ds(c, lay.bh)]
  rows, cols = ref.shape
  tiles = {(r, c): ref[pl.ds(r, lay.bh), pl.ds(c, lay.bh)]
           for r in range(0, rows, lay.bh) for c in range(0, cols, lay.bh)}
  return lambda r, c: tiles[r, c]


def _product(lay: _Layout, lhs: Callable, tile: Callable, depth: int,
             cols: list) -> list[jax.Array]:
  """[sum over r of lhs(r) @ tile(r, c) for each c in cols]: [bb, bh] each, lhs(r) the [bb, bh]
  slice of the left side at contraction offset r < depth; `dtype` operands, float32 sums."""
  def add(r, acc):
    a = lhs(r).astype(lay.dtype)
    # HIGHEST: IEEE float32 products in Triton (its default is TF32); bfloat16 is unaffected.
    return [s + jnp.dot(a, tile(r, c), precision=jax.lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32) for s, c in zip(acc, cols)]
  zeros = [jnp.zeros((lay.bb, lay.bh), jnp.float32) for _ in cols]
  return _loop(lay, depth // lay.bh, add, zeros)


def _gate(lay: _Layout, k: int, j) -> pl.Slice:
  """Gate k of the units j..j + bh in a row of G * hp (gate-major, as W_hh's columns)."""
  return pl.ds(k * lay.hp + j, lay.bh)


def _sync(lay: _Layout) -> None:
  """A barrier across the program's threads: what they wrote before it, all read after it.
  The interpreter runs one thread."""
  if not lay.interpret:
    plgpu.debug_barrier()


def _forward_kernel(lay: _Layout, ins: dict, outs: dict) -> None:
  """One batch tile over all steps: hs[:, s + 1] (cs) from hs[:, s] (cs) and gx[:, s]."""
  family, hp, bh = lay.family, lay.hp, lay.bh
  gates, steps = GATES[family], ins["gx"].shape[1]
  hs, cs, saved = outs["hs"], outs.get("cs"), outs.get("saved")
  tile = _weights(lay, ins["w"])

  def carry_in(j, _):
    u = pl.ds(j, bh)
    hs[:, 0, u] = ins["h0"][:, u]
    if cs is not None:
      cs[:, 0, u] = ins["c0"][:, u]

  _loop(lay, hp // bh, carry_in)
  _sync(lay)

  def step(s, _):
    def chunk(j, _):
      u = pl.ds(j, bh)
      gx = [ins["gx"][:, s, _gate(lay, k, j)] for k in range(gates)]
      gh = _product(lay, lambda r: hs[:, s, pl.ds(r, bh)], tile, hp,
                    [k * hp + j for k in range(gates)])
      if family == "lstm":
        i, f, o = (jax.nn.sigmoid(gx[k] + gh[k]) for k in (0, 1, 3))
        g = jnp.tanh(gx[2] + gh[2])
        c = f * cs[:, s, u] + i * g
        h, kept = o * jnp.tanh(c), (i, f, g, o)
        cs[:, s + 1, u] = c
      elif family == "gru":
        r, z = (jax.nn.sigmoid(gx[k] + gh[k]) for k in (0, 1))
        hn = gh[2] + ins["b_hn"][u][None, :]
        n = jnp.tanh(gx[2] + r * hn)
        h, kept = (1.0 - z) * n + z * hs[:, s, u], (r, z, n, hn)
      else:
        pre = gx[0] + gh[0]
        h = jnp.tanh(pre) if family == "rnn_tanh" else jnp.maximum(pre, 0.0)
        kept = ()
      hs[:, s + 1, u] = h
      if saved is not None:
        for k, value in enumerate(kept):
          saved[:, s, _gate(lay, k, j)] = value

    _loop(lay, hp // bh, chunk)
    _sync(lay)  # step s + 1 reads all of hs[:, s + 1]

  jax.lax.fori_loop(0, steps, step, None)


def _backward_kernel(lay: _Layout, ins: dict, outs: dict) -> None:
  """One batch tile over all steps in reverse: dG[:, s] and the state's gradients, which
  alternate between the two slots of dhs (dcs): step s reads slot (s + 1) % 2, writes s % 2."""
  family, hp, bh = lay.family, lay.hp, lay.bh
  gates, steps = GATES[family], ins["d_ys"].shape[1]
  d_gx, dhs, dcs = outs["d_gx"], outs["dhs"], outs.get("dcs")
  d_gh = outs.get("d_gh", d_gx)  # what W_hh^T multiplies
  saved = ins.get("saved")
  tile = _weights(lay, ins["w"])  # W_hh^T<G * hp, hp>

  def carry_in(j, _):
    u = pl.ds(j, bh)
    dhs[:, steps % 2, u] = ins["d_h"][:, u]
    if dcs is not None:
      dcs[:, steps % 2, u] = ins["d_c"][:, u]

  _loop(lay, hp // bh, carry_in)
  _sync(lay)

  def step(n, _):
    s = steps - 1 - n
    new = jax.lax.rem(s, 2)
    old = 1 - new
    d_h = lambda u: ins["d_ys"][:, s, u] + dhs[:, old, u]  # dL/dh_{s+1}

    def gate_grads(j, _):
      u = pl.ds(j, bh)
      dh = d_h(u)
      kept = [saved[:, s, _gate(lay, k, j)] for k in range(SAVED[family])]
      if family == "lstm":
        i, f, g, o = kept
        tc = jnp.tanh(ins["cs"][:, s + 1, u])
        dc = dcs[:, old, u] + dh * o * (1.0 - tc * tc)
        grads = [dc * g * i * (1.0 - i), dc * ins["cs"][:, s, u] * f * (1.0 - f),
                 dc * i * (1.0 - g * g), dh * tc * o * (1.0 - o)]
        dcs[:, new, u] = dc * f
      elif family == "gru":
        r, z, n, hn = kept
        dn = dh * (1.0 - z) * (1.0 - n * n)
        grads = [dn * hn * r * (1.0 - r), dh * (ins["hs"][:, s, u] - n) * z * (1.0 - z), dn]
        for k, value in enumerate(grads[:2] + [dn * r]):
          d_gh[:, s, _gate(lay, k, j)] = value
      else:
        h = ins["hs"][:, s + 1, u]
        grads = [dh * (1.0 - h * h) if family == "rnn_tanh" else jnp.where(h > 0.0, dh, 0.0)]
      for k, value in enumerate(grads):
        d_gx[:, s, _gate(lay, k, j)] = value

    def recurrent(j, _):
      u = pl.ds(j, bh)
      [dh_prev] = _product(lay, lambda r: d_gh[:, s, pl.ds(r, bh)], tile, gates * hp, [j])
      if family == "gru":  # h_prev's own path: h = (1 - z) n + z h_prev
        dh_prev += d_h(u) * saved[:, s, _gate(lay, 1, j)]
      dhs[:, new, u] = dh_prev

    _loop(lay, hp // bh, gate_grads)
    _sync(lay)  # the product reads every unit's dG_h
    _loop(lay, hp // bh, recurrent)
    _sync(lay)  # step s - 1 reads all of dhs[:, new]

  jax.lax.fori_loop(0, steps, step, None)


def _call(lay: _Layout, kernel: Callable, ins: dict, outs: dict) -> dict:
  """kernel(lay, ins, outs) over the batch tiles: arrays batch-major, each program's block
  its tile of rows; `_WHOLE` inputs (weights) whole for every program."""
  def block(name, shape):
    if name in _WHOLE:
      return pl.BlockSpec(shape, lambda i: (0,) * len(shape))
    return pl.BlockSpec((lay.bb, *shape[1:]), lambda i: (i,) + (0,) * (len(shape) - 1))

  return pl.pallas_call(
      functools.partial(kernel, lay), out_shape=outs,
      grid=(next(iter(outs.values())).shape[0] // lay.bb,),
      in_specs=({k: block(k, v.shape) for k, v in ins.items()},),
      out_specs={k: block(k, v.shape) for k, v in outs.items()},
      interpret=lay.interpret, compiler_params=plgpu.CompilerParams(num_warps=4),
      name=f"{lay.family}_{kernel.__name__.strip('_')}")(ins)


# ------------------------------------------------------------------------------- padding

def _pad(x: jax.Array, lay: _Layout, gates: int = 1, rows: bool = True) -> jax.Array:
  """x<[b, ..., gates * h]> -> [bp, ..., gates * hp] (rows=False: the first axis stays), each
  gate's block padded with zeros on its own.

  Zeros keep the real units exact in every family: W_hh's padded rows (the padded units' h)
  and columns (their gates) are zero, so no real unit reads a padded one, neither in h W_hh
  nor in dG W_hh^T. The padded units stay at zero themselves (every pre-activation 0: tanh 0
  = relu 0 = 0; the LSTM's c = sigmoid(0) c + sigmoid(0) tanh 0 from c = 0, the GRU's
  h = (1 - z) tanh 0 + z h from h = 0), and their zero cotangents give zero gradients.
  Padded batch rows are rows of their own, sliced off."""
  h = x.shape[-1] // gates
  x = x.reshape(*x.shape[:-1], gates, h)
  widths = [(0, 0)] * x.ndim
  widths[-1] = (0, lay.hp - h)
  if rows:
    widths[0] = (0, -x.shape[0] % lay.bb)
  x = jnp.pad(x, widths)
  return x.reshape(*x.shape[:-2], gates * lay.hp)


def _w_hh(params: Params, lay: _Layout) -> jax.Array:
  """W_hh<h, G h> -> <hp, G hp> in `dtype`, zero rows and columns for the padded units."""
  w = _pad(params["w_hh"], lay, GATES[lay.family], rows=False)
  return jnp.pad(w, ((0, lay.hp - w.shape[0]), (0, 0))).astype(lay.dtype)


def _states(lay: _Layout, carry: Carry) -> tuple[jax.Array, ...]:
  return tuple(carry) if lay.family == "lstm" else (carry,)


def _carry(lay: _Layout, states: tuple[jax.Array, ...]) -> Carry:
  return tuple(states) if lay.family == "lstm" else states[0]


# ------------------------------------------------------------------------------ the layer

_f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)


def _matmul(a: jax.Array, b: jax.Array, dtype: Any) -> jax.Array:
  """a @ b in XLA with `dtype` operands and float32 sums, as `cells.matmul`, but float32 as
  IEEE float32 on a GPU too (XLA's default there is TF32), like the kernels' products."""
  return jnp.matmul(a.astype(dtype), b.astype(dtype), precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)


def _forward(lay: _Layout, train: bool, params: Params, carry: Carry, xs: jax.Array):
  """-> (hs<[bp, t + 1, hp]>, cs (LSTM) or None, saved<[bp, t, 4 hp]> (training LSTM, GRU) or
  None), all padded."""
  family, states = lay.family, _states(lay, carry)
  gx = _matmul(xs, params["w_ih"], lay.dtype) + params["b"]  # [b, t, g]: one product
  ins = {"gx": _pad(gx, lay, GATES[family]), "w": _w_hh(params, lay), "h0": _pad(states[0], lay)}
  if family == "lstm":
    ins["c0"] = _pad(states[1], lay)
  if family == "gru":
    ins["b_hn"] = _pad(params["b_hn"], lay, rows=False)
  bp, t = ins["gx"].shape[:2]
  outs = {"hs": _f32(bp, t + 1, lay.hp)}
  if family == "lstm":
    outs["cs"] = _f32(bp, t + 1, lay.hp)
  if train and SAVED[family]:
    outs["saved"] = _f32(bp, t, SAVED[family] * lay.hp)
  res = _call(lay, _forward_kernel, ins, outs)
  return res["hs"], res.get("cs"), res.get("saved")


def _outputs(lay: _Layout, xs: jax.Array, h: int, hs: jax.Array, cs: jax.Array | None):
  """(carry, ys<[b, t, h]>) from the padded hs and cs."""
  b, t = xs.shape[:2]
  states = (hs[:b, t, :h],) + (() if cs is None else (cs[:b, t, :h],))
  return _carry(lay, states), hs[:b, 1:, :h]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _layer(lay: _Layout, params: Params, carry: Carry, xs: jax.Array):
  """One layer: the forward kernel without the saved gates."""
  hs, cs, _ = _forward(lay, False, params, carry, xs)
  return _outputs(lay, xs, params["w_hh"].shape[0], hs, cs)


def _layer_fwd(lay, params, carry, xs):
  hs, cs, saved = _forward(lay, True, params, carry, xs)
  return _outputs(lay, xs, params["w_hh"].shape[0], hs, cs), (params, xs, hs, cs, saved)


def _layer_bwd(lay, residuals, cotangents):
  """The backward kernel's dG<[b, t, g]> (and the GRU's dG_h), then every weight gradient
  and dx as one product over all b * t rows, as the core's `_core_bwd`."""
  params, xs, hs, cs, saved = residuals
  d_carry, d_ys = cotangents
  family, gates = lay.family, GATES[lay.family]
  b, t, d = xs.shape
  h = params["w_hh"].shape[0]
  d_states = _states(lay, d_carry)
  ins = {"w": _w_hh(params, lay).T, "d_ys": _pad(d_ys, lay), "d_h": _pad(d_states[0], lay)}
  if family == "lstm":
    ins.update(cs=cs, d_c=_pad(d_states[1], lay))
  else:
    ins["hs"] = hs
  if saved is not None:
    ins["saved"] = saved
  bp = hs.shape[0]
  outs = {"d_gx": _f32(bp, t, gates * lay.hp), "dhs": _f32(bp, 2, lay.hp)}
  if family == "gru":
    outs["d_gh"] = outs["d_gx"]
  if family == "lstm":
    outs["dcs"] = _f32(bp, 2, lay.hp)
  res = _call(lay, _backward_kernel, ins, outs)

  def rows(a):  # padded [bp, t, G hp] -> [b * t, G h]
    return a[:b].reshape(b, t, gates, lay.hp)[..., :h].reshape(b * t, gates * h)

  d_gx = rows(res["d_gx"])
  d_gh = rows(res["d_gh"]) if family == "gru" else d_gx
  h_prev = hs[:b, :t, :h].reshape(b * t, h)
  grads = {"w_ih": _matmul(xs.reshape(b * t, d).T, d_gx, lay.dtype),
           "w_hh": _matmul(h_prev.T, d_gh, lay.dtype), "b": d_gx.sum(0)}
  if family == "gru":
    grads["b_hn"] = d_gh[:, 2 * h:].sum(0)
  d_xs = _matmul(d_gx, params["w_ih"].T, lay.dtype).reshape(b, t, d)
  d_carry0 = [res[k][:b, 0, :h] for k in ("dhs", "dcs") if k in res]
  return grads, _carry(lay, d_carry0), d_xs


_layer.defvjp(_layer_fwd, _layer_bwd)


def pallas_layer(family: str, params: Params, carry: Carry, xs: jax.Array,
                 dtype: Any = jnp.float32, *, interpret: bool | None = None,
                 block_b: int = BLOCK_B, block_h: int = BLOCK_H) -> tuple[Carry, jax.Array]:
  """A `family` layer over xs<float>[b, t, d] from `carry` (h<float32>[b, h], the LSTM's
  (h, c)) -> (carry, ys<float32>[b, t, h]), in Pallas kernels; products with `dtype`
  operands (float32 or bfloat16) and float32 sums; differentiable.

  interpret: run Pallas' interpreter (None: unless JAX's default backend is a GPU).
  block_b, block_h: batch rows per program and units per chunk, powers of two >= 16.
  """
  if family not in GATES:
    raise ValueError(f"the Pallas kernel runs {', '.join(GATES)}, not {family!r}")
  if jnp.dtype(dtype) not in DTYPES:
    raise ValueError(f"the Pallas kernel takes float32 or bfloat16 operands, not "
                     f"{jnp.dtype(dtype).name}")
  if any(n < 16 or n & (n - 1) for n in (block_b, block_h)):
    raise ValueError(f"block_b and block_h must be powers of two >= 16, not {block_b}, "
                     f"{block_h}")
  b, t, _ = xs.shape
  h = params["w_hh"].shape[0]
  if t == 0:  # no step to run, and blocks of size 0 that Triton could not load
    return carry, jnp.zeros((b, 0, h), jnp.float32)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  hp = max(16, pl.next_power_of_2(h))
  lay = _Layout(family, jnp.dtype(dtype), interpret, block_b, hp, min(block_h, hp))
  return _layer(lay, params, carry, xs.astype(jnp.float32))
