"""Tests for jaxrnn.config: every bad field is named before anything is built; saved configs
are merged onto today's defaults."""

import importlib
import inspect
import pathlib

import jax
import pytest

from configs import default
from jaxrnn import UserError, cells, config as config_lib, model, optim, train


@pytest.mark.parametrize("sections, message", [
    ({"task": "translate"}, "task must be one of lm, classify, got 'translate'"),
    ({"model": {"cell": "nope"}}, "model.cell must be one of rnn, gru, lstm"),
    ({"model": {"hidden_size": 0}}, "model.hidden_size must be >= 1, got 0"),
    ({"model": {"num_layers": 0}}, "model.num_layers must be >= 1, got 0"),
    ({"model": {"embed_dim": 0}}, "model.embed_dim must be >= 1 \\(or set model.one_hot=True\\)"),
    ({"model": {"impl": "cuda"}}, "model.impl must be one of auto, fused, scan, core, onednn, cudnn, pallas, got 'cuda'"),
    ({"model": {"compute_dtype": "float16"}}, "model.compute_dtype must be one of"),
    ({"model": {"cell": "rnn", "nonlinearity": "sigmoid"}}, "model.nonlinearity must be one of tanh"),
    ({"model": {"cell": "gru", "forget_bias": 1.0}},
     "model.forget_bias=1.0 does nothing for cell 'gru' \\(it applies to lstm, lnlstm\\)"),
    ({"model": {"bidirectional": True}}, "would let the language model see the future.*False"),
    ({"data": {"tokens": "byte"}}, "data.tokens must be one of None, char, word"),
    ({"data": {"batching": "shuffled"}}, "data.batching must be one of sequential, random"),
    ({"data": {"batch_size": -4}}, "data.batch_size must be >= 1, got -4"),
    ({"data": {"seq_len": 0}}, "data.seq_len must be >= 1, got 0"),
    ({"data": {"val_frac": 0.6, "test_frac": 0.5}}, "val=0.6, test=0.5 must be in \\[0, 1\\)"),
    ({"data": {"corpus": "rt-polarity"}}, "rt-polarity.* is labelled sentences.*task=classify"),
    ({"data": {"corpus": "/no/such/file.txt"}}, "unknown corpus '/no/such/file.txt': neither a "
                                                "file nor one of tinyshakespeare"),
    ({"train": {"steps": 0}}, "train.steps must be >= 1, got 0"),
    ({"train": {"optimizer": "lion"}}, "train.optimizer must be one of adam, adamw, sgd"),
    ({"train": {"schedule": "exponential"}}, "train.schedule must be one of constant, cosine, linear"),
    ({"train": {"b2": 1.0}}, "train.b2 must be in \\[0, 1\\)"),
    ({"train": {"keep": 0}}, "train.keep must be >= 1, got 0"),
    ({"train": {"log_every": 0}}, "train.log_every must be >= 1, got 0"),
    ({"train": {"eval_lanes": 0}}, "train.eval_lanes must be >= 1, got 0"),
    ({"train": {"devices": -1}}, "train.devices must be >= 0"),
    ({"model": {"dropout": 1.5}}, "model.dropout must be in \\[0, 1\\)"),
    ({"model": {"dropout": -0.5}}, "model.dropout must be in \\[0, 1\\)"),
    ({"model": {"dropout": 1.0}}, "model.dropout must be in \\[0, 1\\)"),
    ({"train": {"lr": -1.0}}, "train.lr must be a finite number >= 0.0, got -1.0"),
    ({"train": {"lr": float("nan")}}, "train.lr must be a finite number >= 0.0, got nan"),
    ({"train": {"clip_norm": -1.0}}, "train.clip_norm must be a finite number >= 0"),
    ({"train": {"warmup_steps": -10}}, "train.warmup_steps must be >= 0, got -10"),
    ({"train": {"eval_every": -5}}, "train.eval_every must be >= 0 \\(0: only at the end\\)"),
    ({"train": {"weight_decay": -0.1}}, "train.weight_decay must be a finite number >= 0"),
    ({"data": {"val_frac": 0.0}}, "data.val_frac is 0, which leaves no validation split"),
    ({"model": {"dropout_in": 1.0}}, "model.dropout_in must be in \\[0, 1\\) .*or None"),
    ({"model": {"embed_dropout": -0.1}}, "model.embed_dropout must be in \\[0, 1\\)"),
    ({"model": {"weight_drop": 1.0}}, "model.weight_drop must be in \\[0, 1\\)"),
    ({"model": {"cell": "mingru", "weight_drop": 0.5}},
     "model.weight_drop needs a cell with one recurrent matrix \\(rnn, gru, lstm\\), not 'mingru'"),
    ({"model": {"tie_embedding": True}}, "model.tie_embedding makes the last layer model.embed_dim=8"
                                         " wide, but the one layer is model.hidden_size=16"),
    ({"model": {"one_hot": True, "tie_embedding": True}}, "act on the embedding: set model.one_hot"),
    ({"model": {"init_scale": -0.1}}, "model.init_scale must be a finite number >= 0.0"),
    ({"model": {"ar": float("inf")}}, "model.ar must be a finite number >= 0.0"),
    ({"train": {"unit": "hours"}}, "train.unit must be one of steps, epochs, got 'hours'"),
    ({"model": {"cell": "mlstm", "num_heads": 3}},
     "model.num_heads=3 must divide every layer's width \\(16: model.hidden_size"),
    ({"model": {"cell": "gru", "num_heads": 2}}, "model.num_heads=2 does nothing for cell 'gru' "
                                                  "\\(it applies to slstm, mlstm\\)"),
    ({"model": {"num_heads": 0}}, "model.num_heads must be >= 1, got 0"),
    ({"train": {"accumulate": 0}}, "train.accumulate must be >= 1"),
    ({"train": {"accumulate": 3}}, "train.accumulate=3 must divide data.batch_size=4"),
    ({"train": {"schedule": "step", "decay_factor": 1.5}}, "train.decay_factor must be in \\(0, 1\\]"),
    ({"train": {"schedule": "step", "warmup_steps": 10}}, "train.schedule=step has no warmup"),
    ({"train": {"asgd_patience": -1}}, "train.asgd_patience must be >= 0 \\(0 turns NT-ASGD off\\)"),
    ({"train": {"asgd_patience": 5}}, "train.asgd_patience > 0 starts NT-ASGD from the validation "
                                      "losses, but train.eval_every=0"),
])
def test_lm_field_errors_name_the_field_and_valid_values(tiny_config, sections, message):
  """Each bad LM field is a UserError naming the field and what it may be."""
  with pytest.raises(UserError, match=message):
    config_lib.validate(tiny_config(**sections))


@pytest.mark.parametrize("sections, message", [
    ({"model": {"num_classes": 3}}, "has 2 classes .*set it to 2 \\(softmax\\) or 1"),
    ({"model": {"num_classes": 0}}, "model.num_classes is 0"),
    ({"model": {"one_hot": True}}, "embedding: set model.one_hot=False"),
    ({"model": {"pooling": "max"}}, "model.pooling must be one of last, mean, got 'max'"),
    ({"data": {"max_vocab": 2}}, "data.max_vocab must be 0 \\(no cap\\) or >= 3, got 2"),
    ({"data": {"corpus": "tinyshakespeare"}}, "labelled sentence corpus \\(rt-polarity\\)"),
    ({"model": {"tie_embedding": True}}, "model.tie_embedding belongs to the language model"),
    ({"model": {"tar": 1.0}}, "model.tar belongs to the language model"),
])
def test_classify_field_errors_name_the_field(tiny_classify_config, sections, message):
  """The classifier's own fields are checked against the corpus' classes."""
  with pytest.raises(UserError, match=message):
    config_lib.validate(tiny_classify_config(**sections))


def test_errors_come_before_anything_is_built(tiny_config, tmp_path):
  """train_and_evaluate refuses a bad field before it creates the workdir."""
  with pytest.raises(UserError, match="train.optimizer"):
    train.train_and_evaluate(tiny_config(train={"optimizer": "lion"}), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_unknown_field_is_named(tiny_config):
  """A field configs/default.py does not have (a config built in Python) is named."""
  config = tiny_config()
  config.model.hiden_size = 3
  with pytest.raises(UserError, match="unknown config field model.hiden_size"):
    config_lib.validate(config)


def test_the_shipped_configs_are_valid():
  """Every config in configs/ passes validation as written (families.py: each row, both sizes)."""
  names = sorted(p.stem for p in pathlib.Path(default.__file__).parent.glob("*.py"))
  for name in names:
    if name in ("__init__", "families"):
      continue
    config_lib.validate(importlib.import_module(f"configs.{name}").get_config())
  from configs import families
  for row in families.ROWS:
    for size in ("1m", "5m"):
      config_lib.validate(families.get_config(f"{row}:{size}"))


@pytest.mark.parametrize("size, target", [("1m", 1e6), ("5m", 5e6)])
def test_the_family_rows_have_the_size_they_claim(size, target):
  """configs/families.py's rows hold their size's parameter count to 12% (Tiny Shakespeare's
  66 symbols)."""
  from configs import families
  for row in families.ROWS:
    config = families.get_config(f"{row}:{size}")
    shapes = jax.eval_shape(lambda k: model.init(k, config.model, 66), jax.random.key(0))
    assert abs(model.num_params(shapes) / target - 1) < 0.12, (row, model.num_params(shapes))


def test_every_choice_builds():
  """Every optimizer and schedule the validator accepts is one optim.make_optimizer builds."""
  config = default.get_config().train
  for optimizer in config_lib.OPTIMIZERS:
    for schedule in config_lib.SCHEDULES:
      config.update(optimizer=optimizer, schedule=schedule, warmup_steps=2)
      optim.make_optimizer(config)


def test_cell_options_defaults_agree_with_configs_default():
  """Every cell option is a model field, with the same default in configs/default.py; every
  cell takes compute_dtype."""
  model_config = default.get_config().model
  for option, value in cells.options().items():
    assert model_config[option] == value, option
  for name in cells.names():
    assert "compute_dtype" in inspect.signature(cells._REGISTRY[name]).parameters, name


def test_saved_configs_merge_onto_the_defaults():
  """A config saved before a field existed reads that field's default; the saved values win;
  a field this version does not know is refused."""
  saved = {"model": {"cell": "gru", "hidden_size": 32}, "train": {"lr": 0.01}}
  config = config_lib.from_saved(saved)
  assert config.task == "lm" and config.model.impl == "auto" and config.model.embed_scale == 1.0
  assert config.model.cell == "gru" and config.model.hidden_size == 32 and config.train.lr == 0.01
  config_lib.validate(config)


def test_older_checkpoints_configs_still_restore(capsys):
  """What older versions accepted restores: an option the saved cell does not take (it had no
  effect) reads its default; a field this version does not know is dropped with a note."""
  config = config_lib.from_saved({"model": {"cell": "gru", "forget_bias": 1.0, "colour": "red"}})
  assert config.model.forget_bias == 0.0 and "colour" not in config.model
  assert "ignoring the saved config's field model.colour" in capsys.readouterr().err
  config_lib.validate(config)


@pytest.mark.parametrize("sections, message", [
    ({"train": {"weight_decay": 0.1}}, "train.weight_decay=0.1 does nothing for train.optimizer="
                                       "'adam' \\(it applies to train.optimizer=adamw\\); leave it "
                                       "at 0.0"),
    ({"train": {"optimizer": "sgd", "b1": 0.8}}, "train.b1=0.8 does nothing for train.optimizer="
                                                 "'sgd' \\(it applies to train.optimizer=adam or "
                                                 "adamw\\); leave it at 0.9"),
    ({"train": {"optimizer": "sgd", "b2": 0.99}}, "train.b2=0.99 does nothing for "
                                                  "train.optimizer='sgd'"),
    ({"model": {"block": "griffin", "cell": "rglru", "expand": 3}},
     "model.expand=3 does nothing for model.block='griffin' \\(it applies to model.block=xlstm "
     "or mamba\\); leave it at 2"),
    ({"model": {"mlp_expansion": 4}}, "model.mlp_expansion=4 does nothing for model.block="
                                      "'stack' \\(it applies to model.block=residual or hawk or "
                                      "griffin\\)"),
    ({"model": {"block": "residual", "conv_width": 3}},
     "model.conv_width=3 does nothing for model.block='residual' \\(it applies to model.block="
     "hawk or griffin or xlstm or mamba\\)"),
    ({"model": {"block": "hawk", "cell": "rglru", "attention_window": 64}},
     "model.attention_window=64 does nothing for model.block='hawk' \\(it applies to "
     "model.block=griffin\\)"),
    ({"train": {"warmup_steps": 10}}, "train.warmup_steps=10 is more than train.steps=5 \\(both "
                                      "in train.unit\\): the lr would peak at 50% of train.lr; set "
                                      "train.warmup_steps to at most 5"),
])
def test_options_that_would_do_nothing_are_refused(tiny_config, sections, message):
  """An option set away from its default where the block or optimizer does not read it, and a
  warmup longer than the run, are refused in one line naming the field and what reads it."""
  with pytest.raises(UserError, match=message):
    config_lib.validate(tiny_config(**sections))


@pytest.mark.parametrize("sections", [
    {"train": {"optimizer": "adamw", "weight_decay": 0.1, "b1": 0.8}},
    {"train": {"optimizer": "sgd", "weight_decay": 0.0, "b1": 0.9, "b2": 0.999}},
    {"model": {"block": "griffin", "cell": "rglru", "conv_width": 3, "mlp_expansion": 2,
               "expand": 2, "num_layers": 3, "lru_width": 24, "attention_window": 16}},
    {"model": {"block": "mamba", "cell": "mamba", "hidden_size": 8, "expand": 3}},
    {"model": {"block": "residual", "mlp_expansion": 2}},
    {"train": {"warmup_steps": 5}},
])
def test_options_read_or_at_their_defaults_are_accepted(tiny_config, sections):
  """The same options where something reads them, or left at their defaults, validate."""
  config_lib.validate(tiny_config(**sections))


def test_read_by_names_the_blocks_that_read_each_option():
  """config.READ_BY agrees with jaxrnn/blocks/: an option changes the shapes of the parameters
  or the carry exactly under the blocks it names (three layers, so that griffin attends)."""
  from jaxrnn import blocks
  for block in blocks.BLOCKS:
    base = default.get_config().model
    base.update(block=block, cell=blocks.CELLS.get(block, "lstm"), hidden_size=64, embed_dim=64,
                num_layers=3)
    shapes = lambda c: jax.tree.map(lambda x: x.shape, jax.eval_shape(
        lambda k: (model.init(k, c, 8), model.initial_carry(c, 2)), jax.random.key(0)))
    for option, (chooser, readers) in config_lib.READ_BY.items():
      if chooser == "model.block":
        changed = base.copy_and_resolve_references()
        changed[option.split(".")[1]] += 1
        assert (shapes(changed) != shapes(base)) == (block in readers), (block, option)


def test_older_checkpoints_with_unread_block_and_optimizer_options_still_restore():
  """A saved config with block or optimizer options its run did not read (accepted before they
  were refused) restores with those options at their defaults, and validates; one with a
  warmup longer than its run validates for evaluation."""
  config = config_lib.from_saved({"model": {"block": "griffin", "cell": "rglru", "expand": 4},
                                  "train": {"optimizer": "sgd", "weight_decay": 0.1, "b1": 0.5}})
  assert (config.model.expand, config.train.weight_decay, config.train.b1) == (2, 0.0, 0.9)
  config = config_lib.from_saved({"model": {"block": "mamba", "cell": "mamba", "expand": 4},
                                  "train": {"optimizer": "adamw", "weight_decay": 0.1}})
  assert (config.model.expand, config.train.weight_decay) == (4, 0.1)  # read: kept
  config_lib.validate(config)
  # Before Griffin had attention layers, model.block=griffin was Hawk: it restores as hawk.
  config = config_lib.from_saved({"model": {"block": "griffin", "cell": "rglru", "num_heads": 2}})
  assert (config.model.block, config.model.num_heads) == ("hawk", 2)
  config = config_lib.from_saved({"model": {"block": "griffin", "cell": "rglru",
                                            "attention_window": 32}})
  assert config.model.block == "griffin"
  config = config_lib.from_saved({"train": {"steps": 5, "warmup_steps": 10}})
  config_lib.validate(config, training=False)  # eval.py --corpus: the schedule is not read
  with pytest.raises(UserError, match="train.warmup_steps=10 is more than train.steps=5"):
    config_lib.validate(config)


def test_a_model_too_big_for_the_memory_is_refused_before_anything_is_built(tiny_config,
                                                                            monkeypatch):
  """The training state (parameters, gradients and Adam's two moments: 4 x 4 bytes a parameter)
  and the layers' outputs over a batch, against the machine's memory: model.hidden_size=100000
  (596 GiB) is refused on a 64 GiB machine, 256 is not, nor 100000 where an accelerator has
  the memory (with its share of the lanes), nor anything where the memory cannot be read."""
  params, state, activations = config_lib.training_memory(tiny_config())
  assert 0 <= state - 16 * params < 64  # and the optimizer's step counts
  assert activations == 4 * 8 * 16 * 4  # lanes x seq_len x hidden_size x 4 bytes
  _, sgd, _ = config_lib.training_memory(tiny_config(train={"optimizer": "sgd"}))
  assert 0 <= sgd - 8 * params < 64  # no moments
  monkeypatch.setattr(config_lib, "physical_memory", lambda: 64 * 2**30)
  with pytest.raises(UserError, match="this model cannot train here: it needs at least 596.1 GiB "
                                      "\\(40,003,800,018 parameters, 596.1 GiB .*; 12.2 MiB of "
                                      "layer outputs per batch\\) but this machine has 64.0 GiB "
                                      "of memory; lower model.hidden_size"):
    config_lib.validate(tiny_config(model={"hidden_size": 100_000}))
  config_lib.validate(tiny_config(model={"hidden_size": 256}))

  class Accelerator:  # a device with 700 GiB of its own
    def memory_stats(self):
      return {"bytes_limit": 700 * 2**30}
  monkeypatch.setattr(config_lib.jax, "local_devices", lambda: [Accelerator()])
  config_lib.validate(tiny_config(model={"hidden_size": 100_000}))
  wide = tiny_config(model={"hidden_size": 100_000}, data={"batch_size": 50_000})  # 149 GiB out
  with pytest.raises(UserError, match="this machine has 64.0 GiB \\(700.0 GiB per device\\)"):
    config_lib.validate(wide)
  monkeypatch.setattr(config_lib.jax, "local_devices", lambda: [Accelerator()] * 2)
  config_lib.validate(wide)  # half the lanes on each
  monkeypatch.undo()
  monkeypatch.setattr(config_lib, "physical_memory", lambda: None)
  config_lib.validate(tiny_config(model={"hidden_size": 100_000}))


def test_the_machines_memory_is_read_where_the_system_says(monkeypatch):
  """physical_memory: the page size times the pages on Linux; None where sysconf cannot say."""
  assert config_lib.physical_memory() > 2**20
  def unknown(name):
    raise ValueError(f"unrecognized configuration name {name}")
  monkeypatch.setattr(config_lib.os, "sysconf", unknown)
  assert config_lib.physical_memory() is None


def test_train_refuses_a_model_too_big_for_the_memory_in_one_line(tiny_flags, script, tmp_path):
  """scripts/train.py with model.hidden_size=100000 (about 600 GiB to train, more than the
  machines these tests run on): one line with the figures, no traceback, no workdir."""
  proc = script("train.py", *tiny_flags(tmp_path / "run", model={"hidden_size": 100_000}))
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith("error: this model cannot train here: it needs at least "), \
      proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
