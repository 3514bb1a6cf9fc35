"""Recurrent cells as pure functions; rnn, gru and lstm with PyTorch's equations and gate order.

Shape legend (used across jaxrnn): b batch, t time, d input, h hidden, v vocabulary,
g gates * h (the width of a cell's stacked gate pre-activations).

A cell is a record of pure functions:
  init(key, d, h) -> params            weights as in PyTorch, transposed to (in, out)
  initial_carry(b, h) -> carry          zeros
  project(params, x[..., d]) -> gx[..., g]   the part of a step that reads x alone (any leading shape)
  recur(params, carry, gx[b, g]) -> (carry, y[b, h])   the rest of one step
  step = recur . project
  log_linear(gx[..., g]) -> (log a, log b)[..., h]    optional: for cells whose step is
      h' = a * h + b with a, b from the input alone (mingru, minlstm), so that `layers.run`
      can compose the steps with a parallel scan

Splitting `project` from `recur` lets `layers.run` do the input product for all time steps
as one matrix product outside the scan. Biases that PyTorch keeps twice (`bias_ih + bias_hh`)
are stored once as their sum, except the GRU's `b_hn`, which sits inside `r * (W_hn h + b_hn)`.

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
  """A recurrent cell: pure `init`, `initial_carry`, `project`, `recur`; `step` composes them."""
  name: str
  init: Callable[..., Params]
  initial_carry: Callable[[int, int], Carry]
  project: Callable[[Params, jax.Array], jax.Array]
  recur: Callable[[Params, Carry, jax.Array], tuple[Carry, jax.Array]]
  # For cells whose one recurrent product is gh = h_prev @ w_hh: `recur` with gh given
  # (core(params, carry, gx, gh)), which lets `layers.run` take gradients of w_hh outside the loop.
  core: Callable[[Params, Carry, jax.Array, jax.Array], tuple[Carry, jax.Array]] | None = None
  dtype: Any = jnp.float32  # operand dtype of the matrix products (see `matmul`)
  log_linear: Callable[[jax.Array], tuple[jax.Array, jax.Array]] | None = None

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


def _dtype(compute_dtype: str) -> Any:
  if compute_dtype not in DTYPES:
    raise UserError(f"model.compute_dtype must be one of {', '.join(DTYPES)}, got {compute_dtype!r}")
  return DTYPES[compute_dtype]


def _project(params: Params, x: jax.Array) -> jax.Array:
  return x @ params["w_ih"] + params["b"]


def hidden(carry: Carry) -> jax.Array:
  """The previous output h<b, h>, which feeds the recurrent product: the carry or its first entry."""
  return carry[0] if isinstance(carry, tuple) else carry


def _gated(name: str, init: Callable[..., Params], initial_carry: Callable[[int, int], Carry],
           core: Callable[..., tuple[Carry, jax.Array]], compute_dtype: str) -> Cell:
  """A cell of the form x W_ih + b, then core(params, carry, gx, h_prev W_hh)."""
  dtype = _dtype(compute_dtype)

  def project(params, x):
    return matmul(x, params["w_ih"], dtype) + params["b"]

  def recur(params, carry, gx):
    return core(params, carry, gx, matmul(hidden(carry), params["w_hh"], dtype))

  return Cell(name, init, initial_carry, project, recur, core, dtype)


def rnn(nonlinearity: str = "tanh", compute_dtype: str = "float32") -> Cell:
  """Elman RNN: h' = act(x W_ih + h W_hh + b), act in {tanh, relu} (torch.nn.RNN)."""
  acts = {"tanh": jnp.tanh, "relu": jax.nn.relu}
  if nonlinearity not in acts:
    raise UserError(f"rnn nonlinearity must be one of {', '.join(acts)}, got {nonlinearity!r}")
  act = acts[nonlinearity]

  def core(params, h, gx, gh):
    h = act(gx + gh)
    return h, h

  return _gated("rnn", lambda key, d, h: _init_gated(key, d, h, 1), _zeros, core, compute_dtype)


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

  return _gated("gru", init, _zeros, core, compute_dtype)


def lstm(forget_bias: float = 0.0, compute_dtype: str = "float32") -> Cell:
  """LSTM with PyTorch's gate order (i, f, g, o); carry (h, c); `forget_bias` is added at init."""

  def init(key, d, h):
    params = _init_gated(key, d, h, 4)
    params["b"] = params["b"].at[h:2 * h].add(forget_bias)
    return params

  def initial_carry(b, h):
    return (_zeros(b, h), _zeros(b, h))

  def core(params, carry, gx, gh):
    _, c = carry
    i, f, g, o = jnp.split(gx + gh, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h

  return _gated("lstm", init, initial_carry, core, compute_dtype)


def _layer_norm(x: jax.Array, gain: jax.Array, bias: jax.Array | float = 0.0) -> jax.Array:
  """Normalises x[..., n] over its last axis (eps 1e-5), then scales by gain<n> and adds bias."""
  centred = x - x.mean(axis=-1, keepdims=True)
  return centred * jax.lax.rsqrt((centred ** 2).mean(axis=-1, keepdims=True) + 1e-5) * gain + bias


def lnlstm(forget_bias: float = 0.0) -> Cell:
  """Layer-normalised LSTM (Ba et al. 2016, eqs. 20-22), gate order (i, f, g, o) as `lstm`.

  gates = LN(x W_ih) + LN(h W_hh) + b, each LN over all four gates; c' = f * c + i * g;
  h' = o * tanh(LN(c')). The gains start at 1, the cell norm's bias at 0; the two gate norms'
  biases would only add to b, so there are none.
  """
  base = lstm(forget_bias)

  def init(key, d, h):
    return {**base.init(key, d, h), "ln_ih_gain": jnp.ones((4 * h,), jnp.float32),
            "ln_hh_gain": jnp.ones((4 * h,), jnp.float32),
            "ln_c_gain": jnp.ones((h,), jnp.float32), "ln_c_bias": jnp.zeros((h,), jnp.float32)}

  def project(params, x):
    return _layer_norm(x @ params["w_ih"], params["ln_ih_gain"]) + params["b"]

  def recur(params, carry, gx):
    h, c = carry
    gates = gx + _layer_norm(h @ params["w_hh"], params["ln_hh_gain"])
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(_layer_norm(c, params["ln_c_gain"], params["ln_c_bias"]))
    return (h, c), h

  return Cell("lnlstm", init, base.initial_carry, project, recur)


def _g(x: jax.Array) -> jax.Array:
  """minGRU's positive activation: x + 0.5 for x >= 0, sigmoid(x) below (Feng et al., appendix)."""
  return jnp.where(x >= 0, x + 0.5, jax.nn.sigmoid(x))


def _log_g(x: jax.Array) -> jax.Array:
  """log(_g(x)), computed without forming _g(x) for negative x."""
  return jnp.where(x >= 0, jnp.log(jax.nn.relu(x) + 0.5), -jax.nn.softplus(-x))


def mingru() -> Cell:
  """minGRU (Feng et al. 2024): z = sigmoid(x W_z + b_z), h' = (1 - z) * h + z * g(x W_h + b_h).

  The gates read x alone, so the step is linear in h; gx holds (z, h~) pre-activations.
  """

  def recur(params, h, gx):
    del params
    k_z, k_h = jnp.split(gx, 2, axis=-1)
    z = jax.nn.sigmoid(k_z)
    h = (1.0 - z) * h + z * _g(k_h)
    return h, h

  def log_linear(gx):
    k_z, k_h = jnp.split(gx, 2, axis=-1)
    return -jax.nn.softplus(k_z), -jax.nn.softplus(-k_z) + _log_g(k_h)  # log(1 - z), log(z g)

  return Cell("mingru", lambda key, d, h: _init_input(key, d, h, 2), _zeros, _project, recur,
              log_linear=log_linear)


def minlstm() -> Cell:
  """minLSTM (Feng et al. 2024): h' = (f * h + i * g(x W_h + b_h)) / (f + i), f and i sigmoids of x.

  The gates read x alone, so the step is linear in h; gx holds (f, i, h~) pre-activations.
  """

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

  return Cell("minlstm", lambda key, d, h: _init_input(key, d, h, 3), _zeros, _project, recur,
              log_linear=log_linear)


def indrnn() -> Cell:
  """IndRNN (Li et al. 2018): h' = relu(x W_ih + b + u * h), one recurrent weight per unit.

  u starts U(0, 1), so each unit's memory decays at its own rate and the state cannot grow
  without bound.
  """

  def init(key, d, h):
    k, k_u = jax.random.split(key)
    return {**_init_input(k, d, h, 1), "u": jax.random.uniform(k_u, (h,), jnp.float32)}

  def recur(params, h, gx):
    h = jax.nn.relu(gx + params["u"] * h)
    return h, h

  return Cell("indrnn", init, _zeros, _project, recur)


_REGISTRY: dict[str, Callable[..., Cell]] = {
    "rnn": rnn,
    "gru": gru,
    "lstm": lstm,
    "lnlstm": lnlstm,
    "mingru": mingru,
    "minlstm": minlstm,
    "indrnn": indrnn,
}


def names() -> list[str]:
  """The registered cell names."""
  return list(_REGISTRY)


def get(name: str, **options: Any) -> Cell:
  """The cell registered as `name`, built with its options (e.g. nonlinearity, forget_bias)."""
  if name not in _REGISTRY:
    raise UserError(f"unknown cell {name!r}; valid cells: {', '.join(_REGISTRY)}")
  try:
    return _REGISTRY[name](**options)
  except TypeError as e:
    raise UserError(f"cell {name!r} does not take options {sorted(options)}: {e}") from None


def from_config(model_config: Any) -> Cell:
  """The cell named by `model_config.cell`, with the options its factory takes read from the config."""
  get(model_config.cell)  # an unknown name fails here, with the list of valid ones
  wanted = inspect.signature(_REGISTRY[model_config.cell]).parameters
  return get(model_config.cell, **{k: model_config[k] for k in wanted if k in model_config})
