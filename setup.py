"""Builds jaxrnn's optional CPU kernels; everything else about the package is in pyproject.toml.

`jaxrnn/kernels/rnn_core.cc` (jaxrnn's own recurrence core) needs only a C++20 compiler and
the XLA FFI headers that ship with jaxlib (`jax.ffi.include_dir()`), a build requirement; it
is built three times, for AVX-512 with AVX512-BF16, for AVX-512 and for AVX2 + FMA, and
jaxrnn loads the fastest its CPU runs.
`jaxrnn/kernels/onednn_rnn.cc` also needs oneDNN's headers from Intel's onednn-devel-cpu-gomp
wheel, another build requirement; it is not linked against libdnnl: `jaxrnn/kernels/__init__.py`
loads libdnnl.so.3 from the onednn-cpu-gomp wheel at run time. Where anything is missing (no
C++ compiler, not x86-64 Linux), the install still succeeds without that kernel and jaxrnn
runs the next-fastest path it has.
"""

import importlib.metadata
import importlib.util
import pathlib
import platform

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _ffi_include() -> str | None:
  """The XLA FFI headers of the jaxlib installed for the build, if any."""
  jaxlib = importlib.util.find_spec("jaxlib")
  if jaxlib is None:
    return None
  return str(pathlib.Path(list(jaxlib.submodule_search_locations)[0]) / "include")


def _include_dirs() -> list[str] | None:
  """[XLA FFI headers, oneDNN headers], or None if either is not installed for the build."""
  jaxlib = importlib.util.find_spec("jaxlib")
  try:
    devel = importlib.metadata.distribution("onednn-devel-cpu-gomp")
  except importlib.metadata.PackageNotFoundError:
    return None
  header = [f for f in devel.files or [] if f.as_posix().endswith("include/oneapi/dnnl/dnnl.hpp")]
  if jaxlib is None or not header:
    return None
  ffi = pathlib.Path(list(jaxlib.submodule_search_locations)[0]) / "include"
  return [str(ffi), str(pathlib.Path(header[0].locate()).parents[2])]


class BuildKernels(build_ext):
  """Builds the kernel where it can; says so, and goes on without it, where it cannot."""

  def build_extensions(self) -> None:
    built = []
    for ext in self.extensions:
      try:
        self.build_extension(ext)
        built.append(ext)
      except Exception as e:  # the compiler's own output is above; one line on what it means
        self.warn(f"jaxrnn: {ext.name} was not built ({e}); jaxrnn will run without it")
    self.extensions[:] = built  # nothing to copy or install for what failed


# rnn_core.cc per instruction set: (flags, floats per vector). -ffp-contract=fast makes a * b + c
# one fused multiply-add, as the kernel's products and polynomials are written to be;
# -fno-wrapv undoes the -fwrapv of Python's own CFLAGS, which setuptools passes first: with
# signed overflow defined, GCC compiled the backward loop's tiles 20% slower (a 2 x 384 LSTM
# layer, batch 64 x 128, on the 2-core EPYC: 67 against 54 ms);
# avx512bf16 takes bfloat16 products with AVX512-BF16's dot product (the others with FMAs).
# Each build names its whole instruction set (-march, last, wins over a user's CFLAGS such as
# -march=native) and turns off what it must not use, so that no build holds an instruction its
# loader (`kernels._core_isas`) does not check the CPU for.
_BASE = ["-march=x86-64-v2", "-mtune=generic", "-mavx2", "-mfma"]  # what every build may use
CORE_BUILDS = {
    "avx512bf16": ([*_BASE, "-mavx512f", "-mavx512bf16", "-mno-amx-tile", "-DJAXRNN_BF16_DOT"], 16),
    "avx512": ([*_BASE, "-mavx512f", "-mno-avx512bf16", "-mno-amx-tile"], 16),
    "avx2": ([*_BASE, "-mno-avx512f"], 8)}
x86_64 = platform.machine() in ("x86_64", "AMD64")
ffi_include = _ffi_include()
extensions = [
    Extension(f"jaxrnn.kernels._rnn_core_{isa}", ["jaxrnn/kernels/rnn_core.cc"],
              include_dirs=[ffi_include], language="c++",
              extra_compile_args=["-std=c++20", "-O3", "-fno-wrapv", "-ffp-contract=fast", *flags,
                                  f"-DJAXRNN_VECTOR_FLOATS={floats}"])
    for isa, (flags, floats) in CORE_BUILDS.items()] if ffi_include and x86_64 else []
include_dirs = _include_dirs()
if include_dirs:
  extensions.append(Extension("jaxrnn.kernels._onednn_rnn", ["jaxrnn/kernels/onednn_rnn.cc"],
                              include_dirs=include_dirs, language="c++",
                              extra_compile_args=["-std=c++17"]))
if not extensions and __name__ == "__main__":
  print("jaxrnn: building without the CPU kernels (their build requirements are not installed "
        "here, e.g. not x86-64 Linux); jaxrnn will run its XLA path")
if __name__ == "__main__":  # as pip's build backend runs it; tests import CORE_BUILDS
  setup(ext_modules=extensions, cmdclass={"build_ext": BuildKernels})
