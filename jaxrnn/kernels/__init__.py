"""Whole-layer recurrence kernels outside XLA: jaxrnn's own core and oneDNN on a CPU, cuDNN
on a GPU.

A kernel runs one layer of a standard cell over all time steps in one call, with the carried
state in and out: `LAYERS[impl](family, params, carry, xs<float>[b, t, d], dtype) -> (carry,
ys<float>[b, t, h])`, batch-major, differentiable (xs may also be tokens<int>[b, t], the
first layer's input under a folded embedding: one-hot rows of W_ih, see `dense`), its
products with `dtype` operands (`DTYPES[impl]`: float32, and bfloat16 in the core) and
float32 sums. `family` is a cell's
`kernel` field ("lstm", "gru", "rnn_tanh", "rnn_relu"), which promises PyTorch's equations and
jaxrnn's parameter names (`w_ih`, `w_hh`, `b`, and the GRU's `b_hn`); here they are arranged
into each kernel's layout.

  core    lstm, gru,  rnn_core.cc (beside this file) through `jax.ffi`: the sequential part of
          rnn         a layer (per step the product with W_hh and the cell's pointwise) in C++,
                      with everything time-parallel (x W_ih + b; dW_ih, dW_hh, db, dx) as single
                      large products in XLA, under one custom VJP. Built by `pip install` where
                      a C++20 compiler is at hand (x86-64 with AVX-512 or AVX2; a third build
                      takes bfloat16 products with AVX512-BF16's dot product).
  onednn  lstm, gru   onednn_rnn.cc (beside this file) through `jax.ffi`: oneDNN's vanilla_lstm
                      and lbr_gru primitives (forward_inference when not differentiated;
                      forward_training plus backward under a custom VJP). Built by `pip install`
                      where a C++ compiler and Intel's onednn wheels are at hand (x86-64 Linux).
  cudnn   lstm        `jax.experimental.rnn.lstm`, cuDNN's LSTM with its own VJP (GPU only).
  pallas  lstm, gru,  pallas_rnn.py (beside this file): the whole time loop in one Pallas
          rnn         (Triton) kernel per layer and pass, under one custom VJP (GPU only; the
                      tests run it on a CPU in Pallas' interpreter).

Each has a pure-JAX twin, the cell's own scan (`layers.recurrence`), which the tests compare
against, and `layers.resolve` falls back to it where a kernel cannot run.
"""

import contextlib
import ctypes
import functools
import importlib.metadata
import importlib.machinery
import os
import pathlib
import sys
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn.cells import Carry, Params, matmul
from jaxrnn.kernels import pallas_rnn

FAMILIES = {"core": ("lstm", "gru", "rnn_tanh", "rnn_relu"), "onednn": ("lstm", "gru"),
            "cudnn": ("lstm",), "pallas": ("lstm", "gru", "rnn_tanh", "rnn_relu")}
# The products' operand types (model.compute_dtype) each kernel runs; accumulation is float32.
DTYPES = {"core": (jnp.float32, jnp.bfloat16), "onednn": (jnp.float32,),
          "cudnn": (jnp.float32,), "pallas": (jnp.float32, jnp.bfloat16)}
# The JAX platform each kernel runs on: the CPU kernels are XLA:CPU custom calls, cuDNN a GPU
# library; `layers.check` refuses any other pairing before anything is built.
PLATFORMS = {"core": "cpu", "onednn": "cpu", "cudnn": "gpu", "pallas": "gpu"}
_SUFFIX = {jnp.dtype(jnp.float32): "", jnp.dtype(jnp.bfloat16): "_bf16"}  # rnn_core.cc's handlers
_CELL_ID = {"lstm": 0, "gru": 1}  # `Cell` in onednn_rnn.cc
_HANDLERS = [f"jaxrnn_{family}_{p}" for family in _CELL_ID for p in ("infer", "train", "grad")]
_PASSES = ("infer", "train", "grad")


# ----------------------------------------------------------------------------------- loading

def _extension(name: str = "_onednn_rnn") -> pathlib.Path | None:
  """The built shared object `name` next to this module, if `pip install` built it."""
  here = pathlib.Path(__file__).parent
  for suffix in importlib.machinery.EXTENSION_SUFFIXES:
    if (path := here / f"{name}{suffix}").exists():
      return path
  return None


def _libdnnl() -> pathlib.Path | None:
  """libdnnl.so.3 from Intel's onednn-cpu-gomp wheel (installed under the environment's lib/)."""
  try:
    files = importlib.metadata.distribution("onednn-cpu-gomp").files or []
  except importlib.metadata.PackageNotFoundError:
    return None
  found = [f for f in files if f.name == "libdnnl.so.3"]
  return pathlib.Path(found[0].locate()) if found else None


# GNU OpenMP's threads spin this many times after a parallel region before they sleep. Its
# default, 300,000, holds a core for milliseconds after each oneDNN call, which the XLA ops
# that follow then lack; 1,000 (libgomp's own choice when threads outnumber cores) still
# bridges the gaps between a layer's time steps. A 2 x 256 LSTM training step on the 2-core
# EPYC: 96-99 ms against 100-105 ms (10,000: 100-103 ms). libgomp reads it once, when it
# loads with libdnnl below.
_GOMP_SPINCOUNT = "1000"


@contextlib.contextmanager
def _gomp_spincount() -> Iterator[None]:
  """GOMP_SPINCOUNT while libgomp starts, unless the user chose how OpenMP threads wait; it is
  not left in the environment of processes started later."""
  if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
    yield
    return
  os.environ["GOMP_SPINCOUNT"] = _GOMP_SPINCOUNT
  try:
    yield
  finally:
    del os.environ["GOMP_SPINCOUNT"]


def _gomp_loaded() -> bool:
  """Whether a GNU OpenMP runtime is in this process already (e.g. torch's, imported first)."""
  try:
    with open("/proc/self/maps") as f:
      return any("libgomp" in line for line in f)
  except OSError:
    return False


_GOMP_LOADED_BEFORE: list[bool] = []  # set when oneDNN loads


def openmp_shared() -> bool:
  """True when oneDNN's OpenMP runtime was already loaded, at its own spin count, by another
  library (torch imported before jaxrnn's first oneDNN layer): oneDNN's threads then spin
  300,000 times after each parallel region and slowed a run beside a busy process several
  fold (issue 26), so `layers.resolve` runs the core instead."""
  return bool(_GOMP_LOADED_BEFORE) and _GOMP_LOADED_BEFORE[0] and not (
      "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ)


@functools.cache
def _load_onednn() -> tuple[ctypes.CDLL | None, str]:
  """(the loaded extension with its FFI targets registered, "") or (None, why not)."""
  extension, libdnnl = _extension(), _libdnnl()
  if extension is None:
    return None, ("jaxrnn's oneDNN extension is not built (`pip install -e .` builds it where "
                  "a C++ compiler and the onednn wheels are available)")
  if libdnnl is None:
    return None, "the onednn-cpu-gomp package (libdnnl.so.3) is not installed"
  _GOMP_LOADED_BEFORE.append(_gomp_loaded())
  try:
    with _gomp_spincount():
      # Global, so that the extension (not linked against libdnnl: it is built without the
      # library at hand) finds oneDNN's symbols when it is loaded next.
      ctypes.CDLL(str(libdnnl), mode=ctypes.RTLD_GLOBAL)
      lib = ctypes.CDLL(str(extension))
  except OSError as e:
    return None, f"loading oneDNN failed: {e}"
  if why := _register([getattr(lib, name) for name in _HANDLERS]):
    return None, why
  lib.jaxrnn_workspace_bytes.restype = ctypes.c_int64
  lib.jaxrnn_workspace_bytes.argtypes = [ctypes.c_int] + [ctypes.c_int64] * 4
  return lib, ""


def _cpu_flags() -> set[str]:
  """The instruction-set flags of this CPU (/proc/cpuinfo; empty elsewhere)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


def _core_isas() -> list[str]:
  """The builds of rnn_core.cc this CPU can run, fastest first: avx512bf16 (AVX-512 with its
  bfloat16 dot product), avx512 (16 floats a vector), avx2 (8)."""
  flags = _cpu_flags()
  isas = []
  if {"avx512f", "avx512_bf16"} <= flags:
    isas.append("avx512bf16")
  if "avx512f" in flags:
    isas.append("avx512")
  if {"avx2", "fma"} <= flags:
    isas.append("avx2")
  return isas


@functools.cache
def _load_core() -> tuple[ctypes.CDLL | None, str]:
  """(the loaded core with its FFI targets registered, "") or (None, why not)."""
  isas = _core_isas()
  if not isas:
    return None, "jaxrnn's core needs an x86-64 CPU with AVX-512 or AVX2 and FMA"
  built = [e for e in map(_extension, (f"_rnn_core_{isa}" for isa in isas)) if e is not None]
  if not built:
    return None, (f"jaxrnn's core ({isas[0]}) is not built (`pip install -e .` builds it where "
                  "a C++20 compiler is available)")
  extension = built[0]
  try:
    lib = ctypes.CDLL(str(extension))
    handlers = [getattr(lib, f"jaxrnn_core_{family}_{p}{suffix}") for family in FAMILIES["core"]
                for p in _PASSES for suffix in _SUFFIX.values()]
  except OSError as e:
    return None, f"loading jaxrnn's core failed: {e}"
  except AttributeError as e:  # built from an older rnn_core.cc
    return None, f"jaxrnn's core is out of date ({e}): rebuild it with `pip install -e .`"
  if why := _register(handlers):
    return None, why
  return lib, ""


def _register(handlers: list[Any]) -> str:
  """Registers the FFI handlers with XLA: "", or why not (a jaxlib whose FFI the extension was
  not built against refuses them: a jax upgrade falls back to XLA with a note, not a crash)."""
  try:
    for handler in handlers:
      jax.ffi.register_ffi_target(handler.__name__, jax.ffi.pycapsule(handler), platform="cpu")
  except Exception as e:  # XLA's registry raises its own types
    return (f"XLA refused its FFI handlers ({type(e).__name__}: {str(e)[:200]}): rebuild it for "
            "this jaxlib with `pip install -e .`")
  return ""


def _check_dtype(impl: str, dtype: Any) -> None:
  if jnp.dtype(dtype) not in DTYPES[impl]:
    raise ValueError(f"the {impl} kernel takes {', '.join(jnp.dtype(d).name for d in DTYPES[impl])}"
                     f" operands, not {jnp.dtype(dtype).name}")


def unavailable(impl: str) -> str:
  """Why kernel `impl` cannot run on this machine ("" when it can)."""
  if impl == "core":
    return _load_core()[1]
  if impl == "onednn":
    return _load_onednn()[1]
  if impl in ("cudnn", "pallas"):
    return "" if jax.default_backend() == "gpu" else (
        f"{'cuDNN' if impl == 'cudnn' else 'the Pallas kernel'} needs a GPU (this platform: "
        f"{jax.default_backend()})")
  raise ValueError(f"not a kernel: {impl!r}")


@functools.cache
def warn_openmp_shared() -> None:
  """Says once per process why `auto` evaluates in the core although oneDNN is built."""
  print("note: another library loaded the OpenMP runtime before jaxrnn (torch imported first?), "
        "so oneDNN's threads would spin at its defaults: model.impl=auto evaluates in jaxrnn's "
        "core instead (set GOMP_SPINCOUNT=1000 before starting Python to keep oneDNN)",
        file=sys.stderr)


@functools.cache
def warn_fallback(impl: str) -> None:
  """Says once per process, on stderr, that `auto` could not use kernel `impl`, and why."""
  print(f"note: model.impl=auto runs the next fastest path, not {impl}: {unavailable(impl)}",
        file=sys.stderr)


def _tokens(xs: jax.Array) -> bool:
  return jnp.issubdtype(xs.dtype, jnp.integer)


def dense(params: Params, xs: jax.Array) -> jax.Array:
  """A layer's input as floats: tokens<int>[b, t] one-hot over W_ih's rows (a folded embedding,
  `model.folds_embedding`, makes W_ih a table of token rows); xs<float>[b, t, d] as it is.
  The core takes the tokens themselves and gathers their rows (`_input_product`)."""
  if _tokens(xs):
    return jax.nn.one_hot(xs, params["w_ih"].shape[0], dtype=jnp.float32)
  return xs


# ------------------------------------------------------------------------------------ oneDNN

def _onednn_weights(family: str, params: Params) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(w_layer<d, g>, w_iter<h, g>, bias<gb>) in oneDNN's gate order (ldigo / ldgo layouts).

  The LSTM's gates (i, f, g, o) are oneDNN's; the GRU's (r, z, n) become lbr_gru's (u=z, r, n)
  and its bias gets a fourth block, b_hn, the bias inside r * (W_hn h + b_hn).
  """
  if family == "lstm":
    return params["w_ih"], params["w_hh"], params["b"]

  def zrn(w):
    r, z, n = jnp.split(w, 3, axis=-1)
    return jnp.concatenate([z, r, n], axis=-1)

  return zrn(params["w_ih"]), zrn(params["w_hh"]), jnp.concatenate([zrn(params["b"]),
                                                                      params["b_hn"]])


def _states(family: str, carry: Carry) -> tuple[jax.Array, ...]:
  return tuple(carry) if family == "lstm" else (carry,)


def _carry(family: str, states) -> Carry:
  return tuple(states) if family == "lstm" else states[0]


def _call(name: str, outs: list[jax.ShapeDtypeStruct], *args: jax.Array) -> list[jax.Array]:
  return jax.ffi.ffi_call(name, outs, vmap_method="sequential")(*args)


def _forward(family, train, weights, carry, xs):
  """-> ((carry, ys<[b, t, h]>), workspace<uint8>[n] or None) from one oneDNN forward call."""
  states = _states(family, carry)
  b, t, d = xs.shape
  h = states[0].shape[-1]
  outs = [jax.ShapeDtypeStruct((b, t, h), jnp.float32)] + [
      jax.ShapeDtypeStruct((b, h), jnp.float32)] * len(states)
  if train:
    size = _load_onednn()[0].jaxrnn_workspace_bytes(_CELL_ID[family], t, b, d, h)
    if size <= 0:
      raise RuntimeError(f"oneDNN could not plan a {family} layer of shape {(t, b, d, h)}")
    outs.append(jax.ShapeDtypeStruct((size,), jnp.uint8))
  res = _call(f"jaxrnn_{family}_{'train' if train else 'infer'}", outs, xs, *states, *weights)
  ys, new_states = res[0], res[1:1 + len(states)]
  return (_carry(family, new_states), ys), (res[-1] if train else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _onednn(family, weights, carry, xs):
  """One oneDNN layer: forward_inference when not differentiated."""
  return _forward(family, False, weights, carry, xs)[0]


def _onednn_fwd(family, weights, carry, xs):
  out, workspace = _forward(family, True, weights, carry, xs)
  return out, (weights, carry, xs, out, workspace)


def _onednn_bwd(family, residuals, cotangents):
  weights, carry, xs, (new_carry, ys), workspace = residuals
  d_carry, d_ys = cotangents
  states = _states(family, carry)
  outs = [jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (xs, *states, *weights)]
  grads = _call(f"jaxrnn_{family}_grad", outs, xs, *states, *weights, ys,
                *_states(family, new_carry), workspace, d_ys, *_states(family, d_carry))
  n = len(states)
  return tuple(grads[1 + n:]), _carry(family, grads[1:1 + n]), grads[0]


_onednn.defvjp(_onednn_fwd, _onednn_bwd)


def onednn_layer(family: str, params: Params, carry: Carry, xs: jax.Array,
                 dtype: Any = jnp.float32) -> tuple[Carry, jax.Array]:
  """A `family` layer over xs<float32>[b, t, d] in oneDNN -> (carry, ys<float32>[b, t, h]).
  float32 only (`DTYPES`)."""
  _check_dtype("onednn", dtype)
  if why := unavailable("onednn"):
    raise RuntimeError(f"model.impl=onednn cannot run: {why}")
  return _onednn(family, _onednn_weights(family, params), carry, dense(params, xs))


# ------------------------------------------------------------------------------------- cuDNN

def cudnn_weights(params: Params) -> jax.Array:
  """The flat weight vector of `jax.experimental.rnn.lstm` for one layer, one direction.

  Its layout (that module's docstring): W_ih<4h, d>, W_hh<4h, h>, b_ih<4h>, b_hh<4h>, gates
  (i, f, g, o) as PyTorch. jaxrnn keeps one bias, so b_hh is zero.
  """
  b = params["b"]
  return jnp.concatenate([params["w_ih"].T.ravel(), params["w_hh"].T.ravel(), b,
                          jnp.zeros_like(b)])


def cudnn_layer(family: str, params: Params, carry: Carry, xs: jax.Array,
                dtype: Any = jnp.float32) -> tuple[Carry, jax.Array]:
  """An LSTM layer over xs<float32>[b, t, d] in cuDNN -> (carry, ys<float32>[b, t, h]).
  float32 only (`DTYPES`)."""
  from jax.experimental import rnn  # imported here: it registers GPU lowerings on first use
  _check_dtype("cudnn", dtype)
  del family  # "lstm", the one cuDNN binding JAX has
  h, c = carry
  xs = dense(params, xs)
  b, t, d = xs.shape
  if t == 0:  # no step: cuDNN is not asked to run an empty sequence
    return carry, jnp.zeros((b, 0, h.shape[-1]), jnp.float32)
  ys, h_n, c_n = rnn.lstm(xs, h[None], c[None], cudnn_weights(params),
                          jnp.full((b,), t, jnp.int32), input_size=d, hidden_size=h.shape[-1],
                          num_layers=1, dropout=0.0, bidirectional=False)
  return (h_n[0], c_n[0]), ys


# ---------------------------------------------------------------------------- jaxrnn's core

_CORE_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
_CORE_AUX = {"lstm": 5, "gru": 4, "rnn_tanh": 0, "rnn_relu": 0}  # the gates rnn_core.cc keeps


def _rounded(x: jax.Array, dtype: Any) -> jax.Array:
  """x<float32> as a product's operand of `dtype` sees it (rounded to bfloat16), in float32."""
  return x if dtype == jnp.float32 else x.astype(dtype).astype(jnp.float32)


def _input_product(w_ih: jax.Array, xs: jax.Array, dtype: Any) -> jax.Array:
  """xs W_ih<[b, t, g]>: one product for all steps; for tokens<int>[b, t] the rows of W_ih they
  pick, which is the one-hot product's value to the bit, at a memory copy's cost (a product
  with 65 one-hot columns runs far below the CPU's peak: 11.6 against 1.7 ms at [64 x 128] x
  [65, 1536] on the 2-core EPYC)."""
  if _tokens(xs):
    return jnp.take(_rounded(w_ih, dtype), xs, axis=0, mode="clip")  # tokens are < v
  return matmul(xs, w_ih, dtype)


def _core_forward(family, dtype, train, params, carry, xs):
  """-> ((carry, ys<[b, t, h]>), aux or None): gx = xs W_ih + b in XLA, then the core's loop;
  every product with `dtype` operands (the loop's per-step ones too) and float32 sums."""
  states = _states(family, carry)
  b, t = xs.shape[:2]
  h = states[0].shape[-1]
  gx = _input_product(params["w_ih"], xs, dtype) + params["b"]  # [b, t, g]
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  outs = [f32(b, t, h)] + [f32(b, h)] * len(states)
  if train:
    floats = _load_core()[0].jaxrnn_core_vector_floats()
    padded = -(-h // floats) * floats
    outs.append(f32(t * b * padded * _CORE_AUX[family]))
  extra = (params["b_hn"],) if family == "gru" else ()
  res = _call(f"jaxrnn_core_{family}_{'train' if train else 'infer'}{_SUFFIX[dtype]}", outs, gx,
              params["w_hh"], *extra, *states)
  return (_carry(family, res[1:1 + len(states)]), res[0]), (res[-1] if train else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _core(family, dtype, params, carry, xs):
  """One layer in the core: the loop without keeping its gates when not differentiated."""
  return _core_forward(family, dtype, False, params, carry, xs)[0]


def _core_fwd(family, dtype, params, carry, xs):
  (new_carry, ys), aux = _core_forward(family, dtype, True, params, carry, xs)
  return (new_carry, ys), (params, carry, xs, ys, aux)


def _core_bwd(family, dtype, residuals, cotangents):
  """The core's backward loop gives the gates' gradients dG<[b, t, g]>; every weight gradient
  and dx is then one product over all b * t rows: dW_ih = X^T dG, dW_hh = H_prev^T dG_h,
  db = sum dG, dx = dG W_ih^T (the GRU's dG_h differs from dG in its n block: r * dn). For
  tokens, dW_ih sums dG's rows per token (the one-hot product's value, in another order) and
  the tokens have no gradient."""
  params, carry, xs, ys, aux = residuals
  d_carry, d_ys = cotangents
  states = _states(family, carry)
  b, t = xs.shape[:2]
  h, g = ys.shape[-1], params["w_hh"].shape[-1]
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  two = family == "gru"
  outs = [f32(b, t, g)] * (2 if two else 1) + [f32(b, h)] * len(states)
  res = _call(f"jaxrnn_core_{family}_grad{_SUFFIX[dtype]}", outs, params["w_hh"], *states, ys,
              aux, d_ys, *_states(family, d_carry))
  d_gx = res[0].reshape(b * t, g)
  d_gh = res[1].reshape(b * t, g) if two else d_gx
  d_states = res[2 if two else 1:]
  rows = lambda x: x.reshape(b * t, x.shape[-1])
  # Each step's input state [b, t, h]; none at t = 0 (the concatenation alone holds h0).
  h_prev = jnp.concatenate([states[0][:, None], ys[:, :-1]], axis=1)[:, :t]
  d = params["w_ih"].shape[0]  # the input's width; for tokens, the vocabulary
  if _tokens(xs):
    d_w_ih = jax.ops.segment_sum(_rounded(d_gx, dtype), xs.reshape(-1), num_segments=d)
    d_xs = np.zeros(xs.shape, jax.dtypes.float0)
  else:
    d_w_ih = matmul(rows(xs).T, d_gx, dtype)  # contract the b * t rows
    d_xs = matmul(d_gx, params["w_ih"].T, dtype).reshape(b, t, d)
  grads = {"w_ih": d_w_ih, "w_hh": matmul(rows(h_prev).T, d_gh, dtype), "b": d_gx.sum(0)}
  if two:
    grads["b_hn"] = d_gh[:, 2 * h:].sum(0)
  return grads, _carry(family, d_states), d_xs


_core.defvjp(_core_fwd, _core_bwd)


def core_layer(family: str, params: Params, carry: Carry, xs: jax.Array,
               dtype: Any = jnp.float32) -> tuple[Carry, jax.Array]:
  """A `family` layer over xs<float32>[b, t, d] (or tokens<int>[b, t], see `dense`) in jaxrnn's
  core -> (carry, ys<float32>[b, t, h]), its products with `dtype` operands (float32 or
  bfloat16) and float32 sums."""
  if why := unavailable("core"):
    raise RuntimeError(f"model.impl=core cannot run: {why}")
  _check_dtype("core", dtype)
  return _core(family, jnp.dtype(dtype), params, carry, xs)


# ----------------------------------------------------------------------------------- Pallas

def pallas_layer(family: str, params: Params, carry: Carry, xs: jax.Array,
                 dtype: Any = jnp.float32) -> tuple[Carry, jax.Array]:
  """A `family` layer over xs<float32>[b, t, d] (or tokens, see `dense`) in the Pallas kernel
  (`pallas_rnn.pallas_layer`: compiled on a GPU, interpreted elsewhere) -> (carry, ys)."""
  _check_dtype("pallas", dtype)
  return pallas_rnn.pallas_layer(family, params, carry, dense(params, xs), jnp.dtype(dtype))


Layer = Callable[[str, Params, Carry, jax.Array, Any], tuple[Carry, jax.Array]]
LAYERS: dict[str, Layer] = {"core": core_layer, "onednn": onednn_layer, "cudnn": cudnn_layer,
                            "pallas": pallas_layer}


def per_pass(infer: str, train: str) -> Layer:
  """A layer that runs kernel `infer` where it is not differentiated (evaluation, a sampling
  prefix) and kernel `train` where it is: its VJP is `train`'s. The two agree to 1e-5."""
  @functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
  def layer(family, params, carry, xs, dtype=jnp.float32):
    return LAYERS[infer](family, params, carry, xs, dtype)

  def layer_fwd(family, params, carry, xs, dtype):
    out, vjp = jax.vjp(functools.partial(LAYERS[train], family, dtype=dtype), params, carry, xs)
    return out, vjp

  def layer_bwd(family, dtype, vjp, cotangents):
    del family, dtype
    return vjp(cotangents)

  layer.defvjp(layer_fwd, layer_bwd)
  return layer
