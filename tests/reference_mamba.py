"""A float64 NumPy transliteration of the Mamba-1 block: the independent reference for jaxrnn's Mamba.

Source: https://github.com/state-spaces/mamba at commit e9594ce1c732d97440f0332fdc43170a2294dbfa
  - mamba_ssm/modules/mamba_simple.py        class Mamba (__init__, forward's slow path, step)
  - mamba_ssm/ops/selective_scan_interface.py  selective_scan_ref
  - mamba_ssm/modules/block.py               class Block (the Add -> Norm -> Mixer residual block)
  - mamba_ssm/models/mixer_seq_simple.py     create_block, _init_weights, MixerModel.forward
  - mamba_ssm/ops/triton/layer_norm.py       rms_norm_ref, class RMSNorm (eps 1e-5)
  - mamba_ssm/models/config_mamba.py         MambaConfig (rms_norm, residual_in_fp32, fused_add_norm)

Only the math is copied; nothing here imports torch or mamba_ssm. Everything is float64.

Layouts and conventions (the ones an implementation must match):
  - `mamba`, `mamba_step`, `residual_block` take batch-major activations x [b, t, d_model].
  - `selective_scan` takes the AUTHORS' channel-major layout: u, delta, z [b, d_inner, t];
    B, C [b, d_state, t]; A [d_inner, d_state]; D, delta_bias [d_inner]; state [b, d_inner, d_state].
  - Parameters are a dict keyed by the authors' state_dict names, in torch layouts
    (nn.Linear weight [out, in], y = x @ W.T + b; nn.Conv1d depthwise weight [d_inner, 1, d_conv]).
  - in_proj output [.., 2*d_inner] splits as x = first d_inner, z = second d_inner (xz.chunk(2)).
  - x_proj output [.., dt_rank + 2*d_state] splits as (dt, B, C) in that order.
  - dt_rank = ceil(d_model / 16) when "auto"; d_inner = expand * d_model.
  - delta = softplus(dt_proj.weight @ dt + dt_proj.bias): the bias is added BEFORE the softplus
    (selective_scan's delta_bias), and dt_proj's bias is not applied as a Linear bias first.
    softplus is torch's: x for x > 20, else log1p(exp(x)) (the CUDA and Triton kernels use the
    same threshold, `delta <= 20 ? log1p(exp(delta)) : delta`).
  - A = -exp(A_log).  dA = exp(delta * A); state <- dA * state + delta * B * u; y = <state, C>.
  - y = y + D * u (u is the post-conv, post-SiLU x), then y = y * SiLU(z), then out_proj.
  - Conv: causal depthwise cross-correlation with bias, then SiLU:
        conv[t] = bias + sum_{k=0}^{d_conv-1} weight[:, 0, k] * x[t - (d_conv-1) + k]
    i.e. the LAST tap weight[..., d_conv-1] multiplies the CURRENT input (nn.Conv1d with
    padding=d_conv-1, output truncated to the first t positions).
  - conv_state [b, d_inner, d_conv] holds the last d_conv conv INPUTS (pre-conv x from in_proj),
    oldest first, newest at [..., -1], zeros before the sequence start: exactly the authors' state
    (`allocate_inference_cache`, forward's `F.pad(x, (d_conv - L, 0))`, and `step`'s
    roll-left-then-write-last). Only [..., 1:] influences later outputs; [..., 0] is the input
    that `step` rolls out before using the state.
  - ssm_state [b, d_inner, d_state].
"""

import math

import numpy as np

REPO = "state-spaces/mamba"
COMMIT = "e9594ce1c732d97440f0332fdc43170a2294dbfa"
NORM_EPS = 1e-5  # RMSNorm's default and create_block / MixerModel's norm_epsilon


# ----------------------------------------------------------------------------- elementwise pieces


def softplus(x):
  """torch.nn.functional.softplus (beta=1, threshold=20): x where x > 20, else log1p(exp(x)).

  state-spaces/mamba@e9594ce, selective_scan_ref's F.softplus, step's F.softplus; the kernels in
  csrc/selective_scan/selective_scan_fwd_kernel.cuh and ops/triton/selective_state_update.py use
  the same threshold.
  """
  x = np.asarray(x, np.float64)
  return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


def inverse_softplus(y):
  """Mamba.__init__'s `dt + log(-expm1(-dt))` (state-spaces/mamba@e9594ce, mamba_simple.py)."""
  y = np.asarray(y, np.float64)
  return y + np.log(-np.expm1(-y))


def sigmoid(x):
  x = np.asarray(x, np.float64)
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def silu(x):
  """nn.SiLU / F.silu: x * sigmoid(x)."""
  x = np.asarray(x, np.float64)
  return x * sigmoid(x)


def linear(x, weight, bias=None):
  """nn.Linear / F.linear: x @ weight.T + bias, weight [out, in]."""
  y = np.asarray(x, np.float64) @ np.asarray(weight, np.float64).T
  return y if bias is None else y + bias


def rms_norm(x, weight, bias=None, eps=NORM_EPS):
  """rms_norm_ref (state-spaces/mamba@e9594ce, mamba_ssm/ops/triton/layer_norm.py), no dropout:

      rstd = 1 / sqrt(mean(x**2, -1) + eps);  out = x * rstd * weight (+ bias)

  RMSNorm (same file) has weight [d] (init ones), no bias, eps=1e-5 by default, and the models
  build it with norm_epsilon=1e-5 (mixer_seq_simple.create_block).
  """
  x = np.asarray(x, np.float64)
  rstd = 1.0 / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + eps)
  out = x * rstd * weight
  return out if bias is None else out + bias


# ----------------------------------------------------------------------------- selective scan


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                   state=None):
  """selective_scan_ref (state-spaces/mamba@e9594ce, mamba_ssm/ops/selective_scan_interface.py),
  real A and input-dependent B, C of shape (B N L) -- the case Mamba-1 uses -- plus an initial
  `state` (the authors' ref always starts from zeros; state=None is that) and always returning the
  last state.

  LAYOUT: the authors' channel-major one.
    u, delta: [b, d_inner, t];  A: [d_inner, d_state];  B, C: [b, d_state, t] (or [d_inner,
    d_state] for time-invariant B/C, as the authors allow);  D, delta_bias: [d_inner];
    z: [b, d_inner, t];  state: [b, d_inner, d_state].
  NOTE: the authors' default is delta_softplus=False; this one defaults to True (Mamba's use).

  Math, per step i:
    delta = softplus(delta + delta_bias[:, None])            (if delta_bias / delta_softplus)
    x_i = exp(delta_i * A) * x_{i-1} + delta_i * B_i * u_i    ([b, d, n])
    y_i = sum_n x_i * C_i
    out = (y + u * D[:, None]) * silu(z)                      (D, z optional)
  Returns (out [b, d_inner, t], last_state [b, d_inner, d_state]); for t == 0 the state passes
  through unchanged.
  """
  u = np.asarray(u, np.float64)
  delta = np.asarray(delta, np.float64)
  A = np.asarray(A, np.float64)
  B = np.asarray(B, np.float64)
  C = np.asarray(C, np.float64)
  if np.iscomplexobj(A):
    raise NotImplementedError("complex A is not part of Mamba-1's use")
  if delta_bias is not None:
    delta = delta + np.asarray(delta_bias, np.float64)[..., None]
  if delta_softplus:
    delta = softplus(delta)
  batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
  if B.ndim not in (2, 3) or C.ndim not in (2, 3):
    raise NotImplementedError("grouped B / C (B G N L) are not part of Mamba-1's use")
  x = (np.zeros((batch, dim, dstate)) if state is None
       else np.array(state, np.float64, copy=True))
  deltaA = np.exp(np.einsum("bdl,dn->bdln", delta, A))
  if B.ndim == 2:
    deltaB_u = np.einsum("bdl,dn,bdl->bdln", delta, B, u)
  else:
    deltaB_u = np.einsum("bdl,bnl,bdl->bdln", delta, B, u)
  ys = []
  for i in range(u.shape[2]):
    x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
    if C.ndim == 2:
      y = np.einsum("bdn,dn->bd", x, C)
    else:
      y = np.einsum("bdn,bn->bd", x, C[:, :, i])
    ys.append(y)
  y = np.stack(ys, axis=2) if ys else np.zeros((batch, dim, 0))  # (batch dim L)
  out = y if D is None else y + u * np.asarray(D, np.float64)[:, None]
  if z is not None:
    out = out * silu(z)
  return out, x


# ----------------------------------------------------------------------------- the Mamba module


def dims(params):
  """(d_model, d_inner, d_state, d_conv, dt_rank) read off the parameter shapes."""
  d_inner, d_model = params["in_proj.weight"].shape
  d_inner //= 2
  d_state = params["A_log"].shape[1]
  d_conv = params["conv1d.weight"].shape[-1]
  dt_rank = params["dt_proj.weight"].shape[1]
  return d_model, d_inner, d_state, d_conv, dt_rank


def zero_states(params, batch):
  """Mamba.allocate_inference_cache: conv_state [b, d_inner, d_conv], ssm_state [b, d_inner, d_state]."""
  _, d_inner, d_state, d_conv, _ = dims(params)
  return np.zeros((batch, d_inner, d_conv)), np.zeros((batch, d_inner, d_state))


def causal_conv1d(x, weight, bias=None, conv_state=None):
  """The depthwise causal conv of Mamba's slow path (nn.Conv1d(groups=d_inner, padding=d_conv-1)
  then `[..., :seqlen]`), before the SiLU, continuing from `conv_state`.

  x: [b, d_inner, t] (channel-major, as in the authors' forward); weight [d_inner, 1, d_conv];
  bias [d_inner] or None; conv_state [b, d_inner, d_conv] = the previous d_conv inputs, newest
  last (zeros = the authors' zero padding). Returns (out [b, d_inner, t], new conv_state), the new
  state being the last d_conv entries of concat(conv_state, x) along time -- which, from a zero
  state, is the authors' `F.pad(x, (d_conv - L, 0))`.

      out[:, c, t] = bias[c] + sum_k weight[c, 0, k] * xx[:, c, t + 1 + k]
  with xx = concat(conv_state, x) (so xx[t + d_conv] = x[t], and k = d_conv-1 hits x[t]).
  """
  x = np.asarray(x, np.float64)
  w = np.asarray(weight, np.float64)[:, 0, :]  # "d 1 w -> d w"
  batch, d_inner, t = x.shape
  d_conv = w.shape[-1]
  if conv_state is None:
    conv_state = np.zeros((batch, d_inner, d_conv))
  xx = np.concatenate([np.asarray(conv_state, np.float64), x], axis=-1)  # [b, d, d_conv + t]
  out = np.zeros((batch, d_inner, t))
  for k in range(d_conv):
    out = out + w[None, :, k, None] * xx[:, :, 1 + k:1 + k + t]
  if bias is not None:
    out = out + np.asarray(bias, np.float64)[None, :, None]
  return out, xx[:, :, xx.shape[-1] - d_conv:].copy()


def mamba(x, params, conv_state=None, ssm_state=None):
  """Mamba.forward's slow path (state-spaces/mamba@e9594ce, mamba_ssm/modules/mamba_simple.py,
  class Mamba, forward with causal_conv1d_fn None / use_fast_path False), batch-major, continuing
  from (conv_state, ssm_state) when given (None = zeros = the authors' forward, which always starts
  from zero states and only writes them back).

  x: [b, t, d_model] -> (y [b, t, d_model], conv_state [b, d_inner, d_conv],
  ssm_state [b, d_inner, d_state]). Two chunks with the states carried equal one call.

    xz = in_proj(x);  x, z = split(xz, 2)                   (x first, z second)
    x = silu(causal_conv1d(x) + conv bias)
    dt, B, C = split(x_proj(x), [dt_rank, d_state, d_state])
    dt = dt_proj.weight @ dt                                 (no bias here)
    y = selective_scan(x, dt, -exp(A_log), B, C, D, z=z, delta_bias=dt_proj.bias,
                       delta_softplus=True)                  (= (scan + D*x) * silu(z))
    out = out_proj(y)
  """
  x = np.asarray(x, np.float64)
  batch, seqlen, _ = x.shape
  _, d_inner, d_state, _, dt_rank = dims(params)
  xz = linear(x, params["in_proj.weight"], params.get("in_proj.bias"))  # [b, l, 2*d_inner]
  xz = np.transpose(xz, (0, 2, 1))  # "b l d -> b d l"
  xs, z = xz[:, :d_inner], xz[:, d_inner:]  # xz.chunk(2, dim=1)
  A = -np.exp(np.asarray(params["A_log"], np.float64))  # (d_inner, d_state)
  xc, conv_state = causal_conv1d(xs, params["conv1d.weight"], params.get("conv1d.bias"),
                                 conv_state)
  xc = silu(xc)
  x_dbl = linear(np.transpose(xc, (0, 2, 1)), params["x_proj.weight"])  # [b, l, r + 2n]
  dt = x_dbl[..., :dt_rank]
  Bm = x_dbl[..., dt_rank:dt_rank + d_state]
  Cm = x_dbl[..., dt_rank + d_state:dt_rank + 2 * d_state]
  dt = np.transpose(dt @ np.asarray(params["dt_proj.weight"], np.float64).T, (0, 2, 1))  # b d l
  Bm = np.transpose(Bm, (0, 2, 1))  # "b l n -> b n l"
  Cm = np.transpose(Cm, (0, 2, 1))
  y, ssm_state = selective_scan(xc, dt, A, Bm, Cm, params["D"], z=z,
                                delta_bias=params["dt_proj.bias"], delta_softplus=True,
                                state=ssm_state)
  y = np.transpose(y, (0, 2, 1))  # "b d l -> b l d"
  out = linear(y, params["out_proj.weight"], params.get("out_proj.bias"))
  return out, conv_state, ssm_state


def mamba_step(x_t, params, conv_state, ssm_state):
  """Mamba.step (state-spaces/mamba@e9594ce, mamba_ssm/modules/mamba_simple.py), the branch with
  causal_conv1d_update and selective_state_update None. One token, returns new states (the
  authors update them in place; here the inputs are not modified).

  x_t: [b, d_model] or [b, 1, d_model] (the authors' shape) -> (y of the same shape,
  conv_state [b, d_inner, d_conv], ssm_state [b, d_inner, d_state]).

    x, z = split(in_proj(x_t), 2)
    conv_state = roll(conv_state, -1); conv_state[..., -1] = x
    x = silu(sum(conv_state * conv1d.weight[:, 0, :], -1) + conv1d.bias)
    dt, B, C = split(x_proj(x), [dt_rank, d_state, d_state])
    dt = softplus(dt @ dt_proj.weight.T + dt_proj.bias)
    ssm_state = ssm_state * exp(dt[..., None] * A) + x[..., None] * dt[..., None] * B[:, None]
    y = (ssm_state @ C + D * x) * silu(z);   out = out_proj(y)
  """
  x_t = np.asarray(x_t, np.float64)
  squeeze = x_t.ndim == 3
  if squeeze:
    assert x_t.shape[1] == 1, "Only support decoding with 1 token at a time for now"
    x_t = x_t[:, 0]
  _, d_inner, d_state, _, dt_rank = dims(params)
  xz = linear(x_t, params["in_proj.weight"], params.get("in_proj.bias"))  # (B 2D)
  x, z = xz[:, :d_inner], xz[:, d_inner:]
  conv_state = np.roll(np.asarray(conv_state, np.float64), shift=-1, axis=-1)
  conv_state[:, :, -1] = x
  x = np.sum(conv_state * np.asarray(params["conv1d.weight"], np.float64)[:, 0, :], axis=-1)
  if params.get("conv1d.bias") is not None:
    x = x + params["conv1d.bias"]
  x = silu(x)
  x_db = linear(x, params["x_proj.weight"])
  dt = x_db[:, :dt_rank]
  Bm = x_db[:, dt_rank:dt_rank + d_state]
  Cm = x_db[:, dt_rank + d_state:dt_rank + 2 * d_state]
  dt = linear(dt, params["dt_proj.weight"])  # "Don't add dt_bias here"
  A = -np.exp(np.asarray(params["A_log"], np.float64))
  dt = softplus(dt + params["dt_proj.bias"])
  dA = np.exp(np.einsum("bd,dn->bdn", dt, A))
  dB = np.einsum("bd,bn->bdn", dt, Bm)
  ssm_state = np.asarray(ssm_state, np.float64) * dA + x[:, :, None] * dB
  y = np.einsum("bdn,bn->bd", ssm_state, Cm)
  y = y + np.asarray(params["D"], np.float64) * x
  y = y * silu(z)
  out = linear(y, params["out_proj.weight"], params.get("out_proj.bias"))
  return (out[:, None] if squeeze else out), conv_state, ssm_state


# ----------------------------------------------------------------------------- the residual block


def _mixer_params(params):
  return {k[len("mixer."):]: v for k, v in params.items() if k.startswith("mixer.")}


def residual_block(x, params, states=None, eps=NORM_EPS):
  """One Mamba layer of a MambaLMHeadModel with rms_norm=True, written as the usual pre-norm
  residual (state-spaces/mamba@e9594ce, mamba_ssm/modules/block.py class Block with
  mlp_cls=nn.Identity (d_intermediate=0), norm_cls=RMSNorm(eps=1e-5)):

      out = x + mixer(rms_norm(x, norm.weight, eps))

  params: the Block's state_dict names: "norm.weight" [d_model] and "mixer.<Mamba names>".
  states: (conv_state, ssm_state) or None (zeros). Returns (out [b, t, d_model], (conv, ssm)).

  The authors compute the same thing in a shifted form, "Add -> Norm -> Mixer": Block.forward
  (hidden, residual) -> residual' = hidden + residual (or hidden for the first block);
  hidden' = mixer(norm(residual')); returns (hidden', residual'), and MixerModel adds the last
  pair before norm_f. So the authors' residual stream after layer i is this function's input to
  layer i+1. fused_add_norm=True (Triton layer_norm_fn with prenorm=True, is_rms_norm=True)
  computes the same add-then-rms_norm; residual_in_fp32=True only keeps the residual stream in
  fp32 when the model runs in fp16/bf16 -- a no-op in float64. `authors_block` below is the
  literal form.
  """
  conv_state, ssm_state = (None, None) if states is None else states
  h = rms_norm(x, params["norm.weight"], params.get("norm.bias"), eps=eps)
  y, conv_state, ssm_state = mamba(h, _mixer_params(params), conv_state, ssm_state)
  return np.asarray(x, np.float64) + y, (conv_state, ssm_state)


def authors_block(hidden_states, residual, params, states=None, eps=NORM_EPS):
  """Block.forward literally (state-spaces/mamba@e9594ce, mamba_ssm/modules/block.py), non-fused
  branch, no MLP: residual = hidden + residual (residual None: hidden);
  hidden = mixer(rms_norm(residual)); returns (hidden, residual, (conv_state, ssm_state)).
  """
  conv_state, ssm_state = (None, None) if states is None else states
  residual = (hidden_states + residual) if residual is not None else hidden_states
  residual = np.asarray(residual, np.float64)
  h = rms_norm(residual, params["norm.weight"], params.get("norm.bias"), eps=eps)
  h, conv_state, ssm_state = mamba(h, _mixer_params(params), conv_state, ssm_state)
  return h, residual, (conv_state, ssm_state)


# ----------------------------------------------------------------------------- parameters


def _rng(rng):
  return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _dims(d_model, d_state, d_conv, expand, dt_rank):
  d_inner = int(expand * d_model)
  dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
  return d_inner, dt_rank


def param_shapes(d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", conv_bias=True,
                 bias=False):
  """Mamba's state_dict names -> torch shapes (Mamba.__init__, mamba_simple.py)."""
  d_inner, dt_rank = _dims(d_model, d_state, d_conv, expand, dt_rank)
  shapes = {"in_proj.weight": (2 * d_inner, d_model),
            "conv1d.weight": (d_inner, 1, d_conv),
            "x_proj.weight": (dt_rank + 2 * d_state, d_inner),
            "dt_proj.weight": (d_inner, dt_rank),
            "dt_proj.bias": (d_inner,),
            "A_log": (d_inner, d_state),
            "D": (d_inner,),
            "out_proj.weight": (d_model, d_inner)}
  if conv_bias:
    shapes["conv1d.bias"] = (d_inner,)
  if bias:
    shapes["in_proj.bias"] = (2 * d_inner,)
    shapes["out_proj.bias"] = (d_model,)
  return shapes


def random_params(rng, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", conv_bias=True,
                  bias=False):
  """Random Mamba parameters under the authors' state_dict names and torch layouts, of a scale
  that keeps activations O(1), with every bias nonzero and A_log / D varying per entry so that a
  transposed or swapped mapping shows. `rng`: a np.random.Generator or a seed.

  Names: in_proj.weight [2*d_inner, d_model], conv1d.weight [d_inner, 1, d_conv],
  conv1d.bias [d_inner], x_proj.weight [dt_rank + 2*d_state, d_inner], dt_proj.weight
  [d_inner, dt_rank], dt_proj.bias [d_inner], A_log [d_inner, d_state], D [d_inner],
  out_proj.weight [d_model, d_inner] (+ in_proj.bias [2*d_inner], out_proj.bias [d_model] if bias).
  """
  rng = _rng(rng)
  d_inner, dt_rank = _dims(d_model, d_state, d_conv, expand, dt_rank)
  p = {"in_proj.weight": rng.normal(0.0, d_model ** -0.5, (2 * d_inner, d_model)),
       "conv1d.weight": rng.uniform(-0.6, 0.6, (d_inner, 1, d_conv)),
       "x_proj.weight": rng.normal(0.0, d_inner ** -0.5, (dt_rank + 2 * d_state, d_inner)),
       "dt_proj.weight": rng.uniform(-1.0, 1.0, (d_inner, dt_rank)) * dt_rank ** -0.5,
       # softplus(bias) spread over [0.01, 1]: the delta of an untrained-but-not-init model
       "dt_proj.bias": inverse_softplus(np.exp(rng.uniform(np.log(0.01), 0.0, d_inner))),
       "A_log": np.log(rng.uniform(0.5, 8.0, (d_inner, d_state))),
       "D": rng.uniform(0.5, 1.5, d_inner) * rng.choice([-1.0, 1.0], d_inner),
       "out_proj.weight": rng.normal(0.0, d_inner ** -0.5, (d_model, d_inner))}
  if conv_bias:
    p["conv1d.bias"] = rng.uniform(0.1, 0.5, d_inner) * rng.choice([-1.0, 1.0], d_inner)
  if bias:
    p["in_proj.bias"] = rng.normal(0.0, 0.3, 2 * d_inner)
    p["out_proj.bias"] = rng.normal(0.0, 0.3, d_model)
  return p


def random_block_params(rng, d_model, **kwargs):
  """random_params under the Block's names ("mixer." prefix) plus a non-trivial "norm.weight"."""
  rng = _rng(rng)
  p = {"mixer." + k: v for k, v in random_params(rng, d_model, **kwargs).items()}
  p["norm.weight"] = rng.uniform(0.5, 1.5, d_model)
  return p


def _torch_default_uniform(rng, shape, fan_in):
  """nn.Linear / nn.Conv1d reset_parameters: kaiming_uniform_(a=sqrt(5)) for the weight and the
  bias alike come out as U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
  return rng.uniform(-bound, bound, shape)


def authors_init(rng, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001,
                 dt_max=0.1, dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True,
                 bias=False, n_layer=None, n_residuals_per_layer=1):
  """The authors' initialisation (distributions, not torch's random stream):
  Mamba.__init__ (state-spaces/mamba@e9594ce, mamba_ssm/modules/mamba_simple.py), then -- when
  n_layer is given -- MixerModel's _init_weights (mamba_ssm/models/mixer_seq_simple.py, defaults
  rescale_prenorm_residual=True; n_residuals_per_layer=1 when d_intermediate == 0).

    in_proj.weight  [2*d_inner, d_model]  U(+-1/sqrt(d_model))      (nn.Linear default)
    in_proj.bias    (bias=True)           U(+-1/sqrt(d_model)); zeroed by _init_weights
    conv1d.weight   [d_inner, 1, d_conv]  U(+-1/sqrt(d_conv))       (nn.Conv1d default,
    conv1d.bias     [d_inner]             U(+-1/sqrt(d_conv))        fan_in = 1 * d_conv; a Conv1d,
                                                                      so _init_weights keeps it)
    x_proj.weight   [dt_rank+2N, d_inner] U(+-1/sqrt(d_inner))      (nn.Linear default, no bias)
    dt_proj.weight  [d_inner, dt_rank]    U(+-s), s = dt_rank**-0.5 * dt_scale
                                          ("constant": all s)
    dt_proj.bias    [d_inner]             inverse_softplus(dt), dt = max(exp(U(log dt_min,
                                          log dt_max)), dt_init_floor); marked _no_reinit
    A_log           [d_inner, d_state]    log(arange(1, d_state+1)) repeated over d_inner
    D               [d_inner]             ones
    out_proj.weight [d_model, d_inner]    U(+-1/sqrt(d_inner)), / sqrt(n_residuals_per_layer *
                                          n_layer) when n_layer is given
    out_proj.bias   (bias=True)           U(+-1/sqrt(d_inner)); zeroed by _init_weights
  (RMSNorm's weight, if building a Block: ones.)
  """
  rng = _rng(rng)
  d_inner, dt_rank = _dims(d_model, d_state, d_conv, expand, dt_rank)
  p = {"in_proj.weight": _torch_default_uniform(rng, (2 * d_inner, d_model), d_model)}
  if bias:
    p["in_proj.bias"] = _torch_default_uniform(rng, (2 * d_inner,), d_model)
  p["conv1d.weight"] = _torch_default_uniform(rng, (d_inner, 1, d_conv), d_conv)
  if conv_bias:
    p["conv1d.bias"] = _torch_default_uniform(rng, (d_inner,), d_conv)
  p["x_proj.weight"] = _torch_default_uniform(rng, (dt_rank + 2 * d_state, d_inner), d_inner)
  dt_init_std = dt_rank ** -0.5 * dt_scale
  if dt_init == "constant":
    p["dt_proj.weight"] = np.full((d_inner, dt_rank), dt_init_std)
  elif dt_init == "random":
    p["dt_proj.weight"] = rng.uniform(-dt_init_std, dt_init_std, (d_inner, dt_rank))
  else:
    raise NotImplementedError(dt_init)
  dt = np.exp(rng.uniform(0.0, 1.0, d_inner) * (math.log(dt_max) - math.log(dt_min))
              + math.log(dt_min))
  dt = np.maximum(dt, dt_init_floor)
  p["dt_proj.bias"] = dt + np.log(-np.expm1(-dt))  # inverse of softplus
  p["A_log"] = np.log(np.tile(np.arange(1, d_state + 1, dtype=np.float64), (d_inner, 1)))
  p["D"] = np.ones(d_inner)
  p["out_proj.weight"] = _torch_default_uniform(rng, (d_model, d_inner), d_inner)
  if bias:
    p["out_proj.bias"] = _torch_default_uniform(rng, (d_model,), d_inner)
  if n_layer is not None:
    if bias:
      p["in_proj.bias"] = np.zeros(2 * d_inner)
      p["out_proj.bias"] = np.zeros(d_model)
    p["out_proj.weight"] = (_torch_default_uniform(rng, (d_model, d_inner), d_inner)
                            / math.sqrt(n_residuals_per_layer * n_layer))
  return p


# ----------------------------------------------------------------------------- self-check


def _self_check():
  rng = np.random.default_rng(0)
  tol = 1e-10
  for kw in ({}, {"bias": True, "d_state": 5, "d_conv": 3, "dt_rank": 3}):
    params = random_params(rng, 8, **kw)
    b, t = 2, 11
    x = rng.normal(size=(b, t, 8))
    y, cs, ss = mamba(x, params)
    assert y.shape == (b, t, 8) and np.all(np.isfinite(y)) and np.abs(y).max() > 1e-3
    # step by step
    c0, s0 = zero_states(params, b)
    c, s, ys = c0, s0, []
    for i in range(t):
      yi, c, s = mamba_step(x[:, i:i + 1], params, c, s)
      ys.append(yi[:, 0])
    assert np.abs(np.stack(ys, 1) - y).max() < tol
    assert np.abs(c - cs).max() < tol and np.abs(s - ss).max() < tol
    # two chunks, states carried, including splits shorter than d_conv - 1
    for cut in (1, 2, 5, 10):
      y1, c1, s1 = mamba(x[:, :cut], params)
      y2, c2, s2 = mamba(x[:, cut:], params, c1, s1)
      assert np.abs(np.concatenate([y1, y2], 1) - y).max() < tol, cut
      assert np.abs(c2 - cs).max() < tol and np.abs(s2 - ss).max() < tol
    # chunk then steps
    y1, c, s = mamba(x[:, :6], params)
    for i in range(6, t):
      yi, c, s = mamba_step(x[:, i], params, c, s)
      assert np.abs(yi - y[:, i]).max() < tol
    # the authors' prefill conv state from a zero start is F.pad(x, (d_conv - L, 0))
    _, d_inner, _, d_conv, _ = dims(params)
    xs = linear(x[:, :2], params["in_proj.weight"], params.get("in_proj.bias"))[..., :d_inner]
    want = np.concatenate([np.zeros((b, d_inner, d_conv - 2)), xs.transpose(0, 2, 1)], -1)
    assert np.abs(mamba(x[:, :2], params)[1] - want).max() < tol
  # residual block: chunked == whole; the authors' shifted form agrees over two layers
  bp = [random_block_params(rng, 8) for _ in range(2)]
  x = rng.normal(size=(2, 9, 8))
  out, st = residual_block(x, bp[0])
  o1, s1 = residual_block(x[:, :4], bp[0])
  o2, s2 = residual_block(x[:, 4:], bp[0], s1)
  assert np.abs(np.concatenate([o1, o2], 1) - out).max() < tol
  assert all(np.abs(a - b_).max() < tol for a, b_ in zip(s2, st))
  h, r, _ = authors_block(x, None, bp[0])
  h, r, _ = authors_block(h, r, bp[1])
  assert np.abs((h + r) - residual_block(out, bp[1])[0]).max() < tol
  # authors_init shapes and values
  ap = authors_init(rng, 8, n_layer=2, bias=True)
  assert {k: v.shape for k, v in ap.items()} == param_shapes(8, bias=True)
  assert np.allclose(softplus(ap["dt_proj.bias"]).clip(1e-4 - 1e-12, 0.1 + 1e-12),
                     softplus(ap["dt_proj.bias"]))
  assert np.all(np.isfinite(mamba(x, ap)[0]))
  print("reference_mamba self-check passed")


if __name__ == "__main__":
  _self_check()
