"""How each layer wraps its cell (`model.block`): the plain stack, a pre-norm residual block,
and the blocks of Griffin, xLSTM and Mamba as their authors wrote them.

  stack      today's stacked cells, dropout between layers (`layers.run_stack`)
  residual   x + cell(norm(x)), then x + mlp(norm(x)); any cell; RMSNorm, recurrentgemma's
             gated MLP (width model.mlp_expansion * h)
  griffin    recurrentgemma's ResidualBlock around its RecurrentBlock (cell rglru):
             gelu(x W_y) * rglru(conv(x W_x)) W_out, then their MLPBlock
  xlstm      xLSTM's mLSTM block (cell mlstm; up-projection, conv and SiLU feeding q and k,
             learnable skip, head-wise norm, SiLU(z) gate), and its sLSTM block at the layers in
             model.slstm_at (conv feeding the i and f gates, head-wise norm, gated MLP)
  mamba      Mamba-1's block (cell mamba): x + out(ssm(silu(conv(x W_in))) * silu(z))

Every block but the stack runs a residual stream of model.hidden_size (h) units: the
embedding is projected into it (`w_in`) where model.embed_dim differs, and a final norm
(`norm`) ends it. A block's carry holds all the next step needs, each convolution's last
(width - 1) inputs included, so one token at a time equals the whole sequence. Where the
authors' code fixes a size or an initialisation, it is theirs (cited per block); the tests
compare each block with a float64 NumPy transliteration of their code (tests/reference_*.py).

Shapes: x<float>[b, t, h] batch-major; a convolution's state<float>[b, width - 1, channels].
"""

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxrnn import cells, layers
from jaxrnn.cells import Carry, Cell, Params, matmul

Config = Any  # ml_collections.ConfigDict (the `model` section)

BLOCKS = ("stack", "residual", "griffin", "xlstm", "mamba")
# The cell an authors' block is built around; "stack" and "residual" run any cell.
CELLS = {"griffin": "rglru", "xlstm": "mlstm", "mamba": "mamba"}
# Cell options a block reads besides the cell itself: Griffin's gates are block-diagonal
# over model.num_heads heads, as recurrentgemma's RG-LRU.
OPTIONS = {"griffin": ("num_heads",)}
RG_EPS, MAMBA_EPS, XLSTM_EPS = 1e-6, 1e-5, 1e-5  # each authors' norm epsilon
XLSTM_QKV_BLOCK = 4  # xLSTM's qkv_proj_blocksize: q, k, v are block-diagonal in blocks of 4
XLSTM_FFN = 1.3  # the sLSTM block's feed-forward factor (FeedForwardConfig.proj_factor)


def takes(model_config: Config) -> set[str]:
  """The cell options a run reads: its cell's and its block's (`OPTIONS`)."""
  return cells.takes(model_config.cell) | set(OPTIONS.get(model_config.block, ()))


def cell(model_config: Config) -> Cell:
  """The cell the layers run (`cells.from_config`), its options checked with the block's."""
  return cells.from_config(model_config, also=OPTIONS.get(model_config.block, ()))


# ---------------------------------------------------------------------------------------------
# Pieces the blocks share. Dense weights are (in, out); "b" is absent where the authors have none.

def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x * rsqrt(mean(x^2) + eps) * (1 + scale), recurrentgemma's form (scale starts at 0)."""
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + scale)


def layer_norm(x: jax.Array, scale: jax.Array, eps: float = XLSTM_EPS,
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


def _normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
  return std * jax.random.normal(key, shape, jnp.float32)


def _uniform(key: jax.Array, shape: tuple[int, ...], bound: float) -> jax.Array:
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _conv_init(key: jax.Array, width: int, channels: int, std: float | None = None) -> Params:
  """w<width, c>: N(0, std^2) (recurrentgemma, bias 0) or, std None, torch's Conv1d default
  U(+-1/sqrt(width)) for both (xLSTM, Mamba)."""
  k_w, k_b = jax.random.split(key)
  if std is not None:
    return {"w": _normal(k_w, (width, channels), std), "b": jnp.zeros((channels,))}
  bound = 1.0 / math.sqrt(width)
  return {"w": _uniform(k_w, (width, channels), bound), "b": _uniform(k_b, (channels,), bound)}


def _on_gates(c: Cell) -> Cell:
  """`c` reading its gate pre-activations gx as its input: for a block that computes them
  itself (an identity `project`); `layers.run` then runs its sequential or parallel form."""
  return dataclasses.replace(c, project=lambda params, gx: gx)


def _round_up(x: float, multiple: int) -> int:
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


# ---------------------------------------------------------------------------------------------
# residual: the pre-norm block of current LMs around any cell.

def _mlp_init(key: jax.Array, h: int, m: int, out_std: float, biases: bool = True) -> Params:
  """recurrentgemma's MLPBlock init: up N(0, 1 / (2h)), down N(0, out_std^2), biases 0."""
  k_up, k_down = jax.random.split(key)
  params = {"up": {"w": _normal(k_up, (2, h, m), math.sqrt(1.0 / (2 * h)))},
            "down": {"w": _normal(k_down, (m, h), out_std)}}
  if biases:
    params["up"]["b"], params["down"]["b"] = jnp.zeros((2, m)), jnp.zeros((h,))
  return params


def _residual_init(key, model_config, layer):
  del layer
  h, k_cell, k_mlp = model_config.hidden_size, *jax.random.split(key)
  m = model_config.mlp_expansion * h
  return {"norm": jnp.zeros((h,)), "cell": cell(model_config).init(k_cell, h, h),
          "mlp_norm": jnp.zeros((h,)),
          "mlp": _mlp_init(k_mlp, h, m, math.sqrt(2.0 / model_config.num_layers / m))}


def _residual_apply(params, carry, x, model_config, layer, step):
  del layer
  c = cell(model_config)
  carry, y = layers.run(c, step.weight_drop(c, params["cell"]), carry,
                        rms_norm(x, params["norm"], RG_EPS), unroll=step.unroll, impl=step.impl)
  x = x + step.drop(y, 0)
  y = gated_mlp(params["mlp"], rms_norm(x, params["mlp_norm"], RG_EPS), c.dtype, approximate=True)
  return carry, x + step.drop(y, 1)


RESIDUAL = Block(_residual_init,
                 lambda model_config, b, layer: cell(model_config).initial_carry(
                     b, model_config.hidden_size),
                 _residual_apply, functools.partial(rms_norm, eps=RG_EPS))


# ---------------------------------------------------------------------------------------------
# griffin: recurrentgemma/jax/modules.py `ResidualBlock` with `RecurrentBlock` and `MLPBlock`.

def _griffin_init(key, model_config, layer):
  """The authors' init (modules.py, layers.py): weights N(0, scale / fan_in), biases and norm
  scales 0, the output projections' scale 2 / num_layers, the conv's 0.01; RG-LRU's a as the
  rglru cell's."""
  del layer
  h, heads, width = model_config.hidden_size, model_config.num_heads, model_config.conv_width
  keys = jax.random.split(key, 7)
  out_scale = 2.0 / model_config.num_layers
  dense_init = lambda k, n_in, n_out, scale=1.0: {"w": _normal(k, (n_in, n_out),
                                                                math.sqrt(scale / n_in)),
                                                  "b": jnp.zeros((n_out,))}
  gate = lambda k: {"w": _normal(k, (heads, h // heads, h // heads), math.sqrt(1.0 / h)),
                    "b": jnp.zeros((h,))}
  return {"temporal_pre_norm": jnp.zeros((h,)),
          "linear_y": dense_init(keys[0], h, h), "linear_x": dense_init(keys[1], h, h),
          "conv": _conv_init(keys[2], width, h, std=math.sqrt(0.01 / width)),
          "input_gate": gate(keys[3]), "a_gate": gate(keys[4]),
          "a_param": cell(model_config).init(keys[5], h, h)["a_param"],
          "linear_out": dense_init(keys[6], h, h, out_scale),
          "channel_pre_norm": jnp.zeros((h,)),
          "mlp": _mlp_init(jax.random.fold_in(key, 1), h, model_config.mlp_expansion * h,
                           math.sqrt(out_scale / (model_config.mlp_expansion * h)))}


def _griffin_carry(model_config, b, layer):
  del layer
  h = model_config.hidden_size
  return jnp.zeros((b, model_config.conv_width - 1, h)), cell(model_config).initial_carry(b, h)


def _griffin_apply(params, carry, x, model_config, layer, step):
  del layer
  c = cell(model_config)
  conv_state, lru_state = carry
  normed = rms_norm(x, params["temporal_pre_norm"], RG_EPS)
  y = jax.nn.gelu(dense(params["linear_y"], normed, c.dtype))  # tanh gelu, as jax.nn's default
  u, conv_state = causal_conv(params["conv"], dense(params["linear_x"], normed, c.dtype),
                              conv_state)
  # The RG-LRU's input is the conv's output itself: gx = (x~, input gate, a gate).
  gx = jnp.concatenate([u, block_diagonal(params["input_gate"], u, c.dtype),
                        block_diagonal(params["a_gate"], u, c.dtype)], axis=-1)
  lru_state, hs = layers.run(_on_gates(c), {"a_param": params["a_param"]}, lru_state, gx,
                             unroll=step.unroll, impl=step.impl)
  x = x + step.drop(dense(params["linear_out"], hs * y, c.dtype), 0)
  y = gated_mlp(params["mlp"], rms_norm(x, params["channel_pre_norm"], RG_EPS), c.dtype,
                approximate=True)
  return (conv_state, lru_state), x + step.drop(y, 1)


GRIFFIN = Block(_griffin_init, _griffin_carry, _griffin_apply,
                functools.partial(rms_norm, eps=RG_EPS))


# ---------------------------------------------------------------------------------------------
# xlstm: xlstm/blocks/xlstm_block.py `xLSTMBlock` around mlstm/layer.py `mLSTMLayer`, or around
# slstm/layer.py `sLSTMLayer` followed by components/feedforward.py `GatedFeedForward`.

def xlstm_inner(model_config: Config) -> int:
  """The mLSTM block's inner width: expand * h rounded up to a multiple of 64, as the authors'."""
  return _round_up(model_config.expand * model_config.hidden_size, 64)


def _is_slstm(model_config: Config, layer: int) -> bool:
  return layer in tuple(model_config.slstm_at)


def _xlstm_init(key, model_config, layer):
  """The authors' init: up- and q/k/v projections N(0, 2 / (5h)) ("small init"), the output
  projection N(0, (2 / num_layers / sqrt(h))^2) ("wang"), mLSTM gates from their biases alone
  (i ~ N(0, 0.1), f from 3 to 6 over the heads), skip 1, norm weights 0 (a scale of 1); the
  sLSTM's recurrent weights and biases as jaxrnn's slstm cell (the authors start R at 0)."""
  h, heads, n = model_config.hidden_size, model_config.num_heads, model_config.num_layers
  width, keys = model_config.conv_width, jax.random.split(key, 8)
  small = math.sqrt(2.0 / (5 * h))
  wang = 2.0 / n / math.sqrt(h)
  if _is_slstm(model_config, layer):
    dh, m = h // heads, _round_up(XLSTM_FFN * h, 64)
    s = cells.get("slstm", num_heads=heads, compute_dtype=model_config.compute_dtype).init(
        keys[0], h, h)
    gate = lambda k: {"w": _normal(k, (heads, dh, dh), small)}
    return {"norm": jnp.zeros((h,)), "conv": _conv_init(keys[1], width, h),
            "igate": gate(keys[2]), "fgate": gate(keys[3]), "zgate": gate(keys[4]),
            "ogate": gate(keys[5]), "w_hh": s["w_hh"], "b": s["b"],
            "group_norm": jnp.zeros((h,)), "ffn_norm": jnp.zeros((h,)),
            "ffn": {"up": {"w": _normal(keys[6], (2, h, m), small)},
                    "down": {"w": _normal(keys[7], (m, h), wang)}}}
  inner = xlstm_inner(model_config)
  blocks = inner // XLSTM_QKV_BLOCK
  qkv = lambda k: {"w": _normal(k, (blocks, XLSTM_QKV_BLOCK, XLSTM_QKV_BLOCK), small)}
  k_i = keys[6]
  return {"norm": jnp.zeros((h,)), "proj_up": {"w": _normal(keys[0], (h, 2 * inner), small)},
          "conv": _conv_init(keys[1], width, inner),
          "q": qkv(keys[2]), "k": qkv(keys[3]), "v": qkv(keys[4]),
          "igate": {"w": jnp.zeros((3 * inner, heads)),
                    "b": 0.1 * jax.random.normal(k_i, (heads,), jnp.float32)},
          "fgate": {"w": jnp.zeros((3 * inner, heads)),
                    "b": jnp.linspace(3.0, 6.0, heads, dtype=jnp.float32)},
          "outnorm": jnp.zeros((inner,)), "skip": jnp.ones((inner,)),
          "proj_down": {"w": _normal(keys[5], (inner, h), wang)}}


def _xlstm_cell(model_config: Config, layer: int) -> Cell:
  factory = cells.slstm if _is_slstm(model_config, layer) else cells.mlstm_memory
  return _on_gates(factory(num_heads=model_config.num_heads,
                           compute_dtype=model_config.compute_dtype))


def _xlstm_carry(model_config, b, layer):
  width = (model_config.hidden_size if _is_slstm(model_config, layer)
           else xlstm_inner(model_config))
  return (jnp.zeros((b, model_config.conv_width - 1, width)),
          _xlstm_cell(model_config, layer).initial_carry(b, width))


def _xlstm_apply(params, carry, x, model_config, layer, step):
  heads, c = model_config.num_heads, _xlstm_cell(model_config, layer)
  conv_state, cell_state = carry
  run = functools.partial(layers.run, c, unroll=step.unroll, impl=step.impl)
  normed = layer_norm(x, params["norm"])
  if _is_slstm(model_config, layer):
    u, conv_state = causal_conv(params["conv"], normed, conv_state)
    u = jax.nn.silu(u)
    # gx in the slstm cell's layout (i, f, z, o), each head-major; i and f read the conv.
    gx = jnp.concatenate([block_diagonal(params[g], v, c.dtype) for g, v in
                          (("igate", u), ("fgate", u), ("zgate", normed), ("ogate", normed))],
                         axis=-1) + params["b"]
    cell_state, hs = run({"w_hh": params["w_hh"]}, cell_state, gx)
    x = x + step.drop(layer_norm(hs, params["group_norm"], heads=heads), 0)
    y = gated_mlp(params["ffn"], layer_norm(x, params["ffn_norm"]), c.dtype, approximate=False)
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
  hs = (layer_norm(hs, params["outnorm"], heads=heads) + params["skip"] * u) * jax.nn.silu(z)
  return (conv_state, cell_state), x + step.drop(dense(params["proj_down"], hs, c.dtype), 0)


XLSTM = Block(_xlstm_init, _xlstm_carry, _xlstm_apply, layer_norm)


# ---------------------------------------------------------------------------------------------
# mamba: mamba_ssm/modules/mamba_simple.py `Mamba` inside modules/block.py `Block` (pre-norm).

def _mamba_cell(model_config: Config) -> Cell:
  """The selective scan with the authors' dt_rank "auto" of the model width, ceil(h / 16)."""
  return cells.get("mamba", state_size=model_config.state_size,
                   dt_rank=model_config.dt_rank or math.ceil(model_config.hidden_size / 16),
                   compute_dtype=model_config.compute_dtype)


def _mamba_init(key, model_config, layer):
  """The authors' init: projections as torch.nn.Linear (U(+-1/sqrt(fan_in)), no biases), the
  output one divided by sqrt(num_layers) (MixerModel's _init_weights), the conv as Conv1d's."""
  del layer
  h = model_config.hidden_size
  inner = model_config.expand * h
  k_in, k_conv, k_cell, k_out = jax.random.split(key, 4)
  return {"norm": jnp.zeros((h,)),
          "in_proj": {"w": _uniform(k_in, (h, 2 * inner), 1.0 / math.sqrt(h))},
          "conv": _conv_init(k_conv, model_config.conv_width, inner),
          "cell": _mamba_cell(model_config).init(k_cell, inner, inner),
          "out_proj": {"w": _uniform(k_out, (inner, h), 1.0 / math.sqrt(inner))
                       / math.sqrt(model_config.num_layers)}}


def _mamba_carry(model_config, b, layer):
  del layer
  inner = model_config.expand * model_config.hidden_size
  return (jnp.zeros((b, model_config.conv_width - 1, inner)),
          _mamba_cell(model_config).initial_carry(b, inner))


def _mamba_apply(params, carry, x, model_config, layer, step):
  del layer
  c = _mamba_cell(model_config)
  conv_state, ssm_state = carry
  u, z = jnp.split(dense(params["in_proj"], rms_norm(x, params["norm"], MAMBA_EPS), c.dtype), 2,
                   axis=-1)
  u, conv_state = causal_conv(params["conv"], u, conv_state)
  ssm_state, y = layers.run(c, params["cell"], ssm_state, jax.nn.silu(u), unroll=step.unroll,
                            impl=step.impl)  # y includes the D skip
  y = dense(params["out_proj"], y * jax.nn.silu(z), c.dtype)
  return (conv_state, ssm_state), x + step.drop(y, 0)


MAMBA = Block(_mamba_init, _mamba_carry, _mamba_apply, functools.partial(rms_norm, eps=MAMBA_EPS))

_BLOCKS = {"residual": RESIDUAL, "griffin": GRIFFIN, "xlstm": XLSTM, "mamba": MAMBA}


# ---------------------------------------------------------------------------------------------
# The layers of a model, whatever its block.

def init(keys: list[jax.Array], model_config: Config, input_size: int, sizes: list[int],
         directions: int) -> dict[str, Any]:
  """{"layers": one params dict per layer (key keys[i])} and, for a residual stream,
  "norm"<h> (the final norm) and "w_in"<d, h> where the input is not h wide.

  The stack's layer i maps sizes[i - 1] (input_size for the first) to sizes[i], as a
  {'fwd', 'bwd'} pair for two directions.
  """
  if model_config.block == "stack":
    c = cell(model_config)

    def layer(k, d, h):
      if directions == 1:
        return c.init(k, d, h)
      k_f, k_b = jax.random.split(k)
      return {"fwd": c.init(k_f, d, h), "bwd": c.init(k_b, d, h)}

    return {"layers": [layer(k, input_size if i == 0 else directions * sizes[i - 1], sizes[i])
                       for i, k in enumerate(keys)]}
  block, h = _BLOCKS[model_config.block], model_config.hidden_size
  params = {"layers": [block.init(k, model_config, i) for i, k in enumerate(keys)],
            "norm": jnp.zeros((h,))}
  if input_size != h:
    params["w_in"] = _uniform(jax.random.fold_in(keys[0], 7), (input_size, h),
                              1.0 / math.sqrt(input_size))
  return params


def initial_carry(model_config: Config, batch_size: int, sizes: list[int]) -> list[Carry]:
  """Zero carries, one per layer (the stack's layer i of width sizes[i]), for b = batch_size."""
  if model_config.block == "stack":
    c = cell(model_config)
    return [c.initial_carry(batch_size, h) for h in sizes]
  block = _BLOCKS[model_config.block]
  return [block.initial_carry(model_config, batch_size, i) for i in range(len(sizes))]


def run(params: dict[str, Any], carries: list[Carry], x: jax.Array, *, model_config: Config,
        dropout_rate: float = 0.0, rng: jax.Array | None = None,
        weight_rng: jax.Array | None = None, bidirectional: bool = False,
        lengths: jax.Array | None = None) -> tuple[list[Carry], jax.Array]:
  """The layers over x<float>[b, t, d] -> (carries, y<float>[b, t, h]).

  With `rng` (keys<key>[b]): dropout at `dropout_rate` (locked if model.locked_dropout)
  between the stack's layers, or on each branch of a residual block before it is added;
  with `weight_rng`: weight drop on each layer's recurrent matrix. `bidirectional` and
  `lengths` as in `layers.run_stack` (the stack only).
  """
  rate = dropout_rate
  if model_config.block == "stack":
    return layers.run_stack(cell(model_config), params["layers"], carries, x, dropout_rate=rate,
                            rng=rng, unroll=model_config.unroll, impl=model_config.impl,
                            bidirectional=bidirectional, lengths=lengths,
                            locked=model_config.locked_dropout,
                            weight_drop=model_config.weight_drop, weight_rng=weight_rng)
  block, n = _BLOCKS[model_config.block], len(params["layers"])
  keys = layers.split_rows(rng, 2 * n, x.shape[0]) if rng is not None else None
  if "w_in" in params:
    x = matmul(x, params["w_in"], cell(model_config).dtype)
  new_carries = []
  for i, (layer_params, carry) in enumerate(zip(params["layers"], carries)):
    w_key = None if weight_rng is None else jax.random.fold_in(weight_rng, i)
    step = Step(model_config.impl, model_config.unroll,
                drop=lambda y, j, i=i: y if keys is None else layers.dropout(
                    y, rate, keys[2 * i + j], model_config.locked_dropout),
                weight_drop=lambda c, p, w_key=w_key: layers.drop_weight(
                    c, p, model_config.weight_drop, w_key))
    carry, x = block.apply(layer_params, carry, x, model_config, i, step)
    new_carries.append(carry)
  return new_carries, block.norm(x, params["norm"])
