"""Float64 NumPy reference of NX-AI's xLSTM blocks (mLSTM block, sLSTM block).

This file is an independent transliteration of the authors' PyTorch code, meant
as the reference that jaxrnn's own xLSTM blocks are tested against.  It uses
only NumPy (float64) and the standard library.

Source transliterated
---------------------
repo   : https://github.com/NX-AI/xlstm
commit : 032a6fb8ee19a8c0db80ae6111ff4744a09414a9  ("Readme update (#19)", 2025-11-04)
files  : xlstm/blocks/xlstm_block.py, xlstm/blocks/mlstm/{block,layer,cell,backends}.py,
     xlstm/blocks/slstm/{block,layer,cell}.py, xlstm/blocks/slstm/src/vanilla/{__init__,slstm}.py,
     xlstm/components/{conv,ln,linear_headwise,feedforward,init}.py, xlstm/utils.py

Authors' default configs (what the defaults below reproduce)
-----------------------------------------------------------
mLSTMLayerConfig : proj_factor=2.0, conv1d_kernel_size=4, qkv_proj_blocksize=4, num_heads=4,
          bias=False, dropout=0.0; inner dim = proj_up_dim(d, 2.0) i.e. 2*d rounded UP to a
          multiple of 64 (UpProjConfigMixin: round_proj_up_dim_up=True, multiple_of=64).
sLSTMLayerConfig : num_heads=4, conv1d_kernel_size=4, group_norm_weight=True, dropout=0.0,
          hidden_size = embedding_dim, function="slstm", bias_init="powerlaw_blockdependent",
          recurrent_weight_init="zeros", backend="cuda" (we transliterate "vanilla").
FeedForwardConfig: proj_factor=1.3 (NOT 4/3), act_fn="gelu" (exact erf gelu), bias=False,
          ff_type="ffn_gated"; up dim = ceil(1.3*d/64)*64.
LayerNorm (ln.py): weight only (bias=False), eps=1e-5, residual_weight=True -> scale is (1 + weight).

Conventions (all exactly as the authors')
-----------------------------------------
* Shapes: activations are batch-major [B, S, D].  Torch parameter layouts: nn.Linear weight is
 [out, in]; nn.Conv1d (depthwise) weight is [D, 1, KS]; LinearHeadwiseExpand weight is
 [num_heads, out_per_head, in_per_head].
* Causal conv tap order: y[t] = bias + sum_{k=0}^{KS-1} w[:, 0, k] * x[t - (KS-1) + k]
 (w[..., KS-1] multiplies the current input; cross-correlation as nn.Conv1d).  State here =
 the last KS-1 inputs [B, KS-1, D] (what CausalConv1d.forward(return_last_state=True) returns,
 zero-padded on the left when fewer inputs were seen).  The authors' step() keeps KS inputs
 [B, KS, D] whose oldest entry is never used; drop it ([:, 1:]) to get ours.
* Norms: LayerNorm / MultiHeadLayerNorm (F.group_norm with num_groups=NH over [NH*DH]) normalise
 with the biased variance and eps=1e-5, scale = 1 + weight.  Per head over DH.
* mLSTM layer order: up-proj -> (x_mlstm, z); conv(x_mlstm) -> silu = a; q,k = headwise(a);
 v = headwise(x_mlstm); gates = Linear(cat(q, k, v)); h = cell(q, k, v); h = outnorm(h)
 (outnorm is INSIDE mLSTMCell, i.e. BEFORE the skip); h = h + learnable_skip * a;
 h = h * silu(z); y = proj_down(h).
* mLSTM cell: keys scaled by 1/sqrt(DH); eps=1e-6 added to the denominator
 max(|q.n|, exp(-m)); initial state (C, n, m) = 0 (m starts at 0, not -inf).
 forward() uses parallel_stabilized_simple, step() uses recurrent_step_stabilized_simple;
 the two differ by O(eps * exp(m)) (~1e-6 relative), so `mode` selects which one to mirror.
* sLSTM gate wiring quirk: sLSTMLayer computes `i, f, z, o = fgate(x_conv), igate(x_conv),
 zgate(x), ogate(x)`, i.e. the module NAMED "fgate" produces the INPUT-gate pre-activation and
 the module named "igate" the FORGET-gate pre-activation.  z and o read the un-convolved x.
* sLSTM pointwise: stabiliser m, `if all(n == 0): m_new = i_raw` (global over the batch) else
 max(i_raw, m + logsigmoid(f_raw)); i, f gates are clipped with min(., 1); y = sigmoid(o)*c/n.
* sLSTM cell parameters: stored here in the "cuda"-backend state_dict layout, which is the
 backend-agnostic "external" layout up to a reshape:
  xlstm.slstm_cell._recurrent_kernel_ : [NH, DH, 4*DH], index [h, d_in, g*DH + d_out]
  xlstm.slstm_cell._bias_             : [NH*4*DH],      index (h, g, d)
 gate order g = (i, f, z, o).  The "vanilla" backend's state_dict stores
 [NH, 4*DH, DH] (h, g*DH+d_out, d_in) and [4*NH*DH] (g, h, d); see slstm_cell_params_to_vanilla.
"""

from __future__ import annotations

import math

import numpy as np

XLSTM_REPO = "https://github.com/NX-AI/xlstm"
XLSTM_COMMIT = "032a6fb8ee19a8c0db80ae6111ff4744a09414a9"

LN_EPS = 1e-5  # xlstm/components/ln.py LayerNorm(eps=1e-5)
MLSTM_EPS = 1e-6  # xlstm/blocks/mlstm/backends.py (eps=1e-6 in both backends)

# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def _f64(x):
  return np.asarray(x, dtype=np.float64)


def _sigmoid(x):
  return np.exp(-np.logaddexp(0.0, -x))


def _logsigmoid(x):
  """torch.nn.functional.logsigmoid."""
  return -np.logaddexp(0.0, -x)


def _silu(x):
  """nn.SiLU / F.silu (the authors' "swish")."""
  return x * _sigmoid(x)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x):
  """F.gelu with approximate='none' (exact erf form), the authors' default "gelu"."""
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


_ACT_FNS = {
  "gelu": _gelu,
  "relu": lambda x: np.maximum(x, 0.0),
  "relu^2": lambda x: np.square(np.maximum(x, 0.0)),
  "sigmoid": _sigmoid,
  "swish": _silu,
}


def _linear(x, p):
  """nn.Linear with torch layout weight [out, in], optional "bias"."""
  y = x @ _f64(p["weight"]).T
  if p.get("bias") is not None:
    y = y + _f64(p["bias"])
  return y


def flatten_params(params, prefix=""):
  """Nested dict -> flat dict with the torch state_dict names ("xlstm.proj_up.weight")."""
  out = {}
  for k, v in params.items():
    name = f"{prefix}.{k}" if prefix else k
    if isinstance(v, dict):
      out.update(flatten_params(v, name))
    else:
      out[name] = v
  return out


def unflatten_params(flat):
  """Flat state_dict-style dict -> nested dict (inverse of flatten_params)."""
  out = {}
  for name, v in flat.items():
    node = out
    parts = name.split(".")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = v
  return out


def _as_nested(params):
  if any("." in k for k in params):
    return unflatten_params(params)
  return params


def proj_up_dim(embedding_dim, proj_factor, round_up_to_multiple_of=64, round_up=True):
  """xlstm/utils.py UpProjConfigMixin._set_proj_up_dim (NX-AI/xlstm @ 032a6fb8).

  int(ceil(proj_factor * embedding_dim / 64) * 64)  (floor if round_up=False).
  """
  mult = proj_factor * embedding_dim / round_up_to_multiple_of
  mult = math.ceil(mult) if round_up else math.floor(mult)
  return int(mult * round_up_to_multiple_of)


# ----------------------------------------------------------------------------------------------
# components
# ----------------------------------------------------------------------------------------------


def layer_norm(x, weight=None, bias=None, eps=LN_EPS, residual_weight=True):
  """xlstm/components/ln.py LayerNorm.forward (NX-AI/xlstm @ 032a6fb8).

  F.layer_norm over the last dim, biased variance, eps=1e-5, scale (1 + weight) when
  residual_weight (the default), optional bias (default off).
  """
  x = _f64(x)
  mu = x.mean(axis=-1, keepdims=True)
  xc = x - mu
  var = np.mean(xc * xc, axis=-1, keepdims=True)
  y = xc / np.sqrt(var + eps)
  if weight is not None:
    y = y * ((1.0 + _f64(weight)) if residual_weight else _f64(weight))
  if bias is not None:
    y = y + _f64(bias)
  return y


def multihead_layernorm(x_heads, weight=None, bias=None, eps=LN_EPS, residual_weight=True):
  """xlstm/components/ln.py MultiHeadLayerNorm.forward (NX-AI/xlstm @ 032a6fb8).

  x_heads: [B, NH, S, DH] (the authors' layout).  F.group_norm(num_groups=NH) on the flattened
  [B*S, NH*DH]: each head normalised over its DH features (biased variance, eps=1e-5), then
  scaled by (1 + weight) with weight of shape [NH*DH] indexed (h, d); optional bias [NH*DH].
  Returns [B, NH, S, DH].
  """
  x = _f64(x_heads)
  B, NH, S, DH = x.shape
  mu = x.mean(axis=-1, keepdims=True)
  xc = x - mu
  var = np.mean(xc * xc, axis=-1, keepdims=True)
  y = xc / np.sqrt(var + eps)
  if weight is not None:
    w = (1.0 + _f64(weight)) if residual_weight else _f64(weight)
    y = y * w.reshape(1, NH, 1, DH)
  if bias is not None:
    y = y + _f64(bias).reshape(1, NH, 1, DH)
  return y


def causal_conv1d(x, weight, bias=None, state=None):
  """xlstm/components/conv.py CausalConv1d.forward / .step / conv1d_step (NX-AI/xlstm @ 032a6fb8).

  Depthwise causal conv (groups=D, padding=KS-1, right end cut):
    y[b, t, d] = bias[d] + sum_{k=0}^{KS-1} weight[d, 0, k] * xx[b, t + k, d],
    xx = concat(state, x) along time, state = previous KS-1 inputs (zeros at the start).
  x: [B, T, D]; weight: [D, 1, KS] (torch "conv1d.conv.weight") or [D, KS]; bias: [D] or None;
  state: [B, KS-1, D] or None.  Returns (y [B, T, D], new_state [B, KS-1, D]).
  """
  x = _f64(x)
  B, T, D = x.shape
  w = _f64(weight).reshape(D, -1)
  KS = w.shape[1]
  pad = KS - 1
  if state is None:
    state = np.zeros((B, pad, D))
  state = _f64(state)
  assert state.shape == (B, pad, D), state.shape
  xx = np.concatenate([state, x], axis=1)  # [B, pad + T, D]
  y = np.zeros((B, T, D))
  for k in range(KS):
    y = y + xx[:, k : k + T, :] * w[:, k]
  if bias is not None:
    y = y + _f64(bias)
  new_state = xx[:, xx.shape[1] - pad :, :].copy()
  return y, new_state


def linear_headwise(x, weight, bias=None):
  """xlstm/components/linear_headwise.py LinearHeadwiseExpand.forward (NX-AI/xlstm @ 032a6fb8).

  weight: [NH, out_per_head, in_per_head]; x[..., NH*in_per_head] is split into NH contiguous
  chunks; out[..., h, o] = sum_d x[..., h, d] * weight[h, o, d]; flattened (h, o); + bias[NH*out].
  """
  x = _f64(x)
  w = _f64(weight)
  NH = w.shape[0]
  xs = x.reshape(*x.shape[:-1], NH, -1)
  y = np.einsum("...hd,hod->...ho", xs, w)
  y = y.reshape(*x.shape[:-1], -1)
  if bias is not None:
    y = y + _f64(bias)
  return y


def gated_feedforward(x, params, act_fn="gelu"):
  """xlstm/components/feedforward.py GatedFeedForward.forward (NX-AI/xlstm @ 032a6fb8).

  proj_up: [2*up, d] -> split into (gate_preact, up_proj) in that order (first half = gate);
  y = proj_down(act_fn(gate_preact) * up_proj).  act_fn default "gelu" (exact erf gelu).
  """
  p = _as_nested(params)
  h = _linear(_f64(x), p["proj_up"])
  up = h.shape[-1] // 2
  gate_preact, up_proj = h[..., :up], h[..., up:]
  return _linear(_ACT_FNS[act_fn](gate_preact) * up_proj, p["proj_down"])


# ----------------------------------------------------------------------------------------------
# mLSTM
# ----------------------------------------------------------------------------------------------


def mlstm_recurrent_step(c_state, n_state, m_state, q, k, v, igate_preact, fgate_preact, eps=MLSTM_EPS):
  """xlstm/blocks/mlstm/backends.py recurrent_step_stabilized_simple (NX-AI/xlstm @ 032a6fb8).

  c_state [B, NH, DH, DH], n_state [B, NH, DH, 1], m_state [B, NH, 1, 1];
  q, k, v [B, NH, DH]; igate_preact, fgate_preact [B, NH].
  Returns h [B, NH, DH], (c_new, n_new, m_new).
  """
  DH = q.shape[-1]
  i = igate_preact[..., None, None]
  log_f = _logsigmoid(fgate_preact)[..., None, None]
  m_new = np.maximum(log_f + m_state, i)
  f_act = np.exp(log_f + m_state - m_new)
  i_act = np.exp(i - m_new)
  k_scaled = k / math.sqrt(DH)
  c_new = f_act * c_state + i_act * (k_scaled[..., :, None] * v[..., None, :])  # C[i, j] = k_i v_j
  n_new = f_act * n_state + i_act * k_scaled[..., :, None]
  h_num = np.einsum("bhd,bhde->bhe", q, c_new)
  qn = np.einsum("bhd,bhd->bh", q, n_new[..., 0])
  max_val = np.exp(-m_new[..., 0, 0])
  h_denom = np.maximum(np.abs(qn), max_val) + eps
  h = h_num / h_denom[..., None]
  return h, (c_new, n_new, m_new)


def mlstm_cell_sequence(q, k, v, igate_pre, fgate_pre, state=None, eps=MLSTM_EPS):
  """Recurrent mLSTM over a sequence: recurrent_step_stabilized_simple applied step by step
  (xlstm/blocks/mlstm/backends.py, as used by mLSTMCell.step; NX-AI/xlstm @ 032a6fb8).

  q, k, v: [B, NH, S, DH] (the authors' backend layout); igate_pre, fgate_pre: [B, NH, S] (or
  [B, NH, S, 1]).  state: (C [B, NH, DH, DH], n [B, NH, DH, 1], m [B, NH, 1, 1]) or None (zeros,
  m = 0 as mLSTMCell.step).  Returns (h_tilde [B, NH, S, DH] before outnorm, new state).
  """
  q, k, v = _f64(q), _f64(k), _f64(v)
  B, NH, S, DH = q.shape
  ig = _f64(igate_pre).reshape(B, NH, S)
  fg = _f64(fgate_pre).reshape(B, NH, S)
  if state is None:
    c = np.zeros((B, NH, DH, DH))
    n = np.zeros((B, NH, DH, 1))
    m = np.zeros((B, NH, 1, 1))
  else:
    c, n, m = (_f64(s) for s in state)
    assert c.shape == (B, NH, DH, DH) and n.shape == (B, NH, DH, 1) and m.shape == (B, NH, 1, 1)
  hs = np.zeros((B, NH, S, DH))
  for t in range(S):
    hs[:, :, t], (c, n, m) = mlstm_recurrent_step(
      c, n, m, q[:, :, t], k[:, :, t], v[:, :, t], ig[:, :, t], fg[:, :, t], eps=eps
    )
  return hs, (c, n, m)


def mlstm_parallel_stabilized_simple(q, k, v, igate_pre, fgate_pre, eps=MLSTM_EPS):
  """xlstm/blocks/mlstm/backends.py parallel_stabilized_simple, stabilize_rowwise=True
  (NX-AI/xlstm @ 032a6fb8); what mLSTMCell.forward uses.  Stateless, zero initial state.

  q, k, v: [B, NH, S, DH]; gates [B, NH, S] (or [..., 1]).  Returns h_tilde [B, NH, S, DH].
  """
  q, k, v = _f64(q), _f64(k), _f64(v)
  B, NH, S, DH = q.shape
  ig = _f64(igate_pre).reshape(B, NH, S)
  log_f = _logsigmoid(_f64(fgate_pre).reshape(B, NH, S))
  cs = np.concatenate([np.zeros((B, NH, 1)), np.cumsum(log_f, axis=-1)], axis=-1)  # [B, NH, S+1]
  mat = cs[..., :, None] - cs[..., None, :]  # [i, j] = cs[i] - cs[j]
  ltr = np.tril(np.ones((S, S), dtype=bool))
  log_fg = np.where(ltr, mat[..., 1:, 1:], -np.inf)
  log_D = log_fg + ig[..., None, :]
  max_log_D = np.max(log_D, axis=-1, keepdims=True)
  D = np.exp(log_D - max_log_D)
  qk = q @ np.swapaxes(k / math.sqrt(DH), -1, -2)
  C = qk * D
  normalizer = np.maximum(np.abs(C.sum(axis=-1, keepdims=True)), np.exp(-max_log_D))
  return (C / (normalizer + eps)) @ v


def mlstm_cell(q, k, v, params, state=None, mode="recurrent"):
  """xlstm/blocks/mlstm/cell.py mLSTMCell.forward (mode="parallel") / .step (mode="recurrent",
  applied step by step) (NX-AI/xlstm @ 032a6fb8).

  q, k, v: [B, S, inner]; params: {"igate": {weight [NH, 3*inner], bias [NH]}, "fgate": same,
  "outnorm": {"weight": [inner]}}.  Gates = Linear(cat([q, k, v], -1)); heads are contiguous
  chunks of inner; h = outnorm(backend(...)) flattened back to [B, S, inner].
  Returns (h_norm [B, S, inner], state (C, n, m) or None in parallel mode).
  """
  p = _as_nested(params)
  q, k, v = _f64(q), _f64(k), _f64(v)
  B, S, inner = q.shape
  NH = _f64(p["igate"]["weight"]).shape[0]
  DH = inner // NH
  gate_in = np.concatenate([q, k, v], axis=-1)
  ig = _linear(gate_in, p["igate"]).transpose(0, 2, 1)  # [B, NH, S]
  fg = _linear(gate_in, p["fgate"]).transpose(0, 2, 1)

  def heads(a):
    return a.reshape(B, S, NH, DH).transpose(0, 2, 1, 3)

  if mode == "recurrent":
    h, new_state = mlstm_cell_sequence(heads(q), heads(k), heads(v), ig, fg, state=state)
  elif mode == "parallel":
    assert state is None, "parallel mode mirrors mLSTMCell.forward, which takes no state"
    h = mlstm_parallel_stabilized_simple(heads(q), heads(k), heads(v), ig, fg)
    new_state = None
  else:
    raise ValueError(mode)
  on = p["outnorm"]
  h = multihead_layernorm(h, on.get("weight"), on.get("bias"))
  return h.transpose(0, 2, 1, 3).reshape(B, S, inner), new_state


def mlstm_layer(x, params, state=None, mode="recurrent"):
  """xlstm/blocks/mlstm/layer.py mLSTMLayer.forward / .step (NX-AI/xlstm @ 032a6fb8).

  x: [B, S, d]; params: the layer's nested dict (the "xlstm" sub-dict of a block).
  state: {"conv_state": [B, KS-1, inner], "mlstm_state": (C, n, m)} or None.
  mode="recurrent" (default) = mLSTMLayer.step applied token by token (state carried);
  mode="parallel" = mLSTMLayer.forward (no state in, returned mlstm_state None).
  Returns (y [B, S, d], new_state).
  """
  p = _as_nested(params)
  x = _f64(x)
  inner = _f64(p["learnable_skip"]).shape[0]
  x_inner = _linear(x, p["proj_up"])
  x_mlstm, z = x_inner[..., :inner], x_inner[..., inner:]
  conv_state = None if state is None else state.get("conv_state")
  mlstm_state = None if state is None else state.get("mlstm_state")
  conv = p["conv1d"]["conv"]
  x_conv, conv_state = causal_conv1d(x_mlstm, conv["weight"], conv.get("bias"), conv_state)
  x_conv_act = _silu(x_conv)
  q = linear_headwise(x_conv_act, p["q_proj"]["weight"], p["q_proj"].get("bias"))
  k = linear_headwise(x_conv_act, p["k_proj"]["weight"], p["k_proj"].get("bias"))
  v = linear_headwise(x_mlstm, p["v_proj"]["weight"], p["v_proj"].get("bias"))
  h_tilde, mlstm_state = mlstm_cell(q, k, v, p["mlstm_cell"], state=mlstm_state, mode=mode)  # incl. outnorm
  h_skip = h_tilde + _f64(p["learnable_skip"]) * x_conv_act
  h = h_skip * _silu(z)
  y = _linear(h, p["proj_down"])
  return y, {"conv_state": conv_state, "mlstm_state": mlstm_state}


def mlstm_block(x, params, state=None, mode="recurrent"):
  """xlstm/blocks/xlstm_block.py xLSTMBlock.forward / .step with an mLSTMLayer and no
  feed-forward (xlstm/blocks/mlstm/block.py mLSTMBlock) (NX-AI/xlstm @ 032a6fb8).

  y = x + mlstm_layer(LayerNorm(x; xlstm_norm.weight, eps 1e-5, scale 1+w)).
  Returns (y, state) with state as mlstm_layer.
  """
  p = _as_nested(params)
  x = _f64(x)
  h, new_state = mlstm_layer(layer_norm(x, p["xlstm_norm"]["weight"]), p["xlstm"], state=state, mode=mode)
  return x + h, new_state


# ----------------------------------------------------------------------------------------------
# sLSTM
# ----------------------------------------------------------------------------------------------


def slstm_pointwise(Wx, Ry, b, states):
  """xlstm/blocks/slstm/src/vanilla/slstm.py slstm_forward_pointwise (NX-AI/xlstm @ 032a6fb8).

  Wx, Ry: [B, 4*H]; b: [4*H]; all gate-major (g, h, d) with g = (i, f, z, o).
  states: [4, B, H] = (y, c, n, m).  Returns new states [4, B, H].
  """
  raw = Wx + Ry + b
  y, c, n, m = states
  B = raw.shape[0]
  iraw, fraw, zraw, oraw = np.moveaxis(raw.reshape(B, 4, -1), 1, 0)
  logfplusm = m + _logsigmoid(fraw)
  if np.all(n == 0.0):  # global over the whole batch, as the authors
    mnew = iraw
  else:
    mnew = np.maximum(iraw, logfplusm)
  ogate = _sigmoid(oraw)
  igate = np.minimum(np.exp(iraw - mnew), 1.0)
  fgate = np.minimum(np.exp(logfplusm - mnew), 1.0)
  cnew = fgate * c + igate * np.tanh(zraw)
  nnew = fgate * n + igate
  ynew = ogate * cnew / nnew
  return np.stack([ynew, cnew, nnew, mnew], axis=0)


def slstm_cell_sequence(gates_x, recurrent_kernel, bias, state=None):
  """xlstm/blocks/slstm/cell.py sLSTMCell_vanilla.forward -> src/vanilla/__init__.py
  slstm_forward (NX-AI/xlstm @ 032a6fb8), config input_shape "BSGNH", output_shape "BNSH".

  gates_x: [B, S, 4*H], gate-major (i | f | z | o), each [NH*DH] with contiguous heads
   (= torch.cat([i, f, z, o], -1) in sLSTMLayer).
  recurrent_kernel: [NH, DH, 4*DH] (cuda state_dict layout) or [NH, DH, 4, DH] (external):
   Ry[b, g, h, o] = sum_d y[b, h, d] * R[h, d, g, o]   (block-diagonal over heads).
  bias: [NH*4*DH] (cuda state_dict layout) or [NH, 4, DH] (external), index (h, g, d).
  state: [4, B, H] = (y, c, n, m) or None (zeros).
  Returns (y [B, NH, S, DH], new state [4, B, H]).
  """
  gx = _f64(gates_x)
  B, S, G_H = gx.shape
  H = G_H // 4
  R = _f64(recurrent_kernel)
  NH = R.shape[0]
  DH = H // NH
  R = R.reshape(NH, DH, 4, DH)
  b = _f64(bias).reshape(NH, 4, DH).transpose(1, 0, 2).reshape(-1)  # -> (g, h, d)
  if state is None:
    states = np.zeros((4, B, H))
  else:
    states = _f64(state)
    assert states.shape == (4, B, H), states.shape
  ys = np.zeros((S, B, H))
  for t in range(S):
    Ry = np.einsum("bhd,hdgo->bgho", states[0].reshape(B, NH, DH), R).reshape(B, 4 * H)
    states = slstm_pointwise(gx[:, t], Ry, b, states)
    ys[t] = states[0]
  return ys.reshape(S, B, NH, DH).transpose(1, 2, 0, 3), states


def slstm_layer(x, params, state=None):
  """xlstm/blocks/slstm/layer.py sLSTMLayer.forward(return_last_state=True) / .step
  (NX-AI/xlstm @ 032a6fb8).

  x: [B, S, D]; params: the layer's nested dict (the "xlstm" sub-dict of a block).
  NOTE the authors' wiring: i-gate pre-act = fgate(silu(conv(x))), f-gate pre-act =
  igate(silu(conv(x))), z = zgate(x), o = ogate(x); out = group_norm(cell(...)) -> [B, S, D].
  state: {"conv_state": [B, KS-1, D], "slstm_state": [4, B, D]} or None.
  Returns (out [B, S, D], new_state).
  """
  p = _as_nested(params)
  x = _f64(x)
  B, S, D = x.shape
  conv_state = None if state is None else state.get("conv_state")
  slstm_state = None if state is None else state.get("slstm_state")
  if "conv1d" in p:
    conv = p["conv1d"]["conv"]
    x_conv, conv_state = causal_conv1d(x, conv["weight"], conv.get("bias"), conv_state)
    x_conv = _silu(x_conv)
  else:  # conv1d_kernel_size == 0
    x_conv = x
  i = linear_headwise(x_conv, p["fgate"]["weight"], p["fgate"].get("bias"))  # sic: "fgate" -> i
  f = linear_headwise(x_conv, p["igate"]["weight"], p["igate"].get("bias"))  # sic: "igate" -> f
  z = linear_headwise(x, p["zgate"]["weight"], p["zgate"].get("bias"))
  o = linear_headwise(x, p["ogate"]["weight"], p["ogate"].get("bias"))
  cell = p["slstm_cell"]
  y, slstm_state = slstm_cell_sequence(
    np.concatenate([i, f, z, o], axis=-1), cell["_recurrent_kernel_"], cell["_bias_"], slstm_state
  )
  gn = p["group_norm"]
  out = multihead_layernorm(y, gn.get("weight"), gn.get("bias")).transpose(0, 2, 1, 3).reshape(B, S, D)
  return out, {"conv_state": conv_state, "slstm_state": slstm_state}


def slstm_block(x, params, state=None, act_fn="gelu"):
  """xlstm/blocks/xlstm_block.py xLSTMBlock.forward / .step with an sLSTMLayer and a
  GatedFeedForward (xlstm/blocks/slstm/block.py sLSTMBlock) (NX-AI/xlstm @ 032a6fb8).

  x = x + slstm_layer(LayerNorm(x; xlstm_norm)); x = x + ffn(LayerNorm(x; ffn_norm)).
  Returns (y, state) with state as slstm_layer.
  """
  p = _as_nested(params)
  x = _f64(x)
  h, new_state = slstm_layer(layer_norm(x, p["xlstm_norm"]["weight"]), p["xlstm"], state=state)
  x = x + h
  if "ffn" in p:
    x = x + gated_feedforward(layer_norm(x, p["ffn_norm"]["weight"]), p["ffn"], act_fn=act_fn)
  return x, new_state


# ----------------------------------------------------------------------------------------------
# parameter layouts, authors' inits, random parameters
# ----------------------------------------------------------------------------------------------


def slstm_cell_params_to_vanilla(recurrent_kernel, bias):
  """cuda/external layout -> the "vanilla" backend's state_dict layout
  (sLSTMCell_vanilla._recurrent_kernel_ext2int / _bias_ext2int, NX-AI/xlstm @ 032a6fb8).
  Returns (R [NH, 4*DH, DH] index (h, g*DH+d_out, d_in), b [4*NH*DH] index (g, h, d))."""
  R = _f64(recurrent_kernel)
  NH, DH = R.shape[0], R.shape[1]
  R = R.reshape(NH, DH, 4, DH).transpose(0, 2, 3, 1).reshape(NH, 4 * DH, DH)
  b = _f64(bias).reshape(NH, 4, DH).transpose(1, 0, 2).reshape(-1)
  return R, b


def slstm_cell_params_from_vanilla(recurrent_kernel_vanilla, bias_vanilla):
  """Inverse of slstm_cell_params_to_vanilla; returns ([NH, DH, 4*DH], [NH*4*DH])."""
  Rv = _f64(recurrent_kernel_vanilla)
  NH, DH = Rv.shape[0], Rv.shape[2]
  R = Rv.reshape(NH, 4, DH, DH).transpose(0, 3, 1, 2).reshape(NH, DH, 4 * DH)
  b = _f64(bias_vanilla).reshape(4, NH, DH).transpose(1, 0, 2).reshape(-1)
  return R, b


def mlstm_fgate_bias_init(num_heads):
  """mLSTMCell.reset_parameters: fgate.weight = 0, fgate.bias = linspace(3, 6, NH);
  igate.weight = 0, igate.bias ~ N(0, 0.1); outnorm.weight = 0 (scale 1)."""
  return np.linspace(3.0, 6.0, num_heads)


def slstm_fgate_bias_init(head_dim, block_idx=0, num_blocks=1):
  """sLSTMCellBase.reset_parameters, bias_init="powerlaw_blockdependent", gate "f" (same for
  every head): -(-5 + 12 * (arange(DH)/(DH-1)) ** (0.3 + 1.3 * block_idx/(num_blocks-1)));
  ratio is 0 when num_blocks == 1.  The other gates' biases are 0, the recurrent kernel is 0."""
  ratio = block_idx / (num_blocks - 1) if num_blocks > 1 else 0.0
  return -(-5.0 + 12.0 * (np.arange(head_dim) / (head_dim - 1)) ** (0.3 + 1.3 * ratio))


def random_params_mlstm_block(
  rng,
  embedding_dim,
  num_heads=4,
  proj_factor=2.0,
  conv1d_kernel_size=4,
  qkv_proj_blocksize=4,
  bias=False,
):
  """Random mLSTMBlock parameters as a nested dict whose flatten_params() keys are exactly the
  torch state_dict names of xlstm.blocks.mlstm.block.mLSTMBlock (torch layouts).  Values are of
  sensible scale but not the authors' init: gate weights, biases, norm weights and the skip are
  all nonzero / non-unit so that any mapping bug shows.  bias=True adds mLSTMLayerConfig(bias=True)
  biases (proj_up, proj_down, q/k/v_proj)."""
  d = embedding_dim
  inner = proj_up_dim(d, proj_factor)
  bs = qkv_proj_blocksize
  nb = round(inner // bs)
  NH = num_heads
  KS = conv1d_kernel_size
  assert inner % NH == 0 and inner % bs == 0

  def n(*shape, std):
    return rng.normal(0.0, std, size=shape)

  xl = {
    "learnable_skip": 1.0 + n(inner, std=0.2),
    "proj_up": {"weight": n(2 * inner, d, std=1.0 / math.sqrt(d))},
    "q_proj": {"weight": n(nb, bs, bs, std=1.0 / math.sqrt(bs))},
    "k_proj": {"weight": n(nb, bs, bs, std=1.0 / math.sqrt(bs))},
    "v_proj": {"weight": n(nb, bs, bs, std=1.0 / math.sqrt(bs))},
    "conv1d": {"conv": {"weight": n(inner, 1, KS, std=1.0 / math.sqrt(KS)), "bias": n(inner, std=0.2)}},
    "mlstm_cell": {
      "igate": {"weight": n(NH, 3 * inner, std=0.5 / math.sqrt(3 * inner)), "bias": n(NH, std=0.5)},
      "fgate": {
        "weight": n(NH, 3 * inner, std=0.5 / math.sqrt(3 * inner)),
        "bias": np.linspace(0.5, 4.0, NH) + n(NH, std=0.3),
      },
      "outnorm": {"weight": n(inner, std=0.2)},
    },
    "proj_down": {"weight": n(d, inner, std=1.0 / math.sqrt(inner))},
  }
  if bias:
    xl["proj_up"]["bias"] = n(2 * inner, std=0.1)
    xl["proj_down"]["bias"] = n(d, std=0.1)
    for name in ("q_proj", "k_proj", "v_proj"):
      xl[name]["bias"] = n(inner, std=0.1)
  return {"xlstm_norm": {"weight": n(d, std=0.2)}, "xlstm": xl}


def random_params_slstm_block(
  rng,
  embedding_dim,
  num_heads=4,
  conv1d_kernel_size=4,
  ff_proj_factor=1.3,
  feedforward=True,
):
  """Random sLSTMBlock parameters as a nested dict whose flatten_params() keys are exactly the
  torch state_dict names of xlstm.blocks.slstm.block.sLSTMBlock; the sLSTM cell's
  _recurrent_kernel_ [NH, DH, 4*DH] / _bias_ [NH*4*DH] are in the cuda (= external) layout
  (see slstm_cell_params_to_vanilla for the vanilla backend's).  Nonzero recurrent kernel,
  biases (f-gate: the authors' powerlaw init + noise) and norm weights.  conv1d_kernel_size=0
  drops the conv (as the authors), feedforward=False drops ffn/ffn_norm."""
  d = embedding_dim
  NH = num_heads
  assert d % NH == 0
  DH = d // NH
  KS = conv1d_kernel_size

  def n(*shape, std):
    return rng.normal(0.0, std, size=shape)

  b = n(NH, 4, DH, std=0.3)
  b[:, 1, :] += slstm_fgate_bias_init(DH)
  xl = {
    "fgate": {"weight": n(NH, DH, DH, std=1.0 / math.sqrt(DH))},
    "igate": {"weight": n(NH, DH, DH, std=1.0 / math.sqrt(DH))},
    "zgate": {"weight": n(NH, DH, DH, std=1.0 / math.sqrt(DH))},
    "ogate": {"weight": n(NH, DH, DH, std=1.0 / math.sqrt(DH))},
    "slstm_cell": {
      "_recurrent_kernel_": n(NH, DH, 4 * DH, std=0.5 / math.sqrt(DH)),
      "_bias_": b.reshape(-1),
    },
    "group_norm": {"weight": n(d, std=0.2)},
  }
  if KS > 0:
    xl["conv1d"] = {"conv": {"weight": n(d, 1, KS, std=1.0 / math.sqrt(KS)), "bias": n(d, std=0.2)}}
  params = {"xlstm_norm": {"weight": n(d, std=0.2)}, "xlstm": xl}
  if feedforward:
    up = proj_up_dim(d, ff_proj_factor)
    params["ffn_norm"] = {"weight": n(d, std=0.2)}
    params["ffn"] = {
      "proj_up": {"weight": n(2 * up, d, std=1.0 / math.sqrt(d))},
      "proj_down": {"weight": n(d, up, std=1.0 / math.sqrt(up))},
    }
  return params


# ----------------------------------------------------------------------------------------------
# self-check
# ----------------------------------------------------------------------------------------------


def _tree_max_abs_diff(a, b):
  if isinstance(a, dict):
    return max(_tree_max_abs_diff(a[k], b[k]) for k in a)
  if isinstance(a, (tuple, list)):
    return max(_tree_max_abs_diff(x, y) for x, y in zip(a, b))
  return float(np.max(np.abs(_f64(a) - _f64(b)))) if np.size(a) else 0.0


def _check_state_semantics(name, fn, params, x, tol=1e-10):
  B, T, _ = x.shape
  y_full, s_full = fn(x, params)
  # token by token
  s, ys = None, []
  for t in range(T):
    y_t, s = fn(x[:, t : t + 1], params, s)
    ys.append(y_t)
  d_step = max(_tree_max_abs_diff(np.concatenate(ys, 1), y_full), _tree_max_abs_diff(s, s_full))
  # two chunks (one shorter than KS-1, one longer)
  worst = 0.0
  for split in (2, 5):
    y1, s1 = fn(x[:, :split], params)
    y2, s2 = fn(x[:, split:], params, s1)
    worst = max(worst, _tree_max_abs_diff(np.concatenate([y1, y2], 1), y_full), _tree_max_abs_diff(s2, s_full))
  print(f"[{name}] one call vs step-by-step: {d_step:.2e}; vs two chunks: {worst:.2e}")
  assert d_step < tol and worst < tol, (name, d_step, worst)
  return y_full, s_full


def _compare_with_authors(src_dir, x_m, p_m, x_s, p_s, tol=1e-10):
  """Load our params into the authors' torch modules (float64) and compare."""
  import sys

  if src_dir not in sys.path:
    sys.path.insert(0, src_dir)
  import torch

  torch.set_num_threads(1)
  from xlstm.blocks.mlstm.block import mLSTMBlock, mLSTMBlockConfig
  from xlstm.blocks.mlstm.layer import mLSTMLayerConfig
  from xlstm.blocks.slstm.block import sLSTMBlock, sLSTMBlockConfig
  from xlstm.blocks.slstm.layer import sLSTMLayerConfig
  from xlstm.components.feedforward import FeedForwardConfig

  def tt(a):
    return torch.tensor(np.asarray(a), dtype=torch.float64)

  def npy(t):
    return t.detach().cpu().numpy()

  results = {}
  B, T, d = x_m.shape
  # ---------------- mLSTM block
  cfg = mLSTMBlockConfig(
    mlstm=mLSTMLayerConfig(embedding_dim=d, num_heads=4, context_length=T), _num_blocks=1, _block_idx=0
  )
  blk = mLSTMBlock(cfg).double().eval()
  sd = {k: tt(v) for k, v in flatten_params(p_m).items()}
  assert set(sd) == set(blk.state_dict()), (set(sd) ^ set(blk.state_dict()))
  for k, v in blk.state_dict().items():
    assert tuple(v.shape) == tuple(sd[k].shape), (k, v.shape, sd[k].shape)
  blk.load_state_dict(sd, strict=True)
  with torch.no_grad():
    y_par = npy(blk(tt(x_m)))
    st, ys = {}, []
    for t in range(T):
      y_t, st = blk.step(tt(x_m[:, t : t + 1]), **st)
      ys.append(npy(y_t))
  y_rec_ref, s_ref = mlstm_block(x_m, p_m)
  y_par_ref, _ = mlstm_block(x_m, p_m, mode="parallel")
  results["mlstm forward (parallel)"] = _tree_max_abs_diff(y_par_ref, y_par)
  results["mlstm step loop"] = _tree_max_abs_diff(y_rec_ref, np.concatenate(ys, 1))
  results["mlstm step state"] = max(
    _tree_max_abs_diff(s_ref["mlstm_state"], tuple(npy(s) for s in st["mlstm_state"])),
    _tree_max_abs_diff(s_ref["conv_state"], npy(st["conv_state"][0])[:, 1:]),
  )
  # ---------------- sLSTM block
  B, T, d = x_s.shape
  cfg = sLSTMBlockConfig(
    slstm=sLSTMLayerConfig(embedding_dim=d, num_heads=4, backend="vanilla"),
    feedforward=FeedForwardConfig(),
    _num_blocks=1,
    _block_idx=0,
  )
  blk = sLSTMBlock(cfg).double().eval()
  flat = flatten_params(p_s)
  Rv, bv = slstm_cell_params_to_vanilla(flat["xlstm.slstm_cell._recurrent_kernel_"], flat["xlstm.slstm_cell._bias_"])
  flat["xlstm.slstm_cell._recurrent_kernel_"], flat["xlstm.slstm_cell._bias_"] = Rv, bv
  sd = {k: tt(v) for k, v in flat.items()}
  assert set(sd) == set(blk.state_dict()), (set(sd) ^ set(blk.state_dict()))
  for k, v in blk.state_dict().items():
    assert tuple(v.shape) == tuple(sd[k].shape), (k, v.shape, sd[k].shape)
  blk.load_state_dict(sd, strict=True)
  # the authors' own ext<->int proxy must give back our external layout
  cell = blk.xlstm.slstm_cell
  NH, DH = 4, d // 4
  results["slstm param layout (their proxy)"] = max(
    _tree_max_abs_diff(npy(cell.recurrent_kernel[:]), p_s["xlstm"]["slstm_cell"]["_recurrent_kernel_"].reshape(NH, DH, 4, DH)),
    _tree_max_abs_diff(npy(cell.bias[:]), p_s["xlstm"]["slstm_cell"]["_bias_"].reshape(NH, 4, DH)),
  )
  with torch.no_grad():
    y_fwd = npy(blk(tt(x_s)))
    st, ys = {}, []
    for t in range(T):
      y_t, st = blk.step(tt(x_s[:, t : t + 1]), **st)
      ys.append(npy(y_t))
    # layer forward with state in two chunks (their return_last_state path)
    xn = blk.xlstm_norm(tt(x_s))
    o1, s1 = blk.xlstm(xn[:, :2], return_last_state=True)
    o2, s2 = blk.xlstm(xn[:, 2:], return_last_state=True, **s1)
  y_ref, s_ref = slstm_block(x_s, p_s)
  lay_ref, lay_s_ref = slstm_layer(layer_norm(x_s, p_s["xlstm_norm"]["weight"]), p_s["xlstm"])
  results["slstm forward"] = _tree_max_abs_diff(y_ref, y_fwd)
  results["slstm step loop"] = _tree_max_abs_diff(y_ref, np.concatenate(ys, 1))
  results["slstm step state"] = max(
    _tree_max_abs_diff(s_ref["slstm_state"], npy(st["slstm_state"])),
    _tree_max_abs_diff(s_ref["conv_state"], npy(st["conv_state"][0])[:, 1:]),
  )
  results["slstm layer 2 chunks (their state)"] = max(
    _tree_max_abs_diff(lay_ref, np.concatenate([npy(o1), npy(o2)], 1)),
    _tree_max_abs_diff(lay_s_ref["slstm_state"], npy(s2["slstm_state"])),
    _tree_max_abs_diff(lay_s_ref["conv_state"], npy(s2["conv_state"])),
  )
  for k, v in results.items():
    print(f"[authors' torch] {k}: max abs diff {v:.2e}")
  bad = {k: v for k, v in results.items() if not v < tol}
  assert not bad, bad
  return results


if __name__ == "__main__":
  import os
  import time

  t0 = time.time()
  rng = np.random.default_rng(0)
  B, T, d = 2, 9, 48  # d=48: mLSTM inner = ceil(96/64)*64 = 128 (DH 32); ffn up = ceil(62.4/64)*64 = 64
  p_m = random_params_mlstm_block(rng, d, num_heads=4)
  p_s = random_params_slstm_block(rng, d, num_heads=4)
  x_m = rng.normal(size=(B, T, d))
  x_s = rng.normal(size=(B, T, d))
  assert p_m["xlstm"]["learnable_skip"].shape == (128,)
  assert p_s["ffn"]["proj_down"]["weight"].shape == (48, 64)

  y_m, _ = _check_state_semantics("mlstm_block", mlstm_block, p_m, x_m)
  _check_state_semantics("slstm_block", slstm_block, p_s, x_s)
  y_mp, _ = mlstm_block(x_m, p_m, mode="parallel")
  print(f"[mlstm_block] recurrent (step) vs parallel (forward) form: {np.max(np.abs(y_m - y_mp)):.2e} (expected ~eps)")
  assert np.max(np.abs(y_m - y_mp)) < 1e-4

  src = os.environ.get("XLSTM_SRC", "/tmp/xlstm_src")
  if os.path.isdir(os.path.join(src, "xlstm")):
    try:
      import torch  # noqa: F401
    except ImportError as e:
      print(f"[authors' torch] skipped: {e}")
    else:
      _compare_with_authors(src, x_m, p_m, x_s, p_s)
      print("[authors' torch] comparison passed (tol 1e-10)")
  else:
    print(f"[authors' torch] skipped: no checkout at {src} (set XLSTM_SRC; e.g. "
       f"git --git-dir=<mirror> archive {XLSTM_COMMIT} xlstm | tar -x -C /tmp/xlstm_src)")
  print(f"self-check OK in {time.time() - t0:.1f} s")
