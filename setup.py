"""Builds jaxrnn's optional oneDNN kernel; everything else about the package is in pyproject.toml.

`jaxrnn/kernels/onednn_rnn.cc` compiles against the XLA FFI headers that ship with jaxlib
(`jax.ffi.include_dir()`) and oneDNN's headers from Intel's onednn-devel-cpu-gomp wheel, both
build requirements. It is not linked against libdnnl: `jaxrnn/kernels/__init__.py` loads libdnnl.so.3
from the onednn-cpu-gomp wheel at run time. Where anything is missing (no C++ compiler, not
x86-64 Linux), the install still succeeds without the kernel and jaxrnn runs its XLA path.
"""

import importlib.metadata
import importlib.util
import pathlib

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


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
        self.warn(f"jaxrnn: the oneDNN kernel was not built ({e}); jaxrnn will run its XLA path")
    self.extensions[:] = built  # nothing to copy or install for what failed


include_dirs = _include_dirs()
extensions = [Extension("jaxrnn.kernels._onednn_rnn", ["jaxrnn/kernels/onednn_rnn.cc"],
                        include_dirs=include_dirs, language="c++",
                        extra_compile_args=["-std=c++17"])] if include_dirs else []
if not include_dirs:
  print("jaxrnn: building without the oneDNN kernel (its build requirements are not installed "
        "here, e.g. not x86-64 Linux); jaxrnn will run its XLA path")
setup(ext_modules=extensions, cmdclass={"build_ext": BuildKernels})
