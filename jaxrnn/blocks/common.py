"""The pieces the blocks share: norms, dense and block-diagonal layers, the causal convolution,
the gated MLP, their initialisations, and the interface every block implements (`Block`).

Dense weights are (in, out); "b" is absent where the authors have none. Shapes: x<float>[b, t,
h] batch-major; a convolution's state<float>[b, width - 1, channels].
"""

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxrnn import cells
from jaxrnn.cells import Carry, Cell, Params, matmul

Config = Any  # ml_collections.ConfigDict (the `model` section)
RG_EPS = 1e-6  # recurrentgemma's RMSNorm epsilon (the residual block takes their norm)

def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x * rsqrt(mean(x^2) + eps) * (1 + scale), recurrentgemma's form (scale starts at 0)."""
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + scale)


def layer_norm(x: jax.Array, scale: jax.Array, eps: float,
               heads: int = 1) -> jax.Array:
  """xLSTM's LayerNorm (biased variance, no bias, weight 1 + scale), over each of `heads`
  contiguous groups of x's last axis (their MultiHeadLayerNorm; one group: LayerNorm)."""
  g = x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)
  g = g - g.mean(axis=-1, keepdims=True)
  g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + eps)
  return g.reshape(x.shape) * (1.0 + scale)


def dense(params: Params, x: jax.Array, dtype: Any) -> jax.Array:
  """x W (+ b): params {"w"<in, out>, optional "b"<out>}."""
  y = matmul(x, params["w"], dtype)
  return y + params["b"] if "b" in params else y


def block_diagonal(params: Params, x: jax.Array, dtype: Any) -> jax.Array:
  """x<..., heads * i> -> <..., heads * j>, head k's slice times w[k]: params {"w"<heads, i, j>,
  optional "b"<heads * j>} (recurrentgemma's BlockDiagonalLinear, xLSTM's LinearHeadwiseExpand)."""
  w = params["w"]
  heads = x.reshape(*x.shape[:-1], w.shape[0], w.shape[1])
  y = cells.einsum("...hi,hij->...hj", heads, w, dtype).reshape(*x.shape[:-1], -1)
  return y + params["b"] if "b" in params else y


def causal_conv(params: Params, x: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Depthwise causal convolution: y_t = b + sum_j w[j] x_{t - (width - 1) + j}, so w[-1] takes
  the current input. x<b, t, c>, params {"w"<width, c>, "b"<c>}, state<b, width - 1, c> the
  inputs before x (zeros at a sequence's start) -> (y<b, t, c>, the last width - 1 inputs)."""
  w, t = params["w"], x.shape[1]
  padded = jnp.concatenate([state, x], axis=1)
  y = sum(padded[:, j:j + t] * w[j] for j in range(w.shape[0])) + params["b"]
  return y, padded[:, t:]


def gated_mlp(params: Params, x: jax.Array, dtype: Any, approximate: bool) -> jax.Array:
  """down(gelu(x W_up[0] + b[0]) * (x W_up[1] + b[1])): recurrentgemma's MLPBlock (tanh gelu)
  and xLSTM's GatedFeedForward (exact gelu, no biases). params {"up": {"w"<2, h, m>, "b"<2, m>},
  "down": {"w"<m, h>, "b"<h>}}."""
  up = params["up"]
  gate, value = (dense({"w": up["w"][i], **({"b": up["b"][i]} if "b" in up else {})}, x, dtype)
                 for i in range(2))
  return dense(params["down"], jax.nn.gelu(gate, approximate=approximate) * value, dtype)


# ---------------------------------------------------------------------------------------------
# Initialisations.

def normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
  return std * jax.random.normal(key, shape, jnp.float32)


def uniform(key: jax.Array, shape: tuple[int, ...], bound: float) -> jax.Array:
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def conv_init(key: jax.Array, width: int, channels: int, std: float | None = None) -> Params:
  """w<width, c>: N(0, std^2) (recurrentgemma, bias 0) or, std None, torch's Conv1d default
  U(+-1/sqrt(width)) for both (xLSTM, Mamba)."""
  k_w, k_b = jax.random.split(key)
  if std is not None:
    return {"w": normal(k_w, (width, channels), std), "b": jnp.zeros((channels,))}
  bound = 1.0 / math.sqrt(width)
  return {"w": uniform(k_w, (width, channels), bound), "b": uniform(k_b, (channels,), bound)}


def mlp_init(key: jax.Array, h: int, m: int, out_std: float, biases: bool = True) -> Params:
  """recurrentgemma's MLPBlock init: up N(0, 1 / (2h)), down N(0, out_std^2), biases 0."""
  k_up, k_down = jax.random.split(key)
  params = {"up": {"w": normal(k_up, (2, h, m), math.sqrt(1.0 / (2 * h)))},
            "down": {"w": normal(k_down, (m, h), out_std)}}
  if biases:
    params["up"]["b"], params["down"]["b"] = jnp.zeros((2, m)), jnp.zeros((h,))
  return params


def on_gates(c: Cell) -> Cell:
  """`c` reading its gate pre-activations gx as its input: for a block that computes them
  itself (an identity `project`); `layers.run` then runs its sequential or parallel form."""
  return dataclasses.replace(c, project=lambda params, gx: gx)


def round_up(x: float, multiple: int) -> int:
  return multiple * math.ceil(x / multiple)


class Step(NamedTuple):
  """What a block's `apply` needs besides its parameters: how to run its cell and its dropout."""
  impl: str
  unroll: int
  drop: Callable[[jax.Array, int], jax.Array]  # (a branch's output, branch index) -> dropped
  weight_drop: Callable[[Cell, Params], Params]  # the recurrent matrix's DropConnect


class Block(NamedTuple):
  """init(key, model_config, layer) -> params; initial_carry(model_config, b, layer) -> carry;
  apply(params, carry, x<b, t, h>, model_config, layer, step) -> (carry, x<b, t, h>);
  norm(x, scale): the final norm after the last layer."""
  init: Callable[..., Params]
  initial_carry: Callable[..., Carry]
  apply: Callable[..., tuple[Carry, jax.Array]]
  norm: Callable[[jax.Array, jax.Array], jax.Array]


