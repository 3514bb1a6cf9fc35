"""A float64 NumPy transliteration of Google DeepMind's Griffin blocks (recurrentgemma, JAX).

The independent reference that jaxrnn's own Griffin blocks are tested against. Every function
follows, operation for operation, the authors' Flax code at

  repo:   https://github.com/google-deepmind/recurrentgemma
  commit: 2efa84dac0e68e63547a27a18fa943c98f1c312e  ("Remove chex dependencies.", 2026-02-06)
  files:  recurrentgemma/jax/layers.py   (RMSNorm, BlockDiagonalLinear, RGLRU, Conv1D, Einsum)
          recurrentgemma/jax/modules.py  (RecurrentBlock, MLPBlock, ResidualBlock)
          recurrentgemma/jax/scan.py     (linear_scan: h_t = a_t * h_{t-1} + x_t)
          recurrentgemma/common.py       (Preset: the Griffin / Hawk / RecurrentGemma configs)

in float64 and with nothing but NumPy, so it shares no code with jaxrnn nor with JAX. Shapes are
batch-major: activations x <b, t, width>. Parameters are nested dicts named, and shaped, as the
authors' Flax parameter tree of one `ResidualBlock` with a RECURRENT temporal block (see
`random_params`): e.g. params["recurrent_block"]["linear_x"]["kernel"] <width, lru_width>.

Conventions pinned by the authors' code (each function's docstring cites its source):
  * RMSNorm:   x * rsqrt(mean(x**2, -1) + 1e-6) * (1 + scale); `scale` is initialised to 0.
  * GELU:      jax.nn.gelu's default, the tanh approximation (approximate=True), in both the
               recurrent block (jax.nn.gelu) and the MLP (flax nn.gelu is jax.nn.gelu).
  * Conv1D:    y_s = b + sum_{j=0}^{W-1} w[j] * x_{s-(W-1)+j}: w[W-1] multiplies the current input,
               w[0] the oldest (s-3 for W=4). The cache holds the last W-1 inputs, oldest first.
  * RG-LRU:    a = exp(-8 * sigmoid(a_gate(x)) * softplus(a_param)); h_t = a_t h_{t-1}
               + sqrt(1 - a_t**2) * (sigmoid(input_gate(x_t)) * x_t); output y_t = h_t.
               At segment_pos == 0 the multiplier is 1 (not sqrt(1 - a**2)) and a is zeroed.
  * BlockDiagonalLinear: w <heads, i, j>, b <heads, j>; x's last axis split head-major
               (x[..., h*i + k] is head h, entry k);
               y[..., h*j + l] = sum_k x[..., h*i + k] w[h, k, l] + b[h, l].
  * Dense:     x @ kernel + bias, kernel <in, out> (flax nn.Dense).

Run it as a script (`python tests/reference_griffin.py`) for its self-check; with the authors'
package importable (see `_authors_modules`) the script also compares against their Flax code.
"""

from __future__ import annotations

import math

import numpy as np

SOURCE = ("google-deepmind/recurrentgemma@2efa84dac0e68e63547a27a18fa943c98f1c312e")
C_RGLRU = 8.0  # the constant c of the RG-LRU: log_a = -8 * gate_a * softplus(a_param)
RMS_EPS = 1e-6  # RMSNorm.eps default
MAX_SQRT_GRADIENT = 1000.0  # sqrt_bound_derivative(1 - a**2, 1000): the backward pass only


# ------------------------------------------------------------------------------------------------
# Elementwise functions.


def sigmoid(x):
  """jax.nn.sigmoid, computed without overflow: 1 / (1 + exp(-x))."""
  x = np.asarray(x, np.float64)
  return np.exp(-np.logaddexp(0.0, -x))


def softplus(x):
  """jax.nn.softplus: log(1 + exp(x)), computed without overflow."""
  return np.logaddexp(0.0, np.asarray(x, np.float64))


def gelu(x, approximate: bool = True):
  """jax.nn.gelu, whose default (the one the authors' code uses) is the tanh approximation:

    approximate=True:  0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x**3)))
    approximate=False: 0.5 * x * (1 + erf(x / sqrt(2)))

  Source: recurrentgemma@2efa84d, recurrentgemma/jax/modules.py, RecurrentBlock.__call__
  (`jax.nn.gelu(y)`) and MLPBlock.__call__ (`nn.gelu(out[0])`, flax's alias of jax.nn.gelu);
  neither passes `approximate`, so both use the tanh form.
  """
  x = np.asarray(x, np.float64)
  if approximate:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
  erf = np.vectorize(math.erf, otypes=[np.float64])
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


# ------------------------------------------------------------------------------------------------
# Layers (recurrentgemma/jax/layers.py).


def rms_norm(x, scale, eps: float = RMS_EPS):
  """RMSNorm with the (1 + scale) parametrisation.

  Source: recurrentgemma@2efa84d, recurrentgemma/jax/layers.py, class RMSNorm:
    var = mean(x**2, axis=-1, keepdims=True); normed = x * rsqrt(var + eps)
    return normed * (scale + 1)
  `scale` is initialised to zeros (zeros_init), i.e. an identity gain at init.

  Args:
    x: <..., width>.
    scale: <width>.
    eps: added to the mean square inside the square root (1e-6 in all the authors' uses).

  Returns:
    <..., width>.
  """
  x = np.asarray(x, np.float64)
  var = np.mean(np.square(x), axis=-1, keepdims=True)
  return x / np.sqrt(var + eps) * (np.asarray(scale, np.float64) + 1.0)


def dense(x, p):
  """flax.linen.Dense: x @ kernel + bias.

  Args:
    x: <..., in>.
    p: {"kernel": <in, out>, "bias": <out>}.

  Returns:
    <..., out>.
  """
  return np.asarray(x, np.float64) @ np.asarray(p["kernel"], np.float64) + p["bias"]


def block_diagonal_linear(x, w, b):
  """BlockDiagonalLinear: a separate dense map per head on contiguous blocks of the last axis.

  Source: recurrentgemma@2efa84d, recurrentgemma/jax/layers.py, class BlockDiagonalLinear:
    x = einops.rearrange(x, "... (h i) -> ... h i", h=num_blocks)
    y = jnp.einsum("... h i, h i j -> ... h j", x, w) + b
    return einops.rearrange(y, "... h j -> ... (h j)")
  "(h i)" is head-major: input feature h * i_size + k is entry k of head h; likewise for outputs.

  Args:
    x: <..., heads * i>.
    w: <heads, i, j>.
    b: <heads, j>.

  Returns:
    <..., heads * j>.
  """
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  heads, i, j = w.shape
  xh = x.reshape(*x.shape[:-1], heads, i)
  y = np.einsum("...hi,hij->...hj", xh, w) + np.asarray(b, np.float64)
  return y.reshape(*x.shape[:-1], heads * j)


def conv1d(x, w, b, state=None):
  """Conv1D: a causal depthwise temporal convolution of width W = w.shape[0] (4 in Griffin).

  Source: recurrentgemma@2efa84d, recurrentgemma/jax/layers.py, class Conv1D.__call__. Their loop
  over `temporal_shift` k = 0..W-1 accumulates x_window(shifted back by k) * w[W - k - 1], so

    y_s = b + sum_{k=0}^{W-1} w[W-1-k] * x_{s-k} = b + sum_{j=0}^{W-1} w[j] * x_{s-(W-1)+j}:

  w[W-1] multiplies the current input x_s, w[W-2] x_{s-1}, ..., w[0] the oldest x_{s-(W-1)}.
  Inputs before the sequence start are zeros ("training mode": windows left-padded with zeros)
  or, when a cache is given ("decoding mode"), the cached previous inputs. The new cache is
  `x[:, 1 - W:]` of the (cache ++ input) sequence, left-padded with zeros to W-1 rows: the last
  W-1 inputs, oldest first, so cache[:, -1] is the most recent input.

  Two notes on the authors' code: (1) their decoding mode asserts one token per call; this
  function accepts any t with a state, which equals their training mode run over the state
  followed by x, and their decoding mode token by token. (2) In training mode they also zero
  window entries that straddle a document boundary (segment_pos == 0 ahead of them); a boundary
  only at position 0 masks nothing (the left padding is already zeros), and in decoding mode
  nothing is masked, so with no resets inside a sequence this function is exact.

  Args:
    x: <b, t, d> inputs.
    w: <W, d> taps (Flax param "w").
    b: <d> bias (Flax param "b").
    state: <b, W-1, d> the previous W-1 inputs, oldest first; None (a fresh sequence) = zeros.

  Returns:
    (y <b, t, d>, new_state <b, W-1, d>).
  """
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  bsz, t, d = x.shape
  width = w.shape[0]
  if state is None:
    state = np.zeros((bsz, width - 1, d))
  state = np.asarray(state, np.float64)
  assert state.shape == (bsz, width - 1, d), (state.shape, (bsz, width - 1, d))
  xp = np.concatenate([state, x], axis=1)  # <b, W-1+t, d>; xp[:, W-1+s] = x_s
  y = np.zeros((bsz, t, d)) + np.asarray(b, np.float64)
  for j in range(width):  # xp[:, j + s] = x_{s-(W-1)+j}
    y = y + xp[:, j:j + t] * w[j]
  new_state = xp[:, xp.shape[1] - (width - 1):]
  return y, new_state


def rg_lru(x, params, h0=None, reset_at_start: bool = False):
  """RG-LRU: the Real-Gated Linear Recurrent Unit (only_real=True, as in all Griffin configs).

  Source: recurrentgemma@2efa84d, recurrentgemma/jax/layers.py, class RGLRU.__call__, with
  recurrentgemma/jax/scan.py linear_scan (h_t = a_t * h_{t-1} + x_t, y_t = h_t, h0 = 0 if None):
    gate_x = sigmoid(input_gate(x));  gate_a = sigmoid(a_gate(x))     (BlockDiagonalLinear each)
    log_a  = -8.0 * gate_a * softplus(a_param);  a = exp(log_a);  a_sq = exp(2 * log_a)
    reset  = (segment_pos == 0)
    multiplier = reset + (1 - reset) * sqrt(1 - a_sq)
    h_t = (a_t * (1 - reset_t)) * h_{t-1} + (x_t * gate_x_t) * multiplier_t
  (Their sqrt has its gradient clipped at 1000 (sqrt_bound_derivative): backward pass only.)

  At a position with segment_pos == 0 their code therefore (i) drops the previous state (a is
  zeroed, so h0 is ignored) and (ii) does NOT apply the sqrt(1 - a**2) normalisation:
  h_0 = gate_x_0 * x_0. A fresh sequence in their code has segment_pos = 0, 1, 2, ... and so
  gets this treatment at its first token. `reset_at_start=True` reproduces it for position 0 of
  this call; the default False treats position 0 like any other (h_0 = a_0 * h0 + sqrt(1 - a_0**2)
  * gate_x_0 * x_0, with h0 = 0 when None), which is their code with segment_pos never 0, and is
  what a block that carries state and never resets computes. Resets inside x are not modelled.

  Args:
    x: <b, t, e> inputs (e = lru_width).
    params: {"a_param": <e>, "input_gate": {"w": <H, e/H, e/H>, "b": <H, e/H>},
             "a_gate": {"w": <H, e/H, e/H>, "b": <H, e/H>}}.
    h0: <b, e> the previous state (their cache); None = zeros.
    reset_at_start: treat position 0 as segment_pos == 0 (see above).

  Returns:
    (y <b, t, e>, h_last <b, e>): y_t = h_t, and h_last = h_{t-1}, the new cache.
  """
  x = np.asarray(x, np.float64)
  bsz, t, e = x.shape
  gate_x = sigmoid(block_diagonal_linear(x, params["input_gate"]["w"], params["input_gate"]["b"]))
  gate_a = sigmoid(block_diagonal_linear(x, params["a_gate"]["w"], params["a_gate"]["b"]))
  log_a = -C_RGLRU * gate_a * softplus(params["a_param"])
  a, a_squared = np.exp(log_a), np.exp(2.0 * log_a)
  gated_x = x * gate_x
  reset = np.zeros((bsz, t))
  if reset_at_start:
    reset[:, 0] = 1.0
  multiplier = reset[..., None] + (1.0 - reset)[..., None] * np.sqrt(1.0 - a_squared)
  normalized_x = gated_x * multiplier
  a = a * (1.0 - reset[..., None])
  h = np.zeros((bsz, e)) if h0 is None else np.asarray(h0, np.float64)
  assert h.shape == (bsz, e), (h.shape, (bsz, e))
  y = np.empty((bsz, t, e))
  for s in range(t):
    h = a[:, s] * h + normalized_x[:, s]
    y[:, s] = h
  return y, h


# ------------------------------------------------------------------------------------------------
# Blocks (recurrentgemma/jax/modules.py).


def recurrent_block(x, params, cache=None, reset_at_start: bool = False):
  """RecurrentBlock: gelu(linear_y(x)) * rg_lru(conv_1d(linear_x(x))), then linear_out.

  Source: recurrentgemma@2efa84d, recurrentgemma/jax/modules.py, class RecurrentBlock.__call__:
    y = jax.nn.gelu(linear_y(x))                    # tanh-approximate GELU
    x = linear_x(x); x, conv1d_state = conv_1d(x); x, rg_lru_state = rg_lru(x)
    return linear_out(x * y), RecurrentBlockCache(rg_lru_state, conv1d_state)
  linear_x, linear_y: Dense width -> lru_width; linear_out: Dense lru_width -> width (all biased).

  Args:
    x: <b, t, width>.
    params: the "recurrent_block" subtree of `random_params`.
    cache: {"rg_lru_state": <b, lru_width>, "conv1d_state": <b, W-1, lru_width>} or None
      (a fresh sequence: zero states).
    reset_at_start: passed to `rg_lru` (their segment_pos == 0 at position 0).

  Returns:
    (y <b, t, width>, new cache as above).
  """
  y = gelu(dense(x, params["linear_y"]))
  h = dense(x, params["linear_x"])
  h, conv1d_state = conv1d(h, params["conv_1d"]["w"], params["conv_1d"]["b"],
                           None if cache is None else cache["conv1d_state"])
  h, rg_lru_state = rg_lru(h, params["rg_lru"], None if cache is None else cache["rg_lru_state"],
                           reset_at_start=reset_at_start)
  out = dense(h * y, params["linear_out"])
  return out, {"conv1d_state": conv1d_state, "rg_lru_state": rg_lru_state}


def mlp_block(x, params):
  """MLPBlock: a gated (GeGLU) MLP, gelu(up_0(x)) * up_1(x) -> ffw_down.

  Source: recurrentgemma@2efa84d, recurrentgemma/jax/modules.py, class MLPBlock, with
  layers.Einsum: ffw_up = Einsum(w <2, width, mlp>, b <2, 1, 1, mlp>, eqn "...td,cdD->c...tD"),
    out = einsum(x, w) + b;  activations = nn.gelu(out[0]) * out[1];  return ffw_down(activations)
  ffw_down: Dense mlp -> width with bias. Branch 0 of w (and b) is the gelu'd one.

  Args:
    x: <b, t, width>.
    params: {"ffw_up": {"w": <2, width, mlp>, "b": <2, 1, 1, mlp>},
             "ffw_down": {"kernel": <mlp, width>, "bias": <width>}}.

  Returns:
    <b, t, width>.
  """
  x = np.asarray(x, np.float64)
  up = np.einsum("...td,cdD->c...tD", x, np.asarray(params["ffw_up"]["w"], np.float64))
  up = up + np.asarray(params["ffw_up"]["b"], np.float64)
  return dense(gelu(up[0]) * up[1], params["ffw_down"])


def residual_block(x, params, cache=None, reset_at_start: bool = False):
  """ResidualBlock with a RECURRENT temporal block (use_mlp=True, as in every Griffin block).

  Source: recurrentgemma@2efa84d, recurrentgemma/jax/modules.py, class ResidualBlock.__call__:
    x1, cache = recurrent_block(temporal_pre_norm(x)); residual = x1 + x
    return mlp_block(channel_pre_norm(residual)) + residual, cache

  Args:
    x: <b, t, width>.
    params: `random_params`' tree: temporal_pre_norm, recurrent_block, channel_pre_norm,
      mlp_block.
    cache: as `recurrent_block`'s; None = a fresh sequence.
    reset_at_start: passed to `rg_lru` (their segment_pos == 0 at position 0).

  Returns:
    (y <b, t, width>, {"conv1d_state": <b, W-1, lru_width>, "rg_lru_state": <b, lru_width>}).
  """
  x = np.asarray(x, np.float64)
  h, new_cache = recurrent_block(rms_norm(x, params["temporal_pre_norm"]["scale"]),
                                 params["recurrent_block"], cache, reset_at_start=reset_at_start)
  residual = h + x
  out = mlp_block(rms_norm(residual, params["channel_pre_norm"]["scale"]), params["mlp_block"])
  return out + residual, new_cache


# ------------------------------------------------------------------------------------------------
# Parameters.


def param_shapes(width, lru_width, num_heads, mlp_width, conv_width=4) -> dict:
  """The authors' Flax parameter tree of one recurrent ResidualBlock, as shapes.

  Source: recurrentgemma@2efa84d, recurrentgemma/jax/modules.py (ResidualBlock.setup names
  "temporal_pre_norm", "recurrent_block", "channel_pre_norm", "mlp_block"; RecurrentBlock.setup
  "linear_y", "linear_x", "linear_out", "conv_1d", "rg_lru"; MLPBlock.setup "ffw_up",
  "ffw_down") and recurrentgemma/jax/layers.py (param names "scale", "w", "b", "a_param").
  In a whole Griffin model the tree sits under params["blocks.<i>"].
  """
  assert lru_width % num_heads == 0 and lru_width % 2 == 0
  hd = lru_width // num_heads
  return {
      "temporal_pre_norm": {"scale": (width,)},
      "recurrent_block": {
          "linear_y": {"kernel": (width, lru_width), "bias": (lru_width,)},
          "linear_x": {"kernel": (width, lru_width), "bias": (lru_width,)},
          "linear_out": {"kernel": (lru_width, width), "bias": (width,)},
          "conv_1d": {"w": (conv_width, lru_width), "b": (lru_width,)},
          "rg_lru": {
              "a_param": (lru_width,),
              "input_gate": {"w": (num_heads, hd, hd), "b": (num_heads, hd)},
              "a_gate": {"w": (num_heads, hd, hd), "b": (num_heads, hd)},
          },
      },
      "channel_pre_norm": {"scale": (width,)},
      "mlp_block": {
          "ffw_up": {"w": (2, width, mlp_width), "b": (2, 1, 1, mlp_width)},
          "ffw_down": {"kernel": (mlp_width, width), "bias": (width,)},
      },
  }


def a_param_init(rng: np.random.Generator, shape, min_rad=0.9, max_rad=0.999, eps=1e-8):
  """The authors' init of the RG-LRU's a_param: |a| (at gate_a = 1/8) uniform on a ring by area.

  Source: recurrentgemma@2efa84d, recurrentgemma/jax/layers.py, rnn_real_param_init (min_rad 0.9
  from RGLRU.min_rad, max_rad 0.999 from RGLRU.a_real_param_init):
    unif ~ U[0, 1); a_real = 0.5 * log(unif * (max_rad**2 - min_rad**2) + min_rad**2 + eps)
    a_param = log(exp(-a_real) - 1)          # softplus^-1(-a_real): softplus(a_param) = -log r
  """
  unif = rng.uniform(size=shape)
  a_real = 0.5 * np.log(unif * (max_rad**2 - min_rad**2) + min_rad**2 + eps)
  return np.log(np.exp(-a_real) - 1.0)


def init_params(rng: np.random.Generator, width, lru_width, num_heads, mlp_width, conv_width=4,
                final_w_init_variance_scale=1.0, min_rad=0.9) -> dict:
  """The authors' initialisation, in NumPy (same distributions, not the same random numbers).

  Source: recurrentgemma@2efa84d, recurrentgemma/jax/layers.py and modules.py (the initializers
  of each param), recurrentgemma/jax/griffin.py (final_w_init_variance_scale = 2 / num_layers).
  jax variance_scaling(scale, "fan_in", "normal") is an untruncated normal with std
  sqrt(scale / fan_in), fan_in = prod(shape) / shape[out_axis] / batch (no batch axes here):
    linear_x, linear_y kernels <width, lru>:   std sqrt(1 / width)
    linear_out kernel <lru, width>:            std sqrt(final_scale / lru_width)
    conv_1d w <W, lru> (scale 0.01):           std sqrt(0.01 / W)            (fan_in = W)
    input_gate / a_gate w <H, e/H, e/H>:       std sqrt(1 / lru_width)       (fan_in = H * e/H)
    ffw_up w <2, width, mlp> (in_axis=[1]):    std sqrt(1 / (2 * width))     (fan_in = 2 * width)
    ffw_down kernel <mlp, width>:              std sqrt(final_scale / mlp_width)
    all biases and both norm scales:           zeros
    a_param:                                   `a_param_init` (min_rad 0.9, max_rad 0.999)
  """
  shapes = param_shapes(width, lru_width, num_heads, mlp_width, conv_width)
  normal = lambda shape, var: rng.normal(scale=math.sqrt(var), size=shape)
  zeros = lambda shape: np.zeros(shape)
  rb, mlp = shapes["recurrent_block"], shapes["mlp_block"]
  dense_init = lambda s, scale: {"kernel": normal(s["kernel"], scale / s["kernel"][0]),
                                 "bias": zeros(s["bias"])}
  return {
      "temporal_pre_norm": {"scale": zeros((width,))},
      "recurrent_block": {
          "linear_y": dense_init(rb["linear_y"], 1.0),
          "linear_x": dense_init(rb["linear_x"], 1.0),
          "linear_out": dense_init(rb["linear_out"], final_w_init_variance_scale),
          "conv_1d": {"w": normal(rb["conv_1d"]["w"], 0.01 / conv_width),
                      "b": zeros((lru_width,))},
          "rg_lru": {
              "a_param": a_param_init(rng, (lru_width,), min_rad=min_rad),
              "input_gate": {"w": normal(rb["rg_lru"]["input_gate"]["w"], 1.0 / lru_width),
                             "b": zeros(rb["rg_lru"]["input_gate"]["b"])},
              "a_gate": {"w": normal(rb["rg_lru"]["a_gate"]["w"], 1.0 / lru_width),
                         "b": zeros(rb["rg_lru"]["a_gate"]["b"])},
          },
      },
      "channel_pre_norm": {"scale": zeros((width,))},
      "mlp_block": {
          "ffw_up": {"w": normal(mlp["ffw_up"]["w"], 1.0 / (2 * width)),
                     "b": zeros(mlp["ffw_up"]["b"])},
          "ffw_down": dense_init(mlp["ffw_down"], final_w_init_variance_scale),
      },
  }


def random_params(rng: np.random.Generator, width, lru_width, num_heads, mlp_width,
                  conv_width=4) -> dict:
  """Random parameters for testing, in the authors' tree (`param_shapes`), all float64.

  Unlike `init_params`, every bias and both norm scales are nonzero, and the conv taps are larger
  than at init (std 0.3, not 0.05), so that a transposed, swapped or dropped parameter changes
  the output. Kernels are normal with std 1/sqrt(fan_in); a_param follows the authors' ring init.

  Returns:
    {"temporal_pre_norm": {"scale": <width>},
     "recurrent_block": {"linear_y": {"kernel": <width, lru>, "bias": <lru>},
                         "linear_x": {"kernel": <width, lru>, "bias": <lru>},
                         "linear_out": {"kernel": <lru, width>, "bias": <width>},
                         "conv_1d": {"w": <conv_width, lru>, "b": <lru>},
                         "rg_lru": {"a_param": <lru>,
                                    "input_gate": {"w": <H, lru/H, lru/H>, "b": <H, lru/H>},
                                    "a_gate": {"w": <H, lru/H, lru/H>, "b": <H, lru/H>}}},
     "channel_pre_norm": {"scale": <width>},
     "mlp_block": {"ffw_up": {"w": <2, width, mlp>, "b": <2, 1, 1, mlp>},
                   "ffw_down": {"kernel": <mlp, width>, "bias": <width>}}}
  """
  shapes = param_shapes(width, lru_width, num_heads, mlp_width, conv_width)
  hd = lru_width // num_heads
  std = {"kernel": lambda s: 1.0 / math.sqrt(s[0]), "bias": lambda s: 0.1,
         "scale": lambda s: 0.2, "b": lambda s: 0.1}
  special = {("recurrent_block", "conv_1d", "w"): 0.3,
             ("recurrent_block", "rg_lru", "input_gate", "w"): 1.0 / math.sqrt(hd),
             ("recurrent_block", "rg_lru", "a_gate", "w"): 1.0 / math.sqrt(hd),
             ("mlp_block", "ffw_up", "w"): 1.0 / math.sqrt(width)}

  def fill(tree, path):
    out = {}
    for key, value in tree.items():
      here = path + (key,)
      if isinstance(value, dict):
        out[key] = fill(value, here)
      elif key == "a_param":
        out[key] = a_param_init(rng, value)
      else:
        scale = special[here] if here in special else std[key](value)
        out[key] = rng.normal(scale=scale, size=value)
    return out

  return fill(shapes, ())


# ------------------------------------------------------------------------------------------------
# Self-check (python tests/reference_griffin.py).


def _authors_modules():
  """Imports the authors' layers/modules: from $RECURRENTGEMMA_SRC (a directory holding the
  `recurrentgemma` package), else extracted from the bare git mirror $RECURRENTGEMMA_GIT_DIR
  (default /work/.mirror/google-deepmind+recurrentgemma/repo) into a temporary directory, with
  the two package __init__ files emptied (they pull in the sampler, sentencepiece, orbax).
  Raises ImportError if neither is available or their dependencies (einops, jaxtyping,
  typeguard, absl, flax, jax) are missing."""
  import atexit
  import os
  import shutil
  import subprocess
  import sys
  import tempfile

  # Their dependencies first, so that nothing is extracted when they are missing.
  import absl.logging  # pylint: disable=import-outside-toplevel,unused-import
  import einops  # pylint: disable=import-outside-toplevel,unused-import
  import flax.linen  # pylint: disable=import-outside-toplevel,unused-import
  import jaxtyping  # pylint: disable=import-outside-toplevel,unused-import
  import typeguard  # pylint: disable=import-outside-toplevel,unused-import

  src = os.environ.get("RECURRENTGEMMA_SRC")
  if not src:
    git_dir = os.environ.get("RECURRENTGEMMA_GIT_DIR",
                             "/work/.mirror/google-deepmind+recurrentgemma/repo")
    if not os.path.isdir(git_dir):
      raise ImportError(f"no recurrentgemma source: set RECURRENTGEMMA_SRC ({git_dir} absent)")
    src = tempfile.mkdtemp(prefix="recurrentgemma_")
    atexit.register(shutil.rmtree, src, ignore_errors=True)
    files = ["common.py", "jax/array_typing.py", "jax/complex_lib.py", "jax/pallas.py",
             "jax/scan.py", "jax/layers.py", "jax/modules.py"]
    for name in files + ["__init__.py", "jax/__init__.py"]:
      path = os.path.join(src, "recurrentgemma", name)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      text = "" if name.endswith("__init__.py") else subprocess.run(
          ["git", f"--git-dir={git_dir}", "show", f"HEAD:recurrentgemma/{name}"],
          check=True, capture_output=True, text=True).stdout
      with open(path, "w") as f:
        f.write(text)
  sys.path.insert(0, src)
  from recurrentgemma import common  # pylint: disable=import-outside-toplevel
  from recurrentgemma.jax import modules  # pylint: disable=import-outside-toplevel
  return common, modules


def _compare_with_authors(rng, width, lru_width, num_heads, mlp_width, b, t):
  """Runs the authors' Flax ResidualBlock (float32, CPU) on our random params; asserts closeness.

  Checked: their param tree's names and shapes equal `param_shapes`; a whole sequence with
  segment_pos = 1..t (never 0) against reset_at_start=False, and with segment_pos = 0..t-1 against
  reset_at_start=True; then decoding token by token with their cache against ours.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  common, modules = _authors_modules()
  block = modules.ResidualBlock(
      width=width, mlp_expanded_width=mlp_width, num_heads=num_heads, attention_window_size=8,
      temporal_block_type=common.TemporalBlockType.RECURRENT, lru_width=lru_width,
      scan_type=common.ScanType.LINEAR_NATIVE)
  x = rng.normal(size=(b, t, width))
  pos = jnp.tile(jnp.arange(t)[None], (b, 1))
  theirs_init = block.init(jax.random.key(0), jnp.asarray(x, jnp.float32), pos)["params"]
  their_shapes = jax.tree.map(lambda a: tuple(a.shape), theirs_init)
  ours = random_params(rng, width, lru_width, num_heads, mlp_width)
  assert param_shapes(width, lru_width, num_heads, mlp_width) == their_shapes, their_shapes
  variables = {"params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), ours)}
  apply = jax.jit(block.apply)
  close = lambda got, want: np.testing.assert_allclose(np.asarray(got, np.float64), want,
                                                       rtol=2e-4, atol=2e-5)
  for reset, p in ((False, pos + 1), (True, pos)):
    got, their_cache = apply(variables, jnp.asarray(x, jnp.float32), p)
    want, want_cache = residual_block(x, ours, reset_at_start=reset)
    close(got, want)
    close(their_cache.rg_lru_state, want_cache["rg_lru_state"])
    close(their_cache.conv1d_state, want_cache["conv1d_state"])
  # Decoding: their prompt pass (segment_pos from 1) then one token at a time with the cache.
  k = t // 2
  _, their_cache = apply(variables, jnp.asarray(x[:, :k], jnp.float32), pos[:, :k] + 1)
  _, cache = residual_block(x[:, :k], ours)
  for s in range(k, t):
    got, their_cache = apply(variables, jnp.asarray(x[:, s:s + 1], jnp.float32),
                             pos[:, s:s + 1] + 1, their_cache)
    want, cache = residual_block(x[:, s:s + 1], ours, cache)
    close(got, want)
    close(their_cache.rg_lru_state, cache["rg_lru_state"])
    close(their_cache.conv1d_state, cache["conv1d_state"])


def _self_check():
  rng = np.random.default_rng(0)
  width, lru_width, num_heads, mlp_width, b, t = 10, 12, 3, 14, 2, 11
  params = random_params(rng, width, lru_width, num_heads, mlp_width)
  x = rng.normal(size=(b, t, width))

  # (1) one call == one step at a time carrying the cache (both with and without the reset).
  for reset in (False, True):
    full, full_cache = residual_block(x, params, reset_at_start=reset)
    cache, steps = None, []
    for s in range(t):
      y, cache = residual_block(x[:, s:s + 1], params, cache, reset_at_start=reset and s == 0)
      steps.append(y)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=1e-12)
    for key in full_cache:
      np.testing.assert_allclose(cache[key], full_cache[key], rtol=0, atol=1e-12)

  # (2) two chunks with the cache carried == one call (every split point, incl. ones < W-1).
  full, full_cache = residual_block(x, params)
  for split in range(1, t):
    y1, cache = residual_block(x[:, :split], params)
    y2, cache = residual_block(x[:, split:], params, cache)
    np.testing.assert_allclose(np.concatenate([y1, y2], axis=1), full, rtol=0, atol=1e-12)
    for key in full_cache:
      np.testing.assert_allclose(cache[key], full_cache[key], rtol=0, atol=1e-12)

  # (3) spot checks of the conventions against hand-written formulas.
  w, bias = rng.normal(size=(4, 3)), rng.normal(size=3)
  xc = rng.normal(size=(1, 6, 3))
  yc, state = conv1d(xc, w, bias)
  assert np.allclose(yc[0, 5], bias + w[3] * xc[0, 5] + w[2] * xc[0, 4] + w[1] * xc[0, 3]
                     + w[0] * xc[0, 2], rtol=0, atol=1e-13)
  assert np.allclose(yc[0, 0], bias + w[3] * xc[0, 0], rtol=0, atol=1e-13)
  assert np.array_equal(state, xc[:, 3:])
  _, state = conv1d(xc[:, :1], w, bias)
  assert np.array_equal(state, np.concatenate([np.zeros((1, 2, 3)), xc[:, :1]], axis=1))
  p = params["recurrent_block"]["rg_lru"]
  xr = rng.normal(size=(1, 1, lru_width))
  y0, _ = rg_lru(xr, p, reset_at_start=True)
  gx = sigmoid(block_diagonal_linear(xr, p["input_gate"]["w"], p["input_gate"]["b"]))
  np.testing.assert_allclose(y0, gx * xr, rtol=0, atol=1e-14)  # no sqrt(1 - a^2) at a reset
  ga = sigmoid(block_diagonal_linear(xr, p["a_gate"]["w"], p["a_gate"]["b"]))
  a = np.exp(-8.0 * ga * np.log1p(np.exp(p["a_param"])))
  h0 = rng.normal(size=(1, lru_width))
  y1, _ = rg_lru(xr, p, h0)
  np.testing.assert_allclose(y1[:, 0], (a * h0 + np.sqrt(1 - a**2) * gx * xr)[:, 0], atol=1e-14)
  wb, bb = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 4))
  xb = rng.normal(size=(6,))
  np.testing.assert_allclose(block_diagonal_linear(xb, wb, bb),
                             np.concatenate([xb[:3] @ wb[0] + bb[0], xb[3:] @ wb[1] + bb[1]]),
                             atol=1e-14)
  print("self-check passed: one call == step by step == two chunks (atol 1e-12)")

  # (4) against the authors' Flax code, when it and its dependencies can be imported.
  import os  # pylint: disable=import-outside-toplevel
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  try:
    _compare_with_authors(rng, width, lru_width, num_heads, mlp_width, b, t)
  except ImportError as e:
    print(f"comparison with the authors' code skipped: {e!r}")
  else:
    print(f"comparison with the authors' code ({SOURCE}) passed (float32 tolerance)")


if __name__ == "__main__":
  _self_check()
