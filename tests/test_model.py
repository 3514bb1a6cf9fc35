"""Tests for jaxrnn.model: shapes, input paths, dropout switching and step-by-step decoding."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxrnn import UserError, model

CELLS = ["rnn", "gru", "lstm"]
B, T, V, H = 3, 8, 11, 12


def _config(cell="lstm", **overrides):
  config = ml_collections.ConfigDict({
      "cell": cell, "hidden_size": H, "num_layers": 2, "embed_dim": 6, "one_hot": False,
      "dropout": 0.0, "unroll": 1, "forget_bias": 1.0, "nonlinearity": "tanh",
  })
  config.update(overrides)
  return config


def _jit_apply(config):
  return jax.jit(functools.partial(model.apply, config=config), static_argnames="train")


def _tokens(seed=0, b=B, t=T):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, size=(b, t)), jnp.int32)


@pytest.mark.parametrize("name", CELLS)
def test_apply_shapes(name):
  """apply maps tokens<b, t> to logits<b, t, v> float32 and carries shaped like initial_carry."""
  config = _config(name)
  params = model.init(jax.random.key(0), config, V)
  carry0 = model.initial_carry(config, B)
  assert len(carry0) == config.num_layers
  carry, logits = model.apply(params, carry0, _tokens(), config=config)
  assert logits.shape == (B, T, V)
  assert logits.dtype == jnp.float32
  assert jax.tree.structure(carry) == jax.tree.structure(carry0)
  for got, zero in zip(jax.tree.leaves(carry), jax.tree.leaves(carry0)):
    assert got.shape == zero.shape == (B, H)
  assert np.isfinite(np.asarray(logits)).all()


def test_one_hot_equals_identity_embedding():
  """one_hot=True gives the same logits as an embedding path whose table is the identity."""
  one_hot_config = _config(one_hot=True)
  embed_config = _config(one_hot=False, embed_dim=V)
  params = model.init(jax.random.key(1), one_hot_config, V)
  assert "embed" not in params
  embed_params = {**params, "embed": jnp.eye(V, dtype=jnp.float32)}
  tokens = _tokens(1)
  carry0 = model.initial_carry(one_hot_config, B)
  expected_carry, expected = model.apply(params, carry0, tokens, config=one_hot_config)
  got_carry, got = model.apply(embed_params, carry0, tokens, config=embed_config)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               got_carry, expected_carry)


def test_eval_ignores_rng():
  """With train=False, passing an rng does not change the logits even with dropout > 0."""
  config = _config(dropout=0.5)
  params = model.init(jax.random.key(2), config, V)
  carry0 = model.initial_carry(config, B)
  tokens = _tokens(2)
  _, without_rng = model.apply(params, carry0, tokens, config=config)
  _, with_rng = model.apply(params, carry0, tokens, config=config, rng=jax.random.key(3))
  np.testing.assert_array_equal(with_rng, without_rng)


def test_train_dropout_changes_logits_per_rng():
  """With train=True and dropout > 0, logits differ from eval and between rngs, same for same rng."""
  config = _config(dropout=0.5)
  params = model.init(jax.random.key(4), config, V)
  carry0 = model.initial_carry(config, B)
  tokens = _tokens(4)

  apply = _jit_apply(config)

  def logits(**kwargs):
    return np.asarray(apply(params, carry0, tokens, **kwargs)[1])

  eval_logits = logits()
  first = logits(train=True, rng=jax.random.key(5))
  second = logits(train=True, rng=jax.random.key(6))
  assert not np.allclose(first, eval_logits, atol=1e-4)
  assert not np.allclose(first, second, atol=1e-4)
  np.testing.assert_array_equal(logits(train=True, rng=jax.random.key(5)), first)


@pytest.mark.parametrize("name", CELLS)
def test_full_sequence_equals_token_by_token(name):
  """One apply over t tokens equals t applies of one token each, threading the carry."""
  config = _config(name, unroll=3)
  params = model.init(jax.random.key(7), config, V)
  tokens = _tokens(7)
  carry0 = model.initial_carry(config, B)
  apply = _jit_apply(config)
  expected_carry, expected = apply(params, carry0, tokens)
  carry, step_logits = carry0, []
  for t in range(T):
    carry, logits = apply(params, carry, tokens[:, t:t + 1])
    step_logits.append(logits)
  np.testing.assert_allclose(jnp.concatenate(step_logits, axis=1), expected,
                             rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               carry, expected_carry)


def test_unknown_cell_in_config_lists_cells():
  """A config naming an unknown cell raises UserError listing the valid cells."""
  config = _config("nope")
  for build in (lambda: model.init(jax.random.key(0), config, V),
                lambda: model.initial_carry(config, B)):
    with pytest.raises(UserError) as info:
      build()
    for name in CELLS:
      assert name in str(info.value)
