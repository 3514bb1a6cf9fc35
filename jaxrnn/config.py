"""Configs: one `validate(config)` before anything is built, and saved configs made whole.

A config is an `ml_collections.ConfigDict` with the sections of `configs/default.py`, which
holds every field with a comment: `task`, `model`, `data`, `train`. `validate` checks every
field against the task and the cell, and each error names the field and its valid values,
so a run fails in its first second rather than after compiling (or, worse, after training).
`from_saved` merges a checkpoint's config onto today's defaults once, so fields added since
that checkpoint was written read their defaults and no code needs `.get(field, default)`.
"""

import math
import os
import sys
from typing import Any, Callable

import jax
import ml_collections

from configs import default
from jaxrnn import UserError, blocks, cells, data, layers, model, optim, tasks

Config = ml_collections.ConfigDict
OPTIMIZERS = ("adam", "adamw", "sgd")  # built by optim.make_optimizer
SCHEDULES = ("constant", "cosine", "linear", "step")  # built by optim.learning_rate
UNITS = ("steps", "epochs")
EPOCH_FIELDS = ("steps", "warmup_steps", "eval_every", "ckpt_every")  # in train.unit
TOKENS = ("char", "word")
POOLINGS = ("last", "mean")
Rule = tuple[Callable[[Any], bool], str]  # (is the value valid?, what the valid values are)
# Options that only some values of another field read: {option: (that field, the values that
# read it)}, from jaxrnn/blocks.py and optim.make_optimizer. Away from its default under any
# other value an option would do nothing, so `validate` refuses it (as `cells.from_config`
# refuses a cell option the cell does not take).
READ_BY: dict[str, tuple[str, tuple[str, ...]]] = {
    "model.mlp_expansion": ("model.block", ("residual", "hawk", "griffin")),
    "model.expand": ("model.block", ("xlstm", "mamba")),
    "model.conv_width": ("model.block", ("hawk", "griffin", "xlstm", "mamba")),
    "model.lru_width": ("model.block", ("hawk", "griffin")),
    "model.attention_window": ("model.block", ("griffin",)),
    "model.logits_soft_cap": ("task", ("lm",)),
    "train.weight_decay": ("train.optimizer", ("adamw",)),
    "train.b1": ("train.optimizer", ("adam", "adamw")),
    "train.b2": ("train.optimizer", ("adam", "adamw")),
}


def _one_of(choices: Any) -> Rule:
  return (lambda v: v in choices), "one of " + ", ".join(map(str, choices))


def _at_least(low: int) -> Rule:
  return (lambda v: v >= low), f">= {low}"


def _finite_at_least(low: float) -> Rule:
  return (lambda v: math.isfinite(v) and v >= low), f"a finite number >= {low}"


def _rate(none: bool = False) -> Rule:
  valid = "in [0, 1) (the fraction dropped)" + (", or None (model.dropout)" if none else "")
  return (lambda v: (none and v is None) or (v is not None and 0.0 <= v < 1.0)), valid


# Fields whose valid values do not depend on other fields.
RULES: dict[str, Rule] = {
    "task": _one_of(tuple(tasks.TASKS)),
    "model.cell": _one_of(tuple(cells.names())),
    "model.block": _one_of(blocks.BLOCKS),
    "model.mlp_expansion": _at_least(1),
    "model.expand": _at_least(1),
    "model.conv_width": _at_least(2),
    "model.lru_width": (_at_least(0)[0], ">= 0 (0: hidden_size)"),
    "model.attention_window": _at_least(1),
    "model.logits_soft_cap": _finite_at_least(0.0),
    "model.state_size": _at_least(1),
    "model.dt_rank": (_at_least(0)[0], ">= 0 (0: ceil(hidden_size / 16))"),
    "model.hidden_size": _at_least(1),
    "model.num_layers": _at_least(1),
    "model.num_heads": _at_least(1),
    "model.unroll": _at_least(1),
    "model.embed_scale": _finite_at_least(0.0),
    "model.dropout": _rate(),
    "model.dropout_in": _rate(none=True),
    "model.dropout_hidden": _rate(none=True),
    "model.dropout_out": _rate(none=True),
    "model.embed_dropout": _rate(),
    "model.weight_drop": _rate(),
    "model.init_scale": _finite_at_least(0.0),
    "model.ar": _finite_at_least(0.0),
    "model.tar": _finite_at_least(0.0),
    "model.impl": _one_of(layers.IMPLS),
    "model.compute_dtype": _one_of(tuple(cells.DTYPES)),
    "data.tokens": _one_of((None,) + TOKENS),
    "data.batching": _one_of(data.BATCHINGS),
    "data.batch_size": _at_least(1),
    "data.seq_len": _at_least(1),
    "data.max_vocab": ((lambda v: v == 0 or v >= 3), "0 (no cap) or >= 3"),
    "train.unit": _one_of(UNITS),
    "train.steps": _at_least(1),
    "train.decay_factor": ((lambda v: 0.0 < v <= 1.0), "in (0, 1] (the lr's factor per epoch)"),
    "train.decay_after": _at_least(0),
    "train.asgd_patience": (_at_least(0)[0], ">= 0 (0 turns NT-ASGD off)"),
    "train.optimizer": _one_of(OPTIMIZERS),
    "train.lr": _finite_at_least(0.0),
    "train.warmup_steps": _at_least(0),
    "train.weight_decay": _finite_at_least(0.0),
    "train.b1": ((lambda v: 0.0 <= v < 1.0), "in [0, 1) (adam's first-moment decay)"),
    "train.b2": ((lambda v: 0.0 <= v < 1.0), "in [0, 1) (adam's second-moment decay)"),
    "train.clip_norm": (_finite_at_least(0.0)[0], "a finite number >= 0 (0 turns clipping off)"),
    "train.accumulate": (_at_least(1)[0], ">= 1 (micro-batches per step; 1: none)"),
    "train.schedule": _one_of(SCHEDULES),
    "train.devices": (_at_least(0)[0], ">= 0 (0: all local devices)"),
    "train.log_every": _at_least(1),
    "train.eval_every": (_at_least(0)[0], ">= 0 (0: only at the end)"),
    "train.ckpt_every": _at_least(1),
    "train.keep": _at_least(1),
    "train.resume_step": ((lambda v: v in ("latest", "best") or (isinstance(v, str) and v.isdigit())),
                          "'latest', 'best' or a step number"),
    "train.eval_lanes": _at_least(1),
    "train.eval_chunk": _at_least(1),
}


def field(config: Config, name: str) -> Any:
  """The value of a dotted field name, e.g. field(config, "model.cell")."""
  for part in name.split("."):
    config = config[part]
  return config


def unread(config: Config) -> list[str]:
  """The options of READ_BY that `config`'s block and optimizer do not read."""
  return [option for option, (chooser, readers) in READ_BY.items()
          if field(config, chooser) not in readers]


def _fail(name: str, value: Any, valid: str) -> None:
  raise UserError(f"{name} must be {valid}, got {value!r}")


def _check_names(config: Config, reference: Config, prefix: str = "") -> None:
  """Every field of `config` exists in `reference` (the defaults), section by section."""
  for key, value in config.items():
    if key not in reference:
      raise UserError(f"unknown config field {prefix}{key}; valid fields here: "
                      f"{', '.join(sorted(reference))}")
    if isinstance(value, ml_collections.ConfigDict):
      _check_names(value, reference[key], f"{prefix}{key}.")


def validate(config: Config, training: bool = True) -> None:
  """Raises a UserError naming the first field the run cannot use, and its valid values.
  `training`: also what only training reads or needs, a warmup longer than the run and more
  memory than the machine has (`_check_memory`); evaluating a trained model reads no schedule
  and holds no gradients nor optimizer state."""
  _check_names(config, default.get_config())
  for name, (valid, description) in RULES.items():
    if not valid(value := field(config, name)):
      _fail(name, value, description)
  defaults = default.get_config()
  for option in unread(config):
    chooser, readers = READ_BY[option]
    if (value := field(config, option)) != (unset := field(defaults, option)):
      raise UserError(f"{option}={value!r} does nothing for {chooser}={field(config, chooser)!r} "
                      f"(it applies to {chooser}={' or '.join(readers)}); leave it at {unset!r}")
  model_config, data_config = config.model, config.data
  _check_block(model_config)
  cell = blocks.cell(model_config)  # the cell's own options: nonlinearity, forget_bias, ...
  layers.check(cell, model_config.impl)  # a kernel that cannot run this cell, or not here
  heads = model_config.num_heads
  sizes = model.layer_sizes(model_config)
  if "num_heads" in blocks.takes(model_config) and any(size % heads for size in sizes):
    raise UserError(f"model.num_heads={heads} must divide every layer's width "
                    f"({', '.join(map(str, sorted(set(sizes))))}: "
                    "model.hidden_size, and model.embed_dim for a tied last layer)")
  if not model_config.one_hot and model_config.embed_dim < 1:
    _fail("model.embed_dim", model_config.embed_dim, ">= 1 (or set model.one_hot=True)")
  if model_config.weight_drop > 0 and cell.recurrent_weight is None:
    with_weight = ", ".join(n for n in cells.names() if cells.get(n).recurrent_weight)
    raise UserError(f"model.weight_drop needs a cell with one recurrent matrix ({with_weight}), "
                    f"not {model_config.cell!r}; set model.weight_drop=0")
  if model_config.one_hot and (model_config.tie_embedding or model_config.embed_dropout > 0):
    raise UserError("model.tie_embedding and model.embed_dropout act on the embedding: set "
                    "model.one_hot=False")
  if config.train.asgd_patience and not config.train.eval_every:
    raise UserError("train.asgd_patience > 0 starts NT-ASGD from the validation losses, but "
                    "train.eval_every=0 validates only at the end: set train.eval_every (e.g. "
                    "one epoch)")
  if data_config.batch_size % config.train.accumulate:
    raise UserError(f"train.accumulate={config.train.accumulate} must divide data.batch_size="
                    f"{data_config.batch_size} (each micro-batch takes an equal share of the "
                    "lanes); choose a divisor")
  if config.train.schedule == "step" and config.train.warmup_steps:
    raise UserError("train.schedule=step has no warmup: set train.warmup_steps=0, or use "
                    "schedule=constant or cosine")
  if training and (warmup := config.train.warmup_steps) > (steps := config.train.steps):
    raise UserError(f"train.warmup_steps={warmup} is more than train.steps={steps} (both in "
                    f"train.unit): the lr would peak at {steps / warmup:.0%} of train.lr; set "
                    f"train.warmup_steps to at most {steps}")
  corpus = data.CORPORA.get(data_config.corpus)
  if config.task == "lm":
    _check_lm(config, corpus)
  else:
    _check_classify(config, corpus)
  if corpus is None or len(corpus.sources) == 1 or corpus.classes:  # corpora cut by fractions
    val_frac, _ = data.fractions(corpus or data.Corpus(()), data_config)
    if val_frac == 0:
      raise UserError("data.val_frac is 0, which leaves no validation split to measure the run "
                      "on; set it above 0 (e.g. 0.1)")
  if training:
    _check_memory(config)


def _check_block(model_config: Config) -> None:
  """The block can wrap the cell, at these widths."""
  block, name = model_config.block, model_config.cell
  if block in blocks.CELLS and name != blocks.CELLS[block]:
    raise UserError(f"model.block={block} is built around the {blocks.CELLS[block]} cell: set "
                    f"model.cell={blocks.CELLS[block]}, or use model.block=residual for "
                    f"{name!r}")
  sizes = model.layer_sizes(model_config)
  inputs = [None if model_config.one_hot else model_config.embed_dim] + sizes[:-1]
  if name == "mamba" and block == "stack" and inputs != sizes:
    raise UserError("the mamba cell keeps its input's width, so a stack of it needs "
                    f"model.embed_dim = model.hidden_size ({model_config.hidden_size}) and no "
                    "one_hot or tied last layer; or use model.block=mamba or residual")
  if block != "stack" and model_config.bidirectional:
    raise UserError(f"model.bidirectional runs a stack of cells both ways; model.block={block} "
                    "runs one direction: set model.block=stack or model.bidirectional=False")
  if block != "stack" and model_config.tie_embedding and (
      model_config.embed_dim != model_config.hidden_size):
    raise UserError(f"model.tie_embedding reads the residual stream (model.hidden_size="
                    f"{model_config.hidden_size}) through the embedding (model.embed_dim="
                    f"{model_config.embed_dim}): set them equal")
  if not set(model_config.slstm_at) <= set(range(model_config.num_layers)) or (
      model_config.slstm_at and block != "xlstm"):
    raise UserError(f"model.slstm_at={tuple(model_config.slstm_at)} must name layers 0.."
                    f"{model_config.num_layers - 1} of model.block=xlstm (sLSTM blocks), got "
                    f"model.block={block}")
  heads = model_config.num_heads
  if block in ("hawk", "griffin") and blocks.griffin.lru_width(model_config) % heads:
    raise UserError(f"model.num_heads={heads} must divide the RG-LRU's width "
                    f"{blocks.griffin.lru_width(model_config)} (model.lru_width, 0: hidden_size)")
  if block == "griffin" and model_config.num_layers < 3:
    raise UserError(f"model.block=griffin attends at every third layer (2, 5, ...), so it needs "
                    f"model.num_layers >= 3 (got {model_config.num_layers}); or use "
                    "model.block=hawk, its all-recurrent twin")
  if block == "griffin" and (model_config.hidden_size // heads) % 4:
    raise UserError(f"griffin's attention heads are model.hidden_size / model.num_heads = "
                    f"{model_config.hidden_size / heads:g} wide, which RoPE needs a multiple of "
                    "4: change model.hidden_size or model.num_heads")
  if block == "xlstm":
    if model_config.hidden_size % heads or blocks.xlstm.inner(model_config) % heads:
      raise UserError(f"model.num_heads={heads} must divide model.hidden_size="
                      f"{model_config.hidden_size} and the mLSTM block's inner width "
                      f"{blocks.xlstm.inner(model_config)} (model.expand * hidden_size, rounded "
                      "up to a multiple of 64)")


def _check_lm(config: Config, corpus: data.Corpus | None) -> None:
  """The corpus must be a text corpus' name or a text file."""
  if config.model.bidirectional:
    raise UserError("model.bidirectional=True would let the language model see the future (the "
                    "backward direction reads the tokens it must predict); set it to False, or "
                    "use task=classify")
  if corpus is not None and corpus.classes:
    raise UserError(f"data.corpus={config.data.corpus!r} is labelled sentences: use it with "
                    "task=classify")
  if corpus is None:
    data.text_file(config.data.corpus)
  if config.model.tie_embedding and config.model.num_layers == 1 and (
      config.model.hidden_size != config.model.embed_dim):
    raise UserError(f"model.tie_embedding makes the last layer model.embed_dim="
                    f"{config.model.embed_dim} wide, but the one layer is model.hidden_size="
                    f"{config.model.hidden_size}: set them equal, or add layers")


def _check_classify(config: Config, corpus: data.Corpus | None) -> None:
  """A labelled corpus, an embedding, a pooling, and as many outputs as the corpus has classes."""
  model_config = config.model
  if corpus is None or not corpus.classes:
    labelled = ", ".join(n for n, c in data.CORPORA.items() if c.classes)
    raise UserError(f"task=classify needs a labelled sentence corpus ({labelled}), got "
                    f"data.corpus={config.data.corpus!r}")
  if model_config.one_hot:
    raise UserError("the classifier reads words through an embedding: set model.one_hot=False")
  for name in ("tie_embedding", "ar", "tar"):
    if model_config[name]:
      raise UserError(f"model.{name} belongs to the language model (task=lm); the classifier "
                      f"has no next-token head: leave it at {default.get_config().model[name]}")
  if model_config.pooling not in POOLINGS:
    _fail("model.pooling", model_config.pooling, _one_of(POOLINGS)[1])
  classes = corpus.classes
  binary = len(classes) == 2
  if model_config.num_classes not in (len(classes), 1 if binary else len(classes)):
    raise UserError(f"model.num_classes is {model_config.num_classes} but {config.data.corpus} "
                    f"has {len(classes)} classes ({', '.join(classes)}); set it to {len(classes)}"
                    + (" (softmax) or 1 (one sigmoid unit)" if binary else ""))


def physical_memory() -> int | None:
  """Bytes of memory this machine has; None where the system does not say (not Linux)."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (AttributeError, ValueError, OSError):  # no os.sysconf (Windows), or no such name
    return None


def shapes(config: Config, vocab_size: int, steps_per_epoch: int = 1) -> tuple[Any, Any, Any]:
  """The (params, optimizer state, carry) `config` trains, as `jax.ShapeDtypeStruct`s (nothing
  is built): what its memory is counted from (`training_memory`), and what a resumed run's
  config must keep (`checkpoint.check_compatible`)."""
  task = tasks.get(config.task)
  params = jax.eval_shape(lambda key: task.init(key, config.model, vocab_size),
                          jax.random.key(0))
  opt_state = jax.eval_shape(optim.make_optimizer(config.train, steps_per_epoch).init, params)
  carry = jax.eval_shape(lambda: task.initial_carry(config.model, config.data.batch_size))
  return params, opt_state, carry


def training_memory(config: Config) -> tuple[int, int, int]:
  """(parameters, bytes of the training state, bytes of activations): a lower bound on what
  training `config` holds at once, from shapes alone (`jax.eval_shape`: nothing is built).

  The state is the parameters, their gradients and the optimizer's state (Adam's two moments,
  NT-ASGD's mean): 4 copies of the parameters under Adam. The activations are each layer's
  output at every step of one micro-batch (data.batch_size / train.accumulate lanes x
  data.seq_len) in float32, which the backward pass keeps. Left out, so that a refused run
  surely could not fit: the vocabulary's rows (the corpus is not read yet; a vocabulary of 2
  is counted), what cells keep besides their outputs (gates) and XLA's scratch.
  """
  params, opt_state, _ = shapes(config, vocab_size=2)
  state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((params, params, opt_state)))
  lanes = config.data.batch_size // config.train.accumulate
  activations = lanes * config.data.seq_len * sum(model.layer_sizes(config.model)) * 4
  return model.num_params(params), state, activations


def _check_memory(config: Config) -> None:
  """Refuses a run whose `training_memory` exceeds this machine's memory (and each of its
  accelerators'), which would fail in XLA with a long out-of-memory traceback; skipped where
  the machine's memory is unknown."""
  if (host := physical_memory()) is None:
    return
  params, state, activations = training_memory(config)
  if state + activations <= host:
    return
  # An accelerator holds the whole state and its share of the lanes in a memory of its own.
  devices = jax.local_devices()
  device = max((d.memory_stats() or {}).get("bytes_limit", 0) for d in devices)
  if state + activations / len(devices) <= device:
    return
  size = lambda n: f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"
  memory = size(host) + (f" ({size(device)} per device)" if device else "")
  raise UserError(f"this model cannot train here: it needs at least {size(state + activations)} "
                  f"({params:,} parameters, {size(state)} with their gradients and the "
                  f"optimizer's state; {size(activations)} of layer outputs per batch) but this "
                  f"machine has {memory} of memory; lower model.hidden_size or model.num_layers "
                  "(or the batch: data.batch_size, data.seq_len)")


def in_steps(config: Config, steps_per_epoch: int) -> Config:
  """`config` with train.unit "steps": EPOCH_FIELDS times `steps_per_epoch` if they were in
  epochs (passes over the training split, `steps_per_epoch` batches each)."""
  if config.train.unit == "steps":
    return config
  config = config.copy_and_resolve_references()
  for name in EPOCH_FIELDS:
    config.train[name] *= steps_per_epoch
  config.train.unit = "steps"
  return config


def from_saved(saved: dict[str, Any]) -> Config:
  """A checkpoint's config (as saved, a nested dict) merged onto `configs/default.py`.

  Fields the saved config lacks are newer than the checkpoint, whose run had their defaults.
  Fields this version does not know are dropped with a note, and options that had no effect
  on that run (cell options the saved cell does not take, block and optimizer options its
  block and optimizer do not read: READ_BY) are reset to their defaults, so that every
  checkpoint written before these checks existed still restores.
  """
  config = default.get_config()
  if saved.get("model", {}).get("block") == "griffin" and "attention_window" not in saved["model"]:
    # Before Griffin had its attention layers, model.block=griffin was what is now hawk.
    saved = {**saved, "model": {**saved["model"], "block": "hawk"}}
  _merge(config, saved, "")
  if config.model.cell in cells.names():
    taken = blocks.takes(config.model)
    for option, value in cells.options().items():
      if option not in taken:
        config.model[option] = value
  for option in unread(config):
    section, name = option.split(".")
    config[section][name] = field(default.get_config(), option)
  return config


def _merge(config: Config, saved: dict[str, Any], prefix: str) -> None:
  for key, value in saved.items():
    if key not in config:
      print(f"note: ignoring the saved config's field {prefix}{key}, which this version of jaxrnn "
            "does not know", file=sys.stderr)
    elif isinstance(config[key], ml_collections.ConfigDict):
      _merge(config[key], value, f"{prefix}{key}.")
    else:
      config[key] = value
