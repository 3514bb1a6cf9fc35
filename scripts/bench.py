"""python scripts/bench.py --cells=rnn,gru,lstm --peers=torch,flax --out=bench.json

Benchmarks jaxrnn against the same model in PyTorch and flax.linen (training and evaluation
tokens/s, sampling chars/s, achieved GFLOP/s; cells with no peer, such as mingru, run alone),
then jaxrnn's lstm alone: training tokens/s over --seq_sweep and the compiled training step's
memory at seq 64 and 1024. Rounds are interleaved (A B C A B C ...); the table shows medians and
jaxrnn/x, the first jaxrnn row's figure over the row's (above 1: jaxrnn is faster). `--quick`
shrinks everything for the test suite.

Each row (a jaxrnn impl, torch, flax) runs in a process of its own, which waits idle while the
others are timed: two OpenMP runtimes in one process (PyTorch's and oneDNN's) slowed each other
by up to 1.7x, so a shared process would measure the sharing, not the libraries.
"""

import functools
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import default
from jaxrnn import UserError, cells, cli, layers, model, optim, provenance, sample, train
from jaxrnn import config as config_lib
from jaxrnn.tasks import lm

flags.DEFINE_string("cells", ",".join(cells.names()),
                    "Comma list of cells to benchmark; cell:hidden sets its own hidden size.")
flags.DEFINE_integer("layers", 2, "Stacked layers.")
flags.DEFINE_integer("hidden", 256, "Hidden size per layer.")
flags.DEFINE_integer("embed", 256, "Embedding width.")
flags.DEFINE_integer("batch", 32, "Training lanes.")
flags.DEFINE_integer("seq", 64, "Training sequence length.")
flags.DEFINE_integer("vocab", 65, "Vocabulary size.")
flags.DEFINE_integer("steps", 10, "Timed calls per round.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds; the median is reported.")
flags.DEFINE_integer("warmup", 3, "Untimed calls per implementation before the rounds.")
flags.DEFINE_string("peers", "torch,flax", "Comma list of peers (torch, flax); missing: skipped.")
flags.DEFINE_string("seq_sweep", "32,64,256,1024", "Sequence lengths of the jaxrnn lstm sweep "
                    "('': none).")
flags.DEFINE_string("memory_seqs", "64,1024", "Sequence lengths at which the compiled training "
                    "step's memory is read ('': none).")
flags.DEFINE_string("measures", "train,eval,sample", "Comma list of what to time per cell.")
flags.DEFINE_string("device", "cpu",
                    "JAX platform: cpu, gpu (CUDA) or tpu; torch follows gpu to cuda.")
flags.DEFINE_bool("quick", False, "Tiny sizes for the test suite; flags given explicitly win.")
flags.DEFINE_string("out", "bench.json", "Where to write the results as JSON.")
flags.DEFINE_string("impls", "", "Comma list of config.model.impl values (e.g. auto,onednn,"
                    "scan,fused); '': the default, auto, in a row named jaxrnn.")
flags.DEFINE_string("serve", "", "Internal: the row this process times for its parent.")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                  "Every row's matrix-product operands: jaxrnn's config.model.compute_dtype, "
                  "PyTorch's autocast, flax's cell dtype.")
FLAGS = flags.FLAGS

# embed = hidden: the mamba cell keeps its input's width, so a stack of it needs them equal;
# one size that suits every cell keeps --quick's rows alike (and alike to the peers').
_QUICK = {"hidden": 32, "embed": 32, "batch": 4, "seq": 8, "steps": 2, "rounds": 2, "warmup": 1,
          "seq_sweep": "8,16"}
_PEER_CELLS = {"rnn": ("RNN", "SimpleCell"), "gru": ("GRU", "GRUCell"),
               "lstm": ("LSTM", "OptimizedLSTMCell")}  # torch.nn class, flax.linen cell
_LANES, _CHUNK = 16, 256  # evaluation batch
_SAMPLES, _PREFIX, _LENGTH = 4, 100, 500
_MEASURES = ("train", "eval", "sample")
# Dense peak TFLOP/s of the GPUs jaxrnn is checked on (NVIDIA's datasheets, SXM boards), by the
# products' operands: float32 runs at the TF32 tensor-core peak, since JAX's default precision
# and cuDNN take TF32 products on these cards (and the bench lets PyTorch do the same).
_GPU_PEAK_TFLOPS = {"H100": {"float32": 494.7, "bfloat16": 989.4},
                    "H200": {"float32": 494.7, "bfloat16": 989.4},
                    "A100": {"float32": 156.0, "bfloat16": 312.0}}
Data = dict[str, Any]  # numpy (inputs, targets) for "train" and "eval", prefix<int>[p]
Fns = dict[str, Callable[[], int]]  # measure -> one call, returning the tokens or chars it did


def _split(text: str) -> list[str]:
  return [s.strip() for s in text.split(",") if s.strip()]


def _cell_spec(spec: str) -> tuple[str, int]:
  """"gru" -> ("gru", --hidden); "mingru:920" -> ("mingru", 920), e.g. to match parameter counts."""
  cell, _, hidden = spec.partition(":")
  if hidden and not hidden.isdigit():
    raise UserError(f"--cells entry {spec!r}: expected a cell name or cell:hidden, e.g. mingru:920")
  return cell, int(hidden or FLAGS.hidden)


def _tokens(rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets)<int32>[rows, length], random with a fixed seed, targets shifted by one."""
  ids = np.random.default_rng(0).integers(0, FLAGS.vocab, (rows, length + 1), dtype=np.int32)
  return ids[:, :-1], ids[:, 1:]


def _config(cell: str, impl: str | None, hidden: int) -> Any:
  """configs/default.py with the benchmark's model, batch and optimizer."""
  config = default.get_config()
  config.model.update(cell=cell, num_layers=FLAGS.layers, hidden_size=hidden,
                      embed_dim=FLAGS.embed, one_hot=False, dropout=0.0,
                      compute_dtype=FLAGS.compute_dtype)
  if impl:
    config.model.impl = impl
  config.data.update(batch_size=FLAGS.batch, seq_len=FLAGS.seq)
  config.train.update(optimizer="adam", lr=3e-3, clip_norm=1.0, schedule="constant",
                      warmup_steps=0)
  return config


@functools.cache
def _train_step(cell: str, impl: str | None, hidden: int) -> tuple[Any, Callable, Callable]:
  """(config, state init, jitted train_step donating the state) of one jaxrnn model."""
  # Cached so that timing, sweep and memory share one compilation wherever shapes agree.
  config = _config(cell, impl, hidden)
  tx = optim.make_optimizer(config.train)
  init = lambda: train.create_train_state(config, FLAGS.vocab, tx)
  step = functools.partial(train.train_step, config=config, tx=tx)
  return config, init, jax.jit(step, donate_argnums=(0,))


def _jaxrnn(cell: str, hidden: int, data: Data, impl: str | None = None) -> Fns:
  """jaxrnn's own train_step, eval_step and sample.generate."""
  x, y = map(jnp.asarray, data["train"])
  config, init, step = _train_step(cell, impl, hidden)
  evaluate = jax.jit(functools.partial(lm.eval_step, model_config=config.model))
  lanes = dict(zip(("inputs", "targets"), map(jnp.asarray, data["eval"])))
  lanes["mask"] = jnp.ones(lanes["inputs"].shape, jnp.float32)
  state = [init()]
  zeros = model.initial_carry(config.model, x.shape[0])
  carry = [model.initial_carry(config.model, _LANES)]

  def train_fn():
    state[0] = jax.block_until_ready(step(state[0], {"inputs": x, "targets": y}, zeros)[0])
    return x.size

  def eval_fn():
    carry[0], nll, _ = evaluate(state[0].params, lanes, carry[0])
    nll.block_until_ready()
    return lanes["inputs"].size

  def sample_fn():
    sample.generate(state[0].params, config.model, jnp.asarray(data["prefix"]), _LENGTH,
                    num_samples=_SAMPLES, temperature=1.0).block_until_ready()
    return _SAMPLES * _LENGTH

  return {"train": train_fn, "eval": eval_fn, "sample": sample_fn}


def _torch(cell: str, hidden: int, data: Data) -> Fns:
  """nn.Embedding + nn.RNN/GRU/LSTM + nn.Linear; eager training, a char-rnn style sampler."""
  import torch
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  gpu = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
  dev = torch.device("cuda" if gpu else "cpu")
  # TF32 products as jaxrnn's rows take them (JAX's default precision on a GPU); PyTorch's
  # cuDNN RNNs take them by default, its matrix products (the head) only when asked.
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = gpu
  sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
  embed = torch.nn.Embedding(FLAGS.vocab, FLAGS.embed)
  rnn = getattr(torch.nn, _PEER_CELLS[cell][0])(FLAGS.embed, hidden,
                                                num_layers=FLAGS.layers, batch_first=True)
  head = torch.nn.Linear(hidden, FLAGS.vocab)
  net = torch.nn.ModuleList([embed, rnn, head]).to(dev)
  opt = torch.optim.Adam(net.parameters(), lr=3e-3)
  x, y, ex, _ = (torch.from_numpy(a).long().to(dev) for a in (*data["train"], *data["eval"]))
  prefix = torch.from_numpy(data["prefix"]).long().to(dev).expand(_SAMPLES, -1)
  carry = [None]

  def forward(tokens, state=None):
    # --compute_dtype=bfloat16: PyTorch's own mixed precision (autocast), float32 parameters.
    # Its CPU autocast covers nn.LSTM, nn.RNN and nn.Linear, not nn.GRU (it stays float32).
    with torch.autocast(dev.type, dtype=torch.bfloat16,
                        enabled=FLAGS.compute_dtype == "bfloat16"):
      ys, state = rnn(embed(tokens), state)
      return head(ys), state

  def train_fn():
    opt.zero_grad(set_to_none=True)
    logits, _ = forward(x)
    torch.nn.functional.cross_entropy(logits.reshape(-1, FLAGS.vocab), y.reshape(-1)).backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    sync()
    return x.numel()

  @torch.no_grad()
  def eval_fn():
    _, carry[0] = forward(ex, carry[0])
    sync()
    return ex.numel()

  @torch.no_grad()
  def sample_fn():
    state = None
    for i in range(prefix.shape[1]):
      logits, state = forward(prefix[:, i:i + 1], state)
    for _ in range(_LENGTH):
      logits, state = forward(torch.multinomial(torch.softmax(logits[:, -1], dim=-1), 1), state)
    sync()
    return _SAMPLES * _LENGTH

  return {"train": train_fn, "eval": eval_fn, "sample": sample_fn}


def _flax(cell: str, hidden: int, data: Data) -> Fns:
  """flax.linen nn.RNN over stacked cells between an Embed and a Dense head; jitted optax step."""
  import flax.linen as nn
  import optax
  cell_cls = getattr(nn, _PEER_CELLS[cell][1])

  class LM(nn.Module):
    @nn.compact
    def __call__(self, tokens, carries):
      xs, new = nn.Embed(FLAGS.vocab, FLAGS.embed)(tokens), []
      for c in carries:
        c, xs = nn.RNN(cell_cls(hidden, dtype=jnp.dtype(FLAGS.compute_dtype)),
                       return_carry=True)(xs, initial_carry=c)
        new.append(c)
      return new, nn.Dense(FLAGS.vocab)(xs)

  zeros = lambda rows: [jax.tree.map(  # in the cells' dtype, which their new carries take
      lambda z: z.astype(FLAGS.compute_dtype), cell_cls(hidden, parent=None).initialize_carry(
          jax.random.key(0), (rows, 1)))] * FLAGS.layers
  lm, tx = LM(), optim.make_optimizer(_config(cell, None, hidden).train)
  x, y, ex, _ = map(jnp.asarray, (*data["train"], *data["eval"]))
  train_zeros, carry = zeros(x.shape[0]), [zeros(ex.shape[0])]
  params = lm.init(jax.random.key(0), x, train_zeros)
  state, forward = [(params, tx.init(params))], jax.jit(lm.apply)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state, x, y, carries):
    params, opt_state = state
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        lm.apply(p, x, carries)[1], y).mean()
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def train_fn():
    state[0] = jax.block_until_ready(step(state[0], x, y, train_zeros))
    return x.size

  def eval_fn():
    carry[0], logits = forward(state[0][0], ex, carry[0])
    logits.block_until_ready()
    return ex.size

  return {"train": train_fn, "eval": eval_fn}


_PEERS = {"torch": _torch, "flax": _flax}


def _serve(row: str, data: Data) -> None:
  """The child's side of `_Process`: one JSON request per stdin line, one JSON reply per line.

  ["build", spec] -> the measures this row has for that cell ([] for a peer without it);
  ["run", measure] -> the units one call did. A UserError is replied as {"error": message}.
  """
  impl = row[len("jaxrnn["):-1] if row.startswith("jaxrnn[") else None
  fns: Fns = {}
  for line in sys.stdin:
    kind, arg = json.loads(line)
    try:
      if kind == "build":
        cell, hidden = _cell_spec(arg)
        if row in _PEERS:
          fns = _PEERS[row](cell, hidden, data) if cell in _PEER_CELLS else {}
        elif _runs(impl, cell):
          fns = _jaxrnn(cell, hidden, data, impl)
        else:
          fns = {}
        reply: Any = list(fns)
      else:
        reply = fns[arg]()
    except UserError as e:
      reply = {"error": str(e)}
    print(json.dumps(reply), flush=True)


def _runs(impl: str | None, cell: str) -> bool:
  """Whether jaxrnn's `impl` runs `cell` here; a known impl that does not (e.g. onednn for
  mingru) is left out of that cell's table with a note, an unknown one is an error."""
  if impl in layers.IMPLS:
    try:
      layers.check(cells.get(cell, compute_dtype=FLAGS.compute_dtype), impl)
    except UserError as e:
      print(f"note: no jaxrnn[{impl}] row for {cell}: {e}", file=sys.stderr)
      return False
  return True


class _Process:
  """A row's implementation in a child process running this script with --serve=row."""

  def __init__(self, row: str):
    self.row = row
    # jaxrnn's rows on huge pages, as its scripts run; the peers as their users run them.
    env = cli.huge_page_env(os.environ) if row.startswith("jaxrnn") else None
    self.proc = subprocess.Popen([sys.executable, __file__, f"--serve={row}", *sys.argv[1:]],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

  def call(self, kind: str, arg: str) -> Any:
    self.proc.stdin.write(json.dumps([kind, arg]) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the {self.row} process exited (rc {self.proc.wait()}); its stderr "
                         "above says why")
    reply = json.loads(line)
    if isinstance(reply, dict):
      raise UserError(reply["error"])
    return reply

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


def _timed(fns: dict[str, Callable[[], int]], calls: int, warmup: int, unit: str,
           flops_per_unit: float = 0.0) -> dict[str, dict[str, Any]]:
  """`warmup` calls of each, then interleaved rounds of `calls`: median units/s, ratio, GFLOP/s.

  Each round starts with one untimed call: a row's threads wait idle while the others are
  timed, and on a VM the first call after that idle can take twice as long (measured on the
  2-core EPYC: the second thread of a call returns from idle up to 60 ms late), which a
  training loop, running its steps back to back, never pays.
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  rounds = {name: [] for name in fns}
  seconds = {name: [] for name in fns}  # per call
  for _ in range(FLAGS.rounds):
    for name, fn in fns.items():
      fn()
      tick = time.perf_counter()
      units = sum(fn() for _ in range(calls))
      elapsed = time.perf_counter() - tick
      rounds[name].append(units / elapsed)
      seconds[name].append(elapsed / calls)
  first = statistics.median(next(iter(rounds.values())))
  return {name: {"median": statistics.median(r), "unit": unit, "rounds": r,
                 "ratio": first / statistics.median(r),
                 "ms_per_call": 1e3 * statistics.median(seconds[name]),
                 "gflops": statistics.median(r) * flops_per_unit / 1e9 if flops_per_unit else None}
          for name, r in rounds.items()}


def _forward_flops_per_token(cell: str, hidden: int) -> float:
  """Matrix-product FLOPs of one token's forward pass: 2 per entry of every weight matrix.

  The embedding is a lookup, and vector weights (indrnn's recurrence, layer-norm gains) are
  elementwise, so neither counts.
  """
  config = _config(cell, None, hidden)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), config.model, FLAGS.vocab))
  del shapes["embed"]
  return sum(2 * a.size for a in jax.tree.leaves(shapes) if a.ndim == 2)


def _memory_mib(cell: str, seq: int, impl: str | None) -> float | None:
  """Compiled temp + argument + output MiB of the jaxrnn training step (compiled, never run)."""
  config, init, step = _train_step(cell, impl, FLAGS.hidden)
  state = jax.eval_shape(init)
  carry = jax.eval_shape(lambda: model.initial_carry(config.model, FLAGS.batch))
  tokens = jax.ShapeDtypeStruct((FLAGS.batch, seq), jnp.int32)
  stats = step.lower(state, {"inputs": tokens, "targets": tokens}, carry).compile()
  stats = stats.memory_analysis()
  fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")
  if stats is None or not all(hasattr(stats, f) for f in fields):
    return None
  aliased = getattr(stats, "alias_size_in_bytes", 0)  # the donated state: argument and output
  return (sum(getattr(stats, f) for f in fields) - aliased) / 2**20


def _field(text: str, name: str) -> str | None:
  found = re.search(rf"^{re.escape(name)}\s*:\s*(.+)$", text, re.MULTILINE)
  return found.group(1).strip() if found else None


def _machine() -> tuple[dict[str, Any], dict[str, Any]]:
  """(what it runs on, fp32 peak GFLOP/s with how it was computed)."""
  lscpu = (subprocess.run(["lscpu"], capture_output=True, text=True).stdout
           if shutil.which("lscpu") else "")
  cpuinfo = pathlib.Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo") else ""
  cores = int(_field(lscpu, "Core(s) per socket") or 0) * int(_field(lscpu, "Socket(s)") or 0)
  cores = cores or os.cpu_count()
  dev = jax.devices()[0]
  machine = {"device": dev.device_kind if dev.platform != "cpu" else provenance.cpu_name(),
             "platform": dev.platform, "cores": cores,
             **{p: importlib.util.find_spec(p) and importlib.metadata.version(p)
                for p in ("jax", "torch", "flax")}}
  mhz, source = _field(lscpu, "CPU max MHz"), "lscpu CPU max MHz"
  if mhz is None:
    mhz, source = _field(cpuinfo, "cpu MHz"), "/proc/cpuinfo cpu MHz"
  cpu_flags = set((_field(cpuinfo, "flags") or "").split())
  # Two FMA pipes x vector lanes x 2. AMD's Zen 4 runs 512-bit FMAs as two 256-bit halves.
  amd = "AuthenticAMD" in cpuinfo
  per_cycle, isa = ((64, "avx512f") if "avx512f" in cpu_flags and not amd else
                    (32, "avx2+fma, or avx512f on AMD") if {"avx2", "fma"} <= cpu_flags
                    else (None, None))
  if dev.platform == "gpu":
    peaks = [p for card, p in _GPU_PEAK_TFLOPS.items() if card in dev.device_kind]
    if not peaks:
      return machine, {"gflops": None, "how": f"n/a (no datasheet peak for {dev.device_kind})"}
    tflops = peaks[0][FLAGS.compute_dtype]
    return machine, {"gflops": tflops * 1e3, "how": f"{dev.device_kind} datasheet, dense "
                     f"{'TF32' if FLAGS.compute_dtype == 'float32' else 'bfloat16'} tensor cores"}
  if mhz is None or per_cycle is None:
    return machine, {"gflops": None, "how": "n/a"}
  ghz = float(mhz) / 1e3
  how = f"{cores} cores x {ghz:.3f} GHz ({source}) x {per_cycle} FLOPs/cycle ({isa})"
  return machine, {"gflops": cores * ghz * per_cycle, "how": how}


def _print(out: dict[str, Any]) -> None:
  """The machine, the peak, then one row per implementation per measure."""
  m, peak = out["machine"], out["peak"]["gflops"]
  print(f"machine: {m['device']}, {m['cores']} cores, {m['platform']} | jax {m['jax']}, "
        f"torch {m['torch']}, flax {m['flax']}")
  print(f"peak: {peak:,.1f} GFLOP/s = {out['peak']['how']}" if peak else
        f"peak: {out['peak']['how']}")
  print("model.impl=auto runs: " + ", ".join(f"{c} {i}" for c, i in out["auto"].items()))
  print(f"{'cell':11} {'measure':12} {'impl':16} {'median':>12} {'unit':6} {'jaxrnn/x':>8} "
        f"{'GFLOP/s':>8} %peak")
  rows = [(cell, measure, impl, r) for cell, measures in out["results"].items()
          for measure, by_impl in measures.items() for impl, r in by_impl.items()]
  rows += [("lstm", f"train@{t}", impl, r) for impl, by_seq in out["seq_sweep"].items()
           for t, r in by_seq.items()]
  rows += [("lstm", f"memory@{t}", impl, {"median": mib, "unit": "MiB"})
           for impl, by_seq in out["memory_mib"].items() for t, mib in by_seq.items()]
  for cell, measure, impl, r in rows:
    ratio = f"{r['ratio']:8.2f}" if "ratio" in r else " " * 8
    flops = f"{r['gflops']:8.2f}" if r.get("gflops") else ""
    flops += f" {100 * r['gflops'] / peak:5.1f}" if r.get("gflops") and peak else ""
    median = "n/a" if r["median"] is None else f"{r['median']:,.1f}"
    print(f"{cell:11} {measure:12} {impl:16} {median:>12} {r['unit']:6} {ratio} {flops}".rstrip())


def _validate() -> None:
  """Refuses a bad flag in one line before any row's process starts (or anything compiles):
  a row would otherwise fail minutes in, after the others were timed, in a traceback."""
  for name in ("layers", "hidden", "embed", "batch", "seq", "vocab", "steps", "rounds"):
    if FLAGS[name].value < 1:
      raise UserError(f"--{name} must be at least 1, got {FLAGS[name].value}")
  if FLAGS.warmup < 0:
    raise UserError(f"--warmup must be at least 0, got {FLAGS.warmup}")
  for name in ("seq_sweep", "memory_seqs"):
    for length in _split(FLAGS[name].value):
      if not length.isdigit() or int(length) < 1:
        raise UserError(f"--{name} takes a comma list of sequence lengths, e.g. 32,64 ('': "
                        f"none), got {length!r}")
  for measure in _split(FLAGS.measures):
    if measure not in _MEASURES:
      raise UserError(f"--measures takes a comma list of {', '.join(_MEASURES)}, got {measure!r}")
  try:
    jax.devices(FLAGS.device)  # takes no GPU memory: main turned preallocation off first
  except (RuntimeError, AssertionError):  # jax asserts where jax_platforms=cuda finds no GPU
    raise UserError(f"--device={FLAGS.device}: JAX has no such device here; use --device=cpu "
                    "(or gpu or tpu where there is one)") from None
  runnable = layers.runnable_impls(FLAGS.device)
  for impl in _split(FLAGS.impls):
    if impl not in runnable:
      raise UserError(f"--impls={impl} cannot run on {FLAGS.device}; the impls that run here: "
                      f"{', '.join(runnable)}")
  for spec in _split(FLAGS.cells):
    cell, hidden = _cell_spec(spec)
    try:
      config_lib.validate(_config(cell, None, hidden))
    except UserError as e:
      raise UserError(f"--cells entry {spec!r} (model.hidden_size={hidden}, model.embed_dim="
                      f"{FLAGS.embed} from --embed): {e}") from None


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}; bench.py takes flags only")
  for name, value in _QUICK.items() if FLAGS.quick else ():
    if not FLAGS[name].present:
      FLAGS[name].value = value
  if FLAGS.device == "gpu":
    # Every row is a process of its own on the one GPU: none may take 75% of its memory at
    # start, as JAX does by default (its children inherit this).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  jax.config.update("jax_platforms", {"gpu": "cuda"}.get(FLAGS.device, FLAGS.device))
  if not FLAGS.serve.startswith(tuple(_PEERS)):
    cli.tune_process()  # as jaxrnn's scripts run; the peers run as their users run them
  if not FLAGS.serve:  # a row's process takes the flags its parent checked
    _validate()
  peers = [p for p in _split(FLAGS.peers) if p in _PEERS and importlib.util.find_spec(p)]
  for name in set(_split(FLAGS.peers)) - set(peers):
    print(f"note: skipping peer {name!r}: unknown or not importable", file=sys.stderr)
  impls = _split(FLAGS.impls)
  rows = {f"jaxrnn[{i}]": i for i in impls} or {"jaxrnn": None}
  data = {"train": _tokens(FLAGS.batch, FLAGS.seq), "eval": _tokens(_LANES, _CHUNK),
          "prefix": _tokens(1, _PREFIX)[0][0]}
  if FLAGS.serve:
    _serve(FLAGS.serve, data)
    return
  machine, peak = _machine()
  results, sweep = {}, {}
  processes = {row: _Process(row) for row in (*rows, *peers)}
  try:
    for spec in _split(FLAGS.cells):
      cell, hidden = _cell_spec(spec)
      fns = {}
      for row, process in processes.items():
        measures = process.call("build", spec)
        fns[row] = {m: functools.partial(process.call, "run", m) for m in measures}
      per_token = _forward_flops_per_token(cell, hidden)
      pick = lambda measure: {name: f[measure] for name, f in fns.items() if measure in f}
      timing = {"train": (FLAGS.steps, FLAGS.warmup, "tok/s", 3 * per_token),
                "eval": (FLAGS.steps, FLAGS.warmup, "tok/s", per_token),
                "sample": (1, 1, "char/s")}
      results[spec] = {m: _timed(pick(m), *timing[m]) for m in _split(FLAGS.measures)}
    memory = {row: {t: _memory_mib("lstm", int(t), impl) for t in _split(FLAGS.memory_seqs)}
              for row, impl in rows.items()}
    for row, impl in rows.items() if _split(FLAGS.seq_sweep) else ():
      fns = {t: _jaxrnn("lstm", FLAGS.hidden, {**data, "train": _tokens(FLAGS.batch, int(t))},
                        impl)["train"] for t in _split(FLAGS.seq_sweep)}
      sweep[row] = _timed(fns, FLAGS.steps, FLAGS.warmup, "tok/s",
                          3 * _forward_flops_per_token("lstm", FLAGS.hidden))
      for r in sweep[row].values():
        del r["ratio"]  # one seq over another is no comparison of implementations
  finally:
    for process in processes.values():
      process.close()
  used = (*_QUICK, "layers", "vocab", "cells", "peers", "impls", "device", "measures",
          "memory_seqs", "compute_dtype")
  specs = {spec: _cell_spec(spec) for spec in _split(FLAGS.cells)}
  auto = {spec: layers.resolve(cells.get(cell, compute_dtype=FLAGS.compute_dtype), "auto",
                               hidden, FLAGS.seq) for spec, (cell, hidden) in specs.items()}
  malloc = {"jaxrnn": (cli.huge_page_env(os.environ) or os.environ).get("GLIBC_TUNABLES"),
            "peers": os.environ.get("GLIBC_TUNABLES")}  # how each row's process was started
  out = {"machine": machine, "peak": peak, "auto": auto, "results": results, "seq_sweep": sweep,
         "memory_mib": memory, "glibc_tunables": malloc, "flags": {k: FLAGS[k].value for k in used}}
  _print(out)
  pathlib.Path(FLAGS.out).write_text(json.dumps(out, indent=2))


def _run(argv: list[str]) -> None:
  """main, where a UserError ends the script in one line (exit 2), as `cli.run` has it; not
  cli.run itself, whose tune_process would reach the peers' processes too."""
  try:
    main(argv)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(_run, flags_parser=cli.parse_flags)
