"""Running cells over time: the recurrences, stacks, bidirectional layers, dropout.

This module runs cells over time (a cell's own `parallel` form, which takes a whole sequence,
is the one loop over time elsewhere), and `resolve` is the one place that chooses how a cell
runs for a given `model.impl`: a whole-layer kernel (`jaxrnn.kernels`) or one of the
XLA recurrences (`recurrence`). Public functions take batch-major arrays (xs<float>[b, t, d]);
inside, the XLA recurrences run time-major ([t, b, ...]). Nothing here names a cell's
parameters: a cell declares the structure a faster recurrence needs (`Cell`).
"""

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxrnn import UserError, kernels
from jaxrnn.cells import Carry, Cell, Params, add_to_hidden, hidden, matmul

XLA_IMPLS = ("fused", "scan")
IMPLS = ("auto",) + XLA_IMPLS + tuple(kernels.LAYERS)

# (params, carry, xs<float>[t, b, d], unroll) -> (final carry, ys<float>[t, b, h])
Recurrence = Callable[[Params, Carry, jax.Array, int], tuple[Carry, jax.Array]]


def runnable_impls(platform: str) -> tuple[str, ...]:
  """The `model.impl` values that can run on JAX platform `platform` (cpu, gpu, tpu)."""
  return ("auto",) + XLA_IMPLS + tuple(k for k in kernels.LAYERS
                                       if kernels.PLATFORMS[k] == platform)


def check(cell: Cell, impl: str, platform: str | None = None) -> None:
  """Raises a one-line UserError unless `impl` can run `cell` on `platform` (default: JAX's)."""
  if impl not in IMPLS:
    raise UserError(f"model.impl must be one of {', '.join(IMPLS)}, got {impl!r}")
  if impl not in kernels.LAYERS:
    return
  platform = platform or jax.default_backend()
  if kernels.PLATFORMS[impl] != platform:
    # Before anything is built: a CPU custom call on a GPU fails deep inside XLA's compiler.
    raise UserError(f"model.impl={impl} runs on a {kernels.PLATFORMS[impl]} only (this "
                    f"platform: {platform}); use model.impl="
                    f"{', '.join(runnable_impls(platform))}")
  instead = f"use model.impl=auto, {' or '.join(XLA_IMPLS)}"
  if cell.kernel not in kernels.FAMILIES[impl]:
    raise UserError(f"model.impl={impl} runs the cells {', '.join(kernels.FAMILIES[impl])}, "
                    f"not {cell.name!r}; {instead}")
  if cell.dtype not in kernels.DTYPES[impl]:
    dtypes = " or ".join(jnp.dtype(d).name for d in kernels.DTYPES[impl])
    raise UserError(f"model.impl={impl} runs {dtypes} only: set model.compute_dtype="
                    f"{jnp.dtype(kernels.DTYPES[impl][0]).name} or {instead}")
  if why := kernels.unavailable(impl):
    raise UserError(f"model.impl={impl} cannot run here: {why}; {instead}")


# What model.impl="auto" runs (`resolve`), measured with scripts/bench.py (docs/speed.md); an
# entry a/b runs kernel a where the layer is not differentiated and kernel b where it is:
#   platform  cell                              float32, hidden, more than 1 step   impl
#   cpu       lstm                              hidden >= 64                       onednn/core
#   cpu       gru, rnn                          hidden >= 64                       core
#   cpu       lstm, gru, rnn (compute_dtype        hidden >= 64                       core
#             bfloat16: the one kernel for it)
#             (a kernel not built here: the next one of the list, else the XLA path below)
#   cpu       rnn, lnlstm, mlstm                otherwise                          fused
#   cpu       every other cell, size or one step at a time                        scan
#   gpu       lstm (float32), hidden >= 1024                                       cudnn
#   gpu, tpu  every other cell or shape                                            fused
# The GPU rows predate a GPU run of cuDNN from jaxrnn (issue 15's bench of the stack alone);
# `pallas` (the whole time loop in one Pallas kernel, kernels/pallas_rnn.py) is not in the
# table: it has not run on a GPU yet, and `auto` takes a kernel only where it measured faster
# (scripts/gpu_check.py's bench is what will say so).
# Cells whose hoisted input product pays on a CPU: rnn's gates are as narrow as its state,
# lnlstm's input product carries a layer norm; mlstm's sequential form keeps every step's
# d x d memories for the backward pass, its chunked parallel form trains 4x faster (9.2K
# against 2.3K tokens/s, 2 x 424, 4 heads, batch 32 x 128). rglru's parallel scan does not
# pay here (12.4K against the scan's 14.3K tokens/s at 2 x 496), nor does mamba's (0.58K
# against 2.5K tokens/s, 8 Mamba blocks of 132); xLSTM's block runs mlstm_memory as mlstm.
CPU_FUSED = ("rnn", "lnlstm", "mlstm", "mlstm_memory")
# Below these a kernel's fixed cost per call outweighs its gain: oneDNN evaluates a 2 x 32
# LSTM at 0.75x the XLA scan on the 2-core EPYC (2 x 64: 1.2x); cuDNN loses to jaxrnn's fused
# scan on an H100 below hidden 1024 (issue 15's figures).
ONEDNN_MIN_HIDDEN = 64
CUDNN_MIN_HIDDEN = 1024
# The CPU kernels by speed, per pass, on the 2-core EPYC (2026-12-07, docs/speed.md): oneDNN's
# inference primitive (brgemm) evaluates an LSTM 1.13-1.14x faster than the core from 2 x 256
# to 2 x 512 (with the first layer, fed tokens, in the core: 5% slower at 2 x 384); the core
# evaluates the GRU faster (1.07-1.12x there, 1.28x at the quickstart's 1 x 256). The core
# trains the quickstart's LSTM 1.76x faster than oneDNN 3.2, ties it at 2 x 256 and 2 x 384 and
# wins at 2 x 512 (1.46x), all before its backward loop got 20% faster, and beside a busy core
# `auto` slows 1.76-1.86x where oneDNN's OpenMP team slows 2.26-2.37x. `auto` takes the first
# of each list that can run the cell.
CPU_TRAIN = ("core", "onednn")
CPU_INFER = {"lstm": ("onednn", "core")}  # every other cell: CPU_TRAIN's order
CPU_BFLOAT16 = ("core",)


def _fastest_here(cell: Cell, order: tuple[str, ...]) -> str | None:
  """The first kernel of `order` that runs `cell` here; one that does not exist here is said
  once (`kernels.warn_fallback`), and the next one tried."""
  for kernel in order:
    if cell.kernel in kernels.FAMILIES[kernel]:
      if not kernels.unavailable(kernel):
        return kernel
      kernels.warn_fallback(kernel)
  return None


def float_dtypes(*trees) -> frozenset[jnp.dtype]:
  """The dtypes of the floating-point arrays in `trees` (a layer's params, carry and inputs)."""
  return frozenset(x.dtype for x in jax.tree.leaves(trees)
                   if jnp.issubdtype(x.dtype, jnp.floating))


def resolve(cell: Cell, impl: str, hidden_size: int, steps: int, platform: str | None = None,
            buffers: frozenset[jnp.dtype] = frozenset({jnp.dtype(jnp.float32)})) -> str:
  """The implementation `impl` stands for: "auto" per the table above, others checked as given.

  One step at a time (sampling) stays in XLA: a kernel call per step costs more than the step.
  `buffers` are the dtypes of the layer's float arrays (`float_dtypes`): every kernel keeps its
  parameters and state in float32 (model.compute_dtype is its products' operands), so `auto`
  sends any other (float64 under jax_enable_x64, say) to XLA, and a kernel named is refused.
  """
  platform = platform or jax.default_backend()
  float32_buffers = buffers <= {jnp.dtype(jnp.float32)}
  if impl != "auto":
    check(cell, impl, platform)
    if impl in kernels.LAYERS and not float32_buffers:
      names = ", ".join(sorted(d.name for d in buffers))
      raise UserError(f"model.impl={impl} takes float32 parameters, carries and inputs, not "
                      f"{names}: cast them to float32, or use model.impl=auto, fused or scan")
    return impl
  float32 = cell.dtype == jnp.float32
  # A kernel call's fixed cost outweighs its gain for one step (sampling) and below the sizes
  # above; and a kernel keeps float32 buffers only.
  kernel_sized = float32_buffers and steps > 1
  if platform == "cpu":
    if kernel_sized and hidden_size >= ONEDNN_MIN_HIDDEN:
      if not float32 and (core := _fastest_here(cell, CPU_BFLOAT16)):  # bfloat16 operands
        return core
      if float32:
        infer = CPU_INFER.get(cell.kernel, CPU_TRAIN)
        if _fastest_here(cell, infer) == "onednn" and kernels.openmp_shared():
          infer = infer[::-1]  # oneDNN's OpenMP team would spin on another library's terms
          kernels.warn_openmp_shared()
        passes = [_fastest_here(cell, order) for order in (infer, CPU_TRAIN)]
        if all(passes):
          return passes[0] if passes[0] == passes[1] else "/".join(passes)
    return "fused" if cell.name in CPU_FUSED else "scan"
  if (platform == "gpu" and kernel_sized and float32
      and cell.kernel in kernels.FAMILIES["cudnn"] and hidden_size >= CUDNN_MIN_HIDDEN):
    return "cudnn"
  return "fused"


def recurrence(cell: Cell, impl: str, steps: int) -> Recurrence:
  """How `cell` runs over `steps` time steps in XLA under `model.impl`; the same values and gradients.

  | impl    | `log_linear` or `parallel` cell (mingru, minlstm; rglru, mlstm) | `core` cell (rnn, gru, lstm)      | other |
  |---------|-----------------------------------------------------------------|-----------------------------------|-------|
  | "fused" | all steps at once (`_parallel`), t > 1                          | scan with a custom VJP (`_fused`) | scan  |
  | "scan"  | scan of `step`                                                  | scan of `step`                    | scan  |

  "fused" takes the input product for all steps as one matrix product before its loop: the
  fastest form on an accelerator. "scan" keeps it in the loop (flax's nn.RNN does the same):
  on XLA:CPU that is faster, because a fusion reading the precomputed gates through the
  loop's dynamic slice costs more per step than the small product itself.
  """
  if impl not in XLA_IMPLS:
    raise UserError(f"model.impl must be one of {', '.join(XLA_IMPLS)}, got {impl!r}")
  if impl == "fused" and steps > 1 and (cell.log_linear or cell.parallel) is not None:
    return functools.partial(_parallel, cell)
  if impl == "fused" and cell.core is not None:
    return functools.partial(_core_fused, cell)
  return functools.partial(_scan, cell)


def run(cell: Cell, params: Params, carry: Carry, xs: jax.Array, *, unroll: int = 1,
        impl: str = "auto") -> tuple[Carry, jax.Array]:
  """Runs `cell` over xs<float>[b, t, d] -> (final carry, ys<float>[b, t, h]).

  xs may be tokens<int>[b, t] for a standard cell whose W_ih is a table of token rows (a
  folded embedding, `model.folds_embedding`): the core gathers those rows, every other path
  reads them as one-hot inputs (`kernels.dense`). `resolve` turns `impl` into a kernel
  (`kernels.LAYERS`: one call for the whole layer) or an XLA recurrence (`recurrence`).
  `unroll` is passed to `lax.scan`.
  """
  impl = resolve(cell, impl, hidden(carry).shape[-1], xs.shape[1],
                 buffers=float_dtypes(params, carry, xs))
  if "/" in impl:  # inference / training kernels, batch-major
    return kernels.per_pass(*impl.split("/"))(cell.kernel, params, carry, xs, cell.dtype)
  if impl in kernels.LAYERS:  # batch-major, as the kernels take it
    return kernels.LAYERS[impl](cell.kernel, params, carry, xs, cell.dtype)
  xs = kernels.dense(params, xs)  # tokens (a folded embedding) as one-hot rows
  carry, ys = recurrence(cell, impl, xs.shape[1])(params, carry, jnp.swapaxes(xs, 0, 1), unroll)
  return carry, jnp.swapaxes(ys, 0, 1)


def _scan(cell: Cell, params: Params, carry: Carry, xs: jax.Array,
          unroll: int) -> tuple[Carry, jax.Array]:
  """`lax.scan` of `cell.step`, differentiated as it stands."""
  return jax.lax.scan(lambda c, x: cell.step(params, c, x), carry, xs, unroll=unroll)


def _parallel(cell: Cell, params: Params, carry: Carry, xs: jax.Array,
              unroll: int) -> tuple[Carry, jax.Array]:
  """A cell whose gates read the input alone, all steps at once: its own `parallel` form, or
  the steps `log_linear` declares composed by `linear_scan`."""
  del unroll
  gx = cell.project(params, xs)  # [t, b, g]: one product for all steps
  if cell.parallel is not None:
    return cell.parallel(params, carry, gx)
  hs = linear_scan(*cell.log_linear(gx), carry)
  return hs[-1], hs


def _core_fused(cell: Cell, params: Params, carry: Carry, xs: jax.Array,
                unroll: int) -> tuple[Carry, jax.Array]:
  """A `core` cell through `_fused`, reading the weights the cell names; one input product."""
  gx = cell.project(params, xs)  # [t, b, g]: one product for all steps
  reads = {k: params[k] for k in cell.core_reads}
  return _fused(cell.core, cell.dtype, unroll, params[cell.recurrent_weight], reads, carry, gx)


def _fused_forward(core, dtype, unroll, w_hh, core_params, carry, gx):
  """Forward scan; also returns the residuals: each step's input carry and product gh."""
  def body(c, g):
    gh = matmul(hidden(c), w_hh, dtype)
    new, y = core(core_params, c, g, gh)
    return new, (y, c, gh)
  carry, (ys, carries, ghs) = jax.lax.scan(body, carry, gx, unroll=unroll)
  return (carry, ys), (carries, ghs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(core, dtype, unroll, w_hh, core_params, carry, gx):
  """A `core` cell over gx<[t, b, g]> from `carry` -> (carry, ys<[t, b, h]>).

  Its custom VJP's backward loop does only the recurrent product; dW_hh is taken afterwards
  as one matrix product over all steps.
  """
  return _fused_forward(core, dtype, unroll, w_hh, core_params, carry, gx)[0]


def _fused_fwd(core, dtype, unroll, w_hh, core_params, carry, gx):
  out, (carries, ghs) = _fused_forward(core, dtype, unroll, w_hh, core_params, carry, gx)
  return out, (w_hh, core_params, carries, gx, ghs)


def _fused_bwd(core, dtype, unroll, residuals, cotangents):
  """Reverse scan with only d(h_prev) = d(gh) W_hh^T inside; dW_hh = H_prev^T dGH in one product."""
  w_hh, core_params, carries, gx, ghs = residuals
  d_carry, d_ys = cotangents
  w_hh_t = w_hh.T  # transposed once, not in every iteration

  def body(state, inputs):
    d_carry, d_core = state
    carry, g, gh, d_y = inputs
    _, vjp = jax.vjp(lambda p, c, g_, gh_: core(p, c, g_, gh_), core_params, carry, g, gh)
    dp, d_prev, d_g, d_gh = vjp((d_carry, d_y))
    d_prev = add_to_hidden(d_prev, matmul(d_gh, w_hh_t, dtype))
    return (d_prev, jax.tree.map(jnp.add, d_core, dp)), (d_g, d_gh)

  zero_core = jax.tree.map(jnp.zeros_like, core_params)
  (d_carry0, d_core), (d_gx, d_ghs) = jax.lax.scan(
      body, (d_carry, zero_core), (carries, gx, ghs, d_ys), reverse=True, unroll=unroll)
  h_prev = hidden(carries)  # [t, b, h]
  d_w_hh = matmul(h_prev.reshape(-1, h_prev.shape[-1]).T, d_ghs.reshape(-1, d_ghs.shape[-1]),
                  dtype)
  return d_w_hh, d_core, d_carry0, d_gx


_fused.defvjp(_fused_fwd, _fused_bwd)


def linear_scan(log_a: jax.Array, log_b: jax.Array, h0: jax.Array) -> jax.Array:
  """The states hs<float>[t, b, h] of h_t = a_t * h_{t-1} + b_t from h0<float>[b, h].

  log_a, log_b<float>[t, b, h] (b_t > 0). `jax.lax.associative_scan` composes the steps in
  O(log t) depth, each run of steps kept in log space as (log of its product of a, log of its
  input-driven sum) and composed with logaddexp: nothing overflows, a long product of small
  a_t underflows to 0 as it should, and no large cumulative sums are subtracted (the cumsum /
  logcumsumexp form of Feng et al. 2024's appendix loses precision that way on long
  sequences). h0 is added in linear space because a carried state may be negative.
  """
  def compose(earlier, later):
    (a1, b1), (a2, b2) = earlier, later
    return a1 + a2, jnp.logaddexp(a2 + b1, b2)

  log_prod_a, log_sum = jax.lax.associative_scan(compose, (log_a, log_b))
  return jnp.exp(log_prod_a) * h0 + jnp.exp(log_sum)


def reverse_valid(xs: jax.Array, lengths: jax.Array) -> jax.Array:
  """xs<[b, t, ...]> with each row's first lengths[b] steps in reverse order; padding stays put."""
  t = jnp.arange(xs.shape[1])
  source = jnp.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)  # [b, t]
  return jnp.take_along_axis(xs, source.reshape(source.shape + (1,) * (xs.ndim - 2)), axis=1)


def run_bidirectional(cell: Cell, params: dict[str, Params], carry: tuple[Carry, Carry],
                      xs: jax.Array, *, lengths: jax.Array, unroll: int = 1,
                      impl: str = "auto") -> tuple[tuple[Carry, Carry], jax.Array]:
  """Runs `cell` both ways over xs<float>[b, t, d] -> (carries, ys<float>[b, t, 2h]).

  params and carry hold one entry per direction ('fwd', 'bwd' and a pair). The backward
  direction reads each row's valid steps lengths[b] - 1, ..., 0, so it never starts on padding;
  its outputs are put back in step order, so ys[:, s] is (forward, backward) at step s. The
  forward direction's outputs at valid steps never depend on the padding after them.
  """
  carry_f, ys_f = run(cell, params["fwd"], carry[0], xs, unroll=unroll, impl=impl)
  carry_b, ys_b = run(cell, params["bwd"], carry[1], reverse_valid(xs, lengths), unroll=unroll,
                      impl=impl)
  return (carry_f, carry_b), jnp.concatenate([ys_f, reverse_valid(ys_b, lengths)], axis=-1)


def row_keys(rng: jax.Array, rows: int) -> jax.Array:
  """keys<key>[b]: `rng` itself if it already holds one key per row, else fold_in(rng, row)."""
  if rng.ndim == 1:
    return rng
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(rows))


def split_rows(rng: jax.Array, num: int, rows: int) -> list[jax.Array]:
  """`num` independent keys<key>[b], split row by row from `rng` (see `row_keys`)."""
  keys = jax.vmap(lambda k: jax.random.split(k, num))(row_keys(rng, rows))  # [b, num]
  return [keys[:, i] for i in range(num)]


def dropout(x: jax.Array, rate: float, rng: jax.Array | None, locked: bool = False) -> jax.Array:
  """Inverted dropout on x[b, ...]; the identity when `rng` is None (evaluation) or `rate` is 0.

  Each row draws its mask from its own key (`row_keys`), so a row's mask is the same however
  the batch is split across devices. `locked` (variational dropout, Gal & Ghahramani 2016):
  one mask per row over the last axis, the same at every time step of xs<float>[b, t, d].
  """
  if rng is None or rate == 0.0:
    return x
  mask_shape = x.shape[-1:] if locked else x.shape[1:]
  keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, mask_shape))(
      row_keys(rng, x.shape[0]))
  if locked:
    keep = keep.reshape(keep.shape[:1] + (1,) * (x.ndim - 2) + keep.shape[1:])
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def drop_weight(cell: Cell, params: Params, rate: float, rng: jax.Array | None) -> Params:
  """DropConnect (Wan et al. 2013; AWD-LSTM's weight drop) on the layer's recurrent matrix.

  params[cell.recurrent_weight] has entries zeroed with probability `rate` (the rest scaled by
  1 / (1 - rate)) by one mask from the single key `rng`: the same for every time step and
  every lane, on every device. It happens before the recurrence, so every `impl` runs it.
  The identity when `rng` is None (evaluation) or `rate` is 0. Bidirectional params
  ({'fwd', 'bwd'}) draw one mask per direction.
  """
  if rng is None or rate == 0.0:
    return params
  if set(params) == {"bwd", "fwd"}:
    return {d: drop_weight(cell, params[d], rate, jax.random.fold_in(rng, i))
            for i, d in enumerate(("bwd", "fwd"))}
  w = params[cell.recurrent_weight]
  keep = jax.random.bernoulli(rng, 1.0 - rate, w.shape)
  return {**params, cell.recurrent_weight: jnp.where(keep, w / (1.0 - rate), 0.0)}


def run_stack(cell: Cell, layer_params: Sequence[Params], carries: Sequence[Carry], xs: jax.Array,
              *, dropout_rate: float = 0.0, rng: jax.Array | None = None, unroll: int = 1,
              impl: str = "auto", bidirectional: bool = False, lengths: jax.Array | None = None,
              locked: bool = False, weight_drop: float = 0.0,
              weight_rng: jax.Array | None = None) -> tuple[list[Carry], jax.Array]:
  """Runs stacked layers over xs<float>[b, t, d] (or tokens<int>[b, t], see `run`) -> (carries,
  ys<float>[b, t, h]).

  Dropout is applied between layers (to the input of layers 2..n; `locked`: one mask per lane
  for all steps) when `rng` (one key, or keys<key>[b]) is given; `weight_drop` on each layer's
  recurrent matrix (`drop_weight`) when `weight_rng` (one key, shared by the batch) is given.
  `bidirectional` layers (`run_bidirectional`: params and carries per direction,
  ys<float>[b, t, 2h]) read each row's first lengths<int>[b] steps backwards (all t steps when
  lengths is None).
  """
  run_layer = run
  if bidirectional:
    lengths = jnp.full(xs.shape[:1], xs.shape[1]) if lengths is None else lengths
    run_layer = functools.partial(run_bidirectional, lengths=lengths)
  n = len(layer_params)
  keys = split_rows(rng, n, xs.shape[0]) if rng is not None else [None] * n
  new_carries = []
  for i, (params, carry) in enumerate(zip(layer_params, carries)):
    if i > 0:
      xs = dropout(xs, dropout_rate, keys[i], locked)
    w_key = None if weight_rng is None else jax.random.fold_in(weight_rng, i)
    params = drop_weight(cell, params, weight_drop, w_key)
    carry, xs = run_layer(cell, params, carry, xs, unroll=unroll, impl=impl)
    new_carries.append(carry)
  return new_carries, xs
