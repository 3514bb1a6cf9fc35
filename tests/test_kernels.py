"""Tests for jaxrnn.kernels and model.impl: jaxrnn's core and the oneDNN layers against the XLA
scan and against torch.nn.LSTM / nn.GRU / nn.RNN in float64, the cuDNN weight packing against
jax.experimental.rnn's reference, what `auto` resolves to, the fallback without the
extensions, and runs that change impl between training, resuming and evaluating."""

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from jax.experimental import rnn as jax_rnn

from conftest import run_script
from jaxrnn import UserError, cells, config as config_lib, checkpoint, interop, kernels, layers, train
from jaxrnn.tasks import lm

ONEDNN = kernels.unavailable("onednn")
needs_onednn = pytest.mark.skipif(bool(ONEDNN), reason=f"the oneDNN kernel cannot run: {ONEDNN}")
CORE = kernels.unavailable("core")
needs_core = pytest.mark.skipif(bool(CORE), reason=f"jaxrnn's core cannot run: {CORE}")
# (impl, cell) of every CPU kernel, each skipped with its reason where it cannot run.
CPU_KERNEL_CELLS = [pytest.param("core", c, marks=needs_core) for c in ("lstm", "gru", "rnn")] + [
    pytest.param("onednn", c, marks=needs_onednn) for c in ("lstm", "gru")]
D, H = 5, 6


def _assert_close(got, want, rtol=1e-5):
  """Equal within rtol of each array's largest entry (float32 against its references)."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    w = np.asarray(w)
    np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=rtol * np.abs(w).max())


def _stack(family, num_layers, b, t, seed=0):
  """Layer params, nonzero carries, inputs xs<b, t, d> and cotangents for ys and carries."""
  cell = cells.get(family)
  keys = jax.random.split(jax.random.key(seed), num_layers)
  params = [cell.init(k, D if i == 0 else H, H) for i, k in enumerate(keys)]
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  carries = [jax.tree.map(lambda z: normal(*z.shape), cell.initial_carry(b, H))
             for _ in range(num_layers)]
  return cell, params, carries, normal(b, t, D), normal(b, t, H), jax.tree.map(
      lambda z: normal(*z.shape), carries)


def _loss(cell, impl, d_ys, d_carries, params, carries, xs):
  """<ys, d_ys> + <final carries, d_carries>: its gradient is the VJP of the whole stack."""
  final, ys = layers.run_stack(cell, params, carries, xs, impl=impl)
  return jnp.sum(ys * d_ys) + sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(final),
                                                                jax.tree.leaves(d_carries)))


@pytest.mark.parametrize("impl, family", CPU_KERNEL_CELLS)
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("b, t", [(1, 1), (3, 37), (2, 300)])
def test_cpu_kernels_match_the_xla_scan(impl, family, num_layers, b, t):
  """Outputs, final carries and gradients (every weight, the carried state in, the inputs) of
  each CPU kernel equal the XLA scan's, batch 1 and odd, one step and long sequences; a hidden
  size (6) that fills no whole vector."""
  cell, params, carries, xs, d_ys, d_carries = _stack(family, num_layers, b, t, seed=b + t)
  run = lambda impl: jax.jit(functools.partial(layers.run_stack, cell, impl=impl))
  _assert_close(run(impl)(params, carries, xs), run("scan")(params, carries, xs))
  grad = lambda impl: jax.jit(jax.grad(functools.partial(_loss, cell, impl, d_ys, d_carries),
                                       argnums=(0, 1, 2)))
  _assert_close(grad(impl)(params, carries, xs), grad("scan")(params, carries, xs))


def _family_cell(family, dtype=jnp.float32):
  """The cell a kernel family runs ("rnn_relu": the rnn with relu), with `dtype` operands."""
  name, _, nonlinearity = family.partition("_")
  options = {"nonlinearity": nonlinearity} if nonlinearity else {}
  return cells.get(name, compute_dtype=jnp.dtype(dtype).name, **options)


def _family_layers(family, dtype, t, impl, b=3, seed=0):
  """{"value": (kernel, scan), "loss": (kernel, scan)}, jitted, and their args (params, a random
  nonzero carry, xs<b, t, D>): `family`'s layer through `kernels.LAYERS[impl]` and through the
  XLA scan (`layers.recurrence`) -> (carry, ys<b, t, H>), and <ys, d_ys> + <carry, d_carry>
  with random cotangents -> (that loss, its gradients for params, carry and xs)."""
  cell = _family_cell(family, dtype)
  params = cell.init(jax.random.key(seed), D, H)
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  carry = jax.tree.map(lambda z: normal(*z.shape), cell.initial_carry(b, H))
  xs, d_ys, d_carry = normal(b, t, D), normal(b, t, H), jax.tree.map(
      lambda z: normal(*z.shape), carry)

  def kernel(p, c, x):
    return kernels.LAYERS[impl](family, p, c, x, cell.dtype)

  def scan(p, c, x):
    c, ys = layers.recurrence(cell, "scan", t)(p, c, jnp.swapaxes(x, 0, 1), 1)
    return c, jnp.swapaxes(ys, 0, 1)

  def loss(layer, p, c, x):
    final, ys = layer(p, c, x)
    return jnp.sum(ys * d_ys) + sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(final),
                                                                  jax.tree.leaves(d_carry)))

  value_and_grad = lambda layer: jax.value_and_grad(functools.partial(loss, layer),
                                                    argnums=(0, 1, 2))
  return {"value": (jax.jit(kernel), jax.jit(scan)),
          "loss": (jax.jit(value_and_grad(kernel)), jax.jit(value_and_grad(scan)))}, (
              params, carry, xs)


# (impl, family, dtype) of every CPU kernel's families and operand types.
KERNEL_FAMILIES = [pytest.param("core", f, d, marks=needs_core) for f in kernels.FAMILIES["core"]
                   for d in kernels.DTYPES["core"]] + [
    pytest.param("onednn", f, jnp.float32, marks=needs_onednn) for f in kernels.FAMILIES["onednn"]]


@pytest.mark.parametrize("impl, family, dtype", KERNEL_FAMILIES)
@pytest.mark.parametrize("b, t", [(1, 0), (3, 0), (3, 1)])
def test_kernels_give_the_scans_answer_for_zero_and_one_step(impl, family, dtype, b, t):
  """Zero steps: the carry unchanged to the bit, ys<b, 0, h>, zero weight gradients and the
  carry's cotangent passed through as its gradient, as the XLA scan gives (oneDNN's GRU
  primitive failed on batch 1); one step: the scan's values and gradients. A kernel that
  leaves an output as XLA allocated it fails: each call follows a computation that frees
  NaN-filled buffers of the carry's size."""
  passes, args = _family_layers(family, dtype, t, impl, b)
  # bfloat16: the scan's gradients round other operands than the core's (1e-2 apart here).
  rtols = {"value": 1e-5, "loss": 1e-5} if dtype == jnp.float32 else {"value": 1e-3,
                                                                      "loss": 2e-2}
  poison = jax.jit(lambda c: jax.tree.map(lambda a: a * jnp.nan, c))
  for _ in range(3):
    for name, (kernel, scan) in passes.items():
      jax.block_until_ready(poison(args[1]))
      got, want = kernel(*args), scan(*args)
      if t == 0:
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
          np.testing.assert_array_equal(g, w)
      else:
        _assert_close(got, want, rtol=rtols[name])


@needs_core
@pytest.mark.parametrize("dtype", kernels.DTYPES["core"])
@pytest.mark.parametrize("family", kernels.FAMILIES["core"])
@pytest.mark.parametrize("where", ["w_hh", "b", "carry"])
def test_the_core_propagates_nan_and_inf_as_the_xla_scan_does(where, family, dtype):
  """One NaN in W_hh, in the bias or in the carry: the core's outputs, final carry, loss and
  every gradient are NaN exactly where the XLA scan's are (sigmoid, tanh, relu and the
  bfloat16 rounding of NaN are NaN, not a bound or a number); also for a NaN with every
  fraction bit set, which rounding to bfloat16 must keep a NaN. An infinity there gives
  outputs and a final carry NaN and inf where the scan's are: an infinite unit of the state
  meets the zero padding of a partial vector of weights (H = 6), and must not spread from
  there to every unit. (Not its gradients: the core's tanh saturates at 1 - 2^-22, XLA's at 1,
  so a gradient's 0 * inf is NaN in XLA where the core's is inf.)"""
  passes, (params, carry, xs) = _family_layers(family, dtype, 4, "core")
  all_ones = np.array(0x7FFFFFFF, np.uint32).view(np.float32)
  for bad in (np.float32(np.nan), all_ones, np.float32(np.inf)):
    if where == "carry":
      args = (params, jax.tree.map(lambda c: c.at[1, 2].set(bad), carry), xs)
    else:
      args = ({**params, where: params[where].at[(2, 3)[:params[where].ndim]].set(bad)}, carry,
              xs)
    for name in ("value", "loss") if np.isnan(bad) else ("value",):
      kernel, scan = passes[name]
      got, want = kernel(*args), scan(*args)
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
        np.testing.assert_array_equal(np.isinf(g), np.isinf(w))
      if name == "loss":
        assert np.isnan(got[0])


@needs_core
@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
def test_the_core_matches_the_xla_scan_over_whole_and_partial_vectors(family):
  """Hidden 40 (two and a half AVX-512 vectors, five AVX2 ones) and 64, batch 13 (odd rows for
  the threads' parts, tiles of every height): values and gradients as the XLA scan's."""
  for hidden in (40, 64):
    cell = cells.get(family)
    params = [cell.init(jax.random.key(1), 24, hidden)]
    rng = np.random.default_rng(hidden)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    carries = [jax.tree.map(lambda z: normal(*z.shape), cell.initial_carry(13, hidden))]
    xs, d_ys = normal(13, 29, 24), normal(13, 29, hidden)
    d_carries = jax.tree.map(lambda z: normal(*z.shape), carries)
    grad = lambda impl: jax.jit(jax.grad(functools.partial(_loss, cell, impl, d_ys, d_carries),
                                         argnums=(0, 1, 2)))
    _assert_close(grad("core")(params, carries, xs), grad("scan")(params, carries, xs))


@needs_core
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
def test_the_core_reads_tokens_as_their_one_hot_rows(family, dtype):
  """Tokens<int>[b, t] (a folded embedding's input) against their one-hot floats: the same
  outputs and carries to the bit (a gather is the one-hot product's value), and the same
  gradients to 1e-6 (dW_ih sums per token, the product in another order), in both dtypes."""
  cell = cells.get(family, compute_dtype=jnp.dtype(dtype).name)
  v, b, t = 11, 3, 37
  params = [cell.init(jax.random.key(2), v, H), cell.init(jax.random.key(3), H, H)]
  rng = np.random.default_rng(7)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  carries = [jax.tree.map(lambda z: normal(*z.shape), cell.initial_carry(b, H)) for _ in params]
  tokens = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  d_ys, d_carries = normal(b, t, H), jax.tree.map(lambda z: normal(*z.shape), carries)
  run = jax.jit(functools.partial(layers.run_stack, cell, impl="core"))
  one_hot = jax.nn.one_hot(tokens, v, dtype=jnp.float32)
  for got, want in zip(jax.tree.leaves(run(params, carries, tokens)),
                       jax.tree.leaves(run(params, carries, one_hot))):
    np.testing.assert_array_equal(got, want)
  grad = jax.jit(jax.grad(functools.partial(_loss, cell, "core", d_ys, d_carries), argnums=(0, 1)))
  _assert_close(grad(params, carries, tokens), grad(params, carries, one_hot), rtol=1e-6)


@needs_core
def test_the_core_runs_on_xlas_threads_and_starts_none_of_its_own():
  """A training step through the core (forward and backward, a batch split over the threads)
  starts no thread: its parts run on XLA's intra-op pool, so nothing competes with XLA's
  workers for the cores. Counted in a fresh process around the first calls of a compiled
  step."""
  from conftest import REPO_ROOT
  code = """
import os, functools, jax, jax.numpy as jnp
from jaxrnn import cells, layers
cell = cells.get("lstm")
params, carries = [cell.init(jax.random.key(0), 8, 32)], [cell.initial_carry(16, 32)]
loss = lambda p, xs: jnp.sum(layers.run_stack(cell, p, carries, xs, impl="core")[1])
xs = jnp.ones((16, 24, 8))
jax.block_until_ready(jax.jit(jnp.sin)(xs))  # XLA's threads are up
step = jax.jit(jax.grad(loss)).lower(params, xs).compile()
before = set(os.listdir("/proc/self/task"))
for _ in range(3): jax.block_until_ready(step(params, xs))
print(len(set(os.listdir("/proc/self/task")) - before))
"""
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=REPO_ROOT, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["0"]


def _bf16(a):
  """a's values rounded to bfloat16 (to nearest even) in float64: the core's bfloat16 operands."""
  return np.asarray(np.asarray(a, np.float32).astype(ml_dtypes.bfloat16), np.float64)


@needs_core
def test_the_core_with_bfloat16_operands_matches_a_float64_loop():
  """compute_dtype=bfloat16 in the core: an LSTM layer's outputs, final carries and every
  gradient equal a float64 NumPy loop (BPTT written out) whose products take bfloat16-rounded
  operands (x, h, W_ih, W_hh forward; the gate gradients, W_hh, W_ih, x and h backward) and
  whose sums are exact: values to 1e-4, gradients to 1e-3. Where a float32 value lies next to
  the midpoint between two bfloat16 values, it can round to the other one than the float64
  value does: 0.4% of the outputs move by up to 4e-5, and 2 of 3,840 entries of dW_ih by 2e-4
  of its largest. Hidden 40 (partial vectors), batch 13 (odd parts)."""
  cell = cells.get("lstm", compute_dtype="bfloat16")
  b, t, d, h = 13, 29, 24, 40
  params = cell.init(jax.random.key(3), d, h)
  rng = np.random.default_rng(3)
  xs, h0, c0 = (rng.normal(size=shape).astype(np.float32) for shape in ((b, t, d), (b, h), (b, h)))
  d_ys = rng.normal(size=(b, t, h)).astype(np.float32)
  loss = lambda p, carry, x: jnp.sum(layers.run(cell, p, carry, x, impl="core")[1] * d_ys)
  run = functools.partial(layers.run, cell, impl="core")
  args = (params, (jnp.asarray(h0), jnp.asarray(c0)), jnp.asarray(xs))
  (h_t, c_t), ys = jax.jit(run)(*args)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)

  w_ih, w_hh = _bf16(params["w_ih"]), _bf16(params["w_hh"])
  sigmoid = lambda z: 1 / (1 + np.exp(-z))
  hs, cs, gates = [h0.astype(np.float64)], [c0.astype(np.float64)], []
  for step in range(t):
    z = _bf16(xs[:, step]) @ w_ih + np.asarray(params["b"], np.float64) + _bf16(hs[-1]) @ w_hh
    i, f, g, o = sigmoid(z[:, :h]), sigmoid(z[:, h:2 * h]), np.tanh(z[:, 2 * h:3 * h]), sigmoid(
        z[:, 3 * h:])
    cs.append(f * cs[-1] + i * g)
    hs.append(o * np.tanh(cs[-1]))
    gates.append((i, f, g, o))
  _assert_close((ys, h_t, c_t), (np.stack(hs[1:], 1), hs[-1], cs[-1]), rtol=1e-4)

  d_z = np.zeros((b, t, 4 * h))
  dh_next, dc = np.zeros((b, h)), np.zeros((b, h))
  for step in reversed(range(t)):
    i, f, g, o = gates[step]
    dh = d_ys[:, step] + dh_next
    tc = np.tanh(cs[step + 1])
    dc = dc + dh * o * (1 - tc ** 2)
    d_z[:, step] = np.concatenate([dc * g * i * (1 - i), dc * cs[step] * f * (1 - f),
                                   dc * i * (1 - g ** 2), dh * tc * o * (1 - o)], -1)
    dh_next, dc = _bf16(d_z[:, step]) @ w_hh.T, dc * f
  h_prev = np.stack(hs[:-1], 1).reshape(b * t, h)
  rows = lambda a: _bf16(a.reshape(b * t, -1))
  want = ({"w_ih": rows(xs).T @ rows(d_z), "w_hh": _bf16(h_prev).T @ rows(d_z),
           "b": d_z.sum((0, 1))}, (dh_next, dc), (rows(d_z) @ w_ih.T).reshape(b, t, d))
  _assert_close(grads, want, rtol=1e-3)


@needs_core
@pytest.mark.parametrize("family, hidden, b, t", [("lstm", 40, 13, 29), ("gru", 5, 3, 37),
                                                  ("rnn", 35, 2, 300)])
def test_the_core_with_bfloat16_operands_trains_within_bfloat16s_precision(family, hidden, b, t):
  """A 2-layer stack with bfloat16 operands in the core: values within 1e-3 of the XLA scan's
  with the same operands, and values and every gradient within 2e-2 of float32's (bfloat16
  keeps 8 bits; the XLA scan's own bfloat16 gradients are 4-8e-3 from float32's here). Hidden
  5 gives the GRU an odd number of gate columns (15), which the kernel pads to whole pairs."""
  c16, c32 = cells.get(family, compute_dtype="bfloat16"), cells.get(family)
  keys = jax.random.split(jax.random.key(hidden), 2)
  params = [c32.init(keys[0], D, hidden), c32.init(keys[1], hidden, hidden)]
  rng = np.random.default_rng(hidden)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  carries = [jax.tree.map(lambda z: normal(*z.shape), c32.initial_carry(b, hidden))
             for _ in range(2)]
  xs, d_ys = normal(b, t, D), normal(b, t, hidden)
  d_carries = jax.tree.map(lambda z: normal(*z.shape), carries)
  run = lambda cell, impl: jax.jit(functools.partial(layers.run_stack, cell, impl=impl))(
      params, carries, xs)
  grad = lambda cell, impl: jax.jit(jax.grad(functools.partial(
      _loss, cell, impl, d_ys, d_carries), argnums=(0, 1, 2)))(params, carries, xs)
  _assert_close(run(c16, "core"), run(c16, "scan"), rtol=1e-3)
  _assert_close(run(c16, "core"), run(c32, "scan"), rtol=2e-2)
  _assert_close(grad(c16, "core"), grad(c32, "scan"), rtol=2e-2)


def test_the_core_build_is_chosen_by_the_cpus_flags(monkeypatch):
  """The builds of rnn_core.cc a CPU can run, fastest first: bfloat16's dot product where the
  CPU has it, then AVX-512, then AVX2 with FMA."""
  for flags, want in (({"avx512f", "avx512_bf16", "avx2", "fma"}, ["avx512bf16", "avx512", "avx2"]),
                      ({"avx512f", "avx2", "fma"}, ["avx512", "avx2"]),
                      ({"avx2", "fma"}, ["avx2"]), ({"sse4_2"}, [])):
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: flags)
    assert kernels._core_isas() == want


BF16_BUILDS = ("avx512_bf16" in kernels._cpu_flags() and kernels._extension(
    "_rnn_core_avx512bf16") is not None and kernels._extension("_rnn_core_avx512") is not None)


def _saved_by_build(isa, code, out):
  """Runs `code` in a process of its own whose core is the `isa` build (sys, numpy as np, jax,
  jax.numpy as jnp, cells, kernels and layers imported) -> the arrays it saved with
  np.savez(sys.argv[1], ...) (`out`)."""
  from conftest import REPO_ROOT
  header = ("import sys, numpy as np, jax, jax.numpy as jnp\n"
            "from jaxrnn import cells, kernels, layers\n"
            f"kernels._core_isas = lambda: [{isa!r}]\n")
  proc = subprocess.run([sys.executable, "-c", header + code, str(out)], capture_output=True,
                        text=True, cwd=REPO_ROOT, timeout=180)
  assert proc.returncode == 0, proc.stderr
  return dict(np.load(f"{out}.npz"))


@pytest.mark.skipif(not BF16_BUILDS, reason="needs a CPU with AVX512-BF16 and both AVX-512 builds")
def test_avx512_bf16s_dot_product_gives_what_the_fma_build_gives(tmp_path):
  """A bfloat16 LSTM's value and gradients in the avx512bf16 build (VDPBF16PS) equal those of
  the avx512 build (two FMAs per pair of operands), each in a process of its own, to 1e-6."""
  code = """
cell = cells.get("lstm", compute_dtype="bfloat16")
params = cell.init(jax.random.key(0), 24, 40)
xs, carry = jax.random.normal(jax.random.key(1), (5, 33, 24)), cell.initial_carry(5, 40)
loss = lambda p: jnp.sum(jnp.sin(layers.run(cell, p, carry, xs, impl="core")[1]))
value, grads = jax.jit(jax.value_and_grad(loss))(params)
np.savez(sys.argv[1], value=value, **grads)
"""
  got = {isa: _saved_by_build(isa, code, tmp_path / isa) for isa in ("avx512bf16", "avx512")}
  _assert_close(got["avx512bf16"], got["avx512"], rtol=1e-6)


@pytest.mark.skipif(kernels._core_isas()[:1] == ["avx2"] or "avx2" not in kernels._core_isas()
                    or kernels._extension("_rnn_core_avx2") is None,
                    reason="the suite runs the avx2 build itself here, or cannot run it")
def test_the_avx2_build_matches_the_xla_scan(tmp_path):
  """On an AVX-512 CPU the suite runs an AVX-512 build; the AVX2 one (8 floats a vector, 16
  registers, the LSTM's forward tiles splats first) in a process of its own: each family's
  values and gradients at hidden 40 (five vectors) and batch 13 as the XLA scan's, to 1e-5."""
  code = """
assert kernels._load_core()[0].jaxrnn_core_vector_floats() == 8
rng, out = np.random.default_rng(0), {}
for family in ("lstm", "gru", "rnn"):
  cell = cells.get(family)
  params = cell.init(jax.random.key(1), 24, 40)
  carry = jax.tree.map(lambda z: jnp.asarray(rng.normal(size=z.shape), jnp.float32),
                       cell.initial_carry(13, 40))
  xs, d_ys = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((13, 29, 24), (13, 29, 40)))
  for impl in ("core", "scan"):
    loss = lambda p, c, x: jnp.sum(layers.run(cell, p, c, x, impl=impl)[1] * d_ys)
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(params, carry, xs)
    for i, leaf in enumerate(jax.tree.leaves((value, grads))):
      out[f"{family}_{impl}_{i}"] = leaf
np.savez(sys.argv[1], **out)
"""
  got = _saved_by_build("avx2", code, tmp_path / "avx2")
  for family in ("lstm", "gru", "rnn"):
    pick = lambda impl: [v for k, v in sorted(got.items()) if k.startswith(f"{family}_{impl}_")]
    _assert_close(pick("core"), pick("scan"))


def _torch_stack(family, params, carries, xs, d_ys, d_carries):
  """torch.nn.LSTM / nn.GRU in float64 with jaxrnn's weights: (final carries, ys), and the
  gradients of `_loss` with respect to every weight, the carries and xs, in jaxrnn's layout."""
  module = getattr(torch.nn, family.upper())(D, H, num_layers=len(params), batch_first=True)
  two_biases = family in ("lstm", "rnn")  # from_torch sums them; each has the sum's gradient
  module.load_state_dict({k: torch.from_numpy(v) for k, v in
                          interop.to_torch_state_dict(family, params).items()})
  module = module.double()
  tensor = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=True)
  x = tensor(xs)
  states = [tensor(np.stack([np.asarray(c[i]) if family == "lstm" else np.asarray(c)
                             for c in carries])) for i in range(2 if family == "lstm" else 1)]
  ys, final = module(x, tuple(states) if family == "lstm" else states[0])
  final = final if family == "lstm" else (final,)
  loss = (ys * torch.from_numpy(np.asarray(d_ys, np.float64))).sum()
  for i, f in enumerate(final):
    cot = np.stack([np.asarray(c[i]) if family == "lstm" else np.asarray(c) for c in d_carries])
    loss = loss + (f * torch.from_numpy(cot.astype(np.float64))).sum()
  loss.backward()
  grads = {k: p.grad.numpy() for k, p in module.named_parameters()}
  d_params = interop.from_torch_state_dict(family, grads)
  if two_biases:  # from_torch sums the two biases; their gradients are each d(b)
    d_params = [{**p, "b": p["b"] / 2} for p in d_params]
  else:  # GRU: b = b_ih + b_hh in the r and z thirds, b_ih alone in the n third
    for i, p in enumerate(d_params):
      p["b"] = grads[f"bias_ih_l{i}"]
  unstack = lambda s: [tuple(a.grad.numpy()[i] for a in s) if family == "lstm"
                       else s[0].grad.numpy()[i] for i in range(len(params))]
  values = ([tuple(f.detach().numpy()[i] for f in final) if family == "lstm"
             else final[0].detach().numpy()[i] for i in range(len(params))], ys.detach().numpy())
  return values, (d_params, unstack(states), x.grad.numpy())


@pytest.mark.parametrize("impl, family", CPU_KERNEL_CELLS)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_cpu_kernels_match_torch_in_float64(impl, family, num_layers):
  """Each CPU kernel against PyTorch's own LSTM / GRU / RNN run in float64: values and
  gradients."""
  cell, params, carries, xs, d_ys, d_carries = _stack(family, num_layers, 3, 23, seed=7)
  want_values, want_grads = _torch_stack(family, params, carries, xs, d_ys, d_carries)
  got_values = layers.run_stack(cell, params, carries, xs, impl=impl)
  got_grads = jax.grad(functools.partial(_loss, cell, impl, d_ys, d_carries),
                       argnums=(0, 1, 2))(params, carries, xs)
  _assert_close(got_values, want_values)
  _assert_close(got_grads, (want_grads[0], want_grads[1], want_grads[2]))


def test_cudnn_weight_packing_equals_the_reference_lstm():
  """`cudnn_weights` unpacked by jax.experimental.rnn and run through its `lstm_ref` gives the
  outputs and final states of jaxrnn's own LSTM (this runs on a CPU: no cuDNN needed)."""
  cell, (params,), (carry,), xs, _, _ = _stack("lstm", 1, 3, 11, seed=3)
  w_ih, w_hh, b_ih, b_hh = jax_rnn.unpack_lstm_weights(kernels.cudnn_weights(params), D, H, 1,
                                                       False)
  ys, h_n, c_n = jax_rnn.lstm_ref(xs, carry[0][None], carry[1][None], w_ih, w_hh, b_ih, b_hh,
                                  jnp.full((3,), 11, jnp.int32), D, H, 1, 0.0, False)
  (h, c), want = layers.run(cell, params, carry, xs, impl="scan")
  _assert_close((h_n[0], c_n[0], ys), (h, c, want))


@pytest.mark.parametrize("name", cells.names())
@pytest.mark.parametrize("steps", [1, 64])
def test_auto_resolves_to_an_implementation_that_runs_here(name, steps):
  """`auto` names a concrete impl that `check` accepts on this machine; one step (sampling)
  always stays in XLA."""
  cell = cells.get(name)
  impl = layers.resolve(cell, "auto", H, steps)
  assert impl in layers.IMPLS and impl != "auto"
  layers.check(cell, impl)
  if steps == 1:
    assert impl in layers.XLA_IMPLS


@pytest.mark.parametrize("platform, name, hidden, want", [
    ("cpu", "mingru", 256, "scan"), ("cpu", "rnn", 32, "fused"), ("cpu", "lnlstm", 256, "fused"),
    ("cpu", "indrnn", 256, "scan"), ("gpu", "lstm", 1024, "cudnn"),
    ("gpu", "lstm", 512, "fused"), ("gpu", "gru", 1024, "fused"), ("tpu", "lstm", 1024, "fused")])
def test_auto_follows_the_table(platform, name, hidden, want):
  """The documented `auto` table, row by row (platforms other than this one named explicitly)."""
  assert layers.resolve(cells.get(name), "auto", hidden, 64, platform) == want


@pytest.fixture
def own_openmp(monkeypatch):
  """As if jaxrnn had loaded the OpenMP runtime itself: another test in this worker process may
  have imported torch first, which moves `auto`'s evaluation to the core (tested below)."""
  monkeypatch.setattr(kernels, "openmp_shared", lambda: False)


@needs_onednn
@needs_core
def test_auto_picks_the_cpu_kernels_per_pass_and_size(own_openmp):
  """lstm in float32 from hidden 64: evaluation in oneDNN, training in the core; gru and rnn in
  the core; bfloat16 operands in the core (the one kernel that takes them); smaller or one
  step: XLA."""
  for name, want in (("lstm", "onednn/core"), ("gru", "core")):
    assert layers.resolve(cells.get(name), "auto", 64, 64, "cpu") == want
    assert layers.resolve(cells.get(name), "auto", 512, 64, "cpu") == want
    assert layers.resolve(cells.get(name), "auto", 32, 64, "cpu") == "scan"
    assert layers.resolve(cells.get(name), "auto", 256, 1, "cpu") == "scan"
  assert layers.resolve(cells.get("rnn"), "auto", 64, 64, "cpu") == "core"
  for name in ("lstm", "gru", "rnn"):
    bf16 = cells.get(name, compute_dtype="bfloat16")
    assert layers.resolve(bf16, "auto", 256, 64, "cpu") == "core"
    assert layers.resolve(bf16, "auto", 32, 64, "cpu") == ("fused" if name == "rnn" else "scan")


@needs_onednn
@needs_core
def test_auto_evaluates_in_one_kernel_and_trains_in_the_other(own_openmp):
  """A 512-wide LSTM under auto: its value is oneDNN's inference and its gradient the core's
  (both within 1e-5 of the XLA scan), so each pass runs where it is fastest."""
  cell = cells.get("lstm")
  params = cell.init(jax.random.key(0), 16, 512)
  xs = jax.random.normal(jax.random.key(1), (2, 5, 16))
  carry = cell.initial_carry(2, 512)
  ys = lambda impl, p: layers.run(cell, p, carry, xs, impl=impl)[1]
  _assert_close(jax.jit(functools.partial(ys, "auto"))(params),
                jax.jit(functools.partial(ys, "onednn"))(params))
  hlo = jax.jit(jax.grad(lambda p: jnp.sum(ys("auto", p) ** 2))).lower(params).as_text()
  assert "jaxrnn_core_lstm_grad" in hlo and "jaxrnn_lstm_grad" not in hlo
  _assert_close(jax.grad(lambda p: jnp.sum(ys("auto", p) ** 2))(params),
                jax.grad(lambda p: jnp.sum(ys("scan", p) ** 2))(params))


@pytest.mark.parametrize("overrides, message", [
    ({"impl": "cudnn"}, r"model.impl=cudnn runs on a gpu only \(this platform: cpu\); use "
                        "model.impl=auto, fused, scan, core, onednn$"),
    ({"impl": "onednn", "cell": "mingru"}, "runs the cells lstm, gru, not 'mingru'"),
    ({"impl": "onednn", "compute_dtype": "bfloat16"}, "runs float32 only"),
    ({"impl": "fast"}, "model.impl must be one of auto, fused, scan, core, onednn, cudnn, pallas"),
])
def test_an_impl_that_cannot_run_is_a_one_line_error(tiny_config, overrides, message):
  if jax.default_backend() == "gpu" and overrides.get("impl") == "cudnn":
    pytest.skip("cuDNN runs on this machine's GPU")
  with pytest.raises(UserError, match=message) as e:
    config_lib.validate(tiny_config(model=overrides))
  assert "\n" not in str(e.value) and "model.impl" in str(e.value)


def test_without_the_extensions_auto_runs_the_next_path_and_says_so_once(
    tiny_config, tmp_path, monkeypatch, capsys):
  """The core missing (simulated: not built): auto trains a 512-wide LSTM in oneDNN, saying
  once why; both missing: the XLA path; an explicit model.impl that cannot run is a one-line
  error naming the other choices."""
  monkeypatch.setattr(kernels, "_extension", lambda name="_onednn_rnn": None)
  lib, why = kernels._load_core.__wrapped__()
  assert lib is None and "not built" in why
  monkeypatch.setattr(kernels, "_load_core", lambda: (None, why))
  kernels.warn_fallback.cache_clear()
  capsys.readouterr()
  for _ in range(3):
    assert layers.resolve(cells.get("lstm"), "auto", 512, 64, "cpu") == (
        "onednn" if not ONEDNN else "scan")
  assert capsys.readouterr().err.count("not core") == 1
  with pytest.raises(UserError, match="model.impl=core cannot run here: .*not built"):
    config_lib.validate(tiny_config(model={"impl": "core"}))
  lib, why = kernels._load_onednn.__wrapped__()
  assert lib is None and "not built" in why
  monkeypatch.setattr(kernels, "_load_onednn", lambda: (None, why))
  assert layers.resolve(cells.get("lstm"), "auto", 256, 64, "cpu") == "scan"
  with pytest.raises(UserError, match="cannot run here: .*not built.*; use model.impl=auto"):
    config_lib.validate(tiny_config(model={"impl": "onednn"}))
  wide = tiny_config(model={"cell": "lstm", "hidden_size": 64})  # oneDNN's size, if it were built
  result = train.train_and_evaluate(wide, str(tmp_path))
  assert np.isfinite(result["val_loss"])


@pytest.mark.slow  # three runs; the impls' equality tests stay fast
@pytest.mark.parametrize("kernel", [pytest.param("core", marks=needs_core),
                                    pytest.param("onednn", marks=needs_onednn)])
def test_a_run_changes_impl_between_training_resuming_and_evaluating(kernel, tiny_config,
                                                                     tmp_path):
  """Trained with the kernel, resumed with scan (and the other way round), evaluated with each:
  the same figures to 1e-5 as a run that never changed."""
  config = lambda impl, steps: tiny_config(
      model={"cell": "lstm", "num_layers": 2, "impl": impl},
      train={"steps": steps, "ckpt_every": 5, "eval_every": 5})
  straight = train.train_and_evaluate(config(kernel, 10), str(tmp_path / "straight"))
  for first, then in ((kernel, "scan"), ("scan", kernel)):
    workdir = str(tmp_path / f"{first}-{then}")
    train.train_and_evaluate(config(first, 5), workdir)
    resumed = train.train_and_evaluate(config(then, 10), workdir)
    np.testing.assert_allclose(resumed["val_loss"], straight["val_loss"], rtol=1e-5)
  saved, vocab, params, _ = checkpoint.load_run(str(tmp_path / "straight"))
  ids = np.asarray(vocab.encode(open(saved.data.corpus).read()), np.int32)
  losses = []
  for impl in (kernel, "scan", "fused"):
    saved.model.impl = impl
    losses.append(lm.make_evaluator(saved)(params, ids)["loss"])
  np.testing.assert_allclose(losses, losses[0], rtol=1e-5)


@pytest.mark.slow  # two subprocess runs; tests/test_parallel.py's 4-device runs go through auto's kernels
@pytest.mark.parametrize("kernel", [pytest.param("core", marks=needs_core),
                                    pytest.param("onednn", marks=needs_onednn)])
def test_kernels_on_four_devices_match_one(kernel, tiny_flags, tmp_path):
  """Under pmap the kernel runs once per device, each on its block of lanes (the core's team
  taken by one device at a time, the others running alone): 4 simulated devices train to the
  losses of 1 (jax.jit) within 1e-5 (two layers, dropout between them)."""
  losses = {}
  for n in (4, 1):
    workdir = tmp_path / f"dev{n}"
    proc = run_script("train.py", *tiny_flags(
        workdir, model={"num_layers": 2, "hidden_size": 64, "dropout": 0.1, "impl": kernel},
        data={"batch_size": 8}, train={"steps": 8, "eval_every": 0, "eval_lanes": 4}), devices=n)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses[n] = [r["loss"] for r in rows]
  np.testing.assert_allclose(losses[4], losses[1], rtol=1e-5)


@pytest.mark.parametrize("kernel", [pytest.param("core", marks=needs_core),
                                    pytest.param("onednn", marks=needs_onednn)])
def test_kernels_run_both_directions_of_a_bidirectional_stack(kernel):
  """The classifier's bidirectional layers (the backward one reads each row's valid steps in
  reverse) give the XLA scan's outputs and carries through the kernel."""
  cell, params, carries, xs, _, _ = _stack("lstm", 1, 3, 9, seed=2)
  params = [{"fwd": params[0], "bwd": cell.init(jax.random.key(9), D, H)}]
  carries = [(carries[0], carries[0])]
  lengths = jnp.array([9, 4, 1])
  run = lambda impl: layers.run_stack(cell, params, carries, xs, impl=impl, bidirectional=True,
                                      lengths=lengths)
  _assert_close(run(kernel), run("scan"))


def test_a_checkpoint_saved_with_an_impl_this_machine_lacks_evaluates_with_auto(
    tiny_config, tmp_path, capsys):
  """model.impl is the machine's, not the model's: a run saved with cudnn (trained on a GPU)
  restores on a CPU with impl=auto and a note, and eval.py prints its figures."""
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(model={"impl": "scan"}), str(workdir))
  meta_file = workdir / "checkpoints" / "5" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  meta["config"]["model"]["impl"] = "cudnn"
  meta_file.write_text(json.dumps(meta))
  capsys.readouterr()
  kernels.warn_fallback.cache_clear()  # said once per process: maybe already, by another test
  config, *_ = checkpoint.load_run(str(workdir))
  if jax.default_backend() != "gpu":
    assert config.model.impl == "auto"
    assert "not cudnn: cuDNN needs a GPU" in capsys.readouterr().err
  proc = run_script("eval.py", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout)["step"] == 5


@needs_onednn
@needs_core
def test_with_openmp_loaded_by_another_library_auto_evaluates_in_the_core():
  """In a process that imported torch first (its libgomp, at the default spin count, loads
  before oneDNN's), auto evaluates an LSTM in the core and trains it there, saying why once; in
  a fresh process, oneDNN evaluates."""
  from conftest import REPO_ROOT
  code = ("{first}from jaxrnn import cells, layers\n"
          "for _ in range(2): print(layers.resolve(cells.get('lstm'), 'auto', 256, 64, 'cpu'))")
  env = {k: v for k, v in __import__("os").environ.items()
         if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
  for first, want in (("import torch\n", "core"), ("", "onednn/core")):
    proc = subprocess.run([sys.executable, "-c", code.format(first=first)], capture_output=True,
                          text=True, cwd=REPO_ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [want, want]
    assert proc.stderr.count("torch imported first?") == (1 if first else 0)


@needs_core
def test_an_extension_xla_refuses_falls_back_with_a_note(monkeypatch):
  """A jaxlib whose FFI the extension was not built for (simulated: registration raises) makes
  the kernel unavailable, with the reason and the fix, instead of crashing every script."""
  def refuse(*args, **kwargs):
    raise RuntimeError("Mismatched FFI API version")
  monkeypatch.setattr(jax.ffi, "register_ffi_target", refuse)
  for load in (kernels._load_core, kernels._load_onednn):
    lib, why = load.__wrapped__()
    if "not built" in why or "not installed" in why:
      continue  # that kernel is not here at all
    assert lib is None and why.startswith("XLA refused its FFI handlers (RuntimeError: "
                                          "Mismatched FFI API version)"), why
    assert why.endswith("rebuild it for this jaxlib with `pip install -e .`")


def test_each_core_build_names_its_instruction_set_over_the_users_cflags(tmp_path):
  """setup.py's flags for each build of the core come after the user's CFLAGS: with
  -march=native on an AVX-512 machine, the avx2 build's code still holds no AVX-512 register
  (a loop the compiler vectorizes, compiled as setup.py compiles rnn_core.cc)."""
  import importlib.util
  import shutil
  from conftest import REPO_ROOT
  if shutil.which("g++") is None or "avx512f" not in kernels._cpu_flags():
    pytest.skip("needs g++ on an AVX-512 CPU (-march=native must offer AVX-512)")
  spec = importlib.util.spec_from_file_location("jaxrnn_setup", REPO_ROOT / "setup.py")
  setup_py = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(setup_py)  # defines the builds; setup() runs only as __main__
  avx2 = setup_py.CORE_BUILDS["avx2"][0]
  source = tmp_path / "loop.cc"
  source.write_text("void axpy(float* y, const float* x, float a, int n) {\n"
                    "  for (int i = 0; i < n; ++i) y[i] += a * x[i];\n}\n")
  asm = {}
  for name, flags in (("native", []), ("avx2", avx2)):
    out = tmp_path / f"{name}.s"
    subprocess.run(["g++", "-march=native", "-O3", *flags, "-S", str(source), "-o", str(out)],
                   check=True)
    asm[name] = out.read_text()
  assert "zmm" in asm["native"] or "ymm" in asm["native"]
  assert "zmm" not in asm["avx2"] and "ymm" in asm["avx2"]
