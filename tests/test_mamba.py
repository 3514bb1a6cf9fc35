"""Mamba-1 (jaxrnn/blocks/mamba.py, the cell `mamba` of jaxrnn/cells.py) against state-spaces'
mamba-ssm 2.3.2.post1, the authors' own PyTorch code, run unchanged on CPU (tests/authors.py):
their pre-norm Block of Mamba on the same weights, outputs, final states and gradients over a
sequence cut in two with the state carried; the final norm of their MixerModel; and the
initialisation, tensor by tensor, against their init code (Mamba.__init__, then MixerModel's
_init_weights).

float32 at 1e-5 (relative to the values' scale) for the block: their selective_scan_ref computes
in float32 whatever its inputs, and both their forward and their `step` take A = -exp(A_log)
in float32 (tests/authors.py), so there is no float64 path through their block. The final norm
has one (their rms_norm_ref computes in its input's dtype): float64 at 1e-10.

The definitions beyond the Mamba module sit in files whose imports cannot run on CPU (triton in
ops/triton/layer_norm.py and so in modules/block.py; Mamba2, MHA and transformers in
models/mixer_seq_simple.py and utils/generation.py). `_authors` compiles just those definitions
from the extracted sources, unchanged, with the names they use bound as their modules would on a
machine without triton.
"""

import ast
import copy
import dataclasses
import functools
import math
import types
import typing

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import authors
from configs import default
from jaxrnn import blocks, cells
from jaxrnn.blocks.mamba import MAMBA

B, T, SPLIT = 2, 11, 4  # a sequence of T steps, run by jaxrnn as [0, SPLIT) then [SPLIT, T)
# The definitions `_authors` compiles, by file under mamba_ssm/.
_DEFINITIONS = {"ops/triton/layer_norm.py": ("rms_norm_ref", "RMSNorm"),
                "modules/block.py": ("Block",),
                "models/mixer_seq_simple.py": ("create_block", "_init_weights", "MixerModel"),
                "utils/generation.py": ("InferenceParams",)}


@functools.cache
def _authors() -> types.SimpleNamespace:
  """authors.mamba() plus their RMSNorm (rms_norm_ref, RMSNorm), Block, create_block,
  _init_weights, MixerModel and InferenceParams, compiled from their files as they are (line
  numbers kept). Bound: the modules' imports (torch, nn, F, ...), Mamba (authors.mamba's),
  None for what a Mamba-1 model never builds (Mamba2, MHA, GatedMLP; layer_norm_fn, used only
  with fused_add_norm) and rms_norm_fn, the triton kernel, to rms_norm_ref, their reference of
  it in the same file (the same arguments, bar residual_in_fp32, which sets only the dtype of
  the residual returned with prenorm=True: never asked for here)."""
  mb = authors.mamba()
  scope = {"torch": torch, "nn": torch.nn, "F": F, "math": math, "copy": copy,
           "partial": functools.partial, "dataclass": dataclasses.dataclass,
           "field": dataclasses.field, "Optional": typing.Optional, "Tensor": torch.Tensor,
           "Mamba": mb.Mamba, "Mamba2": None, "MHA": None, "GatedMLP": None,
           "layer_norm_fn": None,
           "rms_norm_fn": lambda *a, residual_in_fp32=False, **k: scope["rms_norm_ref"](*a, **k)}
  for file, names in _DEFINITIONS.items():
    path = mb.source / "mamba_ssm" / file
    nodes = [n for n in ast.parse(path.read_text()).body if getattr(n, "name", None) in names]
    assert sorted(n.name for n in nodes) == sorted(names), (file, names)
    code = compile(ast.Module(nodes, type_ignores=[]), str(path), "exec")
    exec(code, scope)  # pylint: disable=exec-used
  return types.SimpleNamespace(mb=mb, **{n: scope[n] for names in _DEFINITIONS.values()
                                         for n in names})


def _model_config(**fields) -> ml_collections.ConfigDict:
  """jaxrnn's mamba model at the authors' Mamba defaults: d_state 16, d_conv 4, expand 2, dt_rank
  "auto" (jaxrnn's 0)."""
  config = default.get_config().model
  config.update(block="mamba", cell="mamba", state_size=16, conv_width=4, expand=2, dt_rank=0,
                **fields)
  return config


def _from_authors(p: dict, norm_offset: float = 1.0) -> dict:
  """jaxrnn's layer params from one Block's state_dict names (values, or with norm_offset 0
  their gradients: the authors' norm weight is jaxrnn's 1 + scale)."""
  m = lambda name: p["mixer." + name]
  return {"norm": p["norm.weight"] - norm_offset,
          "in_proj": {"w": m("in_proj.weight").T},
          "conv": {"w": m("conv1d.weight")[:, 0, :].T, "b": m("conv1d.bias")},
          "cell": {"w_x": m("x_proj.weight").T, "w_dt": m("dt_proj.weight").T,
                   "b_dt": m("dt_proj.bias"), "a_log": m("A_log"), "d": m("D")},
          "out_proj": {"w": m("out_proj.weight").T}}


def _numpy(named) -> dict:
  return {name: v.detach().numpy() for name, v in named}


def _jaxrnn_run(params, x, model_config, impl):
  """jaxrnn's block over x[:, :SPLIT], then x[:, SPLIT:] from its carry -> (carry, y)."""
  step = blocks.Step(impl, 1, drop=lambda y, i: y, weight_drop=lambda c, p: p)
  carry = MAMBA.initial_carry(model_config, x.shape[0], 0)
  carry, first = MAMBA.apply(params, carry, x[:, :SPLIT], model_config, 0, step)
  carry, rest = MAMBA.apply(params, carry, x[:, SPLIT:], model_config, 0, step)
  return carry, jnp.concatenate([first, rest], axis=1)


@torch.no_grad()
def _authors_decode(a, block, x):
  """The authors' inference path: the prompt x[:, :SPLIT] through forward with an
  InferenceParams cache (which keeps the scan's last state and the conv's inputs), then one
  token at a time (their `step`), seqlen_offset advanced as their generation loop does ->
  (y, conv_state<b, d_inner, d_conv>, ssm_state<b, d_inner, d_state>)."""
  cache = a.InferenceParams(max_seqlen=T, max_batch_size=B)
  ys = []
  for chunk in [slice(0, SPLIT)] + [slice(t, t + 1) for t in range(SPLIT, T)]:
    hidden, residual = block(x[:, chunk], inference_params=cache)  # Block: (mixer, residual)
    ys.append(hidden + residual)
    cache.seqlen_offset += chunk.stop - chunk.start
  return (torch.cat(ys, dim=1), *cache.key_value_memory_dict[block.layer_idx])


def _close(got, want, scale=1.0, rtol=1e-5, err_msg=""):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=rtol * scale,
                             err_msg=err_msg)


@pytest.mark.parametrize("impl", ["scan", "fused"])
def test_the_block_equals_the_authors(impl):
  """The authors' Block(Mamba(d_model=16, d_state=16, d_conv=4, expand=2, dt_rank="auto",
  use_fast_path=False, layer_idx=0)) with RMSNorm (create_block, rms_norm=True, eps 1e-5) on
  their own init, against jaxrnn's block in two calls (4 and 7 steps) with its carry (the
  conv's last 3 inputs, the SSM state) passed between them, under the sequential scan and the
  parallel (associative) form, within 1e-5 in float32 (relative, and of the values' scale):
  - the outputs against their forward over the 11 steps and against their inference path
    (the prompt, then token by token);
  - the final conv and SSM states against their inference cache's;
  - the gradients of sum(w * y) with respect to every parameter and the input against torch
    autograd through their forward (the path they train with)."""
  a = _authors()
  torch.manual_seed(0)
  block = a.create_block(
      16, d_intermediate=0, rms_norm=True, layer_idx=0,
      ssm_cfg=dict(d_state=16, d_conv=4, expand=2, dt_rank="auto", use_fast_path=False))
  x = torch.randn(B, T, 16, requires_grad=True)
  w = torch.randn(B, T, 16)
  hidden, residual = block(x)  # their Block returns the mixer's output and the residual
  want = hidden + residual
  (w * want).sum().backward()
  decoded, conv_state, ssm_state = _authors_decode(a, block, x)

  model_config = _model_config(hidden_size=16, num_layers=1)
  params = jax.tree.map(jnp.asarray, _from_authors(_numpy(block.named_parameters())))
  xs, ws = jnp.asarray(x.detach().numpy()), jnp.asarray(w.numpy())

  def loss(p, x):  # with jaxrnn's carry and outputs, all from one compiled run
    carry, y = _jaxrnn_run(p, x, model_config, impl)
    return jnp.sum(ws * y), (carry, y)

  (_, ((got_conv, (_, got_ssm)), got)), (got_grads, got_dx) = jax.jit(
      jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, xs)
  want = want.detach()
  scale = float(want.abs().max())
  _close(got, want, scale)
  _close(got, decoded, scale)
  _close(got_conv, conv_state[..., 1:].transpose(1, 2), float(conv_state.abs().max()))
  _close(got_ssm, ssm_state, float(ssm_state.abs().max()))

  want_grads = _from_authors({n: p.grad.numpy() for n, p in block.named_parameters()}, 0.0)
  for (path, g), h in zip(jax.tree_util.tree_leaves_with_path(got_grads),
                          jax.tree.leaves(want_grads), strict=True):
    _close(g, h, float(np.abs(h).max()), err_msg=jax.tree_util.keystr(path))
  _close(got_dx, x.grad, float(x.grad.abs().max()))


def test_the_final_norm_is_the_authors():
  """The norm after the last block (`MAMBA.norm`) is their MixerModel's norm_f (RMSNorm at
  MixerModel's default norm_epsilon, 1e-5, run as rms_norm_ref) in float64 within 1e-10, on
  inputs of mean square 1e-6, where epsilon 1e-5 shrinks the output by sqrt(11): another
  epsilon fails (1e-6: by a factor of 2.3)."""
  a = _authors()
  torch.manual_seed(0)
  norm = a.MixerModel(16, n_layer=1, d_intermediate=0, vocab_size=1, rms_norm=True,
                      ssm_cfg=dict(use_fast_path=False)).norm_f.double()
  with torch.no_grad():
    norm.weight.add_(torch.randn(16, dtype=torch.float64))
    x = 1e-3 * torch.randn(2, 3, 16, dtype=torch.float64)
    want = norm(x).numpy()
  with jax.enable_x64(True):
    got = MAMBA.norm(jnp.asarray(x.numpy()), jnp.asarray(norm.weight.detach().numpy() - 1.0))
  _close(got, want, np.abs(want).max(), rtol=1e-10)


def _check_draws(name: str, ours: np.ndarray, theirs: np.ndarray) -> None:
  """Two samples of one distribution (as tests/test_griffin.py): means within 5 standard errors
  (std * sqrt(2 / n)), stds within 5 / sqrt(n) relative, ranges within 30%."""
  n, scale = ours.size, theirs.std()
  assert abs(ours.mean() - theirs.mean()) < 5 * scale * np.sqrt(2 / n), (
      name, ours.mean(), theirs.mean())
  assert abs(ours.std() / scale - 1) < 5 / np.sqrt(n), (name, ours.std(), scale)
  assert abs(np.ptp(ours) / np.ptp(theirs) - 1) < 0.3, (name, np.ptp(ours), np.ptp(theirs))


def test_the_initialisation_is_the_authors():
  """jaxrnn's `blocks.init` of a 4-layer Mamba model (width 64, inner 128, dt_rank 4) against
  the authors' MixerModel of the same sizes (each Mamba.__init__, then _init_weights, which
  redraws out_proj and divides it by sqrt(n_layer) = 2), tensor by tensor: the norms (1, jaxrnn's
  scale 0), A_log (log(1..16) on every channel) and D (1) equal; the rest (in_proj, conv,
  x_proj, dt_proj, out_proj) by mean, std and range as `_check_draws`; the dt bias by log dt,
  dt = softplus(bias), uniform on [log dt_min, log dt_max] = [log 1e-3, log 0.1], over the 512
  channels of the 4 layers: as `_check_draws`, and its ends within 10 range / 512 of theirs
  (each end's gap to its bound is about exponential, of mean range / 512), so a dt_min or
  dt_max off by 15% fails."""
  a = _authors()
  torch.manual_seed(0)
  net = a.MixerModel(64, n_layer=4, d_intermediate=0, vocab_size=1, rms_norm=True,
                     ssm_cfg=dict(use_fast_path=False))
  state = _numpy(net.named_parameters())
  theirs = {"layers": [_from_authors({k.split(".", 2)[2]: v for k, v in state.items()
                                      if k.startswith(f"layers.{i}.")}) for i in range(4)],
            "norm": state["norm_f.weight"] - 1.0}
  ours = blocks.init(list(jax.random.split(jax.random.key(0), 4)),
                     _model_config(hidden_size=64, num_layers=4), 64, [64] * 4, 1)
  log_dt = lambda tree: np.concatenate([  # popped: compared apart from the other tensors
      np.log(np.logaddexp(0.0, np.asarray(layer["cell"].pop("b_dt"), np.float64)))
      for layer in tree["layers"]])
  ours_dt, theirs_dt = log_dt(ours), log_dt(theirs)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(theirs),
                          strict=True):
    name, x, y = jax.tree_util.keystr(path), np.asarray(x), np.asarray(y)
    assert x.shape == y.shape, name
    if np.ptp(y) == 0 or name.endswith("['a_log']"):
      np.testing.assert_array_equal(x, y, err_msg=name)
    else:
      _check_draws(name, x, y)
  _check_draws("log softplus(b_dt)", ours_dt, theirs_dt)
  for end in (np.min, np.max):
    assert abs(end(ours_dt) - end(theirs_dt)) < 10 * np.ptp(theirs_dt) / ours_dt.size, (
        end.__name__, end(ours_dt), end(theirs_dt))


def test_the_dt_floor_is_the_authors(monkeypatch):
  """The dt init floor (jaxrnn's MAMBA_DT[2]) is the authors' dt_init_floor default (1e-4) and
  is applied as theirs, a clamp of the log-uniform draw: with the draw's range moved to
  [1e-6, 1e-2] (at jaxrnn's floor; their Mamba's dt_min, dt_max at their floor) half of 512
  channels sit at the floor, so softplus(bias)'s least value equals theirs (within 1e-4,
  float32's round trip through the inverse softplus) and its share of the channels matches
  theirs within 5 standard errors (0.16; a floor of 1e-3 makes it 3/4, not 1/2)."""
  a = _authors()
  dt_min, dt_max = 1e-6, 1e-2
  monkeypatch.setattr(cells, "MAMBA_DT", (dt_min, dt_max, cells.MAMBA_DT[2]))
  torch.manual_seed(0)
  theirs = a.mb.Mamba(256, dt_min=dt_min, dt_max=dt_max, use_fast_path=False).dt_proj.bias
  ours = cells.get("mamba").init(jax.random.key(0), 512, 512)["b_dt"]
  dt_ours, dt_theirs = (np.logaddexp(0.0, np.asarray(b, np.float64))
                        for b in (ours, theirs.detach().numpy()))
  floor = dt_theirs.min()
  np.testing.assert_allclose(dt_ours.min(), floor, rtol=1e-4)
  share = lambda dt: np.mean(dt <= floor * (1 + 1e-4))
  assert abs(share(dt_ours) - share(dt_theirs)) < 5 * np.sqrt(2 * 0.25 / 512), (
      share(dt_ours), share(dt_theirs))
