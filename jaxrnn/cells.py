"""Recurrent cells as pure functions; rnn, gru and lstm with PyTorch's equations and gate order.

Shape legend (used across jaxrnn): b batch, t time, d input, h hidden, v vocabulary,
g gates * h (the width of a cell's stacked gate pre-activations).

A cell is a record of pure functions (the contract `layers.py` relies on):
  init(key, d, h) -> params            weights as in PyTorch, transposed to (in, out)
  initial_carry(b, h) -> carry          zeros; h alone, or a tuple whose first entry is h<b, h>
                                        (every leaf's first axis is the batch)
  project(params, x[..., d]) -> gx[..., g]   the part of a step that reads x alone (any leading shape)
  recur(params, carry, gx[b, g]) -> (carry, y[b, h])   the rest of one step
  step = recur . project
and, optionally, the structure a faster recurrence needs (see `Cell`): `core` with its
`recurrent_weight` and `core_reads`, `log_linear` for steps linear in the state, or a
`parallel` form of the cell's own.

Splitting `project` from `recur` lets `layers.run` do the input product for all time steps
as one matrix product outside the scan. Biases that PyTorch keeps twice (`bias_ih + bias_hh`)
are stored once as their sum, except the GRU's `b_hn`, which sits inside `r * (W_hn h + b_hn)`.
Every cell takes `compute_dtype` (the matrix products' operand dtype); its other options are
`model.*` config fields of the same name (`from_config`).

Adding a cell: write a function returning `Cell(...)` and add one line to `_REGISTRY`.
"""

import dataclasses
import inspect
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxrnn import UserError

Params = dict[str, jax.Array]
Carry = Any  # a pytree of (b, h) arrays


@dataclasses.dataclass(frozen=True)
class Cell:
  """A recurrent cell: pure `init`, `initial_carry`, `project`, `recur`; `step` composes them.

  The optional fields declare structure that lets `layers.py` run the cell faster without
  knowing its parameter names:
    core, recurrent_weight, core_reads: the step is `core(reads, carry, gx, gh)` with
      gh = hidden(carry) @ params[recurrent_weight] its one recurrent product and `reads`
      the parameters named in `core_reads`, so dW_hh can be taken outside the time loop;
    log_linear: the step is h' = a * h + b with a, b from gx alone, so the steps compose
      as a parallel scan;
    kernel: "lstm", "gru" or "rnn_<tanh|relu>" when the cell is exactly torch.nn.LSTM / nn.GRU
      / nn.RNN with the parameters `w_ih`, `w_hh`, `b` (and `b_hn`), so a whole-layer kernel
      (`jaxrnn.kernels`: jaxrnn's core, oneDNN, cuDNN) can run it;
    parallel: `parallel(params, carry, gx<t, b, g>) -> (carry, ys<t, b, h>)`, all steps at once
      with the values of scanning `recur` (for cells whose gates read x alone, in a form of
      their own: rglru's signed linear scan, mlstm's stabilized parallel form).
  """
  name: str
  init: Callable[..., Params]
  initial_carry: Callable[[int, int], Carry]
  project: Callable[[Params, jax.Array], jax.Array]
  recur: Callable[[Params, Carry, jax.Array], tuple[Carry, jax.Array]]
  core: Callable[[Params, Carry, jax.Array, jax.Array], tuple[Carry, jax.Array]] | None = None
  dtype: Any = jnp.float32  # operand dtype of the matrix products (see `matmul`)
  log_linear: Callable[[jax.Array], tuple[jax.Array, jax.Array]] | None = None
  recurrent_weight: str | None = None
  core_reads: tuple[str, ...] = ()
  kernel: str | None = None
  parallel: Callable[[Params, Carry, jax.Array], tuple[Carry, jax.Array]] | None = None

  def __post_init__(self):
    if (self.core is None) != (self.recurrent_weight is None):
      raise ValueError(f"cell {self.name!r}: `core` and `recurrent_weight` come together")

  def step(self, params: Params, carry: Carry, x: jax.Array) -> tuple[Carry, jax.Array]:
    """One time step: x<float>[b, d] -> (carry, y<float>[b, h])."""
    return self.recur(params, carry, self.project(params, x))


def _uniform(key: jax.Array, shape: tuple[int, ...], hidden_size: int) -> jax.Array:
  """PyTorch's default RNN initialisation: U(-1/sqrt(h), 1/sqrt(h))."""
  bound = 1.0 / math.sqrt(hidden_size)
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _init_gated(key: jax.Array, d: int, h: int, gates: int) -> Params:
  """w_ih<d, g>, w_hh<h, g>, b<g>, all U(-1/sqrt(h), 1/sqrt(h))."""
  k_ih, k_hh, k_b = jax.random.split(key, 3)
  return {
      "w_ih": _uniform(k_ih, (d, gates * h), h),
      "w_hh": _uniform(k_hh, (h, gates * h), h),
      "b": _uniform(k_b, (gates * h,), h),
  }


def _init_input(key: jax.Array, d: int, h: int, gates: int) -> Params:
  """w_ih<d, g>, b<g>, U(-1/sqrt(h), 1/sqrt(h)): the weights of gates that read the input alone."""
  k_ih, k_b = jax.random.split(key)
  return {"w_ih": _uniform(k_ih, (d, gates * h), h), "b": _uniform(k_b, (gates * h,), h)}


def _zeros(b: int, h: int) -> jax.Array:
  return jnp.zeros((b, h), jnp.float32)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def matmul(a: jax.Array, b: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """a @ b with both operands cast to `dtype`, accumulated and returned in float32.

  bfloat16 operands make the products several times faster on GPUs (and CPUs with bf16
  units); parameters, states and everything elementwise stay float32.
  """
  if dtype == jnp.float32:
    return a @ b
  return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def einsum(spec: str, a: jax.Array, b: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """jnp.einsum(spec, a, b) as `matmul`: operands cast to `dtype`, accumulated and returned in
  float32; for the products with a batch axis (a weight per head) that `matmul` cannot write.

  XLA:CPU's batched dot has no bfloat16 x bfloat16 = float32 (DotThunk: UNIMPLEMENTED, and
  only once it runs), so on a CPU the rounded operands are multiplied in float32: the same
  values (a product of two bfloat16s is exact in float32, and the sums are float32 either
  way), without bfloat16's speed. The platform is the one compiled for, not the default
  backend, so a computation placed on a GPU host's CPU takes the CPU's form too.
  """
  if dtype == jnp.float32:
    return jnp.einsum(spec, a, b)
  return jax.lax.platform_dependent(
      a.astype(dtype), b.astype(dtype),
      cpu=lambda a, b: jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32)),
      default=lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32))


def _dtype(compute_dtype: str) -> Any:
  if compute_dtype not in DTYPES:
    raise UserError(f"model.compute_dtype must be one of {', '.join(DTYPES)}, got {compute_dtype!r}")
  return DTYPES[compute_dtype]


def _input_projection(dtype: Any) -> Callable[[Params, jax.Array], jax.Array]:
  """project(params, x) = x W_ih + b, the products in `dtype`."""
  return lambda params, x: matmul(x, params["w_ih"], dtype) + params["b"]


def hidden(carry: Carry) -> jax.Array:
  """The previous output h<b, h>, which feeds the recurrent product: the carry or its first entry.

  The carry layout every cell keeps: h alone, or a tuple whose first entry is h.
  """
  return carry[0] if isinstance(carry, tuple) else carry


def add_to_hidden(d_carry: Carry, d_h: jax.Array) -> Carry:
  """Adds d_h to the hidden-state entry of a carry (or carry cotangent); see `hidden`."""
  if isinstance(d_carry, tuple):
    return (d_carry[0] + d_h,) + tuple(d_carry[1:])
  return d_carry + d_h


def _gated(name: str, init: Callable[..., Params], initial_carry: Callable[[int, int], Carry],
           core: Callable[..., tuple[Carry, jax.Array]], compute_dtype: str,
           core_reads: tuple[str, ...] = (), kernel: str | None = None) -> Cell:
  """A cell of the form gx = x W_ih + b, then core(params, carry, gx, h_prev W_hh)."""
  dtype, w_hh = _dtype(compute_dtype), "w_hh"

  def recur(params, carry, gx):
    return core(params, carry, gx, matmul(hidden(carry), params[w_hh], dtype))

  return Cell(name, init, initial_carry, _input_projection(dtype), recur, core, dtype,
              recurrent_weight=w_hh, core_reads=core_reads, kernel=kernel)


def rnn(nonlinearity: str = "tanh", compute_dtype: str = "float32") -> Cell:
  """Elman RNN: h' = act(x W_ih + h W_hh + b), act in {tanh, relu} (torch.nn.RNN)."""
  acts = {"tanh": jnp.tanh, "relu": jax.nn.relu}
  if nonlinearity not in acts:
    raise UserError(f"model.nonlinearity must be one of {', '.join(acts)}, got {nonlinearity!r}")
  act = acts[nonlinearity]

  def core(params, h, gx, gh):
    h = act(gx + gh)
    return h, h

  return _gated("rnn", lambda key, d, h: _init_gated(key, d, h, 1), _zeros, core, compute_dtype,
                kernel=f"rnn_{nonlinearity}")


def gru(compute_dtype: str = "float32") -> Cell:
  """GRU with PyTorch's gate order (r, z, n) and n = tanh(x W_in + b_in + r * (h W_hn + b_hn))."""

  def init(key, d, h):
    k, k_hn = jax.random.split(key)
    return {**_init_gated(k, d, h, 3), "b_hn": _uniform(k_hn, (h,), h)}

  def core(params, h, gx, gh):
    xr, xz, xn = jnp.split(gx, 3, axis=-1)
    hr, hz, hn = jnp.split(gh, 3, axis=-1)
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * (hn + params["b_hn"]))
    h = (1.0 - z) * n + z * h
    return h, h

  return _gated("gru", init, _zeros, core, compute_dtype, core_reads=("b_hn",), kernel="gru")


def _lstm_init(forget_bias: float) -> Callable[..., Params]:
  """w_ih<d, 4h>, w_hh<h, 4h>, b<4h> (gates i, f, g, o), `forget_bias` added to the f gate's b."""

  def init(key, d, h):
    params = _init_gated(key, d, h, 4)
    params["b"] = params["b"].at[h:2 * h].add(forget_bias)
    return params

  return init


def _lstm_carry(b: int, h: int) -> Carry:
  return (_zeros(b, h), _zeros(b, h))


def lstm(forget_bias: float = 0.0, compute_dtype: str = "float32") -> Cell:
  """LSTM with PyTorch's gate order (i, f, g, o); carry (h, c); `forget_bias` is added at init."""

  def core(params, carry, gx, gh):
    _, c = carry
    i, f, g, o = jnp.split(gx + gh, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h

  return _gated("lstm", _lstm_init(forget_bias), _lstm_carry, core, compute_dtype,
                kernel="lstm")


def _layer_norm(x: jax.Array, gain: jax.Array, bias: jax.Array | float = 0.0) -> jax.Array:
  """Normalises x[..., n] over its last axis (eps 1e-5), then scales by gain<n> and adds bias."""
  centred = x - x.mean(axis=-1, keepdims=True)
  return centred * jax.lax.rsqrt((centred ** 2).mean(axis=-1, keepdims=True) + 1e-5) * gain + bias


def lnlstm(forget_bias: float = 0.0, compute_dtype: str = "float32") -> Cell:
  """Layer-normalised LSTM (Ba et al. 2016, eqs. 20-22), gate order (i, f, g, o) as `lstm`.

  gates = LN(x W_ih) + LN(h W_hh) + b, each LN over all four gates; c' = f * c + i * g;
  h' = o * tanh(LN(c')). The gains start at 1, the cell norm's bias at 0; the two gate norms'
  biases would only add to b, so there are none.
  """
  dtype = _dtype(compute_dtype)
  lstm_init = _lstm_init(forget_bias)

  def init(key, d, h):
    return {**lstm_init(key, d, h), "ln_ih_gain": jnp.ones((4 * h,), jnp.float32),
            "ln_hh_gain": jnp.ones((4 * h,), jnp.float32),
            "ln_c_gain": jnp.ones((h,), jnp.float32), "ln_c_bias": jnp.zeros((h,), jnp.float32)}

  def project(params, x):
    return _layer_norm(matmul(x, params["w_ih"], dtype), params["ln_ih_gain"]) + params["b"]

  def recur(params, carry, gx):
    h, c = carry
    gates = gx + _layer_norm(matmul(h, params["w_hh"], dtype), params["ln_hh_gain"])
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(_layer_norm(c, params["ln_c_gain"], params["ln_c_bias"]))
    return (h, c), h

  return Cell("lnlstm", init, _lstm_carry, project, recur, dtype=dtype)


def _g(x: jax.Array) -> jax.Array:
  """minGRU's positive activation: x + 0.5 for x >= 0, sigmoid(x) below (Feng et al., appendix)."""
  return jnp.where(x >= 0, x + 0.5, jax.nn.sigmoid(x))


def _log_g(x: jax.Array) -> jax.Array:
  """log(_g(x)), computed without forming _g(x) for negative x."""
  return jnp.where(x >= 0, jnp.log(jax.nn.relu(x) + 0.5), -jax.nn.softplus(-x))


def mingru(compute_dtype: str = "float32") -> Cell:
  """minGRU (Feng et al. 2024): z = sigmoid(x W_z + b_z), h' = (1 - z) * h + z * g(x W_h + b_h).

  The gates read x alone, so the step is linear in h; gx holds (z, h~) pre-activations.
  """
  dtype = _dtype(compute_dtype)

  def recur(params, h, gx):
    del params
    k_z, k_h = jnp.split(gx, 2, axis=-1)
    z = jax.nn.sigmoid(k_z)
    h = (1.0 - z) * h + z * _g(k_h)
    return h, h

  def log_linear(gx):
    k_z, k_h = jnp.split(gx, 2, axis=-1)
    return -jax.nn.softplus(k_z), -jax.nn.softplus(-k_z) + _log_g(k_h)  # log(1 - z), log(z g)

  return Cell("mingru", lambda key, d, h: _init_input(key, d, h, 2), _zeros,
              _input_projection(dtype), recur, dtype=dtype, log_linear=log_linear)


def minlstm(compute_dtype: str = "float32") -> Cell:
  """minLSTM (Feng et al. 2024): h' = (f * h + i * g(x W_h + b_h)) / (f + i), f and i sigmoids of x.

  The gates read x alone, so the step is linear in h; gx holds (f, i, h~) pre-activations.
  """
  dtype = _dtype(compute_dtype)

  def recur(params, h, gx):
    del params
    k_f, k_i, k_h = jnp.split(gx, 3, axis=-1)
    f, i = jax.nn.sigmoid(k_f), jax.nn.sigmoid(k_i)
    h = (f * h + i * _g(k_h)) / (f + i)
    return h, h

  def log_linear(gx):
    k_f, k_i, k_h = jnp.split(gx, 3, axis=-1)
    diff = jax.nn.softplus(-k_f) - jax.nn.softplus(-k_i)  # log i - log f
    return -jax.nn.softplus(diff), -jax.nn.softplus(-diff) + _log_g(k_h)  # log f', log i' g

  return Cell("minlstm", lambda key, d, h: _init_input(key, d, h, 3), _zeros,
              _input_projection(dtype), recur, dtype=dtype, log_linear=log_linear)


def indrnn(compute_dtype: str = "float32") -> Cell:
  """IndRNN (Li et al. 2018): h' = relu(x W_ih + b + u * h), one recurrent weight per unit.

  u starts U(0, 1), so each unit's memory decays at its own rate and the state cannot grow
  without bound.
  """
  dtype = _dtype(compute_dtype)

  def init(key, d, h):
    k, k_u = jax.random.split(key)
    return {**_init_input(k, d, h, 1), "u": jax.random.uniform(k_u, (h,), jnp.float32)}

  def recur(params, h, gx):
    h = jax.nn.relu(gx + params["u"] * h)
    return h, h

  return Cell("indrnn", init, _zeros, _input_projection(dtype), recur, dtype=dtype)


@jax.custom_vjp
def _sqrt_bounded_grad(x: jax.Array) -> jax.Array:
  """sqrt(x) whose derivative is capped at 1000, as recurrentgemma's `sqrt_bound_derivative`
  (sqrt'(x) is infinite at x = 0, where an RG-LRU unit's a_t reaches 1)."""
  return jnp.sqrt(x)


_sqrt_bounded_grad.defvjp(
    lambda x: (jnp.sqrt(x), x),
    lambda x, g: (g * 0.5 * jax.lax.rsqrt(jnp.maximum(x, 1.0 / (4 * 1000.0 ** 2))),))

RGLRU_C = 8.0  # the fixed scale c of the recurrence gate's exponent (De et al. 2024)


def rglru(compute_dtype: str = "float32") -> Cell:
  """RG-LRU, the Real-Gated Linear Recurrent Unit of Griffin (De et al. 2024), as in
  recurrentgemma/jax/layers.py (`RGLRU.__call__`):

    x~ = x W_x + b_x,  i = sigmoid(x W_i + b_i),  r = sigmoid(x W_a + b_a)
    log a_t = -c r_t softplus(Lambda),  i.e. a_t = a^(c r_t) with a = sigmoid(-Lambda) per unit
    h' = a_t * h + sqrt(1 - a_t^2) * (i_t * x~_t)    (c = 8; a_t in log space, as the authors')

  Lambda (`a_param`) starts with a uniform in area on the ring 0.9 <= a <= 0.999, as theirs.
  The gates read x alone, so the step is linear in h (`parallel`: an associative scan).
  Against the authors' layer: the gates are dense rather than block-diagonal over heads,
  x~ is the cell's own input projection (Griffin's block applies it outside the RG-LRU), and
  there are no document resets (the state is carried, as for every jaxrnn cell).
  """
  dtype = _dtype(compute_dtype)

  def init(key, d, h):
    k, k_a = jax.random.split(key)
    # a = exp(-softplus(Lambda)) uniform in area on the ring 0.9 <= a <= 0.999 (rnn_param_init).
    a = jnp.sqrt(jax.random.uniform(k_a, (h,), jnp.float32, 0.9 ** 2, 0.999 ** 2))
    return {**_init_input(k, d, h, 3), "a_param": jnp.log(jnp.expm1(-jnp.log(a)))}

  def terms(params, gx):  # (log a_t, b_t) of h' = a_t h + b_t; b_t of either sign
    x, gate_i, gate_a = jnp.split(gx, 3, axis=-1)
    log_a = -RGLRU_C * jax.nn.sigmoid(gate_a) * jax.nn.softplus(params["a_param"])
    return log_a, _sqrt_bounded_grad(1.0 - jnp.exp(2.0 * log_a)) * (jax.nn.sigmoid(gate_i) * x)

  def recur(params, h, gx):
    log_a, b = terms(params, gx)
    h = jnp.exp(log_a) * h + b
    return h, h

  def parallel(params, h0, gx):
    def compose(earlier, later):  # a run of steps: (log of its product of a, its sum of b)
      (log_a1, b1), (log_a2, b2) = earlier, later
      return log_a1 + log_a2, jnp.exp(log_a2) * b1 + b2  # a <= 1: nothing overflows
    log_prod_a, total = jax.lax.associative_scan(compose, terms(params, gx))
    hs = jnp.exp(log_prod_a) * h0 + total
    return hs[-1], hs

  return Cell("rglru", init, _zeros, _input_projection(dtype), recur, dtype=dtype,
              parallel=parallel)


def _heads(x: jax.Array, num_heads: int) -> jax.Array:
  """x<..., h> -> x<..., heads, h / heads>."""
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def slstm(num_heads: int = 1, compute_dtype: str = "float32") -> Cell:
  """sLSTM, xLSTM's scalar-memory LSTM (Beck et al. 2024), as in xlstm's
  blocks/slstm/src/vanilla/slstm.py (`slstm_forward_pointwise`), gate order (i, f, z, o):

    raw = x W_ih + b + R h    (R block-diagonal over `num_heads` heads: w_hh<heads, h/heads, 4 h/heads>)
    m' = max(i, log sigmoid(f) + m)    (m' = i from the zero state)
    i' = exp(i - m'),  f' = exp(log sigmoid(f) + m - m')    (both <= 1: the stabilizer m)
    c' = f' c + i' tanh(z),  n' = f' n + i',  h' = sigmoid(o) * c' / n'

  The input gate is exponential, the forget gate a sigmoid (the authors' vanilla kernel);
  |h'| <= 1 however large the pre-activations. Carry (h, c, n, m), each <b, h>. Biases start
  as the authors' default: 0, the forget gate's from 5 down to -7 across each head.
  """
  dtype = _dtype(compute_dtype)

  def init(key, d, h):
    k, k_hh = jax.random.split(key)
    dh = h // num_heads
    # The authors' default biases ("powerlaw_blockdependent", first block): 0, except the
    # forget gate's, from 5 down to -7 across each head, so some units remember for long.
    f_bias = -(-5.0 + 12.0 * (jnp.arange(dh, dtype=jnp.float32) / max(dh - 1, 1)) ** 0.3)
    b = jnp.zeros((4, num_heads, dh), jnp.float32).at[1].set(f_bias).reshape(-1)
    return {"w_ih": _init_input(k, d, h, 4)["w_ih"], "b": b,
            "w_hh": _uniform(k_hh, (num_heads, dh, 4 * dh), h)}

  def recur(params, carry, gx):
    h, c, n, m = carry
    # Head k's recurrent product gives its (4, h/heads) gate slice; gx is (4, heads, h/heads).
    gh = einsum("bkd,kdg->bkg", _heads(h, num_heads), params["w_hh"], dtype)
    gh = jnp.swapaxes(gh.reshape(*gh.shape[:2], 4, -1), 1, 2).reshape(gx.shape)
    i, f, z, o = jnp.split(gx + gh, 4, axis=-1)
    log_f_m = m + jax.nn.log_sigmoid(f)
    m = jnp.where(n == 0.0, i, jnp.maximum(i, log_f_m))
    i_gate = jnp.minimum(jnp.exp(i - m), 1.0)
    f_gate = jnp.minimum(jnp.exp(log_f_m - m), 1.0)
    c = f_gate * c + i_gate * jnp.tanh(z)
    n = f_gate * n + i_gate
    h = jax.nn.sigmoid(o) * c / n
    return (h, c, n, m), h

  return Cell("slstm", init, lambda b, h: (_zeros(b, h),) * 4, _input_projection(dtype), recur,
              dtype=dtype)


MLSTM_EPS = 1e-6  # added to the normalizer, as the authors'
MLSTM_CHUNK = 64  # steps the parallel form takes at once (xlstm's chunkwise_simple default)


def _mlstm_normalized(numerator: jax.Array, qn: jax.Array, m: jax.Array) -> jax.Array:
  """numerator<..., d> / (max(|qn|, exp(-m)) + eps) with qn, m <...>: the mLSTM's h~, over and
  under times s = exp(min(m, 0)), so that nothing overflows for any m. exp(-m) is inf in
  float32 once m < -88.7 (a run of closed gates), and then h~ is finite but its gradient
  0 * inf = NaN. exp(-m) s = exp(-max(m, 0)) <= 1 and s <= 1 (exactly 1 for m >= 0: the
  same values bit for bit), and s cancels: the same h~, with a gradient finite everywhere
  (h~ -> 0 where s underflows)."""
  s = jnp.exp(jnp.minimum(m, 0.0))
  denominator = jnp.maximum(jnp.abs(qn) * s, jnp.exp(-jnp.maximum(m, 0.0))) + MLSTM_EPS * s
  return numerator * s[..., None] / denominator[..., None]


def mlstm(num_heads: int = 1, compute_dtype: str = "float32") -> Cell:
  """mLSTM, xLSTM's matrix-memory LSTM (Beck et al. 2024), as in xlstm's
  blocks/mlstm/backends.py (`recurrent_step_stabilized_simple`), per head of d = h / heads:

    q, k, v, o = x W + b (each <h>), k scaled by 1 / sqrt(d);  i, f = x W + b (each <heads>)
    m' = max(log sigmoid(f) + m, i),  f' = exp(log sigmoid(f) + m - m'),  i' = exp(i - m')
    C' = f' C + i' k v^T  <d, d>,  n' = f' n + i' k  <d>
    h' = sigmoid(o) * (q^T C') / (max(|q^T n'|, exp(-m')) + eps)

  The gates read x alone (no recurrent weights), so besides this sequential form for
  sampling there is a `parallel` one for training, equal to it. Carry (h<b, h>,
  C<b, heads, d, d>, n<b, heads, d>, m<b, heads>). The i and f gates start as the authors':
  zero weights, biases N(0, 0.1) and 3 to 6 across the heads.
  """
  return _mlstm(num_heads, compute_dtype, output_gate=True)


def mlstm_memory(num_heads: int = 1, compute_dtype: str = "float32") -> Cell:
  """The mLSTM's matrix memory without its output gate, as xLSTM's mLSTM block runs it (the
  block gates with SiLU(z) after its own norm and skip): h' = (q^T C') / (max(|q^T n'|,
  exp(-m')) + eps), from gx = (q, k, v, i, f), which the block computes itself. Not in the
  registry: `blocks.py` builds it."""
  return _mlstm(num_heads, compute_dtype, output_gate=False)


def _mlstm(num_heads: int, compute_dtype: str, output_gate: bool) -> Cell:
  """`mlstm` (gx = q, k, v, o, i, f) or, without `output_gate`, `mlstm_memory` (q, k, v, i, f)."""
  dtype, vectors = _dtype(compute_dtype), 4 if output_gate else 3

  def init(key, d, h):
    k_ih, _, k_i = jax.random.split(key, 3)  # three keys as before: the same init
    params = _init_input(k_ih, d, h, vectors)
    # The authors' gate init (mLSTMCell.reset_parameters): input and forget gates start from
    # the bias alone, i ~ N(0, 0.1) and f spaced from 3 to 6 over the heads (a long memory).
    i_bias = 0.1 * jax.random.normal(k_i, (num_heads,), jnp.float32)
    f_bias = jnp.linspace(3.0, 6.0, num_heads, dtype=jnp.float32)
    return {"w_ih": jnp.concatenate([params["w_ih"], jnp.zeros((d, 2 * num_heads))], axis=1),
            "b": jnp.concatenate([params["b"], i_bias, f_bias])}

  def initial_carry(b, h):
    dh = h // num_heads
    return (_zeros(b, h), jnp.zeros((b, num_heads, dh, dh), jnp.float32),
            jnp.zeros((b, num_heads, dh), jnp.float32), jnp.zeros((b, num_heads), jnp.float32))

  def split(gx):  # q, k, v, o as <..., heads, d> (k scaled; o None without it), i, f <..., heads>
    h = (gx.shape[-1] - 2 * num_heads) // vectors
    q, k, v, *o = (_heads(x, num_heads) for x in jnp.split(gx[..., :vectors * h], vectors, -1))
    i, f = jnp.split(gx[..., vectors * h:], 2, axis=-1)
    return q, k / jnp.sqrt(jnp.float32(q.shape[-1])), v, (o[0] if o else None), i, f

  def gate(o, h_tilde):  # the output gate, where the cell has one
    return h_tilde if o is None else jax.nn.sigmoid(o) * h_tilde

  def recur(params, carry, gx):
    _, c, n, m = carry
    q, k, v, o, i, f = split(gx)
    log_f_m = jax.nn.log_sigmoid(f) + m
    m = jnp.maximum(log_f_m, i)
    f_gate, i_gate = jnp.exp(log_f_m - m), jnp.exp(i - m)
    c = f_gate[..., None, None] * c + i_gate[..., None, None] * k[..., :, None] * v[..., None, :]
    n = f_gate[..., None] * n + i_gate[..., None] * k
    numerator = jnp.einsum("bkd,bkde->bke", q, c)
    h = gate(o, _mlstm_normalized(numerator, jnp.sum(q * n, -1), m)).reshape(gx.shape[0], -1)
    return (h, c, n, m), h

  def chunk(carry, gx):
    """The steps of gx<t, b, g> at once from the carry: step s reaches step t with log weight
    F_t - F_s + i_s (F the cumulative log forget gate), the carried memory with F_t + m0;
    m_t is the largest of them, which is the recurrence's stabilizer exactly."""
    _, c0, n0, m0 = carry
    q, k, v, o, i, f = (None if x is None else jnp.moveaxis(x, 0, 2)
                        for x in split(gx))  # <b, heads, t, ...>
    log_f = jnp.cumsum(jax.nn.log_sigmoid(f), axis=-1)  # F<b, heads, t>
    causal = jnp.tril(jnp.ones((gx.shape[0],) * 2, bool))
    log_d = jnp.where(causal, log_f[..., :, None] - log_f[..., None, :] + i[..., None, :],
                      -jnp.inf)  # <b, heads, t, s>
    log_carried = log_f + m0[..., None]
    m = jnp.maximum(log_d.max(-1), log_carried)
    d = jnp.exp(log_d - m[..., None])
    carried = jnp.exp(log_carried - m)
    scores = jnp.einsum("bktd,bksd->bkts", q, k) * d
    numerator = (jnp.einsum("bkts,bksd->bktd", scores, v)
                 + carried[..., None] * jnp.einsum("bktd,bkde->bkte", q, c0))
    qn = scores.sum(-1) + carried * jnp.einsum("bktd,bkd->bkt", q, n0)
    hs = gate(o, _mlstm_normalized(numerator, qn, m))  # <b, heads, t, d>
    hs = jnp.moveaxis(hs, 2, 0).reshape(gx.shape[0], gx.shape[1], -1)  # <t, b, h>
    last = d[..., -1, :]  # the last step's weights <b, heads, s>
    c = carried[..., -1, None, None] * c0 + jnp.einsum("bks,bksd,bkse->bkde", last, k, v)
    n = carried[..., -1, None] * n0 + jnp.einsum("bks,bksd->bkd", last, k)
    return (hs[-1], c, n, m[..., -1]), hs

  def parallel(params, carry, gx):
    # Chunks of MLSTM_CHUNK steps, the carry passed between them (the authors' chunkwise form):
    # memory grows with t * chunk rather than t^2, and F_t - F_s never spans more than a chunk,
    # so long sequences keep float32 precision.
    del params
    t, full = gx.shape[0], gx.shape[0] // MLSTM_CHUNK * MLSTM_CHUNK
    ys = []
    if full:
      chunks = gx[:full].reshape(full // MLSTM_CHUNK, MLSTM_CHUNK, *gx.shape[1:])
      carry, hs = jax.lax.scan(chunk, carry, chunks)
      ys.append(hs.reshape(full, *hs.shape[2:]))
    if full < t:
      carry, hs = chunk(carry, gx[full:])
      ys.append(hs)
    return carry, jnp.concatenate(ys)

  return Cell("mlstm" if output_gate else "mlstm_memory", init, initial_carry,
              _input_projection(dtype), recur, dtype=dtype, parallel=parallel)


MAMBA_DT = (1e-3, 0.1, 1e-4)  # the authors' dt_min, dt_max and dt_init_floor


def mamba(state_size: int = 16, dt_rank: int = 0, compute_dtype: str = "float32") -> Cell:
  """Mamba-1's selective state space (Gu & Dao 2023), as state-spaces/mamba's
  mamba_ssm/ops/selective_scan_interface.py (`selective_scan_ref`) and modules/mamba_simple.py
  (`Mamba.step`), on each of h channels with s = state_size states (the input is as wide as
  the state: d = h):

    dt, B, C = x W_x, split (dt_rank, s, s);   delta = softplus(dt W_dt + b_dt)  <h>
    A = -exp(A_log)  <h, s>;   S' = exp(delta A) * S + (delta * x) B^T  <h, s>;   y = S' C + D * x

  Carry (y<b, h>, S<b, h, s>). The factors read x alone, so `parallel` composes the steps
  with an associative scan. dt_rank 0 is the authors' "auto", ceil(h / 16) (the Mamba block
  passes its model width's). Init as theirs: A_log = log(1..s) for every channel, D = 1,
  b_dt the inverse softplus of a log-uniform draw from [1e-3, 0.1] (at least 1e-4), W_dt
  U(+-dt_rank^-1/2), W_x U(+-1/sqrt(h)).
  """
  dtype = _dtype(compute_dtype)

  def init(key, d, h):
    if d != h:  # config.validate says so first, in the user's terms
      raise ValueError(f"the mamba cell keeps its input's width: d={d} != h={h}")
    rank, (dt_min, dt_max, dt_floor) = dt_rank or math.ceil(h / 16), MAMBA_DT
    k_x, k_dt, k_b = jax.random.split(key, 3)
    dt = jnp.maximum(dt_floor, jnp.exp(jax.random.uniform(
        k_b, (h,), jnp.float32, math.log(dt_min), math.log(dt_max))))
    states = jnp.arange(1, state_size + 1, dtype=jnp.float32)
    return {"w_x": _uniform(k_x, (h, rank + 2 * state_size), h),
            "w_dt": jax.random.uniform(k_dt, (rank, h), jnp.float32, -rank ** -0.5, rank ** -0.5),
            "b_dt": dt + jnp.log(-jnp.expm1(-dt)),
            "a_log": jnp.log(jnp.broadcast_to(states, (h, state_size))),
            "d": jnp.ones((h,), jnp.float32)}

  def project(params, x):  # gx = (x, delta's pre-activation, B, C)
    rank = params["w_dt"].shape[0]
    xw = matmul(x, params["w_x"], dtype)
    dt = matmul(xw[..., :rank], params["w_dt"], dtype) + params["b_dt"]
    return jnp.concatenate([x, dt, xw[..., rank:]], axis=-1)

  def terms(params, gx):  # (exp(delta A), (delta x) B^T, each <..., h, s>; x <..., h>; C <..., s>)
    h = params["d"].shape[0]
    x, dt, b, c = jnp.split(gx, [h, 2 * h, 2 * h + state_size], axis=-1)
    delta = jax.nn.softplus(dt)
    a = jnp.exp(delta[..., None] * -jnp.exp(params["a_log"]))
    return a, (delta * x)[..., None] * b[..., None, :], x, c

  def output(params, s, x, c):
    return jnp.einsum("...hs,...s->...h", s, c) + params["d"] * x

  def recur(params, carry, gx):
    a, bx, x, c = terms(params, gx)
    s = a * carry[1] + bx
    y = output(params, s, x, c)
    return (y, s), y

  def parallel(params, carry, gx):
    a, bx, x, c = terms(params, gx)  # <t, b, h, s>

    def compose(earlier, later):  # a run of steps: (its product of factors, its sum of inputs)
      (a1, b1), (a2, b2) = earlier, later
      return a1 * a2, a2 * b1 + b2  # 0 < a <= 1: nothing overflows

    prod_a, total = jax.lax.associative_scan(compose, (a, bx))
    states = prod_a * carry[1] + total
    ys = output(params, states, x, c)
    return (ys[-1], states[-1]), ys

  def initial_carry(b, h):
    return _zeros(b, h), jnp.zeros((b, h, state_size), jnp.float32)

  return Cell("mamba", init, initial_carry, project, recur, dtype=dtype, parallel=parallel)


_REGISTRY: dict[str, Callable[..., Cell]] = {
    "rnn": rnn,
    "gru": gru,
    "lstm": lstm,
    "lnlstm": lnlstm,
    "mingru": mingru,
    "minlstm": minlstm,
    "indrnn": indrnn,
    "rglru": rglru,
    "slstm": slstm,
    "mlstm": mlstm,
    "mamba": mamba,
}


def names() -> list[str]:
  """The registered cell names."""
  return list(_REGISTRY)


def options() -> dict[str, Any]:
  """Every cell option (a `model.*` config field) with its default, from the factories' signatures."""
  return {name: p.default for factory in _REGISTRY.values()
          for name, p in inspect.signature(factory).parameters.items()}


def takes(name: str) -> set[str]:
  """The options cell `name` takes."""
  return set(inspect.signature(_REGISTRY[name]).parameters)


def get(name: str, **cell_options: Any) -> Cell:
  """The cell registered as `name`, built with its options (e.g. nonlinearity, forget_bias)."""
  if name not in _REGISTRY:
    raise UserError(f"unknown cell {name!r}; valid cells: {', '.join(_REGISTRY)}")
  taken = takes(name)
  if unknown := sorted(set(cell_options) - taken):
    raise UserError(f"cell {name!r} does not take options {unknown}; it takes {sorted(taken)}")
  return _REGISTRY[name](**cell_options)


def from_config(model_config: Any, also: tuple[str, ...] = ()) -> Cell:
  """The cell named by `model_config.cell`, built with the options it takes from the config.

  An option field set away from its default for a cell that does not take it is an error
  (e.g. `model.forget_bias` for a gru), not silently ignored, unless it is named in `also`
  (options the layer around the cell reads: `blocks.cell`).
  """
  name = model_config.cell
  get(name)  # an unknown name fails here, with the list of valid ones
  taken = takes(name)
  for option, default in options().items():
    if option not in taken and option not in also and model_config[option] != default:
      users = [n for n in _REGISTRY if option in takes(n)]
      raise UserError(f"model.{option}={model_config[option]!r} does nothing for cell {name!r} "
                      f"(it applies to {', '.join(users)}); leave it at {default!r}")
  return get(name, **{option: model_config[option] for option in taken})
