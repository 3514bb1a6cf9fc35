"""Tests for jaxrnn.kernels.pallas_rnn: the Pallas layers against the XLA scan of the same cell
(values, final carries and every gradient), run by Pallas' interpreter on a CPU and compiled on
a GPU, and their Triton lowering for CUDA, checked on any machine."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.lib.mlir import ir
from jax._src.pallas.triton import lowering as triton_lowering

from jaxrnn import cells, layers
from jaxrnn.kernels.pallas_rnn import BLOCK_H, pallas_layer

FAMILIES = ("lstm", "gru", "rnn_tanh", "rnn_relu")
CELLS = {"lstm": ("lstm", {}), "gru": ("gru", {}), "rnn_tanh": ("rnn", {}),
         "rnn_relu": ("rnn", {"nonlinearity": "relu"})}


def _setup(family, b, t, d, h, dtype="float32", zero_state=False, seed=0):
  """The cell, its params, a carry (random or zeros), xs<b, t, d> and cotangents for ys and
  the final carry."""
  name, options = CELLS[family]
  cell = cells.get(name, compute_dtype=dtype, **options)
  assert cell.kernel == family
  params = cell.init(jax.random.key(seed), d, h)
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  carry = cell.initial_carry(b, h)
  if not zero_state:
    carry = jax.tree.map(lambda z: normal(*z.shape), carry)
  return cell, params, carry, normal(b, t, d), normal(b, t, h), jax.tree.map(
      lambda z: normal(*z.shape), carry)


def _scan(cell, params, carry, xs):
  """The cell's own `lax.scan` (`layers.recurrence`), batch-major like the kernel."""
  carry, ys = layers.recurrence(cell, "scan", xs.shape[1])(params, carry,
                                                         jnp.swapaxes(xs, 0, 1), 1)
  return carry, jnp.swapaxes(ys, 0, 1)


def _loss(run, d_ys, d_carry, params, carry, xs):
  """<ys, d_ys> + <final carry, d_carry>: its gradient is the layer's VJP."""
  final, ys = run(params, carry, xs)
  return jnp.sum(ys * d_ys) + sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(final),
                                                                jax.tree.leaves(d_carry)))


# The interpreted kernels' loops compile in half the time without LLVM's optimisations.
QUICK = {"xla_backend_optimization_level": 0}


def _compiled(run, d_ys, d_carry, args):
  """(run(*args), its gradients) from one compiled call, its products float32 (a GPU's XLA
  would take TF32 by default; the kernel's float32 products are IEEE)."""
  grad = jax.grad(functools.partial(_loss, run, d_ys, d_carry), argnums=(0, 1, 2))
  with jax.default_matmul_precision("highest"):
    lowered = jax.jit(lambda *a: (run(*a), grad(*a))).trace(*args).lower()
  return lowered.compile(compiler_options=QUICK)(*args)


def _both(family, cell, d_ys, d_carry, args, **kernel_options):
  """(values, gradients) of the Pallas layer and of the scan."""
  kernel = functools.partial(pallas_layer, family, dtype=cell.dtype, **kernel_options)
  return [_compiled(run, d_ys, d_carry, args) for run in (kernel, functools.partial(_scan, cell))]


def _assert_close(got, want, rtol):
  """Equal within rtol of each array's largest entry."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape and g.dtype == w.dtype
    w = np.asarray(w)
    np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=rtol * np.abs(w).max())


# (b, t, d, h, block_h, zero_state): odd sizes, W_hh resident in one chunk (h 7 padded to 16)
# with a carried state; two batch tiles of 16 rows and four chunks of 16 units (h 40 padded to
# 64) from zeros.
SHAPES = {"resident": (3, 4, 5, 7, BLOCK_H, False), "chunked": (17, 3, 5, 40, 16, True)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_kernel_matches_the_scan(family, shape):
  """Outputs, final carry and the gradients w.r.t. every parameter, the carry in and xs equal
  the scan's to 1e-5, in float32."""
  b, t, d, h, block_h, zero_state = SHAPES[shape]
  cell, params, carry, xs, d_ys, d_carry = _setup(family, b, t, d, h, zero_state=zero_state)
  (got, got_grads), (want, want_grads) = _both(family, cell, d_ys, d_carry,
                                               (params, carry, xs), block_h=block_h)
  _assert_close(got, want, 1e-5)
  _assert_close(got_grads, want_grads, 1e-5)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _product(dtype, a, b):
  return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _product_bwd(dtype, operands, g):
  a, b = operands
  return _product(dtype, g, b.T), _product(dtype, a.T, g)


_product.defvjp(lambda dtype, a, b: (_product(dtype, a, b), (a, b)), _product_bwd)


def _rounding_matmul(a, b, dtype=jnp.float32):
  """`cells.matmul` (2-d) whose VJP's products take `dtype` operands too, the cotangent among
  them, and sum in float32: the rounding of jaxrnn's kernels (the core's bfloat16 test checks
  it against a float64 loop). JAX's own VJP of a bfloat16 product rounds its results instead:
  the scan differentiated that way is 3-5e-3 (of each array's largest entry) from the kernel,
  as far as a float32 run is from it."""
  return _product(jnp.dtype(dtype), a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_operands_match_the_scan_in_bfloat16(family, monkeypatch):
  """compute_dtype=bfloat16 against the scan of the cell with the same dtype and products
  that round the same operands (`_rounding_matmul`): the same values and gradients but for
  the order of float32 sums, 1e-4 (leaving h unrounded in the kernel's product moves the
  values by 4e-4 to 2e-3)."""
  monkeypatch.setattr(cells, "matmul", _rounding_matmul)
  cell, params, carry, xs, d_ys, d_carry = _setup(family, 3, 6, 5, 7, dtype="bfloat16")
  (got, got_grads), (want, want_grads) = _both(family, cell, d_ys, d_carry, (params, carry, xs))
  _assert_close(got, want, 1e-4)
  _assert_close(got_grads, want_grads, 1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_step(family):
  """t = 1: each loop over time runs once (the backward's state starts in slot 1)."""
  cell, params, carry, xs, d_ys, d_carry = _setup(family, 3, 1, 5, 7, seed=1)
  (got, got_grads), (want, want_grads) = _both(family, cell, d_ys, d_carry, (params, carry, xs))
  _assert_close(got, want, 1e-5)
  _assert_close(got_grads, want_grads, 1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_steps_return_the_carry(family):
  """t = 0: the carry as it came, ys<b, 0, h>, and gradients that pass the carry's cotangent
  through and are zero for the parameters."""
  _, params, carry, xs, d_ys, d_carry = _setup(family, 3, 0, 5, 7)
  final, ys = pallas_layer(family, params, carry, xs)
  assert ys.shape == (3, 0, 7) and ys.dtype == jnp.float32
  _assert_close(final, carry, 0.0)
  loss = functools.partial(_loss, functools.partial(pallas_layer, family), d_ys, d_carry)
  d_params, d_carry0, d_xs = jax.grad(loss, argnums=(0, 1, 2))(params, carry, xs)
  _assert_close(d_carry0, d_carry, 0.0)
  assert all(not np.any(g) for g in jax.tree.leaves(d_params)) and d_xs.shape == xs.shape


def test_refuses_what_it_cannot_run():
  """A cell outside the four families, another operand dtype, blocks Triton cannot take."""
  _, params, carry, xs, _, _ = _setup("rnn_tanh", 3, 2, 5, 7)
  for family, dtype, blocks, match in [
      ("lnlstm", jnp.float32, {}, "not 'lnlstm'"), ("rnn_tanh", jnp.float16, {}, "float16"),
      ("rnn_tanh", jnp.float32, {"block_b": 8}, "powers of two"),
      ("rnn_tanh", jnp.float32, {"block_h": 48}, "powers of two")]:
    with pytest.raises(ValueError, match=match):
      pallas_layer(family, params, carry, xs, dtype, **blocks)


def _triton_modules(lowered) -> dict[str, str]:
  """The Triton kernels in a CUDA lowering: name -> the module's text, each verified (its ops'
  own checks: shapes of powers of two, a dot's operands)."""
  modules = {}

  def visit(op):
    if (op.name == "stablehlo.custom_call" and
        ir.StringAttr(op.attributes["call_target_name"]).value == "__gpu$xla.gpu.triton"):
      config = ir.DictAttr(op.attributes["mhlo.backend_config"])
      with triton_lowering._new_ir_context():
        module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
        assert module.operation.verify()
        modules[ir.StringAttr(config["name"]).value] = str(module)
    for region in op.regions:
      for block in region.blocks:
        for inner in block.operations:
          visit(inner.operation)

  visit(lowered.compiler_ir("stablehlo").operation)
  return modules


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_kernels_lower_to_triton_for_cuda(family, dtype):
  """Without a GPU: the forward and the backward kernel, W_hh resident and in chunks, lower
  through Pallas' Triton backend for CUDA (what jaxlib checks before the GPU compiles them)
  into modules that verify, their float32 products IEEE (never Triton's TF32)."""
  for b, t, d, h, block_h, _ in SHAPES.values():
    cell, params, carry, xs, d_ys, d_carry = _setup(family, b, t, d, h, dtype=dtype)
    kernel = functools.partial(pallas_layer, family, dtype=cell.dtype, interpret=False,
                               block_h=block_h)
    grad = jax.grad(functools.partial(_loss, kernel, d_ys, d_carry), argnums=(0, 1, 2))
    modules = _triton_modules(jax.jit(grad).trace(params, carry, xs).lower(
        lowering_platforms=("cuda",)))
    assert sorted(modules) == [f"{family}_backward_kernel", f"{family}_forward_kernel"]
    assert all("tt.dot" in text and "tf32" not in text for text in modules.values())


def test_registered_as_model_impl_pallas_reading_tokens_one_hot():
  """kernels.LAYERS["pallas"], what model.impl=pallas runs: a folded embedding's tokens read as
  one-hot rows of W_ih, to the scan's values over the same rows."""
  from jaxrnn import kernels
  cell, params, carry, _, _, _ = _setup("lstm", 3, 4, 9, 7)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 9, (3, 4)), jnp.int32)
  with jax.default_matmul_precision("highest"):
    got = kernels.LAYERS["pallas"]("lstm", params, carry, tokens, jnp.float32)
    want = _scan(cell, params, carry, jax.nn.one_hot(tokens, 9))
  _assert_close(got, want, rtol=1e-5)
