"""Whole-layer recurrence kernels outside XLA: oneDNN on a CPU, cuDNN on a GPU.

A kernel runs one layer of a standard cell over all time steps in one call, with the carried
state in and out: `LAYERS[impl](family, params, carry, xs<float>[b, t, d]) -> (carry,
ys<float>[b, t, h])`, batch-major as both libraries take it, float32, differentiable.
`family` is a cell's `kernel` field ("lstm" or "gru"), which promises PyTorch's equations and
jaxrnn's parameter names (`w_ih`, `w_hh`, `b`, and the GRU's `b_hn`); here they are arranged
into each library's layout.

  onednn  lstm, gru  onednn_rnn.cc (beside this file) through `jax.ffi`: oneDNN's vanilla_lstm
                     and lbr_gru primitives (forward_inference when not differentiated;
                     forward_training plus backward under a custom VJP). Built by `pip install`
                     where a C++ compiler and Intel's onednn wheels are at hand (x86-64 Linux).
  cudnn   lstm       `jax.experimental.rnn.lstm`, cuDNN's LSTM with its own VJP (GPU only).

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
from typing import Callable, Iterator

import jax
import jax.numpy as jnp

from jaxrnn.cells import Carry, Params

FAMILIES = {"onednn": ("lstm", "gru"), "cudnn": ("lstm",)}
_CELL_ID = {"lstm": 0, "gru": 1}  # `Cell` in onednn_rnn.cc
_HANDLERS = [f"jaxrnn_{family}_{p}" for family in _CELL_ID for p in ("infer", "train", "grad")]


# ----------------------------------------------------------------------------------- loading

def _extension() -> pathlib.Path | None:
  """The built `_onednn_rnn` shared object next to this module, if `pip install` built it."""
  here = pathlib.Path(__file__).parent
  for suffix in importlib.machinery.EXTENSION_SUFFIXES:
    if (path := here / f"_onednn_rnn{suffix}").exists():
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


@functools.cache
def _load_onednn() -> tuple[ctypes.CDLL | None, str]:
  """(the loaded extension with its FFI targets registered, "") or (None, why not)."""
  extension, libdnnl = _extension(), _libdnnl()
  if extension is None:
    return None, ("jaxrnn's oneDNN extension is not built (`pip install -e .` builds it where "
                  "a C++ compiler and the onednn wheels are available)")
  if libdnnl is None:
    return None, "the onednn-cpu-gomp package (libdnnl.so.3) is not installed"
  try:
    with _gomp_spincount():
      # Global, so that the extension (not linked against libdnnl: it is built without the
      # library at hand) finds oneDNN's symbols when it is loaded next.
      ctypes.CDLL(str(libdnnl), mode=ctypes.RTLD_GLOBAL)
      lib = ctypes.CDLL(str(extension))
  except OSError as e:
    return None, f"loading oneDNN failed: {e}"
  for name in _HANDLERS:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
  lib.jaxrnn_workspace_bytes.restype = ctypes.c_int64
  lib.jaxrnn_workspace_bytes.argtypes = [ctypes.c_int] + [ctypes.c_int64] * 4
  return lib, ""


def unavailable(impl: str) -> str:
  """Why kernel `impl` cannot run on this machine ("" when it can)."""
  if impl == "onednn":
    return _load_onednn()[1]
  if impl == "cudnn":
    return "" if jax.default_backend() == "gpu" else (
        f"cuDNN needs a GPU (this platform: {jax.default_backend()})")
  raise ValueError(f"not a kernel: {impl!r}")


@functools.cache
def warn_fallback(impl: str) -> None:
  """Says once per process, on stderr, that `auto` could not use kernel `impl`, and why."""
  print(f"note: model.impl=auto runs the XLA path, not {impl}: {unavailable(impl)}",
        file=sys.stderr)


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


def onednn_layer(family: str, params: Params, carry: Carry,
                 xs: jax.Array) -> tuple[Carry, jax.Array]:
  """A `family` layer over xs<float32>[b, t, d] in oneDNN -> (carry, ys<float32>[b, t, h])."""
  if why := unavailable("onednn"):
    raise RuntimeError(f"model.impl=onednn cannot run: {why}")
  return _onednn(family, _onednn_weights(family, params), carry, xs)


# ------------------------------------------------------------------------------------- cuDNN

def cudnn_weights(params: Params) -> jax.Array:
  """The flat weight vector of `jax.experimental.rnn.lstm` for one layer, one direction.

  Its layout (that module's docstring): W_ih<4h, d>, W_hh<4h, h>, b_ih<4h>, b_hh<4h>, gates
  (i, f, g, o) as PyTorch. jaxrnn keeps one bias, so b_hh is zero.
  """
  b = params["b"]
  return jnp.concatenate([params["w_ih"].T.ravel(), params["w_hh"].T.ravel(), b,
                          jnp.zeros_like(b)])


def cudnn_layer(family: str, params: Params, carry: Carry,
                xs: jax.Array) -> tuple[Carry, jax.Array]:
  """An LSTM layer over xs<float32>[b, t, d] in cuDNN -> (carry, ys<float32>[b, t, h])."""
  from jax.experimental import rnn  # imported here: it registers GPU lowerings on first use
  del family  # "lstm", the one cuDNN binding JAX has
  h, c = carry
  b, t, d = xs.shape
  ys, h_n, c_n = rnn.lstm(xs, h[None], c[None], cudnn_weights(params),
                          jnp.full((b,), t, jnp.int32), input_size=d, hidden_size=h.shape[-1],
                          num_layers=1, dropout=0.0, bidirectional=False)
  return (h_n[0], c_n[0]), ys


Layer = Callable[[str, Params, Carry, jax.Array], tuple[Carry, jax.Array]]
LAYERS: dict[str, Layer] = {"onednn": onednn_layer, "cudnn": cudnn_layer}
