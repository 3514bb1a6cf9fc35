"""What every script does around its one call into jaxrnn: set up the host's allocator, parse
flags, and turn bad input into one line on stderr (`error: ...`, exit status 2) instead of a
traceback."""

import ctypes
import functools
import importlib.util
import os
import pathlib
import sys
import traceback
from typing import Any, Callable, Mapping, NoReturn

from absl import app, flags

from jaxrnn import UserError


def _fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _unknown_config_field(argv: list[str]) -> str | None:
  """The first `--config.<field>` override that names no field of configs/default.py."""
  from configs import default
  from jaxrnn import config as config_lib
  for arg in argv[1:]:
    if arg.startswith("--config."):
      name = arg[len("--config."):].split("=", 1)[0]
      try:
        config_lib.field(default.get_config(), name)
      except (AttributeError, KeyError):
        return name
  return None


def define_config(default_path: str) -> flags.FlagHolder:
  """`--config`, a config file, with `--config.<field>=value` overrides. ml_collections reads
  the overrides from sys.argv as soon as the flag is defined, so an unknown field fails here."""
  from ml_collections import config_flags
  try:
    return config_flags.DEFINE_config_file("config", default_path, "Path to a config file.",
                                           lock_config=True)
  except (AttributeError, KeyError):
    _fail(f"unknown config field {_unknown_config_field(sys.argv)}; configs/default.py lists "
          "every field")


def _config_path(argv: list[str]) -> str | None:
  """The value of `--config` in argv (`--config=x` or `--config x`), if given."""
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_config_file(spec: str) -> None:
  """Loads `--config` file[:argument] as ml_collections will, saying in one line what is wrong
  with it: a missing file, a syntax error (with its line), an error while it runs, no
  get_config(), or a get_config() that returns no ConfigDict."""
  import ml_collections
  path, *argument = spec.split(":", 1)
  where = pathlib.Path(path)
  if not where.is_file():
    listed = ", ".join(sorted(p.name for p in pathlib.Path("configs").glob("[!_]*.py")))
    _fail(f"--config {path}: no such file" + (f" (configs/ holds {listed})" if listed else ""))
  module_spec = importlib.util.spec_from_file_location(f"_jaxrnn_config_{where.stem}", where)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    _fail(f"--config {path}, line {e.lineno}: {e.msg}")
  except Exception as e:  # the config file's own code failed
    line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__))
                 if f.filename == str(where)), "?")
    _fail(f"--config {path}, line {line}: {type(e).__name__}: {e}")
  if not callable(getattr(module, "get_config", None)):
    _fail(f"--config {path} has no get_config() function; a config file defines one that "
          "returns an ml_collections.ConfigDict (see configs/default.py)")
  try:
    config = module.get_config(*argument)
  except Exception as e:
    _fail(f"--config {path}: get_config() failed: {type(e).__name__}: {e}")
  if not isinstance(config, ml_collections.ConfigDict):
    _fail(f"--config {path}: get_config() returned {type(config).__name__}, not an "
          "ml_collections.ConfigDict (see configs/default.py)")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag, config file or config override reported in one
  line."""
  if (spec := _config_path(argv)) is not None:
    check_config_file(spec)
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    if name := _unknown_config_field(argv):
      _fail(f"unknown config field {name}; configs/default.py lists every field")
    _fail(f"{e}; see --helpshort")


# What keeps freed memory in a process: {tunable: (mallopt parameter (malloc.h), value)}.
_KEEP_FREED = {"mmap_max": (-4, 0), "trim_threshold": (-1, 2**31 - 1)}
# The same as glibc tunables, and transparent huge pages for what malloc maps (glibc >= 2.35).
MALLOC_TUNABLES = ":".join(f"glibc.malloc.{name}={value}" for name, value in
                           [("hugetlb", 1), *((n, v) for n, (_, v) in _KEEP_FREED.items())])
_THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
  """The kernel's transparent huge page mode ("always", "madvise", "never"), None off Linux."""
  try:
    return _THP_MODE.read_text().split("[", 1)[1].split("]", 1)[0]
  except (OSError, IndexError):
    return None


def _malloc_tuned(environ: Mapping[str, str]) -> bool:
  """Whether the user tunes malloc (GLIBC_TUNABLES, MALLOC_* variables): then jaxrnn does not."""
  return any(k == "GLIBC_TUNABLES" or k.startswith("MALLOC_") for k in environ)


def _libc(name: str) -> Any:
  """The C library's function `name`; None where it has none (not glibc: musl, macOS) or cannot
  be opened by name (Windows: ctypes.CDLL(None) raises)."""
  try:
    return getattr(ctypes.CDLL(None), name, None)
  except (OSError, TypeError):
    return None


def _glibc_version() -> tuple[int, ...] | None:
  """glibc's version, None without glibc (musl, macOS, Windows)."""
  if (version := _libc("gnu_get_libc_version")) is None:
    return None
  version.restype = ctypes.c_char_p
  return tuple(int(part) for part in version().decode().split(".")[:2])


_SWITCH = {"1": True, "true": True, "yes": True, "on": True,
           "0": False, "false": False, "no": False, "off": False}


def _huge_pages_wanted(environ: Mapping[str, str]) -> bool:
  """JAXRNN_HUGE_PAGES as a user would write it (unset, 1, yes, on: wanted; 0, no, off: not);
  "done" marks a process `restart_with_huge_pages` started. A UserError for anything else."""
  value = environ.get("JAXRNN_HUGE_PAGES", "1").strip().lower()
  if value == "done":
    return False
  if value not in _SWITCH:
    raise UserError(f"JAXRNN_HUGE_PAGES must be 1 or 0 (yes / no, on / off), got "
                    f"{environ['JAXRNN_HUGE_PAGES']!r}")
  return _SWITCH[value]


def huge_page_env(environ: Mapping[str, str], thp_mode: str | None = None) -> dict[str, str] | None:
  """`environ` with GLIBC_TUNABLES=MALLOC_TUNABLES (and JAXRNN_HUGE_PAGES=done), where a process
  started with it gets huge pages: glibc 2.35 or later, and the kernel's transparent huge pages
  (`thp_mode`, default this host's) "madvise" or "always". None otherwise, where the user tunes
  malloc (GLIBC_TUNABLES, MALLOC_* variables), or turns it off (JAXRNN_HUGE_PAGES=0)."""
  if (not _huge_pages_wanted(environ) or _malloc_tuned(environ)
      or (thp_mode or _thp_mode()) not in ("always", "madvise")
      or (_glibc_version() or (0,)) < (2, 35)):
    return None
  return {**environ, "GLIBC_TUNABLES": MALLOC_TUNABLES, "JAXRNN_HUGE_PAGES": "done"}


# Interpreter options that take the next argument as their value (python --help).
_VALUED_OPTIONS = ("-W", "-X", "--check-hash-based-pycs")


def _wrapped(options: list[str]) -> bool:
  """Whether the arguments before the script hold a program of their own (coverage run, a
  debugger's launcher, memray): a word that is no interpreter option nor an option's value."""
  i = 0
  while i < len(options):
    if not options[i].startswith("-"):
      return True
    i += 2 if options[i] in _VALUED_OPTIONS else 1
  return False


def _restarted() -> None:
  """In a process `restart_with_huge_pages` started: the environment as the user gave it, for
  the processes this one starts (glibc read the tunables when this one started; a child that
  kept them would keep its freed memory too, and a jaxrnn script among them restarts itself)."""
  os.environ.pop("GLIBC_TUNABLES", None)  # the user had none: `_malloc_tuned` checked
  os.environ.pop("JAXRNN_HUGE_PAGES", None)


def restart_with_huge_pages(script: str) -> None:
  """Runs `script` (the caller's __file__) again in its own process (`os.execve`: the same pid,
  interpreter options, arguments and streams) under `huge_page_env`, where that changes
  anything, once; returns where it does not, and where `script` is not the program Python was
  started with (run by a debugger, IPython or another program's runpy, from stdin, by -m, or
  by a wrapper such as `coverage run`, which a restart would run again). The restarted process
  gives its children the environment the user gave it.

  XLA's CPU runtime takes each step's large buffers straight from the kernel (past a thread's
  64 MB malloc heap), so on 4 KB pages every step faults them in again: 60,000 faults per LSTM
  training step at 2 x 384, batch 64 x 128, and evaluation 5-40% slower (docs/speed.md). glibc
  reads its tunables only at process start, hence the restart; a script calls this first,
  before jax is imported, so that the restart costs only Python's start.
  """
  if os.environ.get("JAXRNN_HUGE_PAGES") == "done":
    _restarted()
    return
  try:
    env = huge_page_env(os.environ)
  except UserError as e:
    _fail(str(e))
  started = sys.orig_argv[1:]
  options = started[:len(started) - len(sys.argv)]  # the interpreter's own, before the script
  if (env is None or not sys.executable or started[len(options):] != sys.argv
      or "-m" in options or "-c" in options or _wrapped(options)
      or not os.path.isfile(sys.argv[0]) or not os.path.samefile(sys.argv[0], script)):
    return
  for stream in (sys.stdout, sys.stderr):
    if stream is not None:  # None: the stream was closed when the process started
      stream.flush()
  os.execve(sys.executable, [sys.executable, *started], env)


def keep_freed_memory() -> bool:
  """Has glibc's malloc keep the memory a process frees for its next allocation; True if set.

  XLA's CPU runtime allocates every buffer of a step afresh, on its own threads, and glibc
  hands the free top of a thread's heap and every block it mapped on its own back to the
  kernel, so each step touched new pages: 12,000-14,500 page faults per training step at the
  bench defaults (50-57 MB), 10-15% of the step on the 2-core EPYC (docs/speed.md). Without
  mapped blocks or trimming, a process keeps its peak footprint, as a caching allocator does.
  Blocks that outgrow a thread's 64 MB heap are still mapped afresh (2 x 384 at batch 64 x 128:
  no gain): `restart_with_huge_pages` puts those on huge pages. One arena for all threads would
  keep them, but oneDNN's GEMM threads allocate on every call and then queue on its lock (GRU
  evaluation 1.7x slower). Does nothing without glibc, or where malloc is tuned already
  (GLIBC_TUNABLES, as `restart_with_huge_pages` sets it, or MALLOC_* variables).
  """
  if _malloc_tuned(os.environ):
    return False
  if (mallopt := _libc("mallopt")) is None:  # not glibc
    return False
  return all(mallopt(param, value) == 1 for param, value in _KEEP_FREED.values())


def release_freed_memory() -> None:
  """Hands what the process has freed back to the kernel (glibc's malloc_trim), which
  `keep_freed_memory` otherwise keeps: called after a whole-split evaluation, whose buffers
  would hold the process at the evaluation's peak for the rest of training. Does nothing
  without glibc."""
  if (trim := _libc("malloc_trim")) is not None:
    trim(0)


def run_inline() -> None:
  """Has a CPU computation run on the thread that calls it, not on a dispatch thread of XLA's
  (`jax_cpu_enable_async_dispatch`; pmap's computations stay asynchronous). Call it before the
  first computation: JAX reads it when it creates the CPU client.

  XLA's CPU runtime allocates each call's scratch (a step's intermediates: 230 MB for the 2 x
  384 LSTM at batch 64 x 128) on the thread that runs the call. On a dispatch thread that is a
  thread's malloc arena, which cannot hold a block over 64 MB, so glibc maps it afresh each
  step (115 huge-page faults, the memory zeroed each time); on the calling thread it comes from
  the main heap, which `keep_freed_memory` keeps. Fresh pages cost most on a VM whose host
  takes back the pages a guest frees (virtio-balloon free page reporting): beside PyTorch in
  `scripts/bench.py` that LSTM trained at 11.2-14.5K tokens/s dispatched, 14.9-15.6K inline
  (docs/speed.md). The host no longer queues the next step while one runs; `train.py` does
  about a millisecond of host work between steps.
  """
  import jax  # here: a script restarts (`restart_with_huge_pages`) before jax is imported
  jax.config.update("jax_cpu_enable_async_dispatch", False)


class _Unbroken:
  """A text stream whose reader may go away (`train.py | head -1`): where a write or flush meets
  a broken pipe, the stream's file descriptor is pointed at os.devnull and the process goes on,
  as `tee -p` does, so that a run still saves its checkpoints and a script ends without a
  traceback."""

  def __init__(self, stream: Any):
    self._stream = stream

  def _silence(self) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, self._stream.fileno())
    os.close(devnull)

  def write(self, text: str) -> int:
    try:
      return self._stream.write(text)
    except BrokenPipeError:
      self._silence()
      return len(text)

  def flush(self) -> None:
    try:
      self._stream.flush()
    except BrokenPipeError:
      self._silence()

  def __getattr__(self, name: str) -> Any:
    return getattr(self._stream, name)


def survive_closed_pipes() -> None:
  """sys.stdout and sys.stderr as `_Unbroken` streams (once; a closed stream stays None)."""
  for name in ("stdout", "stderr"):
    stream = getattr(sys, name)
    if stream is not None and not isinstance(stream, _Unbroken):
      setattr(sys, name, _Unbroken(stream))


def tune_process() -> None:
  """What jaxrnn's scripts set in their process before its first computation:
  `keep_freed_memory()` and `run_inline()`."""
  keep_freed_memory()
  run_inline()


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)` after `tune_process()`, where a UserError from main ends the script
  with one line, and a reader that goes away (`| head`) ends nothing (`survive_closed_pipes`)."""
  survive_closed_pipes()
  tune_process()

  @functools.wraps(main)
  def guarded(argv: list[str]) -> None:
    try:
      main(argv)
    except UserError as e:
      _fail(str(e))
  app.run(guarded, flags_parser=parse_flags)
