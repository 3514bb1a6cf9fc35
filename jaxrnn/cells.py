"""Recurrent cells as pure functions; rnn, gru and lstm with PyTorch's equations and gate order.

Shape legend (used across jaxrnn): b batch, t time, d input, h hidden, v vocabulary,
g gates * h (the width of a cell's stacked gate pre-activations).

A cell is a record of pure functions (the contract `layers.py` relies on):
  init(key, d, h) -> params            weights as in PyTorch, transposed to (in, out)
  initial_carry(b, h) -> carry          zeros; h alone, or a tuple whose first entry is h
  project(params, x[..., d]) -> gx[..., g]   the part of a step that reads x alone (any leading shape)
  recur(params, carry, gx[b, g]) -> (carry, y[b, h])   the rest of one step
  step = recur . project
and, optionally, the structure a faster recurrence needs (see `Cell`): `core` with its
`recurrent_weight` and `core_reads`, or `log_linear` for steps linear in the state.

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
    kernel: "lstm" or "gru" when the cell is exactly torch.nn.LSTM / nn.GRU with the parameters
      `w_ih`, `w_hh`, `b` (and `b_hn`), so a whole-layer library kernel (`jaxrnn.kernels`:
      oneDNN, cuDNN) can run it.
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


def from_config(model_config: Any) -> Cell:
  """The cell named by `model_config.cell`, built with the options it takes from the config.

  An option field set away from its default for a cell that does not take it is an error
  (e.g. `model.forget_bias` for a gru), not silently ignored.
  """
  name = model_config.cell
  get(name)  # an unknown name fails here, with the list of valid ones
  taken = takes(name)
  for option, default in options().items():
    if option not in taken and model_config[option] != default:
      users = [n for n in _REGISTRY if option in takes(n)]
      raise UserError(f"model.{option}={model_config[option]!r} does nothing for cell {name!r} "
                      f"(it applies to {', '.join(users)}); leave it at {default!r}")
  return get(name, **{option: model_config[option] for option in taken})
