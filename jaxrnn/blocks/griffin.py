"""hawk and griffin: the two models of De et al. 2024, "Griffin: Mixing Gated Linear Recurrences
with Local Attention for Efficient Language Models", as in google-deepmind/recurrentgemma,
jax/modules.py `ResidualBlock`, one temporal block and an `MLPBlock` per layer:

  x + temporal(rms(x)), then x + mlp(rms(x))
  recurrent   W_out(gelu(W_y x) * rglru(conv(W_x x)))   (`RecurrentBlock`; cell rglru, its gates
              block-diagonal over model.num_heads heads, model.lru_width wide)
  attention   local multi-query attention (`LocalAttentionBlock`): model.num_heads query heads
              and one key and value head of h / num_heads, RoPE on the first half of each
              head, each token seeing itself and the model.attention_window tokens before it

Hawk's layers are all recurrent; Griffin's follow the authors' pattern (recurrent, recurrent,
attention), so layers 2, 5, 8, ... attend. The attention's carry is the window before the
current tokens (keys and values, oldest first, with a mask of which are filled), so truncated
BPTT, whole-split evaluation and sampling see the same window as one long sequence.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxrnn import cells, layers
from jaxrnn.blocks.common import (RG_EPS, Block, Config, block_diagonal, causal_conv, conv_init,
                                  dense, gated_mlp, mlp_init, normal, on_gates, rms_norm)
from jaxrnn.cells import Cell, Params

OPTIONS = ("num_heads",)  # the rglru cell's gates are block-diagonal over num_heads heads
ROPE_WAVELENGTH = 10_000  # recurrentgemma's _MAX_WAVELENGTH
MIN_LOGIT = -2.3819763e38  # recurrentgemma's _MIN_LOGITS_VALUE, a masked position's logit


def cell(model_config: Config) -> Cell:
  """The RG-LRU, its options read with the block's (`OPTIONS`)."""
  return cells.from_config(model_config, also=OPTIONS)


def lru_width(model_config: Config) -> int:
  """The RG-LRU's width: model.lru_width, or 0 for the model's (the authors' default, None)."""
  return model_config.lru_width or model_config.hidden_size


def is_attention(model_config: Config, layer: int) -> bool:
  """Griffin's layers 2, 5, 8, ... (the authors' block_types: recurrent, recurrent, attention)."""
  return model_config.block == "griffin" and layer % 3 == 2


def rope(x: jax.Array, positions: jax.Array) -> jax.Array:
  """recurrentgemma's `_apply_rope`: the first half of x's last axis (d) rotated by position,
  in pairs (j, j + d / 4) at frequencies ROPE_WAVELENGTH^(-4j / d); positions broadcast
  against x<..., d> without its last axis."""
  x_rope, rest = jnp.split(x, 2, axis=-1)
  first, second = jnp.split(x_rope, 2, axis=-1)
  inv_frequency = 1.0 / ROPE_WAVELENGTH ** (2 * jnp.arange(first.shape[-1]) / x_rope.shape[-1])
  angle = positions[..., None] * inv_frequency
  sin, cos = jnp.sin(angle).astype(x.dtype), jnp.cos(angle).astype(x.dtype)
  return jnp.concatenate([first * cos - second * sin, second * cos + first * sin, rest], axis=-1)


def local_attention(params: Params, cache: tuple[jax.Array, ...], x: jax.Array, num_heads: int,
                    dtype: Any) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """recurrentgemma's LocalAttentionBlock over x<b, t, h> after the window in `cache` ->
  (the window after x, y<b, t, h>).

  cache: (keys<b, w, h / num_heads>, values<b, w, h / num_heads>, filled<b, w>), the w =
  model.attention_window tokens before x, oldest first; keys before their rotation, which
  takes positions relative to x's first token (-w .. t - 1): attention depends on positions'
  differences only, so this equals the authors' absolute positions, in float32 however long
  the stream. params {"proj_q": {"w"<h, h>}, "proj_k", "proj_v": {"w"<h, h / num_heads>},
  "proj_final": {"w"<h, h>, "b"<h>}}.
  """
  cached_keys, cached_values, filled = cache
  (b, t, h), window = x.shape, filled.shape[1]
  head = h // num_heads
  q = dense(params["proj_q"], x, dtype).reshape(b, t, num_heads, head)
  new = lambda name, old: jnp.concatenate(
      [old, dense(params[name], x, dtype).astype(old.dtype)], axis=1)  # <b, w + t, head>
  keys, values = new("proj_k", cached_keys), new("proj_v", cached_values)
  filled = jnp.concatenate([filled, jnp.ones((b, t), filled.dtype)], axis=1)
  at_q = jnp.arange(t, dtype=x.dtype)
  at_k = jnp.arange(-window, t, dtype=x.dtype)
  logits = cells.einsum("btnd,bsd->bnts", rope(q, at_q[:, None]), rope(keys, at_k),
                        dtype) * head ** -0.5
  seen = (at_k <= at_q[:, None]) & (at_k >= at_q[:, None] - window)  # <t, w + t>
  logits = jnp.where(seen & (filled[:, None, None, :] > 0), logits, MIN_LOGIT)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  y = cells.einsum("bnts,bsd->btnd", probs, values, dtype).reshape(b, t, h)
  return ((keys[:, -window:], values[:, -window:], filled[:, -window:]),
          dense(params["proj_final"], y, dtype))


def _mlp(params, x, dtype, step):
  """The layer's second half, x + mlp(rms(x)), for either temporal block."""
  y = gated_mlp(params["mlp"], rms_norm(x, params["channel_pre_norm"], RG_EPS), dtype,
                approximate=True)
  return x + step.drop(y, 1)


def _init(key, model_config, layer):
  """The authors' init (modules.py, layers.py): weights N(0, scale / fan_in), biases and norm
  scales 0, the output projections' scale 2 / num_layers, the conv's 0.01; RG-LRU's a as the
  rglru cell's."""
  h, heads, width = model_config.hidden_size, model_config.num_heads, model_config.conv_width
  m = model_config.mlp_expansion * h
  out_scale = 2.0 / model_config.num_layers
  mlp = mlp_init(jax.random.fold_in(key, 1), h, m, math.sqrt(out_scale / m))
  dense_init = lambda k, n_in, n_out, scale=1.0: {"w": normal(k, (n_in, n_out),
                                                               math.sqrt(scale / n_in)),
                                                  "b": jnp.zeros((n_out,))}
  if is_attention(model_config, layer):
    keys = jax.random.split(key, 4)
    no_bias = lambda k, n_out: {"w": normal(k, (h, n_out), math.sqrt(1.0 / h))}
    return {"temporal_pre_norm": jnp.zeros((h,)), "proj_q": no_bias(keys[0], h),
            "proj_k": no_bias(keys[1], h // heads), "proj_v": no_bias(keys[2], h // heads),
            "proj_final": dense_init(keys[3], h, h, out_scale),
            "channel_pre_norm": jnp.zeros((h,)), "mlp": mlp}
  lru, keys = lru_width(model_config), jax.random.split(key, 7)
  gate = lambda k: {"w": normal(k, (heads, lru // heads, lru // heads), math.sqrt(1.0 / lru)),
                    "b": jnp.zeros((lru,))}
  return {"temporal_pre_norm": jnp.zeros((h,)),
          "linear_y": dense_init(keys[0], h, lru), "linear_x": dense_init(keys[1], h, lru),
          "conv": conv_init(keys[2], width, lru, std=math.sqrt(0.01 / width)),
          "input_gate": gate(keys[3]), "a_gate": gate(keys[4]),
          "a_param": cell(model_config).init(keys[5], lru, lru)["a_param"],
          "linear_out": dense_init(keys[6], lru, h, out_scale),
          "channel_pre_norm": jnp.zeros((h,)), "mlp": mlp}


def _carry(model_config, b, layer):
  if is_attention(model_config, layer):
    w, head = model_config.attention_window, model_config.hidden_size // model_config.num_heads
    return jnp.zeros((b, w, head)), jnp.zeros((b, w, head)), jnp.zeros((b, w))
  lru = lru_width(model_config)
  return jnp.zeros((b, model_config.conv_width - 1, lru)), cell(model_config).initial_carry(b, lru)


def _apply(params, carry, x, model_config, layer, step):
  c = cell(model_config)
  normed = rms_norm(x, params["temporal_pre_norm"], RG_EPS)
  if is_attention(model_config, layer):
    carry, y = local_attention(params, carry, normed, model_config.num_heads, c.dtype)
    return carry, _mlp(params, x + step.drop(y, 0), c.dtype, step)
  conv_state, lru_state = carry
  y = jax.nn.gelu(dense(params["linear_y"], normed, c.dtype))  # tanh gelu, as jax.nn's default
  u, conv_state = causal_conv(params["conv"], dense(params["linear_x"], normed, c.dtype),
                              conv_state)
  # The RG-LRU's input is the conv's output itself: gx = (x~, input gate, a gate).
  gx = jnp.concatenate([u, block_diagonal(params["input_gate"], u, c.dtype),
                        block_diagonal(params["a_gate"], u, c.dtype)], axis=-1)
  lru_state, hs = layers.run(on_gates(c), {"a_param": params["a_param"]}, lru_state, gx,
                             unroll=step.unroll, impl=step.impl)
  x = x + step.drop(dense(params["linear_out"], hs * y, c.dtype), 0)
  return (conv_state, lru_state), _mlp(params, x, c.dtype, step)


# Hawk is Griffin without its attention layers: one block serves both (`is_attention`).
GRIFFIN = Block(_init, _carry, _apply, functools.partial(rms_norm, eps=RG_EPS))
