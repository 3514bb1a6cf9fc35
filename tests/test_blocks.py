"""Tests for jaxrnn.blocks: each authors' block against a float64 NumPy transliteration of their
code (tests/reference_griffin.py, reference_xlstm.py, reference_mamba.py, each citing the
repository, commit, file and function), weights mapped explicitly; carries (convolution state
included) across chunks and token by token; the stack unchanged; the validator's errors."""

import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import authors
import reference_xlstm
from configs import default
from conftest import run_script
from jaxrnn import UserError, blocks, cells, checkpoint, config as config_lib, model, train
from jaxrnn.tasks import lm

B, T, SPLIT = 2, 11, 4  # a sequence of T steps, also run as [0, SPLIT) then [SPLIT, T)


def _model_config(**fields) -> ml_collections.ConfigDict:
  config = default.get_config().model
  config.update(fields)
  return config


def _step(impl: str) -> blocks.Step:
  return blocks.Step(impl, 1, drop=lambda y, i: y, weight_drop=lambda c, p: p)


def _f64(tree):
  return jax.tree.map(lambda v: jnp.asarray(np.asarray(v, np.float64)), tree)


def _run_in_two(block, params, model_config, layer, x, impl):
  """The block over x from a zero carry, in two chunks with the carry passed between them."""
  carry = _f64(block.initial_carry(model_config, x.shape[0], layer))
  step = _step(impl)
  carry, y1 = block.apply(params, carry, x[:, :SPLIT], model_config, layer, step)
  carry, y2 = block.apply(params, carry, x[:, SPLIT:], model_config, layer, step)
  return carry, jnp.concatenate([y1, y2], axis=1)


def _close(got, want, atol=1e-5):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=atol)


# ---------------------------------------------------------------------------------------------
# xLSTM: xLSTMBlock around the mLSTM layer, and around the sLSTM layer with its feed-forward.

def _headwise(w):
  """xLSTM's LinearHeadwiseExpand weight <heads, out, in> as jaxrnn's <heads, in, out>."""
  return np.swapaxes(w, 1, 2)


def _conv(conv):
  return {"w": conv["weight"][:, 0, :].T, "b": conv["bias"]}


def _mlstm_from_authors(p):
  xl, cell = p["xlstm"], p["xlstm"]["mlstm_cell"]
  return {"norm": p["xlstm_norm"]["weight"], "proj_up": {"w": xl["proj_up"]["weight"].T},
          "conv": _conv(xl["conv1d"]["conv"]),
          **{name: {"w": _headwise(xl[f"{name}_proj"]["weight"])} for name in "qkv"},
          "igate": {"w": cell["igate"]["weight"].T, "b": cell["igate"]["bias"]},
          "fgate": {"w": cell["fgate"]["weight"].T, "b": cell["fgate"]["bias"]},
          "outnorm": cell["outnorm"]["weight"], "skip": xl["learnable_skip"],
          "proj_down": {"w": xl["proj_down"]["weight"].T}}


def _slstm_from_authors(p, heads):
  xl, up = p["xlstm"], p["ffn"]["proj_up"]["weight"].T  # <d, 2m>: (gate, value)
  m = up.shape[1] // 2
  bias = xl["slstm_cell"]["_bias_"].reshape(heads, 4, -1)  # (head, gate, unit) -> (gate, head, unit)
  return {"norm": p["xlstm_norm"]["weight"], "conv": _conv(xl["conv1d"]["conv"]),
          # The authors' module named fgate makes the input gate's pre-activation, igate the
          # forget gate's (sLSTMLayer.forward); jaxrnn names each for the gate it feeds.
          "igate": {"w": _headwise(xl["fgate"]["weight"])},
          "fgate": {"w": _headwise(xl["igate"]["weight"])},
          "zgate": {"w": _headwise(xl["zgate"]["weight"])},
          "ogate": {"w": _headwise(xl["ogate"]["weight"])},
          "w_hh": xl["slstm_cell"]["_recurrent_kernel_"],
          "b": np.swapaxes(bias, 0, 1).reshape(-1),
          "group_norm": xl["group_norm"]["weight"], "ffn_norm": p["ffn_norm"]["weight"],
          "ffn": {"up": {"w": np.stack([up[:, :m], up[:, m:]])},
                  "down": {"w": p["ffn"]["proj_down"]["weight"].T}}}


@pytest.mark.parametrize("impl", ["scan", "fused"])
def test_xlstm_mlstm_block_equals_the_authors(impl):
  """One mLSTM block (width 24 -> inner 64, 4 heads) in two chunks, sequential and chunked
  parallel form, against xlstm's xLSTMBlock with an mLSTMLayer in float64: outputs, the conv
  state and the memory (C, n, m) within 1e-5."""
  width, heads = 24, 4
  rng = np.random.default_rng(1)
  authors = reference_xlstm.random_params_mlstm_block(rng, width, num_heads=heads)
  x = rng.normal(size=(B, T, width))
  want, state = reference_xlstm.mlstm_block(x, authors)
  config = _model_config(block="xlstm", cell="mlstm", hidden_size=width, num_heads=heads)
  assert blocks.xlstm.inner(config) == 64  # 2 x 24 rounded up to a multiple of 64, as theirs
  with jax.enable_x64(True):
    (conv_state, (_, c, n, m)), got = _run_in_two(blocks.xlstm.XLSTM,
                                                  _f64(_mlstm_from_authors(authors)), config, 0,
                                                  jnp.asarray(x), impl)
  _close(got, want)
  _close(conv_state, state["conv_state"])
  want_c, want_n, want_m = state["mlstm_state"]
  _close(c, want_c)
  _close(n, want_n[..., 0])
  _close(m, want_m[..., 0, 0])


def test_xlstm_slstm_block_equals_the_authors():
  """An sLSTM block (model.slstm_at=(0,); width 16, 4 heads, feed-forward 1.3x rounded up to
  64) in two chunks against xlstm's xLSTMBlock with an sLSTMLayer and GatedFeedForward in
  float64: outputs, the conv state and (h, c, n, m) within 1e-5."""
  width, heads = 16, 4
  rng = np.random.default_rng(2)
  authors = reference_xlstm.random_params_slstm_block(rng, width, num_heads=heads)
  x = rng.normal(size=(B, T, width))
  want, state = reference_xlstm.slstm_block(x, authors)
  config = _model_config(block="xlstm", cell="mlstm", hidden_size=width, num_heads=heads,
                         slstm_at=(0,))
  with jax.enable_x64(True):
    (conv_state, cell_state), got = _run_in_two(blocks.xlstm.XLSTM,
                                                _f64(_slstm_from_authors(authors, heads)),
                                                config, 0, jnp.asarray(x), "scan")
  _close(got, want)
  _close(conv_state, state["conv_state"])
  for got_leaf, want_leaf in zip(cell_state, state["slstm_state"], strict=True):
    _close(got_leaf, want_leaf)


def _mlstm_gates_at_minus_200():
  """gx<b, t, 3h + 2 heads> and a carry for the mLSTM memory (2 heads of 2, b 2, 5 steps) whose
  stabilizer m is -100 and -200 in the carry, -150 after step 0 (i -150, f -60) and -200 after
  step 1 (i -200), where exp(-m) is past float32's largest number (m < -88.7); then the gates
  open (i, f ~ N(0, 1)) and m is i, so steps 2 to 4 give outputs of order 1."""
  b, t, heads, d = 2, 5, 2, 2
  rng = np.random.default_rng(5)
  qkv = rng.normal(size=(b, t, 3 * heads * d))
  i, f = rng.normal(size=(2, b, t, heads))
  i[:, :2] += np.array([-150.0, -200.0])[:, None]
  f[:, :2] -= 60.0
  carry = (np.zeros((b, heads * d)), rng.normal(size=(b, heads, d, d)),
           rng.normal(size=(b, heads, d)), np.array([[-100.0, -200.0], [-200.0, -100.0]]))
  return np.concatenate([qkv, i, f], axis=-1), carry


def _mlstm_reference(gx, carry):
  """tests/reference_xlstm.py's mLSTM (the authors' recurrent_step_stabilized_simple, float64)
  on the layout of `_mlstm_gates_at_minus_200` -> (h<b, t, h>, (C, n, m) as jaxrnn's carry)."""
  b, t, heads, d = *gx.shape[:2], *carry[2].shape[1:]
  q, k, v = (np.swapaxes(x.reshape(b, t, heads, d), 1, 2)
             for x in np.split(gx[..., :3 * heads * d], 3, axis=-1))
  i, f = (np.swapaxes(x, 1, 2) for x in np.split(gx[..., 3 * heads * d:], 2, axis=-1))
  _, c, n, m = carry
  hs, (c, n, m) = reference_xlstm.mlstm_cell_sequence(q, k, v, i, f,
                                                      (c, n[..., None], m[..., None, None]))
  return np.swapaxes(hs, 1, 2).reshape(b, t, -1), (c, n[..., 0], m[..., 0, 0])


@pytest.mark.parametrize("form", ["step", "parallel"])
def test_mlstm_normalizer_stays_finite_where_exp_minus_m_overflows(form):
  """The mLSTM memory's normalizer max(|q n|, exp(-m)) at m = -150 and -200 (a run of closed
  gates, as training at lr 3e-2 reached), in the step form (lax.scan of `recur`) and the
  chunked parallel form, in float32: outputs and final carry equal the float64 reference's
  within 1e-5, and the gradient of sum(w * h) with respect to every gate input and the
  carry (C, n, m) is finite and equals the reference's (central differences in float64)
  within 1e-5 of its largest entry (those of steps 0 and 1 and of the carry are ~0: nothing
  weighted by exp(m) reaches an output of order 1). exp(-m) overflowed to inf there: h stayed
  finite (a finite numerator over inf) and its gradient was NaN (0 * inf), which stopped
  training for good."""
  gx, carry = _mlstm_gates_at_minus_200()
  w = np.random.default_rng(6).normal(size=gx.shape[:2] + (carry[0].shape[-1],))
  cell = cells.mlstm_memory(num_heads=2)
  run = {"step": lambda c, g: jax.lax.scan(lambda c, x: cell.recur({}, c, x), c, g),
         "parallel": lambda c, g: cell.parallel({}, c, g)}[form]

  def forward(gx, carry):  # batch-major, as the block; the forms take time-major gx
    carry, hs = run(carry, jnp.swapaxes(gx, 0, 1))
    return carry, jnp.swapaxes(hs, 0, 1)

  f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  (_, *got_carry), got = jax.jit(forward)(f32(gx), f32(carry))
  want, want_carry = _mlstm_reference(gx, carry)
  _close(got, want)
  for a, b in zip(got_carry, want_carry, strict=True):
    _close(a, b)
  loss = lambda gx, carry: jnp.sum(w * forward(gx, carry)[1])
  got_grads = jax.jit(jax.grad(loss, (0, 1)))(f32(gx), f32(carry))
  got_grads = [got_grads[0], *got_grads[1][1:]]  # h is no input of the mLSTM's step
  inputs = [gx, *carry[1:]]

  def reference_loss(j, x):  # sum(w * h) with inputs[j] replaced by x
    args = inputs[:j] + [x] + inputs[j + 1:]
    return np.sum(w * _mlstm_reference(args[0], (carry[0], *args[1:]))[0])

  want_grads = []
  for j, x in enumerate(inputs):
    want_grads.append(np.zeros(x.shape))
    for index in np.ndindex(x.shape):
      step = np.zeros(x.shape)
      step[index] = 1e-6 * max(1.0, abs(x[index]))
      want_grads[-1][index] = (reference_loss(j, x + step) - reference_loss(j, x - step)) / (
          2 * step[index])
  largest = max(np.abs(g).max() for g in want_grads)
  for name, got_grad, want_grad in zip(("gx", "C", "n", "m"), got_grads, want_grads,
                                       strict=True):
    assert np.isfinite(np.asarray(got_grad)).all(), f"NaN or inf in the gradient of {name}"
    _close(got_grad, want_grad, atol=1e-5 * largest)


# ---------------------------------------------------------------------------------------------
# Pieces of the blocks.

def test_the_slstm_blocks_dropout_falls_before_its_head_wise_norm():
  """sLSTMLayer.forward drops the cell's output, then normalises it per head: a dropout that
  scales the branch (here by 2, where the mask keeps everything) leaves the block's output as
  it was up to the norm's epsilon (1e-5 against the cell output's variance: 1e-3 here), where
  dropout after the norm would move it by the normed branch itself (unit variance per head);
  the mLSTM block drops after its output projection (the branch doubled)."""
  x = jax.random.normal(jax.random.key(0), (B, T, 32))

  def apply(slstm, scale):
    config = _model_config(block="xlstm", cell="mlstm", hidden_size=32, num_heads=2,
                           slstm_at=(0,) if slstm else ())
    params = blocks.xlstm.XLSTM.init(jax.random.key(1), config, 0)
    carry = blocks.xlstm.XLSTM.initial_carry(config, B, 0)
    step = blocks.Step("scan", 1, drop=lambda y, j: scale * y if j == 0 else y,
                       weight_drop=lambda c, p: p)
    return blocks.xlstm.XLSTM.apply(params, carry, x, config, 0, step)[1]

  np.testing.assert_allclose(apply(True, 2.0), apply(True, 1.0), atol=1e-2)
  assert not np.allclose(apply(False, 2.0), apply(False, 1.0), atol=1e-3)


def test_the_residual_blocks_mlp_is_recurrentgemmas():
  """`gated_mlp` with tanh gelu against recurrentgemma 1.0.1's MLPBlock (tests/authors.py) on
  its own init (biases drawn, so that they are tested too), float32 within 1e-5."""
  rg = authors.recurrentgemma()
  mlp = rg.modules.MLPBlock(width=8, expanded_width=24)
  x = jax.random.normal(jax.random.key(0), (B, T, 8))
  theirs = mlp.init(jax.random.key(1), x)["params"]
  theirs = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.key(2), v.shape),
                        theirs)
  up = theirs["ffw_up"]
  ours = {"up": {"w": up["w"], "b": up["b"].reshape(2, -1)},
          "down": {"w": theirs["ffw_down"]["kernel"], "b": theirs["ffw_down"]["bias"]}}
  _close(blocks.common.gated_mlp(ours, x, jnp.float32, approximate=True),
         mlp.apply({"params": theirs}, x))


# ---------------------------------------------------------------------------------------------
# Whole models: token by token, the stack, the validator.

MODELS = {
    "residual": dict(block="residual", cell="lstm"),
    "residual-mamba": dict(block="residual", cell="mamba"),
    "hawk": dict(block="hawk", cell="rglru", num_heads=2),
    # layer 2 attends; a window of 4 makes the 9 tokens roll it over
    "griffin": dict(block="griffin", cell="rglru", num_heads=2, num_layers=3, attention_window=4),
    "xlstm": dict(block="xlstm", cell="mlstm", num_heads=2, slstm_at=(1,)),
    "mamba": dict(block="mamba", cell="mamba"),
}


@pytest.mark.parametrize("name", MODELS)
def test_one_token_at_a_time_equals_the_whole_sequence(name):
  """A 2-layer LM of each block (griffin: 3): logits for 9 tokens at once (the parallel forms, impl=fused)
  equal those of 9 one-token calls carrying the carries (convolution states included),
  within 1e-5; the carries' leaves are batch-first."""
  config = _model_config(hidden_size=32, embed_dim=16, **{"num_layers": 2, **MODELS[name]})
  params = model.init(jax.random.key(0), config, 11)
  tokens = jax.random.randint(jax.random.key(1), (3, 9), 0, 11)
  carry = model.initial_carry(config, 3)
  assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(carry))
  whole_config = config.copy_and_resolve_references()
  whole_config.impl = "fused"
  whole_carry, whole = jax.jit(lambda p, c, x: model.apply(p, c, x, model_config=whole_config))(
      params, carry, tokens)
  one = jax.jit(lambda p, c, x: model.apply(p, c, x, model_config=config))
  steps = []
  for t in range(tokens.shape[1]):
    carry, logits = one(params, carry, tokens[:, t:t + 1])
    steps.append(logits)
  _close(jnp.concatenate(steps, axis=1), whole)
  for a, b in zip(jax.tree.leaves(carry), jax.tree.leaves(whole_carry), strict=True):
    _close(a, b)


BFLOAT16 = {  # one layer of each block; xlstm's two are an mLSTM and an sLSTM
    "residual": dict(block="residual", cell="lstm"),
    "hawk": dict(block="hawk", cell="rglru", num_heads=2),
    "griffin": dict(block="griffin", cell="rglru", num_heads=2, num_layers=3),  # layer 2 attends
    "xlstm": dict(block="xlstm", cell="mlstm", num_heads=2, slstm_at=(1,), num_layers=2),
    "slstm": dict(block="xlstm", cell="mlstm", num_heads=2, slstm_at=(0,)),  # xlstm's fast twin
    "mamba": dict(block="mamba", cell="mamba"),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "xlstm" else n
                                  for n in BFLOAT16])
def test_each_block_computes_in_bfloat16_close_to_float32(name):
  """compute_dtype=bfloat16 through model.apply, forward and gradient (the products with a
  weight per head, Hawk's gates and xLSTM's q, k, v and sLSTM gates and recurrence, were
  a bf16 x bf16 = f32 batched dot, which XLA:CPU refused when it ran): logits and the
  gradient are finite, moved by the rounding, and within 0.05 of float32's largest entry.
  bfloat16 keeps 8 significant bits (2^-9 ~ 0.002 relative per operand); over these layers
  the logits and gradients move by up to 0.011 of their largest entry, so 0.05 has room,
  while a wrong product is off by the size of the values themselves."""
  results = {}
  for dtype in ("float32", "bfloat16"):
    config = _model_config(hidden_size=16, embed_dim=8, compute_dtype=dtype, **BFLOAT16[name])
    params, carry = model.init(jax.random.key(0), config, 11), model.initial_carry(config, 2)

    def loss(params, tokens):  # next-token cross-entropy
      logits = model.apply(params, carry, tokens, model_config=config)[1]
      log_p = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1)
      return -jnp.mean(log_p), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        params, jax.random.randint(jax.random.key(1), (2, 6), 0, 11))
    results[dtype] = (np.asarray(logits),
                      np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)]))
  for want, got in zip(results["float32"], results["bfloat16"], strict=True):
    assert np.isfinite(got).all()
    assert not np.array_equal(got, want)  # the products did round
    np.testing.assert_allclose(got, want, rtol=0, atol=0.05 * np.abs(want).max())


def test_the_stack_is_the_default_and_unchanged(tiny_config):
  """model.block defaults to "stack", whose parameters hold no residual-stream entries."""
  config = tiny_config()
  assert config.model.block == "stack"
  params = model.init(jax.random.key(0), config.model, 20)
  assert set(params) == {"layers", "head", "embed"}


@pytest.mark.parametrize("fields, message", [
    (dict(block="griffin", cell="lstm"), "model.block=griffin is built around the rglru cell"),
    (dict(block="griffin", cell="rglru"), "model.block=griffin attends at every third layer"),
    (dict(block="hawk", cell="rglru", lru_width=48, num_heads=5), "model.num_heads=5 must divide"),
    (dict(block="hawk", cell="rglru", lru_width=40, num_heads=16),
     "must divide the RG-LRU's width 40"),
    (dict(block="griffin", cell="rglru", num_layers=3, num_heads=16),
     "griffin's attention heads are model.hidden_size / model.num_heads = 2 wide"),
    (dict(block="hawk", cell="rglru", attention_window=64),
     "model.attention_window=64 does nothing for model.block='hawk'"),
    (dict(block="mamba", cell="gru"), "model.block=mamba is built around the mamba cell"),
    (dict(block="xlstm", cell="mlstm", num_heads=3), "model.num_heads=3 must divide"),
    (dict(block="hawk", cell="rglru", num_heads=5), "model.num_heads=5 must divide"),
    (dict(block="xlstm", cell="mlstm", slstm_at=(4,)), "model.slstm_at=(4,) must name layers"),
    (dict(block="residual", cell="lstm", slstm_at=(0,)), "model.slstm_at=(0,) must name layers"),
    (dict(block="stack", cell="mamba"), "the mamba cell keeps its input's width"),
    (dict(block="residual", cell="lstm", tie_embedding=True), "model.tie_embedding reads"),
    (dict(block="fancy"), "model.block must be one of stack, residual, hawk, griffin, xlstm, mamba"),
    (dict(block="residual", cell="gru", num_heads=2), "model.num_heads=2 does nothing"),
])
def test_a_block_that_cannot_take_the_config_is_a_one_line_error(tiny_config, fields, message):
  with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
    config_lib.validate(tiny_config(model=dict(hidden_size=32, **{"num_layers": 2, **fields})))
  assert "\n" not in str(e.value)


def test_bidirectional_needs_the_stack(tiny_classify_config):
  with pytest.raises(UserError, match="model.bidirectional runs a stack of cells both ways"):
    config_lib.validate(tiny_classify_config(model=dict(block="residual", bidirectional=True)))


# ---------------------------------------------------------------------------------------------
# Training with a block: resume, devices, the task and options around it.

RUNS = {  # each block at the tiny size, with dropout on so that its keys are exercised
    "residual": dict(block="residual", cell="lstm", num_layers=2),
    "hawk": dict(block="hawk", cell="rglru", num_heads=2, num_layers=2),
    "griffin": dict(block="griffin", cell="rglru", num_heads=2, num_layers=3, attention_window=8),
    "xlstm": dict(block="xlstm", cell="mlstm", num_heads=2, slstm_at=(1,), num_layers=2),
    "mamba": dict(block="mamba", cell="mamba", num_layers=1),
}
FAST = ("mamba", "griffin")  # the quickest to compile; the others run in the slow suite


def _params(workdir):
  return checkpoint.load_run(str(workdir))[2]


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in RUNS])
def test_a_run_with_a_block_resumes_bit_for_bit(name, tiny_config, tmp_path):
  """10 steps, stop, resume to 20 == 20 straight, bit for bit (dropout on, micro-batches)."""
  def config(steps):
    return tiny_config(model=dict(dropout=0.1, **RUNS[name]),
                       train={"steps": steps, "ckpt_every": 5, "accumulate": 2})
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train.train_and_evaluate(config(20), str(straight))
  train.train_and_evaluate(config(10), str(resumed))
  train.train_and_evaluate(config(20), str(resumed))
  for a, b in zip(jax.tree.leaves(_params(straight)), jax.tree.leaves(_params(resumed)),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Half a minute each (two script runs, one on four simulated devices): all in the slow suite
# (run with -m slow); the fast suite keeps test_parallel.py's four devices against one for the
# stack.
@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_four_devices_equal_one_with_a_block(name, tiny_flags, tmp_path):
  """The same 10-step run (dropout on) on 4 simulated devices and on 1: final parameters within
  1e-5 (Adam's normalized steps carry the devices' differently ordered sums into the 1e-6s)."""
  params = {}
  for n in (4, 1):
    workdir = tmp_path / f"dev{n}"
    proc = run_script("train.py", *tiny_flags(workdir, model=dict(dropout=0.1, **RUNS[name]),
                                              data={"batch_size": 8},
                                              train={"steps": 10, "eval_lanes": 4}), devices=n)
    assert proc.returncode == 0, proc.stderr
    params[n] = _params(workdir)
  for a, b in zip(jax.tree.leaves(params[4]), jax.tree.leaves(params[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_block_trains_the_classifier_in_bfloat16(tiny_classify_config, tmp_path):
  """The sentence classifier with a residual block and bfloat16 products trains to finite
  parameters."""
  config = tiny_classify_config(model=dict(block="residual", cell="gru",
                                           compute_dtype="bfloat16"))
  train.train_and_evaluate(config, str(tmp_path))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(_params(tmp_path)))


def test_sample_and_beam_search_continue_a_prefix_with_a_block(tiny_flags, tmp_path):
  """sample.py (sampled and --beam) continues a prefix from a griffin run's checkpoint (its
  attention's window carried one token at a time)."""
  proc = run_script("train.py", *tiny_flags(tmp_path, model=RUNS["griffin"]))
  assert proc.returncode == 0, proc.stderr
  for extra in ((), ("--beam=3",)):
    proc = run_script("sample.py", f"--workdir={tmp_path}", "--prefix=the ", "--length=12",
                      *extra)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("the ") and len(proc.stdout.splitlines()[0]) >= 16


@pytest.mark.slow  # five 200-step runs and their resumed twins (about 8 minutes on two cores)
@pytest.mark.parametrize("name", ["residual", "hawk", "griffin", "xlstm", "mamba"])
def test_each_block_learns_tiny_shakespeare_as_a_user_runs_it(name, tmp_path):
  """Issue 25's check, through the scripts: 2 layers of 64 (griffin: 3), 200 steps of 16 x 64 on Tiny
  Shakespeare's first 200 KB at lr 3e-3 reach a validation perplexity below half the unigram
  one; 100 + 100 steps equal 200 bit for bit; sample.py continues a prefix."""
  text = (pathlib.Path(os.environ["JAXRNN_DATA_DIR"]) / "tinyshakespeare.txt").read_text()
  corpus = tmp_path / "shakespeare200k.txt"
  corpus.write_text(text[:200_000])
  cell = {"residual": "lstm", "hawk": "rglru", "griffin": "rglru", "xlstm": "mlstm",
          "mamba": "mamba"}[name]
  flags = lambda workdir, steps: [
      f"--workdir={workdir}", f"--config.data.corpus={corpus}", f"--config.model.block={name}",
      f"--config.model.cell={cell}", f"--config.model.num_layers={3 if name == 'griffin' else 2}",
      "--config.model.hidden_size=64", "--config.data.batch_size=16", "--config.data.seq_len=64",
      f"--config.train.steps={steps}", "--config.train.lr=3e-3", "--config.train.ckpt_every=100",
      "--config.train.eval_every=0"]
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  for workdir, steps in ((straight, 200), (resumed, 100), (resumed, 200)):
    proc = run_script("train.py", *flags(workdir, steps), timeout=900)
    assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.splitlines()[-1])
  for a, b in zip(jax.tree.leaves(_params(straight)), jax.tree.leaves(_params(resumed)),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  config = checkpoint.load_run(str(straight))[0]
  vocab, ids = lm.prepare_data(config)
  counts = np.bincount(ids["train"], minlength=len(vocab)) + 1.0
  unigram = math.exp(-np.mean(np.log((counts / counts.sum())[ids["val"][1:]])))
  assert result["perplexity"] < 0.5 * unigram, (result["perplexity"], unigram)
  proc = run_script("sample.py", f"--workdir={straight}", "--prefix=ROMEO:", "--length=60")
  assert proc.returncode == 0 and proc.stdout.startswith("ROMEO:"), proc.stderr
  print(f"{name}: perplexity {result['perplexity']:.2f} (unigram {unigram:.2f}); "
        f"{proc.stdout[:70]!r}")
