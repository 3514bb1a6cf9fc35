"""Tests for jaxrnn.cells: shapes, the step decomposition, and numerics against NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrnn import UserError, cells, model

CELLS = ["rnn", "gru", "lstm"]  # the torch.nn cells
ALL_CELLS = cells.names()
GATES = {"rnn": 1, "gru": 3, "lstm": 4, "lnlstm": 4, "mingru": 2, "minlstm": 3, "indrnn": 1}
B, D, H = 3, 5, 7


def _random_carry(name, rng, b=B, h=H):
  return jax.tree.map(lambda z: jnp.asarray(rng.normal(size=z.shape), jnp.float32),
                      cells.get(name).initial_carry(b, h))


def _float64(params):
  return {k: np.asarray(v, np.float64) for k, v in params.items()}


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("name", CELLS)
def test_init_shapes_dtypes_and_range(name):
  """init gives w_ih<d, g*h>, w_hh<h, g*h>, b<g*h> (and GRU b_hn<h>), float32, in U(±1/sqrt(h))."""
  params = cells.get(name).init(jax.random.key(0), D, H)
  g = GATES[name] * H
  expected = {"w_ih": (D, g), "w_hh": (H, g), "b": (g,)}
  if name == "gru":
    expected["b_hn"] = (H,)
  assert {k: v.shape for k, v in params.items()} == expected
  bound = 1.0 / math.sqrt(H)
  for value in params.values():
    assert value.dtype == jnp.float32
    value = np.asarray(value)
    assert np.abs(value).max() <= bound
    assert value.std() > 0.2 * bound


@pytest.mark.parametrize("name", ALL_CELLS)
def test_initial_carry_is_zeros(name):
  """initial_carry(b, h) is float32 zeros of shape (b, h); the LSTMs have two of them."""
  carry = cells.get(name).initial_carry(B, H)
  leaves = jax.tree.leaves(carry)
  assert len(leaves) == (2 if name in ("lstm", "lnlstm") else 1)
  for leaf in leaves:
    assert leaf.shape == (B, H)
    assert leaf.dtype == jnp.float32
    np.testing.assert_array_equal(leaf, np.zeros((B, H)))


@pytest.mark.parametrize("name", ALL_CELLS)
def test_step_shapes(name):
  """step maps x<b, d> to a carry with the initial carry's structure and y<b, h>."""
  cell = cells.get(name)
  params = cell.init(jax.random.key(1), D, H)
  carry0 = cell.initial_carry(B, H)
  carry, y = cell.step(params, carry0, jnp.ones((B, D), jnp.float32))
  assert y.shape == (B, H)
  assert y.dtype == jnp.float32
  assert jax.tree.structure(carry) == jax.tree.structure(carry0)
  for leaf in jax.tree.leaves(carry):
    assert leaf.shape == (B, H)


@pytest.mark.parametrize("name", ALL_CELLS)
def test_step_is_recur_of_project(name):
  """step(params, carry, x) equals recur(params, carry, project(params, x))."""
  cell = cells.get(name)
  params = cell.init(jax.random.key(2), D, H)
  rng = np.random.default_rng(0)
  carry = _random_carry(name, rng)
  x = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
  expected_carry, expected_y = cell.recur(params, carry, cell.project(params, x))
  got_carry, got_y = cell.step(params, carry, x)
  np.testing.assert_array_equal(got_y, expected_y)
  jax.tree.map(np.testing.assert_array_equal, got_carry, expected_carry)


@pytest.mark.parametrize("name", ALL_CELLS)
def test_project_any_leading_shape(name):
  """project on x<t, b, d> equals project on each x[t] separately."""
  cell = cells.get(name)
  params = cell.init(jax.random.key(3), D, H)
  xs = jnp.asarray(np.random.default_rng(1).normal(size=(4, B, D)), jnp.float32)
  gx = cell.project(params, xs)
  assert gx.shape == (4, B, GATES[name] * H)
  for t in range(4):
    np.testing.assert_allclose(gx[t], cell.project(params, xs[t]), rtol=1e-6, atol=1e-6)


def test_worked_example_tanh_rnn():
  """Two steps of a 2-unit tanh RNN match the float64 equations and the hand-computed numbers."""
  w_xh = np.array([[0.5, 0.6]])
  w_hh = np.array([[0.1, 0.2], [0.3, 0.4]])
  b = np.array([0.1, -0.1])
  w_hq = np.array([[1.0], [2.0]])
  b_q = 0.1
  inputs = [1.0, 2.0]

  h = np.zeros((1, 2))
  expected_states, expected_outputs = [], []
  for x in inputs:
    h = np.tanh(np.array([[x]]) @ w_xh + h @ w_hh + b)
    expected_states.append(h[0])
    expected_outputs.append((h @ w_hq)[0, 0] + b_q)

  cell = cells.get("rnn", nonlinearity="tanh")
  params = {"w_ih": jnp.asarray(w_xh, jnp.float32), "w_hh": jnp.asarray(w_hh, jnp.float32),
            "b": jnp.asarray(b, jnp.float32)}
  carry = cell.initial_carry(1, 2)
  states, outputs = [], []
  for x in inputs:
    carry, y = cell.step(params, carry, jnp.full((1, 1), x, jnp.float32))
    states.append(np.asarray(y)[0])
    outputs.append((np.asarray(y, np.float64) @ w_hq)[0, 0] + b_q)

  np.testing.assert_allclose(states, expected_states, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(outputs, expected_outputs, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(states, [[0.537, 0.462], [0.860, 0.884]], atol=1e-3)
  np.testing.assert_allclose(outputs, [1.56, 2.73], atol=5e-3)
  np.testing.assert_allclose(outputs, [1.561, 2.727], atol=1e-3)


def test_concatenation_identity():
  """X W_xh + H W_hh (project + h @ w_hh) equals cat(X, H) @ cat(W_xh, W_hh) + b."""
  cell = cells.get("rnn")
  params = cell.init(jax.random.key(4), D, H)
  rng = np.random.default_rng(2)
  x = rng.normal(size=(B, D)).astype(np.float32)
  h = rng.normal(size=(B, H)).astype(np.float32)
  split = cell.project(params, jnp.asarray(x)) + jnp.asarray(h) @ params["w_hh"]
  w = np.concatenate([np.asarray(params["w_ih"]), np.asarray(params["w_hh"])], axis=0)
  joint = (np.concatenate([x, h], axis=1).astype(np.float64) @ w.astype(np.float64)
           + np.asarray(params["b"], np.float64))
  np.testing.assert_allclose(split, joint, rtol=1e-5, atol=1e-5)
  _, y = cell.step(params, jnp.asarray(h), jnp.asarray(x))
  np.testing.assert_allclose(y, np.tanh(joint), rtol=1e-5, atol=1e-6)


def test_unknown_cell_lists_valid_names():
  """cells.get with an unknown name raises UserError naming every registered cell."""
  with pytest.raises(UserError) as info:
    cells.get("nope")
  message = str(info.value)
  assert "nope" in message
  for name in ALL_CELLS:
    assert name in message


def test_bad_options_raise_user_error():
  """An unknown nonlinearity or an option a cell does not take raises UserError."""
  with pytest.raises(UserError, match="nonlinearity"):
    cells.get("rnn", nonlinearity="sigmoid")
  with pytest.raises(UserError):
    cells.get("gru", forget_bias=1.0)


@pytest.mark.parametrize("nonlinearity, act", [
    ("tanh", np.tanh),
    ("relu", lambda a: np.maximum(a, 0.0)),
])
def test_rnn_nonlinearity_matches_numpy(nonlinearity, act):
  """The rnn step applies the chosen activation to x W_ih + h W_hh + b (float64 reference)."""
  cell = cells.get("rnn", nonlinearity=nonlinearity)
  params = cell.init(jax.random.key(5), D, H)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(B, D))
  h = rng.normal(size=(B, H))
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  pre = x @ p["w_ih"] + h @ p["w_hh"] + p["b"]
  assert (pre < 0).any() and (pre > 0).any()
  _, y = cell.step(params, jnp.asarray(h, jnp.float32), jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(y, act(pre), rtol=1e-5, atol=1e-6)
  if nonlinearity == "relu":
    np.testing.assert_array_equal(np.asarray(y)[pre < 0], 0.0)


def test_lstm_forget_bias_shifts_only_forget_gate():
  """forget_bias adds exactly to b[h:2h] (the f gate) and leaves everything else unchanged."""
  base = cells.get("lstm").init(jax.random.key(6), D, H)
  shifted = cells.get("lstm", forget_bias=1.5).init(jax.random.key(6), D, H)
  np.testing.assert_array_equal(shifted["w_ih"], base["w_ih"])
  np.testing.assert_array_equal(shifted["w_hh"], base["w_hh"])
  diff = np.asarray(shifted["b"], np.float64) - np.asarray(base["b"], np.float64)
  expected = np.zeros(4 * H)
  expected[H:2 * H] = 1.5
  np.testing.assert_allclose(diff, expected, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(diff[:H], 0.0)
  np.testing.assert_array_equal(diff[2 * H:], 0.0)


@pytest.mark.parametrize("h, x", [(2, 1), (16, 5), (7, 30)])
def test_rnn_parameter_count(h, x):
  """A 1-layer tanh RNN with state h and input x has h * (h + x) + h parameters."""
  params = cells.get("rnn").init(jax.random.key(7), x, h)
  assert model.num_params(params) == h * (h + x) + h


def _g(x):
  """minGRU's g (Feng et al. 2024, appendix B), in float64."""
  return np.where(x >= 0, x + 0.5, _sigmoid(x))


def _paper_step(name, p, h, x):
  """One step of the paper's sequential minGRU / minLSTM equations in float64."""
  if name == "mingru":
    z = _sigmoid(x @ p["w_ih"][:, :H] + p["b"][:H])
    h_tilde = _g(x @ p["w_ih"][:, H:] + p["b"][H:])
    return (1.0 - z) * h + z * h_tilde
  pre = x @ p["w_ih"] + p["b"]
  f, i, h_tilde = _sigmoid(pre[:, :H]), _sigmoid(pre[:, H:2 * H]), _g(pre[:, 2 * H:])
  return f / (f + i) * h + i / (f + i) * h_tilde


@pytest.mark.parametrize("name", ["mingru", "minlstm"])
def test_min_cells_step_matches_the_paper(name):
  """mingru / minlstm step: the paper's sequential equations (float64), with no w_hh at all."""
  cell = cells.get(name)
  params = cell.init(jax.random.key(8), D, H)
  assert set(params) == {"w_ih", "b"}
  rng = np.random.default_rng(4)
  x, h = 2.0 * rng.normal(size=(B, D)), rng.normal(size=(B, H))
  _, y = cell.step(params, jnp.asarray(h, jnp.float32), jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(y, _paper_step(name, _float64(params), h, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mingru", "minlstm"])
def test_log_linear_is_the_step(name):
  """exp(log a) * h + exp(log b) from `log_linear` equals `recur`, for any h (negative included)."""
  cell = cells.get(name)
  rng = np.random.default_rng(5)
  gx = jnp.asarray(4.0 * rng.normal(size=(B, GATES[name] * H)), jnp.float32)
  h = jnp.asarray(rng.normal(size=(B, H)), jnp.float32)
  log_a, log_b = cell.log_linear(gx)
  assert bool(jnp.all(log_a <= 0.0))  # 0 < a <= 1: the state cannot grow
  _, y = cell.recur({}, h, gx)
  np.testing.assert_allclose(jnp.exp(log_a) * h + jnp.exp(log_b), y, rtol=1e-5, atol=1e-6)


def _layer_norm(x, gain, bias=0.0):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * gain + bias


def test_lnlstm_matches_numpy():
  """lnlstm step: Ba et al. eqs. 20-22 (gate order i, f, g, o) in float64, non-trivial gains."""
  cell = cells.get("lnlstm", forget_bias=1.0)
  params = cell.init(jax.random.key(9), D, H)
  rng = np.random.default_rng(6)
  params = {k: v if k in ("w_ih", "w_hh", "b")
            else jnp.asarray(rng.uniform(0.5, 1.5, v.shape), jnp.float32) for k, v in params.items()}
  p = _float64(params)
  x, h, c = rng.normal(size=(B, D)), rng.normal(size=(B, H)), rng.normal(size=(B, H))
  gates = (_layer_norm(x @ p["w_ih"], p["ln_ih_gain"]) + _layer_norm(h @ p["w_hh"], p["ln_hh_gain"])
           + p["b"])
  i, f, g, o = np.split(gates, 4, axis=-1)
  c_new = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
  h_new = _sigmoid(o) * np.tanh(_layer_norm(c_new, p["ln_c_gain"], p["ln_c_bias"]))
  (got_h, got_c), y = cell.step(params, (jnp.asarray(h, jnp.float32), jnp.asarray(c, jnp.float32)),
                                jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got_c, c_new, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_h, h_new, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(y, got_h)


def test_indrnn_matches_numpy():
  """indrnn step: relu(x W_ih + b + u * h) with one recurrent weight per unit, u in [0, 1)."""
  cell = cells.get("indrnn")
  params = cell.init(jax.random.key(10), D, H)
  assert params["u"].shape == (H,) and 0.0 <= float(params["u"].min()) < float(params["u"].max()) < 1.0
  p = _float64(params)
  rng = np.random.default_rng(7)
  x, h = rng.normal(size=(B, D)), rng.normal(size=(B, H))
  _, y = cell.step(params, jnp.asarray(h, jnp.float32), jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(y, np.maximum(x @ p["w_ih"] + p["b"] + p["u"] * h, 0.0),
                             rtol=1e-5, atol=1e-6)
