"""Tests for jaxrnn.train: metrics, clipping, whole-split evaluation, training end to end."""

import collections
import functools
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from jaxrnn import UserError, data, model, train

SHARED = pathlib.Path(os.environ["JAXRNN_DATA_DIR"])


def tiny_config(corpus: str, **train_overrides):
  config = default.get_config()
  config.model.update(hidden_size=16, embed_dim=8)
  config.data.update(corpus=corpus, batch_size=4, seq_len=8)
  config.train.update(steps=5, eval_every=0, log_every=1, eval_lanes=2, eval_chunk=8)
  config.train.update(train_overrides)
  return config


@pytest.fixture
def text_file(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text("the quick brown fox jumps over the lazy dog.\n" * 40)
  return str(path)


def test_uniform_predictor_has_perplexity_vocab_size(text_file):
  """Zero head weights give uniform logits: perplexity = |V| and bpc = log2 |V|."""
  config = tiny_config(text_file)
  vocab, ids = train.prepare_data(config)
  params = model.init(jax.random.key(0), config.model, len(vocab))
  params["head"] = jax.tree.map(jnp.zeros_like, params["head"])
  result = train.make_evaluator(config)(params, ids["val"])
  assert result["perplexity"] == pytest.approx(len(vocab), rel=1e-5)
  assert result["bpc"] == pytest.approx(math.log2(len(vocab)), rel=1e-5)
  assert result["tokens"] == len(ids["val"]) - 1


def test_perfect_predictor_has_perplexity_one(tmp_path):
  """On a one-symbol text, a head biased hard towards it gives perplexity 1 and bpc 0."""
  path = tmp_path / "a.txt"
  path.write_text("a" * 500)
  config = tiny_config(str(path))
  vocab, ids = train.prepare_data(config)
  params = model.init(jax.random.key(0), config.model, len(vocab))
  params["head"] = {"w": jnp.zeros_like(params["head"]["w"]),
                    "b": jnp.array([40.0, -40.0])}  # vocab is ("a", "<unk>")
  result = train.make_evaluator(config)(params, ids["val"])
  assert result["perplexity"] == pytest.approx(1.0, abs=1e-6)
  assert result["bpc"] == pytest.approx(math.log2(result["perplexity"]), abs=1e-6)


def python_reference_nll(params, config, ids):
  """Mean NLL of ids[1:] given ids[:-1], feeding one token at a time from a zero state."""
  apply = jax.jit(functools.partial(model.apply, config=config.model))
  carry = model.initial_carry(config.model, 1)
  total = 0.0
  for x, y in zip(ids[:-1], ids[1:]):
    carry, logits = apply(params, carry, jnp.array([[x]]))
    logits = np.asarray(logits[0, 0], np.float64)
    total += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[y]
  return total / (len(ids) - 1)


def test_one_lane_evaluation_equals_a_python_loop(text_file):
  """Whole-split loss with one lane and chunks equals a token-by-token loop with carried state."""
  config = tiny_config(text_file, eval_lanes=1, eval_chunk=7)
  vocab, ids = train.prepare_data(config)
  params = model.init(jax.random.key(1), config.model, len(vocab))
  val = ids["val"][:90]
  got = train.make_evaluator(config)(params, val)
  assert got["loss"] == pytest.approx(python_reference_nll(params, config, val), rel=1e-5)
  assert got["tokens"] == 89


def test_lanes_evaluate_each_lane_from_a_zero_state(text_file):
  """k lanes equal the token-weighted mean of k separate one-lane evaluations of the lane slices."""
  config = tiny_config(text_file, eval_lanes=3, eval_chunk=5)
  vocab, ids = train.prepare_data(config)
  params = model.init(jax.random.key(2), config.model, len(vocab))
  val = ids["val"][:61]  # 60 targets: lanes of 20
  got = train.make_evaluator(config)(params, val)
  parts = [python_reference_nll(params, config, val[i * 20:i * 20 + 21]) for i in range(3)]
  assert got["loss"] == pytest.approx(np.mean(parts), rel=1e-5)


def test_sixteen_lanes_match_one_lane_on_a_trained_model():
  """After some training, the 16-lane validation loss is within 0.5% of the exact one-lane pass."""
  config = tiny_config("timemachine", eval_lanes=16, eval_chunk=128)
  config.model.update(hidden_size=64, embed_dim=16)
  config.data.update(batch_size=16, seq_len=32)
  vocab, ids = train.prepare_data(config)
  tx = train.make_optimizer(config.train)
  state = train.create_train_state(config, len(vocab), tx)
  step = jax.jit(functools.partial(train.train_step, config=config, tx=tx))
  batches = data.train_batches(ids["train"], config.data, 0)
  carry = model.initial_carry(config.model, config.data.batch_size)
  for _ in range(150):
    state, carry, _ = step(state, next(batches), carry)
  lanes = train.make_evaluator(config)(state.params, ids["val"])
  config.train.eval_lanes = 1
  one = train.make_evaluator(config)(state.params, ids["val"])
  assert lanes["tokens"] == one["tokens"] == len(ids["val"]) - 1
  assert one["perplexity"] < 0.7 * len(vocab)  # trained, so the state carries information
  assert lanes["loss"] == pytest.approx(one["loss"], rel=5e-3)


def test_clipping_bounds_the_update(text_file):
  """SGD with lr 1 and clip_norm 1e-3: the parameter change has global norm exactly 1e-3."""
  config = tiny_config(text_file, optimizer="sgd", lr=1.0, clip_norm=1e-3)
  vocab, ids = train.prepare_data(config)
  tx = train.make_optimizer(config.train)
  state = train.create_train_state(config, len(vocab), tx)
  before = state.params
  batch = next(data.train_batches(ids["train"], config.data, 0))
  carry = model.initial_carry(config.model, config.data.batch_size)
  new, _, metrics = train.train_step(state, batch, carry, config=config, tx=tx)
  delta = jax.tree.map(lambda a, b: a - b, new.params, before)
  assert float(metrics["grad_norm"]) > 1e-3  # so the clip was active
  assert float(train.optax.tree.norm(delta)) == pytest.approx(1e-3, rel=1e-4)


def test_one_train_step_changes_every_parameter(text_file):
  """Every leaf of the params moves after one Adam step (nothing is cut off from the loss)."""
  config = tiny_config(text_file)
  config.model.num_layers = 2
  vocab, ids = train.prepare_data(config)
  tx = train.make_optimizer(config.train)
  state = train.create_train_state(config, len(vocab), tx)
  batch = next(data.train_batches(ids["train"], config.data, 0))
  carry = model.initial_carry(config.model, config.data.batch_size)
  new, _, _ = train.train_step(state, batch, carry, config=config, tx=tx)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.params, state.params)
  assert all(jax.tree.leaves(changed)), changed


def test_cosine_schedule_warms_up_and_decays():
  """Cosine: 0 at step 0, the peak after warmup, ~0 at the last step."""
  config = default.get_config().train
  config.update(schedule="cosine", warmup_steps=10, steps=100, lr=1e-2)
  schedule = train.learning_rate(config)
  assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1e-2)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-8)


def test_nan_loss_stops_the_run(text_file, tmp_path):
  """A NaN learning rate poisons the params; the run stops at step 2 with advice."""
  config = tiny_config(text_file, lr=float("nan"))
  with pytest.raises(UserError, match="at step 2.*lower train.lr"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_training_beats_the_unigram_model(tmp_path):
  """A small LSTM on The Time Machine ends well below the unigram perplexity of the text."""
  config = tiny_config("timemachine", steps=300, eval_lanes=16, eval_chunk=256)
  config.model.update(hidden_size=128, embed_dim=32)
  config.data.update(batch_size=32, seq_len=32)
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  vocab, ids = train.prepare_data(config)
  counts = collections.Counter(ids["train"].tolist())
  probs = np.array([counts.get(i, 0) + 1 for i in range(len(vocab))], np.float64)
  probs /= probs.sum()
  unigram = math.exp(-np.mean(np.log(probs[ids["val"][1:]])))
  assert result["perplexity"] < 0.6 * unigram, (result["perplexity"], unigram)


def classify_config(**model_overrides):
  """A small sentence classifier on rt-polarity (the first 500 words of the vocabulary)."""
  config = default.get_config()
  config.task = "classify"
  config.model.update(hidden_size=8, embed_dim=8, bidirectional=True)
  config.model.update(model_overrides)
  config.data.update(corpus="rt-polarity", batch_size=8, seq_len=24, max_vocab=500)
  config.train.update(steps=4, eval_every=2, log_every=1, eval_lanes=128)
  return config


def reference_figures(params, config, split):
  """Mean cross-entropy and accuracy of a whole split from one apply and float64 NumPy."""
  logits = np.asarray(model.apply_classifier(params, jnp.asarray(split["inputs"]),
                                             jnp.asarray(split["lengths"]),
                                             config=config.model), np.float64)
  y = split["targets"]
  if logits.shape[1] == 1:
    z = logits[:, 0]
    nll = np.logaddexp(0.0, -z) * y + np.logaddexp(0.0, z) * (1 - y)
    predictions = (z > 0).astype(int)
  else:
    nll = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1) \
        - logits[np.arange(len(y)), y]
    predictions = logits.argmax(1)
  return nll.mean(), (predictions == y).mean()


@pytest.mark.parametrize("num_classes", [1, 2])
def test_classify_evaluator_equals_one_pass_over_the_split(num_classes):
  """Chunked, masked evaluation equals cross-entropy (binary for one sigmoid unit) and accuracy
  of the whole split computed at once."""
  config = classify_config(num_classes=num_classes, bidirectional=False)
  vocab, splits = train.prepare_data(config)
  params = train.create_train_state(config, len(vocab), train.make_optimizer(config.train)).params
  got = train.make_evaluator(config)(params, splits["val"])
  loss, accuracy = reference_figures(params, config, splits["val"])
  assert got["examples"] == 1066
  assert got["loss"] == pytest.approx(loss, rel=1e-5)
  assert got["accuracy"] == pytest.approx(accuracy, abs=1e-9)


def test_classify_train_step_changes_every_parameter():
  """One Adam step on a bidirectional classifier moves every leaf; no carry comes back."""
  config = classify_config(dropout=0.1)
  vocab, splits = train.prepare_data(config)
  tx = train.make_optimizer(config.train)
  state = train.create_train_state(config, len(vocab), tx)
  batch = next(train.task_of(config).train_batches(splits["train"], config, 0))
  batch = {k: v for k, v in batch.items() if k != "reset"}
  step = jax.jit(functools.partial(train.train_step, config=config, tx=tx))
  new, carry, metrics = step(state, batch, ())
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.params, state.params)
  assert all(jax.tree.leaves(changed)), changed
  assert carry == () and np.isfinite(float(metrics["loss"]))


def test_classify_config_errors_are_caught_early(tmp_path):
  """A class count the corpus does not have, a bidirectional LM and an unknown task are refused
  before training, each naming what to change."""
  config = classify_config(num_classes=3)
  with pytest.raises(UserError, match="has 2 classes .*set it to 2 \\(softmax\\) or 1"):
    train.train_and_evaluate(config, str(tmp_path / "a"))
  config = tiny_config("timemachine")
  config.model.bidirectional = True
  with pytest.raises(UserError, match="see the future"):
    train.train_and_evaluate(config, str(tmp_path / "b"))
  config.task = "translate"
  with pytest.raises(UserError, match="task must be one of lm, classify"):
    train.train_and_evaluate(config, str(tmp_path / "c"))


def test_mingru_trains_the_lm_with_no_other_change(text_file, tmp_path):
  """--config.model.cell=mingru alone: a short LM run ends well below the uniform loss log |V|."""
  config = tiny_config(text_file, steps=30, lr=1e-2)
  config.model.cell = "mingru"
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  vocab, _ = train.prepare_data(config)
  assert math.isfinite(result["val_loss"]) and result["val_loss"] < 0.9 * math.log(len(vocab))
