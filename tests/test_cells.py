"""Tests for jaxrnn.cells: shapes, the step decomposition, and numerics against NumPy (and, for
rglru, slstm and mlstm, against their authors' code re-implemented in float64 NumPy)."""

import math

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from jaxrnn import UserError, cells, layers, model

CELLS = ["rnn", "gru", "lstm"]  # the torch.nn cells
ALL_CELLS = cells.names()
GATES = {"rnn": 1, "gru": 3, "lstm": 4, "lnlstm": 4, "mingru": 2, "minlstm": 3, "indrnn": 1,
         "rglru": 3, "slstm": 4, "mlstm": 4, "mamba": 2}
CARRY_LEAVES = {"lstm": 2, "lnlstm": 2, "slstm": 4, "mlstm": 4, "mamba": 2}  # others: h alone
B, D, H = 3, 5, 7
STATES = 16  # the mamba cell's default state_size


def width(name, h=H):
  """The width of a cell's projection gx: its gates times h (mlstm: plus i and f per head;
  mamba: x and delta, then B and C of its states)."""
  return GATES[name] * h + {"mlstm": 2, "mamba": 2 * STATES}.get(name, 0)


def d_in(name):
  """The input width the tests give a cell: D, or H for the mamba cell, which keeps its width."""
  return H if name == "mamba" else D


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
  """initial_carry(b, h) is float32 zeros, h<b, h> first (the LSTMs add c; slstm c, n, m;
  mlstm its memory C<b, heads, d, d>, n and m), every leaf batch-first."""
  carry = cells.get(name).initial_carry(B, H)
  leaves = jax.tree.leaves(carry)
  assert len(leaves) == CARRY_LEAVES.get(name, 1)
  assert cells.hidden(carry).shape == (B, H)
  for leaf in leaves:
    assert leaf.shape[0] == B and leaf.dtype == jnp.float32
    np.testing.assert_array_equal(leaf, np.zeros(leaf.shape))


@pytest.mark.parametrize("name", ALL_CELLS)
def test_step_shapes(name):
  """step maps x<b, d> to a carry with the initial carry's structure and y<b, h>."""
  cell = cells.get(name)
  params = cell.init(jax.random.key(1), d_in(name), H)
  carry0 = cell.initial_carry(B, H)
  carry, y = cell.step(params, carry0, jnp.ones((B, d_in(name)), jnp.float32))
  assert y.shape == (B, H)
  assert y.dtype == jnp.float32
  assert jax.tree.structure(carry) == jax.tree.structure(carry0)
  for leaf, leaf0 in zip(jax.tree.leaves(carry), jax.tree.leaves(carry0)):
    assert leaf.shape == leaf0.shape


@pytest.mark.parametrize("name", ALL_CELLS)
def test_step_is_recur_of_project(name):
  """step(params, carry, x) equals recur(params, carry, project(params, x))."""
  cell = cells.get(name)
  params = cell.init(jax.random.key(2), d_in(name), H)
  rng = np.random.default_rng(0)
  carry = _random_carry(name, rng)
  x = jnp.asarray(rng.normal(size=(B, d_in(name))), jnp.float32)
  expected_carry, expected_y = cell.recur(params, carry, cell.project(params, x))
  got_carry, got_y = cell.step(params, carry, x)
  np.testing.assert_array_equal(got_y, expected_y)
  jax.tree.map(np.testing.assert_array_equal, got_carry, expected_carry)


@pytest.mark.parametrize("name", ALL_CELLS)
def test_project_any_leading_shape(name):
  """project on x<t, b, d> equals project on each x[t] separately."""
  cell = cells.get(name)
  params = cell.init(jax.random.key(3), d_in(name), H)
  xs = jnp.asarray(np.random.default_rng(1).normal(size=(4, B, d_in(name))), jnp.float32)
  gx = cell.project(params, xs)
  assert gx.shape == (4, B, width(name))
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


# RG-LRU, sLSTM and mLSTM against their authors' code. Neither package installs beside jaxrnn
# (recurrentgemma pins absl-py < 2 and numpy < 2.4; xlstm needs mlstm_kernels and ninja), so
# each reference below is its authors' function re-implemented line by line in float64 NumPy.
HEADS = 2
H_HEADS = 8  # divisible by HEADS


def _softplus(x):
  return np.logaddexp(0.0, x)


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def rglru_authors(x, h0, w_i, b_i, w_a, b_a, a_param):
  """recurrentgemma 1.0.1, jax/layers.py, RGLRU.__call__ with only_real=True and no segment
  reset, its BlockDiagonalLinear gates as one block; scan.linear_scan as a loop."""
  gate_x = _sigmoid(x @ w_i + b_i)
  gate_a = _sigmoid(x @ w_a + b_a)
  log_a = -8.0 * gate_a * _softplus(a_param)
  a, a_squared = np.exp(log_a), np.exp(2 * log_a)
  normalized_x = x * gate_x * np.sqrt(1 - a_squared)
  h, ys = h0, []
  for t in range(x.shape[1]):
    h = a[:, t] * h + normalized_x[:, t]
    ys.append(h)
  return np.stack(ys, 1), h


def test_rglru_matches_the_authors_layer():
  """rglru with w_x = I and b_x = 0 is the authors' RG-LRU on its input: outputs and final
  state within 1e-5 over 12 steps from a nonzero state."""
  cell = cells.get("rglru")
  rng = np.random.default_rng(20)
  params = cell.init(jax.random.key(20), H, H)
  w_i, w_a = (rng.normal(size=(H, H)) / np.sqrt(H) for _ in range(2))
  b_i, b_a = rng.normal(size=H), rng.normal(size=H)
  params["w_ih"] = jnp.asarray(np.concatenate([np.eye(H), w_i, w_a], 1), jnp.float32)
  params["b"] = jnp.asarray(np.concatenate([np.zeros(H), b_i, b_a]), jnp.float32)
  p = _float64(params)
  xs, h0 = rng.normal(size=(B, 12, H)), rng.normal(size=(B, H))
  want_ys, want_h = rglru_authors(xs, h0, p["w_ih"][:, H:2 * H], p["b"][H:2 * H],
                                  p["w_ih"][:, 2 * H:], p["b"][2 * H:], p["a_param"])
  carry, ys = layers.run(cell, params, jnp.asarray(h0, jnp.float32), jnp.asarray(xs, jnp.float32),
                         impl="scan")
  np.testing.assert_allclose(ys, want_ys, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(carry, want_h, rtol=1e-5, atol=1e-5)
  a = np.exp(-_softplus(p["a_param"]))  # the authors' ring: 0.9 <= a <= 0.999 at init
  assert 0.9 <= a.min() and a.max() <= 0.999


def slstm_authors(wx, r, b, states):
  """xlstm 2.0.6, blocks/slstm/src/vanilla: `slstm_forward`'s Ry (R<heads, 4 d, d>) and
  slstm.py's `slstm_forward_pointwise`, one step; states (y, c, n, m)."""
  y, c, n, m = states
  batch, heads, d = y.shape[0], r.shape[0], r.shape[2]
  ry = (y.reshape(batch, heads, 1, d) @ np.swapaxes(r, 1, 2).reshape(1, heads, d, 4 * d))
  ry = np.swapaxes(ry.reshape(batch, heads, 4, d), 1, 2).reshape(batch, -1)
  iraw, fraw, zraw, oraw = np.split(wx + ry + b, 4, axis=-1)
  logfplusm = m + _log_sigmoid(fraw)
  mnew = iraw if np.all(n == 0.0) else np.maximum(iraw, logfplusm)
  igate = np.minimum(np.exp(iraw - mnew), 1.0)
  fgate = np.minimum(np.exp(logfplusm - mnew), 1.0)
  cnew = fgate * c + igate * np.tanh(zraw)
  nnew = fgate * n + igate
  return _sigmoid(oraw) * cnew / nnew, cnew, nnew, mnew


def test_slstm_matches_the_authors_kernel():
  """slstm with 2 heads: the authors' vanilla step (block-diagonal R mapped as w_hh[k] = R[k]^T)
  over 12 steps from the zero state, pre-activations up to about +-10: every state within 1e-5."""
  cell = cells.get("slstm", num_heads=HEADS)
  params = {k: 4.0 * v for k, v in cell.init(jax.random.key(21), D, H_HEADS).items()}
  p = _float64(params)
  r = np.swapaxes(p["w_hh"], 1, 2)  # the authors' R<heads, 4 d, d>
  xs = 2.0 * np.random.default_rng(21).normal(size=(B, 12, D))
  states = tuple(np.zeros((B, H_HEADS)) for _ in range(4))
  carry = cell.initial_carry(B, H_HEADS)
  for t in range(12):
    states = slstm_authors(xs[:, t] @ p["w_ih"], r, p["b"], states)
    carry, y = cell.step(params, carry, jnp.asarray(xs[:, t], jnp.float32))
    np.testing.assert_allclose(y, states[0], rtol=1e-5, atol=1e-5)
  for got, want in zip(carry, states, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def mlstm_authors(c, n, m, q, k, v, i, f, eps=1e-6):
  """xlstm 2.0.6, blocks/mlstm/backends.py, `recurrent_step_stabilized_simple`: q, k, v
  <b, heads, d>, i, f <b, heads>, c <b, heads, d, d>, n <b, heads, d>, m <b, heads>."""
  q, k, v = q[..., None], k[..., None], v[..., None]  # (B, NH, DH, 1)
  log_fg_act = _log_sigmoid(f)[..., None, None]
  m_new = np.maximum(log_fg_act + m[..., None, None], i[..., None, None])
  fg_act = np.exp(log_fg_act + m[..., None, None] - m_new)
  ig_act = np.exp(i[..., None, None] - m_new)
  k_scaled = k / np.sqrt(q.shape[-2])
  c_new = fg_act * c + ig_act * (k_scaled @ np.swapaxes(v, -1, -2))
  n_new = fg_act * n[..., None] + ig_act * k_scaled
  h_num = np.swapaxes(q, -1, -2) @ c_new
  qn = np.swapaxes(q, -1, -2) @ n_new
  h = h_num / (np.maximum(np.abs(qn), np.exp(-m_new)) + eps)
  return h[..., 0, :], c_new, n_new[..., 0], m_new[..., 0, 0]


def test_mlstm_matches_the_authors_recurrent_step():
  """mlstm with 2 heads: the authors' stabilized step, times the output gate sigmoid(o) of
  the paper's h = o * h~ (their layer applies it outside the cell), over 12 steps from the
  zero state: outputs and memories within 1e-5."""
  cell = cells.get("mlstm", num_heads=HEADS)
  params = cell.init(jax.random.key(22), D, H_HEADS)
  p = _float64(params)
  xs = np.random.default_rng(22).normal(size=(B, 12, D))
  d = H_HEADS // HEADS
  c, n, m = np.zeros((B, HEADS, d, d)), np.zeros((B, HEADS, d)), np.zeros((B, HEADS))
  carry = cell.initial_carry(B, H_HEADS)
  for t in range(12):
    gx = xs[:, t] @ p["w_ih"] + p["b"]
    q, k, v, o = (x.reshape(B, HEADS, d) for x in np.split(gx[:, :4 * H_HEADS], 4, axis=-1))
    h_tilde, c, n, m = mlstm_authors(c, n, m, q, k, v, gx[:, 4 * H_HEADS:4 * H_HEADS + HEADS],
                                     gx[:, 4 * H_HEADS + HEADS:])
    carry, y = cell.step(params, carry, jnp.asarray(xs[:, t], jnp.float32))
    np.testing.assert_allclose(y, (_sigmoid(o) * h_tilde).reshape(B, -1), rtol=1e-5, atol=1e-5)
  for got, want in zip(carry[1:], (c, n, m), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, steps, dtypes", [
    ("rglru", 24, (jnp.float32,)), ("mlstm", 70, (jnp.float32,)),
    # mamba's two forms also meet in check_grads and against the authors' scan (fast suite)
    pytest.param("mamba", 24, (jnp.float32,), marks=pytest.mark.slow),
    pytest.param("mlstm", 70, (jnp.float64,), marks=pytest.mark.slow)])  # 30 s of float64
def test_parallel_form_equals_the_sequential_one(name, steps, dtypes):
  """impl=fused runs `cell.parallel` (all steps at once; mlstm's 70 are a chunk of 64 and the
  rest), impl=scan the step in lax.scan, from a carry reached by 20 steps: in float32 the
  same outputs and final carry within 1e-5 and
  gradients (parameters and carry) within 1e-5 of their largest entry; for mlstm, in float64
  the same gradients to 1e-10, so what float32 shows is rounding (its long memories sum the
  steps in another order)."""
  for dtype in dtypes:
    with jax.enable_x64(dtype == jnp.float64):
      cell = cells.get(name, **({"num_heads": HEADS} if name == "mlstm" else {}))
      cast = lambda tree: jax.tree.map(lambda v: v.astype(dtype), tree)
      d = H_HEADS if name == "mamba" else D
      params = cast(cell.init(jax.random.key(23), d, H_HEADS))
      rng = np.random.default_rng(23)
      warmup, xs = (jnp.asarray(rng.normal(size=(B, t, d)), dtype) for t in (20, steps))
      carry0, _ = layers.run(cell, params, cast(cell.initial_carry(B, H_HEADS)), warmup,
                             impl="scan")
      run = lambda impl, params, carry: layers.run(cell, params, carry, xs, impl=impl)
      grad = lambda impl: jax.grad(lambda p, c: jnp.sum(jnp.sin(run(impl, p, c)[1])), (0, 1))
      grads = [jax.tree.leaves(grad(impl)(params, carry0)) for impl in ("fused", "scan")]
      if dtype == jnp.float64:
        for a, b in zip(*grads, strict=True):
          np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
        continue
      (carry_p, ys_p), (carry_s, ys_s) = run("fused", params, carry0), run("scan", params, carry0)
      np.testing.assert_allclose(ys_p, ys_s, rtol=1e-5, atol=1e-5)
      for a, b in zip(jax.tree.leaves(carry_p), jax.tree.leaves(carry_s), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
      for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


@pytest.mark.parametrize("name", ["rglru", "slstm", "mlstm", "mamba"])
def test_stabilized_gates_stay_finite_over_4096_steps(name):
  """Pre-activations in the tens (weights x8, inputs x3) over 4,096 steps: outputs, states and
  gradients stay finite, sequentially and (rglru, mlstm) in the parallel form, which agrees
  to 1e-2 (mlstm's outputs reach the hundreds where |q n| nearly cancels against its floor
  exp(-m), and there float32 rounding depends on the order of summation)."""
  cell = cells.get(name)
  params = {k: 8.0 * v for k, v in cell.init(jax.random.key(24), d_in(name), H).items()}
  xs = jnp.asarray(3.0 * np.random.default_rng(24).normal(size=(1, 4096, d_in(name))),
                   jnp.float32)
  carry0 = cell.initial_carry(1, H)

  def grads_and_run(impl):  # one compilation gives the gradients and the run they differentiate
    def loss(p):
      carry, ys = layers.run(cell, p, carry0, xs, impl=impl)
      return jnp.mean(ys), (carry, ys)
    return jax.jit(jax.grad(loss, has_aux=True))(params)

  grads, (carry, ys) = grads_and_run("scan")
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((carry, ys, grads)))
  if cell.parallel is not None:
    parallel_grads, (_, parallel_ys) = grads_and_run("fused")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(parallel_grads))
    np.testing.assert_allclose(parallel_ys, ys, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("name", ["rglru", "slstm", "mlstm", "mamba"])
def test_gradients_pass_check_grads(name):
  """jax.test_util.check_grads (reverse mode, float64) on 5 steps from a reached state, through
  the sequential form and (rglru, mlstm) the parallel one."""
  with jax.enable_x64(True):
    cell = cells.get(name, **({"num_heads": HEADS} if name in ("slstm", "mlstm") else {}))
    d = H_HEADS if name == "mamba" else 3
    params = jax.tree.map(lambda v: v.astype(jnp.float64),
                          cell.init(jax.random.key(25), d, H_HEADS))
    rng = np.random.default_rng(25)
    carry, _ = layers.run(cell, params, jax.tree.map(lambda z: z.astype(jnp.float64),
                                                     cell.initial_carry(2, H_HEADS)),
                          jnp.asarray(rng.normal(size=(2, 3, d))), impl="scan")
    xs = jnp.asarray(rng.normal(size=(2, 5, d)))
    for impl in ("scan", "fused") if cell.parallel else ("scan",):
      jax.test_util.check_grads(lambda p, c, x: layers.run(cell, p, c, x, impl=impl)[1],
                                (params, carry, xs), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_mamba_matches_the_authors_selective_scan():
  """The mamba cell over 9 steps from a random state, sequential and parallel, against a float64
  NumPy loop of state-spaces/mamba's `selective_scan_ref` (which computes in float32 and starts
  from zeros; tests/test_mamba.py compares the block with it itself): the same x_proj / dt_proj
  split, delta = softplus(dt + bias), S' = exp(delta A) S + delta B x, y = S' C + D x; outputs
  and final state within 1e-10 in float64."""
  softplus = lambda v: np.log1p(np.exp(v))

  def selective_scan(x, dt, a, b, c, d, state):  # time-major loop; x, dt <b, t, h>; b, c <b, t, s>
    ys = []
    for i in range(x.shape[1]):
      delta = softplus(dt[:, i])[..., None]  # <b, h, 1>
      state = np.exp(delta * a) * state + delta * b[:, i, None] * x[:, i, :, None]
      ys.append(state @ c[:, i, :, None])
    return np.concatenate(ys, axis=-1).swapaxes(1, 2) + d * x, state

  with jax.enable_x64(True):
    cell = cells.get("mamba", state_size=5, dt_rank=3)
    params = jax.tree.map(lambda v: v.astype(jnp.float64), cell.init(jax.random.key(26), H, H))
    rng = np.random.default_rng(26)
    params["a_log"] = jnp.log(jnp.asarray(rng.uniform(0.5, 8.0, (H, 5))))
    params["d"] = jnp.asarray(rng.uniform(-1.5, 1.5, H))
    xs, state = rng.normal(size=(B, 9, H)), rng.normal(size=(B, H, 5))
    p = {k: np.asarray(v) for k, v in params.items()}
    dbl = xs @ p["w_x"]  # x_proj: (dt, B, C)
    dt, b, c = dbl[..., :3] @ p["w_dt"], dbl[..., 3:8], dbl[..., 8:]
    want_ys, want_state = selective_scan(xs, dt + p["b_dt"], -np.exp(p["a_log"]), b, c, p["d"],
                                         state)
    carry = (jnp.zeros((B, H)), jnp.asarray(state))
    for impl in ("scan", "fused"):
      (_, got_state), ys = layers.run(cell, params, carry, jnp.asarray(xs), impl=impl)
      np.testing.assert_allclose(ys, want_ys, rtol=1e-10, atol=1e-10)
      np.testing.assert_allclose(got_state, want_state, rtol=1e-10, atol=1e-10)
