"""The authors' own published code, run unchanged beside jaxrnn's pins, for tests to compare with.

    import authors
    rg = authors.recurrentgemma()  # Google DeepMind's Griffin (JAX/Flax): rg.modules.ResidualBlock
    xl = authors.xlstm()           # NX-AI's xLSTM (PyTorch): xl.sLSTMLayer, xl.mLSTMLayer, ...
    mb = authors.mamba()           # state-spaces' Mamba-1 (PyTorch): mb.Mamba, selective_scan_ref

Each call installs on first use (once per machine), imports, and returns a namespace of the
authors' modules and classes; where the install cannot be done (no network) the calling test is
skipped saying what failed, or fails with that line where the environment variable CI is set (CI
reaches the package registry, so there it is an error). Only tests import this file: nothing under
jaxrnn/, scripts/ or a training run does.

How the authors' code runs unchanged beside jaxrnn's pins
---------------------------------------------------------
jaxrnn pins numpy 2.4, jax 0.10, flax 0.12 and torch 2.13 (CPU). The authors' packages declare
pins that contradict these (recurrentgemma 1.0.1: numpy<2.4, absl-py<2, typeguard<3; xlstm 2.0.6:
mlstm_kernels, ninja, safetensors) or cannot be met here at all (mamba-ssm: a CUDA build, triton).
So nothing of theirs goes into jaxrnn's environment and none of their declared dependencies is
installed; what they import at run time is jaxrnn's own jax, flax, numpy, torch and absl, plus a
few small pure-Python helpers pinned beside them:

  * One cache folder per pinned set, `$JAXRNN_AUTHORS_DIR/authors-<key>` (JAXRNN_AUTHORS_DIR
    defaults to `${XDG_CACHE_HOME:-~/.cache}/jaxrnn`; <key> hashes tests/authors.txt, the Mamba
    pin below, the Python version and the platform, so any change installs afresh beside the old).
  * `<folder>/site`: `pip install --no-deps --require-hashes --only-binary :all: --target
    <folder>/site -r tests/authors.txt`: wheels only, every version and sha256 pinned there:
    recurrentgemma 1.0.1 and xlstm 2.0.6, and the helpers they import: einops 0.8.2, jaxtyping
    0.3.11 (with its own dependency wadler-lindig 0.1.8), typeguard 2.13.3 (recurrentgemma's
    `typechecked` decorators are written for typeguard 2) and sentencepiece 0.2.3 (imported by
    recurrentgemma.jax's sampler, which its package __init__ imports). --no-deps is what keeps
    their numpy<2.4 / absl<2 pins (and xlstm's CUDA-kernel packages) out: recurrentgemma's modules
    and layers run on numpy 2.4 and absl 2 (it uses absl.logging only), and xlstm's "vanilla"
    sLSTM backend and its mLSTM backends are plain PyTorch, so mlstm_kernels and ninja (for its
    CUDA sLSTM kernel) are never imported. The folder goes FIRST on sys.path only after checking
    that it holds nothing but these packages (none of them one of jaxrnn's), so it shadows none
    of jaxrnn's numpy, jax, flax or torch (else it goes last).
  * `<folder>/mamba_ssm-2.3.2.post1`: mamba-ssm is published as a source distribution only, whose
    build compiles CUDA kernels and whose package imports triton, so it is not installed: pip
    downloads the pinned sdist by name (`pip download --no-deps --no-binary :all:
    --require-hashes`; preparing its metadata runs its setup.py, which imports torch: hence
    --no-build-isolation, with jaxrnn's torch and the environment's setuptools, and
    MAMBA_SKIP_CUDA_BUILD=TRUE so that it compiles nothing), and its `mamba_ssm/` sources are
    extracted as they are. 2.3.2.post1 is the newest release, and the nearest to
    state-spaces/mamba@e9594ce (9 commits later), the commit tests/reference_mamba.py
    transliterates: mamba_ssm/modules/mamba_simple.py is identical there, and
    ops/selective_scan_interface.py differs only in e9594ce wrapping `import selective_scan_cuda`
    in try/except (selective_scan_ref is identical). Two modules are imported from it, unchanged:
    `mamba_ssm.ops.selective_scan_interface` (selective_scan_ref) and
    `mamba_ssm.modules.mamba_simple` (Mamba). Before they are imported, `sys.modules` gets:
      - `mamba_ssm`: an empty package whose __path__ is the extracted folder, so that the real
        `mamba_ssm/__init__.py` (which imports Mamba2, Mamba3 and the LM head, all triton or
        tilelang code) is not run; the subpackages' own __init__ files (empty) run as they are;
      - `selective_scan_cuda`: a stub for the compiled CUDA extension that selective_scan_interface
        imports unconditionally in 2.3.2.post1; its fwd and bwd raise (nothing on CPU calls them);
      - `mamba_ssm.ops.triton.layer_norm`: a stub, since the real one imports triton;
        selective_scan_interface imports `_layer_norm_fwd` from it (used by the fused fast path
        only; the stub's raises), and mamba_simple's guarded `from ... import RMSNorm, ...` finds
        nothing there and falls back to None as it does on a machine without triton;
      - None for `causal_conv1d` and `mamba_ssm.ops.triton.selective_state_update`: Python then
        raises ImportError on their import, and the authors' own try/except falls back to their
        pure-PyTorch paths (F.conv1d for the convolution, step's einsum update), as it does on any
        machine without those packages; blocking them keeps that so even where triton or
        causal-conv1d happen to be installed.
    Mamba.forward's slow path (use_fast_path=False; it is taken anyway without causal_conv1d)
    calls `selective_scan_fn`, the autograd wrapper of the CUDA kernel. The one rebinding: in
    mamba_simple's namespace, `selective_scan_fn` is the authors' `selective_scan_ref`, their
    pure-PyTorch specification of that kernel with the same signature and outputs (their tests
    check the kernel against it), so forward, its inference-cache path and autograd run on CPU.

The install is done under an fcntl lock (`authors-<key>.lock` beside the folder) into a temporary
folder that is renamed into place when complete, so pytest-xdist workers that ask at once install
it once and never see half a folder. With xdist, tests/conftest.py calls `preinstall()` in the
controller before the workers start.

Float64: jaxrnn's references are float64, but not all of the authors' code honours float64:
  * recurrentgemma: runs under `with jax.enable_x64(True):` with dtype=param_dtype=jnp.float64, and
    its typecheck decorators (jaxtyping + typeguard 2) accept float64 arrays (they reject, e.g., a
    float segment_pos). But its RG-LRU scan accumulates in float32 (scan.linear_scan's default
    acc_float_dtype) and its local attention takes the softmax in float32, so float64 outputs are
    float32-accurate (the rest is float64); the RG-LRU cache it returns is float32, and a float64
    rg_lru_state passed back in fails its assertion (pallas.get_acc_dtype).
  * xlstm: `.double()` modules on float64 inputs compute in float64 throughout (vanilla sLSTM and
    the mLSTM backends follow the input's dtype).
  * mamba: selective_scan_ref computes in float32 whatever its inputs: it casts u, delta, B, C to
    float32 (`.float()`), its state takes A's dtype, and A must be float32 too (a float64 A fails
    in its einsum with the float32 C: "expected scalar type Double but found Float"); its output
    takes u's dtype. Mamba.forward passes A = -exp(A_log.float()), so the scan of a `.double()`
    Mamba is float32-accurate while its projections and convolution are float64; `step` is
    float64 except for that float32 A.
"""

import hashlib
import importlib
import importlib.metadata
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types

import pytest

HERE = pathlib.Path(__file__).resolve().parent
REQUIREMENTS = HERE / "authors.txt"

# The mamba-ssm release whose sources are extracted (see the module docstring).
MAMBA_VERSION = "2.3.2.post1"
MAMBA_SDIST = f"mamba_ssm-{MAMBA_VERSION}.tar.gz"
MAMBA_SHA256 = "104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028"

# What tests/authors.txt installs, by top-level name: the only entries `site` may hold for it to go
# first on sys.path (with their *.dist-info folders).
PACKAGES = ("recurrentgemma", "xlstm", "einops", "jaxtyping", "wadler_lindig", "typeguard",
            "sentencepiece")
_SITE_EXTRAS = ("sentencepiece.libs",)  # the wheel's bundled shared libraries
_LAYOUT = "1"  # bump when the folder's layout changes
_UNAVAILABLE = "JAXRNN_AUTHORS_UNAVAILABLE"  # set by preinstall() for the xdist workers it starts
_PIP_TIMEOUT_S = 900


class Unavailable(Exception):
  """The authors' code could not be installed here (one line: what failed)."""


def _key() -> str:
  digest = hashlib.sha256()
  for part in (_LAYOUT, REQUIREMENTS.read_bytes().decode(), MAMBA_SDIST, MAMBA_SHA256,
               f"{sys.implementation.name}{sys.version_info[0]}{sys.version_info[1]}",
               sys.platform, platform.machine()):
    digest.update(part.encode() + b"\0")
  return digest.hexdigest()[:16]


def folder() -> pathlib.Path:
  """Where the authors' code is (or will be) installed: $JAXRNN_AUTHORS_DIR/authors-<key>."""
  base = os.environ.get("JAXRNN_AUTHORS_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxrnn")
  return pathlib.Path(base).resolve() / f"authors-{_key()}"


def _ready(root: pathlib.Path) -> bool:
  return (root / "READY").is_file()


def _run(args, what, env=None):
  try:
    done = subprocess.run(args, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(env or {})})
  except (OSError, subprocess.TimeoutExpired) as e:
    raise Unavailable(f"{what}: {e}") from None
  if done.returncode:
    lines = [l.strip() for l in (done.stderr + done.stdout).splitlines() if l.strip()]
    errors = [l for l in lines if "error" in l.lower()]
    offline = any("connection" in l.lower() or "resolve" in l.lower() for l in lines)
    raise Unavailable(f"{what} (exit {done.returncode}): "
                      f"{(errors or lines or ['no output'])[-1][:300]}"
                      f"{' (the package index could not be reached)' if offline else ''}")


def _install(tmp: pathlib.Path) -> None:
  pip = [sys.executable, "-m", "pip"]
  _run(pip + ["install", "--quiet", "--no-input", "--no-deps", "--require-hashes",
              "--only-binary", ":all:", "--target", str(tmp / "site"), "-r", str(REQUIREMENTS)],
       "pip install -r tests/authors.txt")
  req = tmp / "mamba-requirement.txt"
  req.write_text(f"mamba-ssm=={MAMBA_VERSION} --hash=sha256:{MAMBA_SHA256}\n")
  _run(pip + ["download", "--quiet", "--no-input", "--no-deps", "--require-hashes",
              "--no-binary", ":all:", "--no-build-isolation", "--dest", str(tmp / "sdist"),
              "-r", str(req)],
       f"pip download mamba-ssm=={MAMBA_VERSION} (its sdist)",
       env={"MAMBA_SKIP_CUDA_BUILD": "TRUE"})
  sdist = tmp / "sdist" / MAMBA_SDIST
  if hashlib.sha256(sdist.read_bytes()).hexdigest() != MAMBA_SHA256:
    raise Unavailable(f"{MAMBA_SDIST}: sha256 differs from the pinned {MAMBA_SHA256}")
  top = f"mamba_ssm-{MAMBA_VERSION}/"
  with tarfile.open(sdist) as tar:
    members = [m for m in tar.getmembers() if m.name.startswith(top + "mamba_ssm/")
               or m.name in (top + "LICENSE", top + "AUTHORS")]
    kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    tar.extractall(tmp, members=members, **kwargs)
  shutil.rmtree(tmp / "sdist")
  req.unlink()


def _ensure() -> pathlib.Path:
  """Installs the authors' code once (under a lock, atomically) and returns its folder."""
  root = folder()
  if _ready(root):
    return root
  if reason := os.environ.get(_UNAVAILABLE):
    raise Unavailable(reason)
  import fcntl  # pylint: disable=import-outside-toplevel
  try:
    root.parent.mkdir(parents=True, exist_ok=True)
    lock = open(root.parent / f"{root.name}.lock", "w")  # pylint: disable=consider-using-with
  except OSError as e:
    raise Unavailable(f"cannot create {root.parent}: {e}") from None
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if _ready(root):  # another process installed it while this one waited
      return root
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
      _install(tmp)
      (tmp / "READY").write_text(f"{_key()}\n")
      if root.exists():  # a folder left half-made by an older layout or by hand
        shutil.rmtree(root)
      os.rename(tmp, root)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return root


_failure: list[str] = []


def _unavailable(reason: str):
  line = f"the authors' code is not installed here: {reason}"
  if os.environ.get("CI"):
    pytest.fail(line, pytrace=False)
  pytest.skip(line)


def _root() -> pathlib.Path:
  """The installed folder, with its `site` on sys.path; skips (fails under CI) where it can't."""
  if _failure:
    _unavailable(_failure[0])
  try:
    root = _ensure()
  except Unavailable as e:
    _failure.append(str(e))
    _unavailable(str(e))
  site = str(root / "site")
  if site not in sys.path:
    for name in PACKAGES:  # imported from elsewhere already: the pinned one would not be used
      if (module := sys.modules.get(name)) is not None and not str(
          getattr(module, "__file__", "") or "").startswith(site):
        raise ImportError(f"{name} is already imported from {module.__file__}, not from {site}")
    allowed = set(PACKAGES) | set(_SITE_EXTRAS)
    own = all(entry in allowed or entry.endswith(".dist-info") for entry in os.listdir(site))
    if own:
      sys.path.insert(0, site)
    else:
      sys.path.append(site)
    importlib.invalidate_caches()
  return root


def preinstall() -> str | None:
  """Installs the authors' code now (tests/conftest.py, in the xdist controller); never raises.
  Returns the reason where it cannot, and records it for the workers, which then skip at once."""
  try:
    _ensure()
    return None
  except Unavailable as e:
    os.environ[_UNAVAILABLE] = str(e)
    return str(e)


def recurrentgemma() -> types.SimpleNamespace:
  """Google DeepMind's recurrentgemma 1.0.1 (JAX/Flax), as published.

  Returns a namespace: package (recurrentgemma), common (TemporalBlockType, ScanType, presets),
  layers (RMSNorm, BlockDiagonalLinear, RGLRU, Conv1D, Einsum), modules (RecurrentBlock,
  LocalAttentionBlock, MLPBlock, ResidualBlock), scan (linear_scan), array_typing, version.
  """
  _root()
  package = importlib.import_module("recurrentgemma")
  return types.SimpleNamespace(
      package=package, version=importlib.metadata.version("recurrentgemma"),
      common=importlib.import_module("recurrentgemma.common"),
      layers=importlib.import_module("recurrentgemma.jax.layers"),
      modules=importlib.import_module("recurrentgemma.jax.modules"),
      scan=importlib.import_module("recurrentgemma.jax.scan"),
      array_typing=importlib.import_module("recurrentgemma.jax.array_typing"))


def xlstm() -> types.SimpleNamespace:
  """NX-AI's xlstm 2.0.6 (PyTorch), as published.

  Returns a namespace: package (xlstm), version, the classes sLSTMLayer, sLSTMLayerConfig,
  mLSTMLayer, mLSTMLayerConfig, sLSTMBlock, sLSTMBlockConfig, mLSTMBlock, mLSTMBlockConfig,
  xLSTMBlock, xLSTMBlockConfig, xLSTMBlockStack, xLSTMBlockStackConfig, FeedForwardConfig,
  GatedFeedForward, and mlstm_backends (the module xlstm.blocks.mlstm.backends:
  parallel_stabilized_simple, recurrent_step_stabilized_simple, ...). Use backend="vanilla" for
  sLSTMLayerConfig on CPU (its default, "cuda", compiles a CUDA kernel).
  """
  _root()
  package = importlib.import_module("xlstm")
  block = importlib.import_module("xlstm.blocks.xlstm_block")
  stack = importlib.import_module("xlstm.xlstm_block_stack")
  ns = types.SimpleNamespace(
      package=package, version=package.__version__,
      mlstm_backends=importlib.import_module("xlstm.blocks.mlstm.backends"),
      xLSTMBlock=block.xLSTMBlock, xLSTMBlockConfig=block.xLSTMBlockConfig,
      xLSTMBlockStack=stack.xLSTMBlockStack, xLSTMBlockStackConfig=stack.xLSTMBlockStackConfig)
  for name in ("sLSTMLayer", "sLSTMLayerConfig", "mLSTMLayer", "mLSTMLayerConfig", "sLSTMBlock",
               "sLSTMBlockConfig", "mLSTMBlock", "mLSTMBlockConfig", "FeedForwardConfig",
               "GatedFeedForward"):
    setattr(ns, name, getattr(package, name))
  return ns


def _cuda_only(name: str):
  def unavailable(*args, **kwargs):
    del args, kwargs
    raise RuntimeError(f"{name} is a CUDA/triton kernel, stubbed by tests/authors.py on CPU")
  unavailable.__name__ = name.rsplit(".", 1)[-1]
  return unavailable


def _stub(name: str, doc: str, *functions: str) -> types.ModuleType:
  module = types.ModuleType(name, doc)
  for attr in functions:
    setattr(module, attr, _cuda_only(f"{name}.{attr}"))
  return module


_mamba: list[types.SimpleNamespace] = []


def mamba() -> types.SimpleNamespace:
  """state-spaces' mamba-ssm 2.3.2.post1 (PyTorch): Mamba-1's module and reference scan, on CPU.

  Returns a namespace: selective_scan_ref (their pure-PyTorch selective scan, channel-major:
  u, delta, z [b, d_inner, t]; B, C [b, d_state, t]; A [d_inner, d_state]; it computes in float32
  and needs a float32 A, see the module docstring), Mamba (the module: build it with
  use_fast_path=False, call .double() for float64; forward, step, allocate_inference_cache), the
  modules mamba_simple and selective_scan_interface, version, source (the extracted sdist folder)
  and stubs (the names sys.modules was given; see the module docstring).
  """
  if _mamba:
    return _mamba[0]
  root = _root()
  source = root / f"mamba_ssm-{MAMBA_VERSION}"
  if "mamba_ssm" not in sys.modules:
    package = types.ModuleType("mamba_ssm", "mamba-ssm's sources; its __init__ is not run")
    package.__path__ = [str(source / "mamba_ssm")]
    package.__version__ = MAMBA_VERSION
    sys.modules["mamba_ssm"] = package
  stubs = {
      "selective_scan_cuda": _stub(
          "selective_scan_cuda", "Stub of mamba-ssm's compiled CUDA extension.", "fwd", "bwd"),
      "mamba_ssm.ops.triton.layer_norm": _stub(
          "mamba_ssm.ops.triton.layer_norm",
          "Stub of mamba-ssm's triton layer norm: only the name selective_scan_interface imports.",
          "_layer_norm_fwd"),
      "causal_conv1d": None,  # None in sys.modules: `import causal_conv1d` raises ImportError
      "mamba_ssm.ops.triton.selective_state_update": None,
  }
  if not isinstance(getattr(sys.modules["mamba_ssm"], "__path__", None), list) or \
      sys.modules["mamba_ssm"].__path__ != [str(source / "mamba_ssm")]:
    raise ImportError(f"mamba_ssm is already imported from elsewhere: {sys.modules['mamba_ssm']}")
  sys.modules.update(stubs)  # over any real ones too: the CPU paths, wherever triton is installed
  interface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
  simple = importlib.import_module("mamba_ssm.modules.mamba_simple")
  # The slow path's scan: the CUDA kernel's wrapper -> the authors' reference of that kernel.
  simple.selective_scan_fn = interface.selective_scan_ref
  _mamba.append(types.SimpleNamespace(
      version=MAMBA_VERSION, source=source, stubs=tuple(stubs),
      selective_scan_ref=interface.selective_scan_ref, Mamba=simple.Mamba,
      mamba_simple=simple, selective_scan_interface=interface))
  return _mamba[0]
