"""Tests for jaxrnn.blocks across the families (each family against its authors' own code:
test_griffin.py, test_xlstm.py, test_mamba.py): carries (convolution states and attention
windows included) across chunks and token by token, bfloat16, the stack unchanged, the
validator's errors, training, resume, devices and sampling with a block."""

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
from configs import default
from conftest import run_script
from jaxrnn import UserError, blocks, checkpoint, config as config_lib, model, train
from jaxrnn.tasks import lm

B, T = 2, 11


def _model_config(**fields) -> ml_collections.ConfigDict:
  config = default.get_config().model
  config.update(fields)
  return config


def _close(got, want, atol=1e-5):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=atol)


# ---------------------------------------------------------------------------------------------
# Pieces of the blocks.

def test_the_slstm_blocks_dropout_falls_before_its_head_wise_norm():
  """sLSTMLayer.forward drops the cell's output, then normalises it per head: a dropout that
  scales the branch by 2 (where the mask keeps everything) leaves the block's output as it was
  up to the norm's epsilon (1e-5 against the cell output's variance: 1e-3 here), where dropout
  after the norm would move it by the normed branch itself (unit variance per head); one that
  drops everything (scale 0) removes the branch, so the dropout is applied at all."""
  config = _model_config(block="xlstm", cell="mlstm", hidden_size=32, num_heads=2,
                         slstm_at=(0,))
  params = blocks.xlstm.XLSTM.init(jax.random.key(1), config, 0)
  carry = blocks.xlstm.XLSTM.initial_carry(config, B, 0)
  x = jax.random.normal(jax.random.key(0), (B, T, 32))

  @jax.jit
  def apply(scale):
    step = blocks.Step("scan", 1, drop=lambda y, j: scale * y if j == 0 else y,
                       weight_drop=lambda c, p: p)
    return blocks.xlstm.XLSTM.apply(params, carry, x, config, 0, step)[1]

  np.testing.assert_allclose(apply(2.0), apply(1.0), atol=1e-2)
  assert np.abs(apply(0.0) - apply(1.0)).max() > 0.5


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
    # Hawk's layers and an attending layer 2; a window of 4 makes the 9 tokens roll it over
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
    "griffin": dict(block="griffin", cell="rglru", num_heads=2, num_layers=3),  # Hawk's, then attn
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
FAST = ("mamba",)  # the quickest to compile; the others run in the slow suite


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


@pytest.mark.slow  # sample.py with every block also runs in the slow check below
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
