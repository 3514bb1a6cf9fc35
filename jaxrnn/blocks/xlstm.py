"""xlstm: the blocks of xLSTM (Beck et al. 2024) as in NX-AI/xlstm, blocks/xlstm_block.py
`xLSTMBlock`, around mlstm/layer.py `mLSTMLayer` (cell mlstm), or at the layers in
model.slstm_at around slstm/layer.py `sLSTMLayer` followed by components/feedforward.py
`GatedFeedForward`.

  mLSTM block   x + W_down((norm(mlstm(q, k, v)) + skip * u) * silu(z)),
                (x_m, z) = W_up ln(x), u = silu(conv(x_m)); q, k from u, v from x_m
  sLSTM block   x + norm(slstm(i, f from silu(conv(ln x)); z, o from ln x)), then x + ffn(ln x)

The mLSTM runs as `layers.run` chooses for its cell (`model.impl`): its step form (the authors'
`recurrent_step_stabilized_simple`) under `scan`, its chunkwise parallel form (the authors'
`parallel_stabilized_simple`, chunked) under `fused`, which `auto` takes on every platform.
"""

import functools
import math

import jax
import jax.numpy as jnp

from jaxrnn import cells, layers
from jaxrnn.blocks.common import (Block, Config, block_diagonal, causal_conv, conv_init, dense,
                                  gated_mlp, layer_norm, normal, on_gates, round_up)
from jaxrnn.cells import Cell

EPS = 1e-5  # the authors' LayerNorm epsilon
QKV_BLOCK = 4  # qkv_proj_blocksize: q, k, v are block-diagonal in blocks of 4
FFN = 1.3  # the sLSTM block's feed-forward factor (FeedForwardConfig.proj_factor)


def inner(model_config: Config) -> int:
  """The mLSTM block's inner width: expand * h rounded up to a multiple of 64, as the authors'."""
  return round_up(model_config.expand * model_config.hidden_size, 64)


def _is_slstm(model_config: Config, layer: int) -> bool:
  return layer in tuple(model_config.slstm_at)


def slstm_forget_bias(head_dim: int, layer: int, num_layers: int) -> jax.Array:
  """The authors' "powerlaw_blockdependent" forget-gate bias<head_dim> (slstm/cell.py): from 5
  down to -7 across a head, the curve's exponent 0.3 + 1.3 * layer / (num_layers - 1), so
  deeper blocks start remembering for longer."""
  ratio = layer / (num_layers - 1) if num_layers > 1 else 0.0
  x = jnp.arange(head_dim, dtype=jnp.float32) / max(head_dim - 1, 1)
  return -(-5.0 + 12.0 * x ** (0.3 + 1.3 * ratio))


def _init(key, model_config, layer):
  """The authors' init: up- and q/k/v projections N(0, 2 / (5h)) ("small init"), the output
  projections N(0, (2 / num_layers / sqrt(h))^2) ("wang"), mLSTM gates from their biases alone
  (i ~ N(0, 0.1), f from 3 to 6 over the heads), skip 1, norm weights 0 (a scale of 1); the
  sLSTM's recurrent weights 0, its biases 0 but the forget gate's (`slstm_forget_bias`)."""
  h, heads, n = model_config.hidden_size, model_config.num_heads, model_config.num_layers
  width, keys = model_config.conv_width, jax.random.split(key, 8)
  small = math.sqrt(2.0 / (5 * h))
  wang = 2.0 / n / math.sqrt(h)
  if _is_slstm(model_config, layer):
    dh, m = h // heads, round_up(FFN * h, 64)
    gate = lambda k: {"w": normal(k, (heads, dh, dh), small)}
    b = jnp.zeros((4, heads, dh)).at[1].set(slstm_forget_bias(dh, layer, n)).reshape(-1)
    return {"norm": jnp.zeros((h,)), "conv": conv_init(keys[1], width, h),
            "igate": gate(keys[2]), "fgate": gate(keys[3]), "zgate": gate(keys[4]),
            "ogate": gate(keys[5]), "w_hh": jnp.zeros((heads, dh, 4 * dh)), "b": b,
            "group_norm": jnp.zeros((h,)), "ffn_norm": jnp.zeros((h,)),
            "ffn": {"up": {"w": normal(keys[6], (2, h, m), small)},
                    "down": {"w": normal(keys[7], (m, h), wang)}}}
  width_in = inner(model_config)
  blocks = width_in // QKV_BLOCK
  qkv = lambda k: {"w": normal(k, (blocks, QKV_BLOCK, QKV_BLOCK), small)}
  return {"norm": jnp.zeros((h,)), "proj_up": {"w": normal(keys[0], (h, 2 * width_in), small)},
          "conv": conv_init(keys[1], width, width_in),
          "q": qkv(keys[2]), "k": qkv(keys[3]), "v": qkv(keys[4]),
          "igate": {"w": jnp.zeros((3 * width_in, heads)),
                    "b": 0.1 * jax.random.normal(keys[6], (heads,), jnp.float32)},
          "fgate": {"w": jnp.zeros((3 * width_in, heads)),
                    "b": jnp.linspace(3.0, 6.0, heads, dtype=jnp.float32)},
          "outnorm": jnp.zeros((width_in,)), "skip": jnp.ones((width_in,)),
          "proj_down": {"w": normal(keys[5], (width_in, h), wang)}}


def _cell(model_config: Config, layer: int) -> Cell:
  factory = cells.slstm if _is_slstm(model_config, layer) else cells.mlstm_memory
  return on_gates(factory(num_heads=model_config.num_heads,
                          compute_dtype=model_config.compute_dtype))


def _carry(model_config, b, layer):
  width = model_config.hidden_size if _is_slstm(model_config, layer) else inner(model_config)
  return (jnp.zeros((b, model_config.conv_width - 1, width)),
          _cell(model_config, layer).initial_carry(b, width))


def _apply(params, carry, x, model_config, layer, step):
  heads, c = model_config.num_heads, _cell(model_config, layer)
  conv_state, cell_state = carry
  run = functools.partial(layers.run, c, unroll=step.unroll, impl=step.impl)
  normed = layer_norm(x, params["norm"], EPS)
  if _is_slstm(model_config, layer):
    u, conv_state = causal_conv(params["conv"], normed, conv_state)
    u = jax.nn.silu(u)
    # gx in the slstm cell's layout (i, f, z, o), each head-major; i and f read the conv.
    gx = jnp.concatenate([block_diagonal(params[g], v, c.dtype) for g, v in
                          (("igate", u), ("fgate", u), ("zgate", normed), ("ogate", normed))],
                         axis=-1) + params["b"]
    cell_state, hs = run({"w_hh": params["w_hh"]}, cell_state, gx)
    # Dropout before the head-wise norm, as sLSTMLayer.forward.
    x = x + layer_norm(step.drop(hs, 0), params["group_norm"], EPS, heads=heads)
    y = gated_mlp(params["ffn"], layer_norm(x, params["ffn_norm"], EPS), c.dtype,
                  approximate=False)
    return (conv_state, cell_state), x + step.drop(y, 1)
  x_m, z = jnp.split(dense(params["proj_up"], normed, c.dtype), 2, axis=-1)
  u, conv_state = causal_conv(params["conv"], x_m, conv_state)
  u = jax.nn.silu(u)
  q, k = block_diagonal(params["q"], u, c.dtype), block_diagonal(params["k"], u, c.dtype)
  v = block_diagonal(params["v"], x_m, c.dtype)
  qkv = jnp.concatenate([q, k, v], axis=-1)
  gx = jnp.concatenate([qkv, dense(params["igate"], qkv, c.dtype),
                        dense(params["fgate"], qkv, c.dtype)], axis=-1)
  cell_state, hs = run({}, cell_state, gx)
  # Norm, then the learnable skip from the conv, then the SiLU(z) gate (mLSTMLayer.forward).
  hs = (layer_norm(hs, params["outnorm"], EPS, heads=heads) + params["skip"] * u) * jax.nn.silu(z)
  return (conv_state, cell_state), x + step.drop(dense(params["proj_down"], hs, c.dtype), 0)


XLSTM = Block(_init, _carry, _apply, functools.partial(layer_norm, eps=EPS))
