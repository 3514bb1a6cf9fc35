"""Tests for jaxrnn.tasks.lm: whole-split perplexity and bpc against independent references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from jaxrnn import data, model, optim, train
from jaxrnn.tasks import lm


def test_uniform_predictor_has_perplexity_vocab_size(tiny_config):
  """Zero head weights give uniform logits: perplexity = |V| and bpc = log2 |V|."""
  config = tiny_config()
  vocab, ids = lm.prepare_data(config)
  params = model.init(jax.random.key(0), config.model, len(vocab))
  params["head"] = jax.tree.map(jnp.zeros_like, params["head"])
  result = lm.make_evaluator(config)(params, ids["val"])
  assert result["perplexity"] == pytest.approx(len(vocab), rel=1e-5)
  assert result["bpc"] == pytest.approx(np.log2(len(vocab)), rel=1e-5)
  assert result["tokens"] == len(ids["val"]) - 1 == lm.size(ids["val"])


def test_perfect_predictor_has_perplexity_one(tiny_config, tmp_path):
  """On a one-symbol text, a head biased hard towards it gives perplexity 1 and bpc 0."""
  path = tmp_path / "a.txt"
  path.write_text("a" * 500)
  config = tiny_config(data={"corpus": str(path)})
  vocab, ids = lm.prepare_data(config)
  params = model.init(jax.random.key(0), config.model, len(vocab))
  params["head"] = {"w": jnp.zeros_like(params["head"]["w"]),
                    "b": jnp.array([40.0, -40.0])}  # vocab is ("a", "<unk>")
  result = lm.make_evaluator(config)(params, ids["val"])
  assert result["perplexity"] == pytest.approx(1.0, abs=1e-6)
  assert result["bpc"] == pytest.approx(np.log2(result["perplexity"]), abs=1e-6)


def python_reference_nll(params, config, ids):
  """Mean NLL of ids[1:] given ids[:-1], feeding one token at a time from a zero state."""
  apply = jax.jit(functools.partial(model.apply, model_config=config.model))
  carry = model.initial_carry(config.model, 1)
  total = 0.0
  for x, y in zip(ids[:-1], ids[1:]):
    carry, logits = apply(params, carry, jnp.array([[x]]))
    logits = np.asarray(logits[0, 0], np.float64)
    total += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[y]
  return total / (len(ids) - 1)


def test_one_lane_evaluation_equals_a_python_loop(tiny_config):
  """Whole-split loss with one lane and chunks equals a token-by-token loop with carried state."""
  config = tiny_config(train={"eval_lanes": 1, "eval_chunk": 7})
  vocab, ids = lm.prepare_data(config)
  params = model.init(jax.random.key(1), config.model, len(vocab))
  val = ids["val"][:90]
  got = lm.make_evaluator(config)(params, val)
  assert got["loss"] == pytest.approx(python_reference_nll(params, config, val), rel=1e-5)
  assert got["tokens"] == 89


def test_lanes_evaluate_each_lane_from_a_zero_state(tiny_config):
  """k lanes equal the token-weighted mean of k separate one-lane evaluations of the lane slices."""
  config = tiny_config(train={"eval_lanes": 3, "eval_chunk": 5})
  vocab, ids = lm.prepare_data(config)
  params = model.init(jax.random.key(2), config.model, len(vocab))
  val = ids["val"][:61]  # 60 targets: lanes of 20
  got = lm.make_evaluator(config)(params, val)
  parts = [python_reference_nll(params, config, val[i * 20:i * 20 + 21]) for i in range(3)]
  assert got["loss"] == pytest.approx(np.mean(parts), rel=1e-5)


def test_sixteen_lanes_match_one_lane_on_a_trained_model(tiny_config):
  """After some training, the 16-lane validation loss is within 0.5% of the exact one-lane pass."""
  config = tiny_config(model={"hidden_size": 64, "embed_dim": 16},
                       data={"corpus": "timemachine", "batch_size": 16, "seq_len": 32},
                       train={"eval_lanes": 16, "eval_chunk": 128})
  vocab, ids = lm.prepare_data(config)
  tx = optim.make_optimizer(config.train)
  state = train.create_train_state(config, len(vocab), tx)
  step = jax.jit(functools.partial(train.train_step, config=config, tx=tx))
  batches = lm.train_batches(ids["train"], config, 0)
  carry = model.initial_carry(config.model, config.data.batch_size)
  for _ in range(150):
    _, batch = next(batches)
    state, carry, _ = step(state, batch, carry)
  lanes = lm.make_evaluator(config)(state.params, ids["val"])
  config.train.eval_lanes = 1
  one = lm.make_evaluator(config)(state.params, ids["val"])
  assert lanes["tokens"] == one["tokens"] == len(ids["val"]) - 1
  assert one["perplexity"] < 0.7 * len(vocab)  # trained, so the state carries information
  assert lanes["loss"] == pytest.approx(one["loss"], rel=5e-3)


def test_summary_keys_are_the_documented_result_fields():
  """val figures become val_loss, perplexity, bpc, tokens; test figures get a test_ prefix."""
  figures = {"loss": 1.0, "perplexity": 2.7, "bpc": 1.4, "tokens": 10}
  assert lm.summary("val", figures) == {"val_loss": 1.0, "perplexity": 2.7, "bpc": 1.4,
                                        "tokens": 10}
  assert set(lm.summary("test", figures)) == {"test_loss", "test_perplexity", "test_bpc",
                                              "test_tokens"}


def test_training_batches_come_as_reset_and_arrays(tiny_config):
  """The LM's training iterator yields (reset, {inputs, targets}) and resets at epoch starts."""
  config = tiny_config()
  _, ids = lm.prepare_data(config)
  batches = lm.train_batches(ids["train"], config, 0)
  resets = [next(batches)[0] for _ in range(batches.batches_per_epoch + 1)]
  assert resets == [True] + [False] * (batches.batches_per_epoch - 1) + [True]
  _, batch = next(batches)
  assert set(batch) == {"inputs", "targets"} and batch["inputs"].shape == (4, 8)
  assert isinstance(data.train_batches(ids["train"], config.data, 0), data.SequentialBatches)


def test_a_loss_past_exps_range_is_an_infinite_perplexity(tiny_config):
  """A head that puts -1000 nats on every target gives perplexity inf, not an OverflowError."""
  config = tiny_config()
  vocab, ids = lm.prepare_data(config)
  params = model.init(jax.random.key(0), config.model, len(vocab))
  params["head"] = {"w": jnp.zeros_like(params["head"]["w"]),
                    "b": jnp.zeros(len(vocab)).at[vocab.unk_id].set(1000.0)}
  result = lm.make_evaluator(config)(params, ids["val"])
  assert result["loss"] == pytest.approx(1000.0, rel=1e-3) and result["perplexity"] == np.inf


def test_ar_and_tar_add_the_penalties_computed_by_hand():
  """AR = ar * mean(dropped^2), TAR = tar * mean((y[t+1] - y[t])^2), as a float64 NumPy sum."""
  rng = np.random.default_rng(0)
  ys, dropped = rng.normal(size=(3, 7, 5)), rng.normal(size=(3, 7, 5))
  config = default.get_config().model
  config.update(ar=2.0, tar=1.0)
  expected = 2.0 * np.mean(dropped ** 2) + 1.0 * np.mean(np.diff(ys, axis=1) ** 2)
  got = lm.penalties(jnp.asarray(ys, jnp.float32), jnp.asarray(dropped, jnp.float32), config)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  config.update(ar=0.0, tar=0.0)
  assert lm.penalties(ys, dropped, config) == 0.0


def test_the_loss_is_the_mean_nll_plus_the_penalties(tiny_config):
  """With AR / TAR on, lm.loss is the cross-entropy plus exactly `penalties` of the last layer's
  outputs; with them off it is the cross-entropy alone, to the bit."""
  config = tiny_config(model={"dropout": 0.2, "ar": 2.0, "tar": 1.0})
  vocab, ids = lm.prepare_data(config)
  params = model.init(jax.random.key(0), config.model, len(vocab))
  carry = model.initial_carry(config.model, config.data.batch_size)
  _, batch = next(lm.train_batches(ids["train"], config, 0))
  rngs = model.Rngs(rows=jax.random.key(1), shared=jax.random.key(2))
  _, ys, dropped = model.outputs(params, carry, batch["inputs"], model_config=config.model,
                                 train=True, rng=rngs)
  nll = lm.nll(model.head(params, dropped), batch["targets"]).mean()
  got, _ = lm.loss(params, carry, batch, config.model, rngs)
  np.testing.assert_allclose(got, nll + lm.penalties(ys, dropped, config.model), rtol=1e-6)
  assert got > nll
  config.model.update(ar=0.0, tar=0.0)
  np.testing.assert_array_equal(lm.loss(params, carry, batch, config.model, rngs)[0], nll)
