"""Tests for jaxrnn.layers: scan against a Python loop, the choice of recurrence, unroll, stacks
and dropout, the parallel scan of the linear cells, bidirectional layers."""

import functools

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from jaxrnn import UserError, cells, kernels, layers

CELLS = ["rnn", "gru", "lstm"]
LINEAR = ["mingru", "minlstm"]  # cells with `log_linear`: run as a parallel scan
B, T, D, H = 4, 9, 5, 6


NORMALIZED = ("slstm", "mlstm")  # their carry holds normalizer states, positive when reached


def _random_carry(name, rng, b=B, h=H):
  """Random normal states; for the NORMALIZED cells a state they can reach (four steps of
  random inputs from zero), since an arbitrary normalizer near 0 magnifies any rounding."""
  cell = cells.get(name)
  if name in NORMALIZED:
    params, carry = cell.init(jax.random.key(99), D, h), cell.initial_carry(b, h)
    for _ in range(4):
      carry, _ = cell.step(params, carry, jnp.asarray(rng.normal(size=(b, D)), jnp.float32))
    return carry
  return jax.tree.map(lambda z: jnp.asarray(rng.normal(size=z.shape), jnp.float32),
                      cell.initial_carry(b, h))


def _setup(name, seed=0, d=None):
  d = d or (H if name == "mamba" else D)  # the mamba cell keeps its input's width
  cell = cells.get(name)
  params = cell.init(jax.random.key(seed), d, H)
  rng = np.random.default_rng(seed)
  carry = _random_carry(name, rng)
  xs = jnp.asarray(rng.normal(size=(B, T, d)), jnp.float32)
  return cell, params, carry, xs


def _assert_trees_close(got, expected, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), got, expected)


@pytest.mark.parametrize("name", cells.names())
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
def test_unroll_does_not_change_results(name):
  """unroll=4 (not a divisor of t) gives the same outputs and carry as unroll=1."""
  cell, params, carry0, xs = _setup(name, seed=3)
  for impl in layers.XLA_IMPLS:
    expected_carry, expected_ys = layers.run(cell, params, carry0, xs, unroll=1, impl=impl)
    got_carry, got_ys = layers.run(cell, params, carry0, xs, unroll=4, impl=impl)
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


@pytest.mark.parametrize("name, impl, steps, chosen", [
    ("lstm", "fused", 9, "_core_fused"), ("gru", "fused", 1, "_core_fused"),
    ("mingru", "fused", 9, "_parallel"), ("minlstm", "fused", 1, "_scan"),
    ("lnlstm", "fused", 9, "_scan"), ("indrnn", "fused", 9, "_scan"),
    ("lstm", "scan", 9, "_scan"), ("mingru", "scan", 9, "_scan"),
])
def test_recurrence_is_chosen_by_cell_structure_and_impl(name, impl, steps, chosen):
  """`recurrence` is the documented table: the custom VJP for cells with a core, the parallel
  scan for cells linear in their state (over more than one step), the plain scan otherwise."""
  assert layers.recurrence(cells.get(name), impl, steps).func.__name__ == chosen


def test_a_cell_with_its_own_weight_names_runs_fused():
  """layers.py names no parameter: a cell whose recurrent weight and core parameters have other
  names runs through the custom VJP with the values and gradients of the plain scan."""
  base = cells.get("gru")

  def rename(params):
    return {"u_in": params["w_ih"], "u_rec": params["w_hh"], "bias": params["b"],
            "reset_bias": params["b_hn"]}

  def core(params, h, gx, gh):
    return base.core({"b_hn": params["reset_bias"]}, h, gx, gh)

  cell = cells.Cell(
      "renamed_gru", lambda key, d, h: rename(base.init(key, d, h)), base.initial_carry,
      lambda params, x: x @ params["u_in"] + params["bias"],
      lambda params, carry, gx: core(params, carry, gx, carry @ params["u_rec"]),
      core=core, recurrent_weight="u_rec", core_reads=("reset_bias",))
  _, params, carry0, xs = _setup("gru", seed=14)
  params = rename(params)
  assert layers.recurrence(cell, "fused", T).func.__name__ == "_core_fused"

  def loss(impl, params, carry):
    return jnp.sum(layers.run(cell, params, carry, xs, impl=impl)[1] ** 2)

  fused, plain = (jax.grad(functools.partial(loss, impl), argnums=(0, 1))(params, carry0)
                  for impl in layers.XLA_IMPLS)
  _assert_trees_close(fused, plain)
  np.testing.assert_allclose(layers.run(cell, params, carry0, xs)[1],
                             layers.run(base, {"w_ih": params["u_in"], "w_hh": params["u_rec"],
                                               "b": params["bias"], "b_hn": params["reset_bias"]},
                                        carry0, xs)[1], rtol=1e-6, atol=1e-6)


def test_unknown_impl_is_refused():
  """A misspelt model.impl names the valid choices."""
  cell = cells.get("rnn")
  with pytest.raises(UserError, match="fused, scan"):
    layers.run(cell, cell.init(jax.random.key(0), D, H), cell.initial_carry(B, H),
               jnp.zeros((B, T, D)), impl="fast")


@pytest.mark.parametrize("name", [n if n != "mamba" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in cells.names()])  # 10 s; bf16 blocks: test_blocks
def test_bfloat16_products_stay_close_to_float32(name):
  """compute_dtype=bfloat16: outputs within bf16 rounding of float32, fused grads = scan grads."""
  f32, bf16 = cells.get(name), cells.get(name, compute_dtype="bfloat16")
  f32, params, carry, xs = _setup(name, seed=12)
  _, want = layers.run(f32, params, carry, xs)
  _, got = layers.run(bf16, params, carry, xs)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=3e-2)
  assert not np.allclose(got, want, atol=1e-6)  # the products really ran in bfloat16

  def loss(impl, params):
    return jnp.sum(layers.run(bf16, params, carry, xs, impl=impl)[1] ** 2)

  fused, plain = (jax.grad(functools.partial(loss, impl))(params) for impl in ("fused", "scan"))
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(plain), strict=True):
    # bf16 rounding scales with the gradient: mlstm's long memories reach tens here.
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2 * max(1.0, float(np.abs(b).max())))


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _paper_loop(name, params, h0, xs):
  """The paper's sequential minGRU / minLSTM over xs[b, t, d] in float64 -> hs[b, t, h]."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  h, hs = np.asarray(h0, np.float64), []
  for t in range(xs.shape[1]):
    pre = np.asarray(xs[:, t], np.float64) @ p["w_ih"] + p["b"]
    h_tilde = np.where(pre[:, -H:] >= 0, pre[:, -H:] + 0.5, _sigmoid(pre[:, -H:]))
    if name == "mingru":
      z = _sigmoid(pre[:, :H])
      h = (1.0 - z) * h + z * h_tilde
    else:
      f, i = _sigmoid(pre[:, :H]), _sigmoid(pre[:, H:2 * H])
      h = (f * h + i * h_tilde) / (f + i)
    hs.append(h)
  return np.stack(hs, axis=1)


@pytest.mark.parametrize("name", LINEAR)
def test_parallel_scan_matches_the_papers_sequential_equations(name):
  """layers.run (associative scan) equals a float64 loop of the paper's equations and the
  sequential mode (cell.step in lax.scan) within 1e-5, from a carry of either sign."""
  cell = cells.get(name)
  params = cell.init(jax.random.key(11), D, H)
  rng = np.random.default_rng(11)
  h0 = jnp.asarray(rng.normal(size=(B, H)), jnp.float32)
  xs = jnp.asarray(2.0 * rng.normal(size=(B, 200, D)), jnp.float32)
  carry, ys = jax.jit(lambda p, c, x: layers.run(cell, p, c, x))(params, h0, xs)
  np.testing.assert_allclose(ys, _paper_loop(name, params, h0, xs), rtol=1e-5, atol=1e-5)
  sequential = jax.jit(lambda p, c, x: jax.lax.scan(lambda c, x: cell.step(p, c, x), c,
                                                    jnp.swapaxes(x, 0, 1)))
  seq_carry, seq_ys = sequential(params, h0, xs)
  np.testing.assert_allclose(ys, jnp.swapaxes(seq_ys, 0, 1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(carry, seq_carry, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", LINEAR)
def test_scan_impl_runs_the_linear_cells_sequentially_with_the_same_gradients(name):
  """model.impl="scan": the plain scan of `recur` gives the paper's outputs and the parallel
  scan's gradients (both within 1e-5)."""
  cell = cells.get(name)
  params = cell.init(jax.random.key(12), D, H)
  rng = np.random.default_rng(12)
  h0 = jnp.asarray(rng.normal(size=(B, H)), jnp.float32)
  xs = jnp.asarray(2.0 * rng.normal(size=(B, 50, D)), jnp.float32)
  _, ys = jax.jit(lambda p, c, x: layers.run(cell, p, c, x, impl="scan"))(params, h0, xs)
  np.testing.assert_allclose(ys, _paper_loop(name, params, h0, xs), rtol=1e-5, atol=1e-5)
  grads = {impl: jax.jit(jax.grad(lambda p, c, impl=impl: jnp.sum(jnp.sin(
      layers.run(cell, p, c, xs, impl=impl)[1])), argnums=(0, 1)))(params, h0)
           for impl in ("fused", "scan")}
  for parallel, sequential in zip(*map(jax.tree.leaves, grads.values())):
    np.testing.assert_allclose(parallel, sequential, rtol=1e-5, atol=1e-5)


def _saturated(name, t, seed):
  """A cell with pre-activations of +-10 and more, inputs<float>[2, t, d] and a zero state."""
  cell = cells.get(name)
  params = {k: 8.0 * v for k, v in cell.init(jax.random.key(seed), D, H).items()}
  xs = jnp.asarray(3.0 * np.random.default_rng(seed).normal(size=(2, t, D)), jnp.float32)
  return cell, params, jnp.zeros((2, H), jnp.float32), xs


@pytest.mark.parametrize("name", LINEAR)
def test_parallel_scan_stays_finite_on_4096_steps(name):
  """T = 4096 with saturated gates: the log-space scan stays finite and matches the sequential mode."""
  cell, params, h0, xs = _saturated(name, 4096, seed=12)
  # Op by op rather than jit: compiling the 12-level scan whole takes longer than running it,
  # and the second cell reuses the first one's compiled ops.
  ys = layers.run(cell, params, h0, xs)[1]
  assert np.isfinite(np.asarray(ys)).all()
  _, seq_ys = jax.lax.scan(lambda c, x: cell.step(params, c, x), h0, jnp.swapaxes(xs, 0, 1))
  np.testing.assert_allclose(ys, jnp.swapaxes(seq_ys, 0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", LINEAR)
def test_parallel_scan_gradients_finite_on_4096_steps(name):
  """T = 4096 with saturated gates: every gradient of the parallel scan is finite (slow to compile)."""
  cell, params, h0, xs = _saturated(name, 4096, seed=13)
  grads = jax.jit(jax.grad(lambda p: layers.run(cell, p, h0, xs)[1].mean()))(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_reverse_valid_reverses_each_rows_valid_steps():
  """Row b's first lengths[b] steps come out reversed, padding in place; applied twice, nothing."""
  xs = jnp.arange(2 * 5 * 1).reshape(2, 5, 1)
  lengths = jnp.array([3, 5])
  got = layers.reverse_valid(xs, lengths)
  np.testing.assert_array_equal(got[..., 0], [[2, 1, 0, 3, 4], [9, 8, 7, 6, 5]])
  np.testing.assert_array_equal(layers.reverse_valid(got, lengths), xs)


def _flip_valid_by_hand(xs, lengths):
  out = np.array(xs)
  for b, n in enumerate(lengths):
    out[b, :n] = xs[b, :n][::-1]
  return out


@pytest.mark.parametrize("name", ["lstm", "mingru"])
def test_bidirectional_equals_two_runs_by_hand(name):
  """Forward half: run over xs; backward half: run over each row's valid part flipped by hand,
  flipped back. Padding after a row's length changes neither half at valid steps."""
  cell = cells.get(name)
  keys = jax.random.split(jax.random.key(14))
  params = {"fwd": cell.init(keys[0], D, H), "bwd": cell.init(keys[1], D, H)}
  zeros = cell.initial_carry(B, H)
  rng = np.random.default_rng(14)
  xs = rng.normal(size=(B, T, D)).astype(np.float32)
  lengths = np.array([T, 4, 1, 7])
  _, ys = layers.run_bidirectional(cell, params, (zeros, zeros), jnp.asarray(xs),
                                   lengths=jnp.asarray(lengths))
  assert ys.shape == (B, T, 2 * H)
  _, forward = layers.run(cell, params["fwd"], zeros, jnp.asarray(xs))
  _, backward = layers.run(cell, params["bwd"], zeros, jnp.asarray(_flip_valid_by_hand(xs, lengths)))
  backward = _flip_valid_by_hand(np.asarray(backward), lengths)
  noise = rng.normal(size=xs.shape).astype(np.float32)
  padded_other = np.where(np.arange(T)[None, :, None] < lengths[:, None, None], xs, noise)
  _, ys_other = layers.run_bidirectional(cell, params, (zeros, zeros), jnp.asarray(padded_other),
                                         lengths=jnp.asarray(lengths))
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(ys[b, :n, :H], forward[b, :n], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ys[b, :n, H:], backward[b, :n], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ys_other[b, :n], ys[b, :n], rtol=1e-5, atol=1e-6)


def test_bidirectional_stack_feeds_both_directions_up():
  """A 2-layer bidirectional run_stack equals chaining run_bidirectional, layer 2 reading 2h inputs."""
  cell = cells.get("lstm")
  keys = jax.random.split(jax.random.key(15), 4)
  layer_params = [{"fwd": cell.init(keys[0], D, H), "bwd": cell.init(keys[1], D, H)},
                  {"fwd": cell.init(keys[2], 2 * H, H), "bwd": cell.init(keys[3], 2 * H, H)}]
  zeros = cell.initial_carry(B, H)
  xs = jnp.asarray(np.random.default_rng(15).normal(size=(B, T, D)), jnp.float32)
  lengths = jnp.array([T, 3, 5, 1])
  expected = xs
  for params in layer_params:
    _, expected = layers.run_bidirectional(cell, params, (zeros, zeros), expected, lengths=lengths)
  _, got = layers.run_stack(cell, layer_params, [(zeros, zeros)] * 2, xs, bidirectional=True,
                            lengths=lengths)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_locked_dropout_is_constant_across_time_and_differs_across_lanes():
  """A locked mask zeroes the same units at every step of a lane; lanes draw their own masks."""
  rate, b, t, d = 0.5, 6, 12, 40
  x = jnp.ones((b, t, d))
  y = np.asarray(layers.dropout(x, rate, jax.random.key(3), locked=True))
  np.testing.assert_array_equal(y, np.broadcast_to(y[:, :1], y.shape))  # the same at every step
  assert set(np.unique(y)) == {0.0, 1.0 / (1.0 - rate)}
  masks = y[:, 0] != 0.0  # [b, d]
  assert all((masks[i] != masks[j]).any() for i in range(b) for j in range(i))
  per_row = layers.dropout(x[:2], rate, layers.row_keys(jax.random.key(3), b)[:2], locked=True)
  np.testing.assert_array_equal(per_row, y[:2])  # a lane's mask is its own key's, as on devices


def _masked_stack(cell, layer_params, rate, rng):
  """Each layer's W_hh times an independent draw of the mask drop_weight documents."""
  out = []
  for i, params in enumerate(layer_params):
    w = params[cell.recurrent_weight]
    keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - rate, w.shape)
    out.append({**params, cell.recurrent_weight: jnp.where(keep, w / (1.0 - rate), 0.0)})
  return out


@pytest.mark.parametrize("impl", ["scan", "fused", "onednn"])
@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_weight_drop_masks_w_hh_alone_with_one_mask_for_every_step(name, impl):
  """weight_drop changes W_hh's entries only (to 0 or w / (1 - p)), and the stack then runs
  exactly as one with that masked matrix at every time step, under each impl (the oneDNN
  kernel included, where it is built)."""
  if impl == "onednn" and (why := kernels.unavailable("onednn")):
    pytest.skip(f"the oneDNN kernel is not available here: {why}")
  cell, layer_params, carries, xs = _stack_setup(name, seed=11)
  rng, rate = jax.random.key(12), 0.4
  dropped = layers.drop_weight(cell, layer_params[0], rate, rng)
  for key, value in layer_params[0].items():
    if key != cell.recurrent_weight:
      np.testing.assert_array_equal(dropped[key], value)
  w, got = np.asarray(layer_params[0][cell.recurrent_weight]), np.asarray(dropped[cell.recurrent_weight])
  zeroed = got == 0.0
  assert 0 < zeroed.mean() < 1
  np.testing.assert_allclose(got[~zeroed], w[~zeroed] / (1.0 - rate), rtol=1e-6)
  run = functools.partial(layers.run_stack, cell, carries=carries, xs=xs, impl=impl)
  got = run(layer_params, weight_drop=rate, weight_rng=rng)
  expected = run(_masked_stack(cell, layer_params, rate, rng))
  _assert_trees_close(got, expected, rtol=0, atol=0)
  _assert_trees_close(run(layer_params, weight_drop=rate), run(layer_params), rtol=0, atol=0)
