"""Tests for jaxrnn.layers: scan against a Python loop, resets, unroll, stacks and dropout."""

import functools

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from jaxrnn import UserError, cells, layers

CELLS = ["rnn", "gru", "lstm"]
B, T, D, H = 4, 9, 5, 6


def _random_carry(name, rng, b=B, h=H):
  if name == "lstm":
    return (jnp.asarray(rng.normal(size=(b, h)), jnp.float32),
            jnp.asarray(rng.normal(size=(b, h)), jnp.float32))
  return jnp.asarray(rng.normal(size=(b, h)), jnp.float32)


def _setup(name, seed=0, d=D):
  cell = cells.get(name)
  params = cell.init(jax.random.key(seed), d, H)
  rng = np.random.default_rng(seed)
  carry = _random_carry(name, rng)
  xs = jnp.asarray(rng.normal(size=(B, T, d)), jnp.float32)
  return cell, params, carry, xs


def _assert_trees_close(got, expected, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), got, expected)


@pytest.mark.parametrize("name", CELLS)
def test_run_matches_python_loop(name):
  """run over xs<b, t, d> equals a Python loop of cell.step over time, batch-major out."""
  cell, params, carry0, xs = _setup(name)
  step = jax.jit(cell.step)
  carry, ys = carry0, []
  for t in range(T):
    carry, y = step(params, carry, xs[:, t])
    ys.append(y)
  expected_ys = jnp.stack(ys, axis=1)
  got_carry, got_ys = layers.run(cell, params, carry0, xs)
  assert got_ys.shape == (B, T, H)
  np.testing.assert_allclose(got_ys, expected_ys, rtol=1e-5, atol=1e-6)
  _assert_trees_close(got_carry, carry)


@pytest.mark.parametrize("name", CELLS)
def test_reset_equals_restart_from_zero(name):
  """A reset at step t for some rows equals running [0, t) then [t, T) from a zeroed carry there."""
  cell, params, carry0, xs = _setup(name, seed=1)
  t_reset = 4
  rows = np.array([True, False, True, False])
  reset = np.zeros((B, T), bool)
  reset[rows, t_reset] = True

  mid, ys_first = layers.run(cell, params, carry0, xs[:, :t_reset])
  mid = jax.tree.map(lambda a: jnp.where(jnp.asarray(rows)[:, None], 0.0, a), mid)
  expected_carry, ys_second = layers.run(cell, params, mid, xs[:, t_reset:])
  expected_ys = jnp.concatenate([ys_first, ys_second], axis=1)

  got_carry, got_ys = layers.run(cell, params, carry0, xs, reset=jnp.asarray(reset))
  got_ys = np.asarray(got_ys)
  np.testing.assert_allclose(got_ys, expected_ys, rtol=1e-5, atol=1e-6)
  _assert_trees_close(got_carry, expected_carry)

  no_reset_ys = np.asarray(layers.run(cell, params, carry0, xs)[1])
  np.testing.assert_allclose(got_ys[~rows], no_reset_ys[~rows], rtol=1e-5, atol=1e-6)
  assert not np.allclose(got_ys[rows, t_reset:], no_reset_ys[rows, t_reset:], atol=1e-4)


@pytest.mark.parametrize("name", CELLS)
def test_all_false_reset_is_no_reset(name):
  """An all-False reset mask gives the same result as no mask."""
  cell, params, carry0, xs = _setup(name, seed=2)
  expected_carry, expected_ys = layers.run(cell, params, carry0, xs)
  got_carry, got_ys = layers.run(cell, params, carry0, xs, reset=jnp.zeros((B, T), bool))
  np.testing.assert_allclose(got_ys, expected_ys, rtol=1e-6, atol=1e-6)
  _assert_trees_close(got_carry, expected_carry, rtol=1e-6)


@pytest.mark.parametrize("name", CELLS)
def test_unroll_does_not_change_results(name):
  """unroll=4 (not a divisor of t) gives the same outputs and carry as unroll=1."""
  cell, params, carry0, xs = _setup(name, seed=3)
  reset = jnp.asarray(np.random.default_rng(3).random((B, T)) < 0.2)
  for kwargs in ({}, {"reset": reset}):
    expected_carry, expected_ys = layers.run(cell, params, carry0, xs, unroll=1, **kwargs)
    got_carry, got_ys = layers.run(cell, params, carry0, xs, unroll=4, **kwargs)
    np.testing.assert_allclose(got_ys, expected_ys, rtol=1e-5, atol=1e-6)
    _assert_trees_close(got_carry, expected_carry)


def _stack_setup(name, num_layers=3, seed=4):
  cell = cells.get(name)
  keys = jax.random.split(jax.random.key(seed), num_layers)
  layer_params = [cell.init(k, D if i == 0 else H, H) for i, k in enumerate(keys)]
  rng = np.random.default_rng(seed)
  carries = [_random_carry(name, rng) for _ in range(num_layers)]
  xs = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  return cell, layer_params, carries, xs


@pytest.mark.parametrize("name", CELLS)
def test_run_stack_without_rng_chains_run(name):
  """Without rng, run_stack ignores dropout_rate, is deterministic and equals chaining run."""
  cell, layer_params, carries, xs = _stack_setup(name)
  expected_carries, h = [], xs
  for params, carry in zip(layer_params, carries):
    carry, h = layers.run(cell, params, carry, h)
    expected_carries.append(carry)

  first = layers.run_stack(cell, layer_params, carries, xs, dropout_rate=0.5)
  second = layers.run_stack(cell, layer_params, carries, xs, dropout_rate=0.5)
  got_carries, got_ys = first
  assert len(got_carries) == len(layer_params)
  np.testing.assert_allclose(got_ys, h, rtol=1e-5, atol=1e-6)
  _assert_trees_close(got_carries, expected_carries)
  _assert_trees_close(second, first, rtol=0, atol=0)


def test_dropout_identity_without_rng_or_rate():
  """dropout is the identity when rng is None or the rate is 0."""
  x = jnp.asarray(np.random.default_rng(5).normal(size=(B, T, H)), jnp.float32)
  np.testing.assert_array_equal(layers.dropout(x, 0.5, None), x)
  np.testing.assert_array_equal(layers.dropout(x, 0.0, jax.random.key(0)), x)


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_dropout_keeps_fraction_and_rescales(rate):
  """With rng, about 1 - rate of the entries survive, each scaled by exactly 1 / (1 - rate)."""
  x = jnp.asarray(np.random.default_rng(6).uniform(0.5, 1.5, size=(64, 256)), jnp.float32)
  y = np.asarray(layers.dropout(x, rate, jax.random.key(7)))
  kept = y != 0.0
  n = kept.size
  assert abs(kept.mean() - (1.0 - rate)) < 4.0 * np.sqrt(rate * (1.0 - rate) / n)
  np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / (1.0 - rate), rtol=1e-6)
  other = np.asarray(layers.dropout(x, rate, jax.random.key(8)))
  assert ((other != 0.0) != kept).any()


@pytest.mark.parametrize("name", CELLS)
def test_run_stack_dropout_only_between_layers(name):
  """With rng, layer 1 is untouched (same carry) while deeper layers and outputs change."""
  cell, layer_params, carries, xs = _stack_setup(name, seed=9)
  clean_carries, clean_ys = layers.run_stack(cell, layer_params, carries, xs)
  got_carries, got_ys = layers.run_stack(cell, layer_params, carries, xs, dropout_rate=0.5,
                                         rng=jax.random.key(10))
  _assert_trees_close(got_carries[0], clean_carries[0], rtol=0, atol=0)
  assert not np.allclose(got_ys, clean_ys, atol=1e-4)
  zero_rate = layers.run_stack(cell, layer_params, carries, xs, dropout_rate=0.0,
                               rng=jax.random.key(10))
  _assert_trees_close(zero_rate, (clean_carries, clean_ys), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["rnn", "gru", "lstm"])
def test_fused_gradients_equal_plain_scan(name):
  """The custom-VJP path's values and gradients (params, carry, inputs) equal the plain scan's."""
  cell = cells.get(name)
  rng = np.random.default_rng(11)
  params = cell.init(jax.random.key(11), D, H)
  carry = _random_carry(name, rng)
  xs = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)

  def loss(impl, params, carry, xs):
    final, ys = layers.run(cell, params, carry, xs, impl=impl)
    return jnp.sum(ys * cotangent) + sum(jnp.sum(c ** 2) for c in jax.tree.leaves(final))

  fused = jax.value_and_grad(functools.partial(loss, "fused"), argnums=(0, 1, 2))(params, carry, xs)
  plain = jax.value_and_grad(functools.partial(loss, "scan"), argnums=(0, 1, 2))(params, carry, xs)
  for got, want in zip(jax.tree.leaves(fused), jax.tree.leaves(plain), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  jax.test_util.check_grads(functools.partial(loss, "fused"), (params, carry, xs), order=1,
                            modes=("rev",), atol=1e-2, rtol=1e-2)


def test_unknown_impl_is_refused():
  """A misspelt model.impl names the valid choices."""
  cell = cells.get("rnn")
  with pytest.raises(UserError, match="fused, scan"):
    layers.run(cell, cell.init(jax.random.key(0), D, H), cell.initial_carry(B, H),
               jnp.zeros((B, T, D)), impl="fast")


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_bfloat16_products_stay_close_to_float32(name):
  """compute_dtype=bfloat16: outputs within bf16 rounding of float32, fused grads = scan grads."""
  f32, bf16 = cells.get(name), cells.get(name, compute_dtype="bfloat16")
  rng = np.random.default_rng(12)
  params = f32.init(jax.random.key(12), D, H)
  carry = _random_carry(name, rng)
  xs = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  _, want = layers.run(f32, params, carry, xs)
  _, got = layers.run(bf16, params, carry, xs)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=3e-2)
  assert not np.allclose(got, want, atol=1e-6)  # the products really ran in bfloat16

  def loss(impl, params):
    return jnp.sum(layers.run(bf16, params, carry, xs, impl=impl)[1] ** 2)

  fused, plain = (jax.grad(functools.partial(loss, impl))(params) for impl in ("fused", "scan"))
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(plain), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2)
