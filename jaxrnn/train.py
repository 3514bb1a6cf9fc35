"""Training and evaluation: train state, jit-compiled steps, whole-split metrics, the loop.

One loop serves every task (`TASKS`, chosen by `config.task`): the character/word language
model ('lm') and the sentence classifier ('classify'); a task brings its data, parameters,
carried state, loss and evaluation. Metrics are sums (`nll_sum`, `tokens`), turned into
perplexity `exp(nll_sum / tokens)`, bits per character `nll_sum / tokens / ln 2` or accuracy
on the host; per-batch figures are never averaged. Batches are batch-major: LM inputs/targets
<int>[b, t]; classifier inputs<int>[b, t], lengths<int>[b], targets<int>[b].
"""

import dataclasses
import functools
import json
import math
import pathlib
import platform
import subprocess
import sys
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrnn import UserError, __version__, checkpoint, data, model, parallel

Config = Any  # ml_collections.ConfigDict


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def learning_rate(config: Config) -> optax.Schedule:
  """Constant, or linear warmup then cosine decay to 0 at `steps` (config: the `train` section)."""
  if config.schedule == "constant":
    if config.warmup_steps:
      return optax.linear_schedule(0.0, config.lr, config.warmup_steps)
    return optax.constant_schedule(config.lr)
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup_steps,
                                              max(config.steps, config.warmup_steps + 1))
  raise UserError(f"train.schedule must be 'constant' or 'cosine', got {config.schedule!r}")


def make_optimizer(config: Config) -> optax.GradientTransformation:
  """Global-norm clipping first, then adam / adamw / sgd with the learning-rate schedule."""
  lr = learning_rate(config)
  optimizers = {
      "adam": lambda: optax.adam(lr),
      "adamw": lambda: optax.adamw(lr, weight_decay=config.weight_decay),
      "sgd": lambda: optax.sgd(lr),
  }
  if config.optimizer not in optimizers:
    raise UserError(f"train.optimizer must be one of {', '.join(optimizers)}, got {config.optimizer!r}")
  clip = optax.clip_by_global_norm(config.clip_norm) if config.clip_norm > 0 else optax.identity()
  return optax.chain(clip, optimizers[config.optimizer]())


def create_train_state(config: Config, vocab_size: int, tx: optax.GradientTransformation) -> TrainState:
  """Fresh parameters and optimizer state from `config.train.seed`."""
  params_key, dropout_key = jax.random.split(jax.random.key(config.train.seed))
  params = task_of(config).init(params_key, config.model, vocab_size)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=dropout_key)


def _nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood<float>[b, t] in nats."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def _lm_loss(params: Any, carry: Any, batch: dict[str, jax.Array], config: Config,
             rng: jax.Array) -> tuple[jax.Array, Any]:
  """(mean next-token loss of batch {inputs, targets}<int>[b, t], the final carry)."""
  carry, logits = model.apply(params, carry, batch["inputs"], config=config, train=True, rng=rng)
  return _nll(logits, batch["targets"]).mean(), carry


def _label_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-sentence cross-entropy<float>[b] in nats: binary for one (sigmoid) output, else softmax."""
  if logits.shape[-1] == 1:
    return optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(logits.dtype))
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _predictions(logits: jax.Array) -> jax.Array:
  """labels<int>[b] from logits<float>[b, c]: logit > 0 for one sigmoid output, else argmax."""
  if logits.shape[-1] == 1:
    return (logits[:, 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1)


def _classify_loss(params: Any, carry: Any, batch: dict[str, jax.Array], config: Config,
                   rng: jax.Array) -> tuple[jax.Array, Any]:
  """(mean cross-entropy of batch {inputs, lengths, targets}, the carry unchanged: there is none)."""
  logits = model.apply_classifier(params, batch["inputs"], batch["lengths"], config=config,
                                  train=True, rng=rng)
  return _label_nll(logits, batch["targets"]).mean(), carry


def train_step(state: TrainState, batch: dict[str, jax.Array], carry: Any, *, config: Config,
               tx: optax.GradientTransformation,
               across_devices: bool = False) -> tuple[TrainState, Any, dict[str, jax.Array]]:
  """One optimizer step on a batch of the config's task; the carry enters as a constant.

  Returns the new state, the final carry (for the next batch of the same lanes) and metrics:
  mean loss (nats per token or sentence), gradient global norm before clipping, learning rate.
  Under `parallel.pmap` with `across_devices`, gradients and loss are averaged over devices, and
  each row's dropout key comes from its global row index, so any device count gives the same step.
  """
  rows = batch["inputs"].shape[0]
  first_row = parallel.row_offset(rows) if across_devices else 0
  step_rng = jax.random.fold_in(state.rng, state.step)
  rng = jax.vmap(lambda i: jax.random.fold_in(step_rng, i))(first_row + jnp.arange(rows))

  def loss_fn(params):
    return task_of(config).loss(params, carry, batch, config.model, rng)

  (loss, new_carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if across_devices:
    loss, grads = parallel.mean((loss, grads))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
             "lr": learning_rate(config.train)(state.step)}
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, jax.lax.stop_gradient(new_carry), metrics


def eval_step(params: Any, batch: dict[str, jax.Array], carry: Any, *,
              config: Config) -> tuple[Any, jax.Array, jax.Array]:
  """(carry, nll<float>[b], tokens<float>[b]) summed over one masked chunk, per lane; no dropout."""
  carry, logits = model.apply(params, carry, batch["inputs"], config=config.model)
  nll = _nll(logits, batch["targets"]) * batch["mask"]
  return carry, nll.sum(axis=1), batch["mask"].sum(axis=1)


def make_lm_evaluator(config: Config, devs: parallel.Devices | None = None
                      ) -> Callable[[Any, np.ndarray], dict[str, float]]:
  """`evaluate(params, ids<int>[n])`: loss, perplexity, bpc and tokens over a whole split.

  The split is cut into `train.eval_lanes` contiguous lanes read side by side (split over
  the devices), the state carried along each lane; every target counts once, padding never.
  Per-lane sums are added up on the host in float64, in lane order, whatever the device count.
  One lane is the exact sequential evaluation; 16 lanes differ from it only by the 15 lane
  starts from a zero state. `devs`: all local devices by default.
  """
  devs = devs or parallel.devices()
  parallel.check_divisible(config.train.eval_lanes, devs, "train.eval_lanes")
  step = parallel.pmap(functools.partial(eval_step, config=config), devs)
  zeros = model.initial_carry(config.model, config.train.eval_lanes)

  def evaluate(params, ids):
    params = parallel.replicate(params, devs)
    carry = parallel.shard(parallel.process_rows(zeros, devs), devs)
    nll, tokens = 0.0, 0.0
    for chunk in data.eval_chunks(ids, config.train.eval_lanes, config.train.eval_chunk):
      carry, chunk_nll, chunk_tokens = step(
          params, parallel.shard(parallel.process_rows(chunk, devs), devs), carry)
      nll += parallel.unshard(chunk_nll).astype(np.float64)
      tokens += parallel.unshard(chunk_tokens).astype(np.float64)
    nll, tokens = parallel.all_rows((nll, tokens), devs)
    loss = float(nll.sum() / tokens.sum())
    return {"loss": loss, "perplexity": math.exp(loss), "bpc": loss / math.log(2),
            "tokens": int(tokens.sum())}

  return evaluate


def classify_eval_step(params: Any, batch: dict[str, jax.Array], *,
                       config: Config) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(nll<float>[b], correct<float>[b], mask<float>[b]) of one masked chunk of sentences."""
  logits = model.apply_classifier(params, batch["inputs"], batch["lengths"], config=config.model)
  correct = (_predictions(logits) == batch["targets"]).astype(jnp.float32)
  mask = batch["mask"]
  return _label_nll(logits, batch["targets"]) * mask, correct * mask, mask


def make_classify_evaluator(config: Config, devs: parallel.Devices | None = None
                            ) -> Callable[[Any, dict[str, np.ndarray]], dict[str, float]]:
  """`evaluate(params, split)`: loss (nats/sentence), accuracy and examples over a whole split.

  The split (`data.encode_sentences`) is read `train.eval_lanes` sentences at a time, split over
  the devices; per-row sums are added up on the host in float64, in row order, whatever the
  device count. `devs`: all local devices by default.
  """
  devs = devs or parallel.devices()
  parallel.check_divisible(config.train.eval_lanes, devs, "train.eval_lanes")
  step = parallel.pmap(functools.partial(classify_eval_step, config=config), devs)

  def evaluate(params, split):
    if not len(split["targets"]):
      raise UserError("no sentences to evaluate in this split: raise data.val_frac or "
                      "data.test_frac above 0")
    params = parallel.replicate(params, devs)
    sums = 0.0
    for chunk in data.sentence_chunks(split, config.train.eval_lanes):
      out = step(params, parallel.shard(parallel.process_rows(chunk, devs), devs))
      sums += np.stack(parallel.unshard(out)).astype(np.float64)  # [3, b_process]
    nll, correct, count = parallel.all_rows(sums.T, devs).sum(axis=0)
    return {"loss": float(nll / count), "accuracy": float(correct / count),
            "examples": int(count)}

  return evaluate


def make_evaluator(config: Config, devs: parallel.Devices | None = None
                   ) -> Callable[[Any, Any], dict[str, float]]:
  """`evaluate(params, split)` over a whole encoded split (`prepare_data`) for the config's task."""
  return task_of(config).make_evaluator(config, devs)


def check_config(config: Config) -> None:
  """Fails early, with a UserError, on config values the code would only trip over later."""
  task = task_of(config)
  jax.eval_shape(lambda: task.init(jax.random.key(0), config.model, 2))
  make_optimizer(config.train)
  if config.train.steps < 1:
    raise UserError(f"train.steps must be >= 1, got {config.train.steps}")
  for field in ("eval_lanes", "eval_chunk", "ckpt_every", "keep", "log_every"):
    if config.train[field] < 1:
      raise UserError(f"train.{field} must be >= 1, got {config.train[field]}")


class _Log:
  """metrics.jsonl rows, plus progress on stderr (a bar on a terminal, plain lines otherwise).

  Every row carries `elapsed_s`, the run's wall time (summed over resumed sessions). On
  resume, rows past the restored step (written after the last checkpoint) are dropped,
  since those steps run again. Only the main process of a multi-host run writes.
  """

  def __init__(self, workdir: pathlib.Path, steps: int, resumed_at: int = 0, enabled: bool = True):
    self.enabled, self.file, self.bar = enabled, None, None
    self.start, self.elapsed_before = time.perf_counter(), 0.0
    if not enabled:
      return
    path = workdir / "metrics.jsonl"
    if path.exists():
      kept = [json.loads(r) for r in path.read_text().splitlines()]
      kept = [r for r in kept if r["step"] <= resumed_at]
      path.write_text("".join(json.dumps(r) + "\n" for r in kept))
      self.elapsed_before = max((r.get("elapsed_s", 0.0) for r in kept), default=0.0)
    self.file = open(path, "a")
    if sys.stderr.isatty():
      import tqdm  # the usual progress bar; only on an interactive terminal
      self.bar = tqdm.tqdm(total=steps, initial=resumed_at, file=sys.stderr, dynamic_ncols=True)

  def note(self, text: str) -> None:
    if self.enabled:
      (self.bar.write if self.bar else lambda s: print(s, file=sys.stderr))(text)

  def write(self, row: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {**row, "elapsed_s": round(self.elapsed_before + time.perf_counter() - self.start, 3)}
    self.file.write(json.dumps(row) + "\n")
    self.file.flush()
    if row["split"] == "train" and self.bar is not None:
      self.bar.update(row["step"] - self.bar.n)
      self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
    else:
      self.note(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in row.items()))

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.file is not None:
      self.file.close()


def _prepare_text(config: Config, vocab: data.Vocab | None) -> tuple[data.Vocab, dict[str, np.ndarray]]:
  """The LM's vocabulary and each split as ids<int>[n]."""
  splits, level = data.load_splits(config.data)
  vocab = data.Vocab.build(splits["train"], level) if vocab is None else vocab
  return vocab, {name: vocab.encode(text) for name, text in splits.items()}


def _prepare_sentences(config: Config, vocab: data.Vocab | None
                       ) -> tuple[data.Vocab, dict[str, dict[str, np.ndarray]]]:
  """The classifier's word vocabulary and each split as `data.encode_sentences` arrays."""
  splits, classes = data.load_sentences(config.data)
  binary = len(classes) == 2
  if config.model.num_classes not in (len(classes), 1 if binary else len(classes)):
    raise UserError(f"model.num_classes is {config.model.num_classes} but {config.data.corpus} has "
                    f"{len(classes)} classes ({', '.join(classes)}); set it to {len(classes)}"
                    + (" (softmax) or 1 (one sigmoid unit)" if binary else ""))
  if vocab is None:
    vocab = data.word_vocab(splits["train"][0], config.data.max_vocab)
  return vocab, {name: data.encode_sentences(split, vocab, config.data.seq_len)
                 for name, split in splits.items()}


def prepare_data(config: Config, vocab: data.Vocab | None = None) -> tuple[data.Vocab, dict[str, Any]]:
  """The vocabulary (built on the training split unless given) and every split encoded."""
  return task_of(config).prepare_data(config, vocab)


def load_run(workdir: str, step: int | str = "latest") -> tuple[Config, data.Vocab, Any, int]:
  """(config, vocab, params, step) of a saved run, from its workdir alone."""
  if not pathlib.Path(workdir, "checkpoints").is_dir():
    raise UserError(f"no checkpoints in {workdir}: not a jaxrnn workdir, or it never saved one")
  mngr = checkpoint.manager(workdir)
  config, vocab = checkpoint.config_and_vocab(checkpoint.read_meta(mngr, step))
  tx = make_optimizer(config.train)
  state = jax.eval_shape(lambda: create_train_state(config, len(vocab), tx))
  carry = jax.eval_shape(lambda: task_of(config).initial_carry(config.model, config.data.batch_size))
  state, _, meta = checkpoint.restore(mngr, state, carry, step)
  return config, vocab, state.params, meta["step"]


def _resume(mngr, state, carry, config, vocab) -> tuple[TrainState, Any, int]:
  """The latest readable checkpoint's state, carry and data position, if the workdir has one."""
  if mngr.latest_step() is None:
    return state, carry, 0
  saved = checkpoint.read_meta(mngr)
  checkpoint.check_compatible(saved["config"], config)
  if saved["vocab"]["tokens"] != list(vocab.tokens):
    raise UserError("the corpus' vocabulary differs from the one this workdir's checkpoint was "
                    "trained with; use the same corpus, or a new --workdir")
  state, carry, meta = checkpoint.restore(mngr, state, carry)
  print(f"resuming from the checkpoint at step {meta['step']}", file=sys.stderr)
  return state, carry, meta["position"]


def _write_run_files(workdir: pathlib.Path, config: Config, vocab: data.Vocab,
                     devs: parallel.Devices) -> None:
  """The resolved config, the vocabulary and what the run ran on, for reproducing it."""
  (workdir / "config.json").write_text(config.to_json(indent=2))
  (workdir / "vocab.json").write_text(vocab.to_json())
  (workdir / "run.json").write_text(json.dumps({
      "jaxrnn": __version__, "git_commit": git_commit(), "jax": jax.__version__,
      "jaxlib": jax.lib.__version__, "device_kind": devs.local[0].device_kind,
      "devices": devs.count, "processes": devs.process_count, "cpu": cpu_name()}))


def git_commit() -> str | None:
  """The commit of the jaxrnn checkout in use, with "+dirty" for uncommitted changes; None if
  jaxrnn was installed from a wheel rather than run from a git checkout."""
  root = pathlib.Path(__file__).resolve().parent.parent
  if not (root / ".git").exists():
    return None
  git = lambda *args: subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                     text=True, check=True, timeout=30).stdout.strip()
  try:
    head, changes = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
  except (OSError, subprocess.SubprocessError):
    return None
  return head + ("+dirty" if changes else "")


def cpu_name() -> str:
  """The host CPU's model name (device_kind says only "cpu"), for comparing runs' speed."""
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  names = [line.split(":", 1)[1].strip() for line in
           (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
           if line.startswith("model name")]
  return names[0] if names else platform.processor() or platform.machine()


def train_and_evaluate(config: Config, workdir: str) -> dict[str, Any]:
  """Trains per `config` (resuming from `workdir`'s latest checkpoint), logging to metrics.jsonl.

  The step runs under `parallel.pmap` over `train.devices` devices (one included), each with
  its block of the batch's lanes and their carried states. Returns the final validation
  figures, or {"step", "preempted": True} after a SIGTERM/SIGINT.
  """
  check_config(config)
  task = task_of(config)
  devs = parallel.devices(config.train.devices)
  parallel.check_divisible(config.data.batch_size, devs, "data.batch_size")
  evaluate = make_evaluator(config, devs)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  vocab, ids = prepare_data(config)
  tx = make_optimizer(config.train)
  zeros = task.initial_carry(config.model, config.data.batch_size)
  mngr = checkpoint.manager(workdir, config.train.keep)
  state, carry, position = _resume(mngr, create_train_state(config, len(vocab), tx), zeros,
                                   config, vocab)
  if devs.is_main:
    _write_run_files(workdir, config, vocab, devs)

  def local(rows):  # this process' lanes, one block per device
    return parallel.shard(parallel.process_rows(rows, devs), devs)

  step_fn = parallel.pmap(functools.partial(train_step, config=config, tx=tx, across_devices=True),
                          devs, donate_argnums=(0,))
  batches = task.train_batches(ids["train"], config, position)
  first = int(state.step) + 1
  params_count = model.num_params(state.params)
  state, carry, zeros = parallel.replicate(state, devs), local(carry), local(zeros)
  log = _Log(workdir, config.train.steps, resumed_at=first - 1, enabled=devs.is_main)
  log.note(f"{params_count:,} parameters, vocabulary {len(vocab)}, {task.size(ids['train']):,} "
           f"training {task.unit}, {devs.count} {devs.local[0].platform} device(s)")

  def evaluate_splits(step, splits):
    params = parallel.unreplicate(state.params)
    rows = {s: evaluate(params, ids[s]) for s in splits if task.size(ids[s]) > 0}
    for split, row in rows.items():
      log.write({"step": step, "split": split, **row})
    return rows

  tokens_per_step = config.data.batch_size * config.data.seq_len  # padding included
  start, evals = time.perf_counter(), {}
  train_seconds, ticked_at = 0.0, first - 1  # time in training steps since the last train row
  with checkpoint.Preemption() as preemption:
    for step in range(first, config.train.steps + 1):
      tick = time.perf_counter()
      batch = next(batches)
      if batch["reset"]:
        carry = zeros
      state, carry, metrics = step_fn(state, local({k: v for k, v in batch.items() if k != "reset"}),
                                      carry)
      metrics = parallel.unreplicate(metrics)
      loss = float(metrics["loss"])  # waits for the step, so the timing below is the step's
      train_seconds += time.perf_counter() - tick
      if not math.isfinite(loss):  # stop before this state can reach a checkpoint
        log.close()
        raise UserError(f"loss is {loss} at step {step}; lower train.lr (now {config.train.lr}) "
                        f"or set train.clip_norm (now {config.train.clip_norm}) lower")
      last = step == config.train.steps
      if step % config.train.log_every == 0 or last:
        log.write({"step": step, "split": "train", "loss": loss,
                   "grad_norm": float(metrics["grad_norm"]), "lr": float(metrics["lr"]),
                   "tokens_per_s": (step - ticked_at) * tokens_per_step / train_seconds})
        train_seconds, ticked_at = 0.0, step
      evaluated = last or (config.train.eval_every and step % config.train.eval_every == 0)
      if evaluated:
        evals = evaluate_splits(step, task.final_splits if last else ("val",))
      if last or preemption.requested or step % config.train.ckpt_every == 0:
        checkpoint.save(mngr, parallel.unreplicate(state),
                        parallel.all_rows(parallel.unshard(carry), devs), batches.position,
                        config, vocab,
                        val_loss=evals["val"]["loss"] if evaluated and "val" in evals else None)
      if preemption.requested:
        log.close()
        return {"step": step, "preempted": True}
  if not evals:  # the workdir's run had already finished: report it again
    evals = evaluate_splits(first - 1, task.final_splits)
  log.close()

  result = {"step": int(parallel.unreplicate(state.step)), "params": params_count,
            "devices": devs.count, "seconds": round(time.perf_counter() - start, 1)}
  for split, row in evals.items():
    result.update(task.summary(split, row))
  return result


def _lm_summary(split: str, row: dict[str, Any]) -> dict[str, Any]:
  """The LM's result keys: val_loss, perplexity, bpc, tokens; test_loss, test_perplexity, ..."""
  prefix = "" if split == "val" else f"{split}_"
  return {f"{split}_loss": row["loss"], **{prefix + k: row[k] for k in ("perplexity", "bpc", "tokens")}}


@dataclasses.dataclass(frozen=True)
class Task:
  """What a task brings to the one training loop."""
  init: Callable[[jax.Array, Config, int], Any]  # (key, model config, vocab size) -> params
  initial_carry: Callable[[Config, int], Any]  # (model config, b) -> state carried across batches
  loss: Callable[..., tuple[jax.Array, Any]]  # (params, carry, batch, model cfg, rng) -> (loss, carry)
  prepare_data: Callable[[Config, data.Vocab | None], tuple[data.Vocab, dict[str, Any]]]
  train_batches: Callable[[Any, Config, int], Any]  # (train split, config, position) -> iterator
  make_evaluator: Callable[..., Callable[[Any, Any], dict[str, Any]]]  # (config, devs)
  final_splits: tuple[str, ...]  # evaluated after the last step
  summary: Callable[[str, dict[str, Any]], dict[str, Any]]  # one split's figures -> result keys
  size: Callable[[Any], int]  # what an encoded split holds to learn from or evaluate
  unit: str  # of `size`


TASKS: dict[str, Task] = {
    "lm": Task(
        init=model.init, initial_carry=model.initial_carry, loss=_lm_loss,
        prepare_data=_prepare_text,
        train_batches=lambda ids, config, position: data.train_batches(
            ids, config.data, config.train.seed, position),
        make_evaluator=make_lm_evaluator, final_splits=("val", "test"), summary=_lm_summary,
        size=lambda ids: len(ids) - 1, unit="tokens"),
    "classify": Task(
        init=model.init_classifier, initial_carry=lambda config, b: (),  # nothing crosses batches
        loss=_classify_loss, prepare_data=_prepare_sentences,
        train_batches=lambda split, config, position: data.SentenceBatches(
            split, config.data.batch_size, config.train.seed, position),
        # The test split is left to eval.py, so it is read once per reported figure.
        make_evaluator=make_classify_evaluator, final_splits=("val",),
        summary=lambda split, row: {f"{split}_{k}": v for k, v in row.items()},
        size=lambda split: len(split["targets"]), unit="sentences"),
}


def task_of(config: Config) -> Task:
  """The task named by `config.task`; configs saved before there were tasks are LMs."""
  name = config.get("task", "lm")
  if name not in TASKS:
    raise UserError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
  return TASKS[name]
