"""Tests for jaxrnn.train: the optimizer, the train step, when the loop logs, evaluates and
saves, the NaN guard, and training end to end."""

import collections
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from jaxrnn import UserError, checkpoint, model, train
from jaxrnn.tasks import classify, lm


def first_batch(config, ids):
  _, batch = next(lm.train_batches(ids["train"], config, 0))
  return batch


def test_clipping_bounds_the_update(tiny_config):
  """SGD with lr 1 and clip_norm 1e-3: the parameter change has global norm exactly 1e-3."""
  config = tiny_config(train={"optimizer": "sgd", "lr": 1.0, "clip_norm": 1e-3})
  vocab, ids = lm.prepare_data(config)
  tx = train.make_optimizer(config.train)
  state = train.create_train_state(config, len(vocab), tx)
  before = state.params
  carry = model.initial_carry(config.model, config.data.batch_size)
  new, _, metrics = train.train_step(state, first_batch(config, ids), carry, config=config, tx=tx)
  delta = jax.tree.map(lambda a, b: a - b, new.params, before)
  assert float(metrics["grad_norm"]) > 1e-3  # so the clip was active
  assert float(optax.tree.norm(delta)) == pytest.approx(1e-3, rel=1e-4)


def test_one_train_step_changes_every_parameter(tiny_config):
  """Every leaf of the params moves after one Adam step (nothing is cut off from the loss)."""
  config = tiny_config(model={"num_layers": 2})
  vocab, ids = lm.prepare_data(config)
  tx = train.make_optimizer(config.train)
  state = train.create_train_state(config, len(vocab), tx)
  carry = model.initial_carry(config.model, config.data.batch_size)
  new, _, _ = train.train_step(state, first_batch(config, ids), carry, config=config, tx=tx)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.params, state.params)
  assert all(jax.tree.leaves(changed)), changed


def test_classify_train_step_changes_every_parameter(tiny_classify_config):
  """One Adam step on a bidirectional classifier moves every leaf; no carry comes back."""
  config = tiny_classify_config(model={"bidirectional": True, "dropout": 0.1},
                                data={"seq_len": 24, "max_vocab": 500})
  vocab, splits = classify.prepare_data(config)
  tx = train.make_optimizer(config.train)
  state = train.create_train_state(config, len(vocab), tx)
  _, batch = next(classify.train_batches(splits["train"], config, 0))
  step = jax.jit(functools.partial(train.train_step, config=config, tx=tx))
  new, carry, metrics = step(state, batch, ())
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.params, state.params)
  assert all(jax.tree.leaves(changed)), changed
  assert carry == () and np.isfinite(float(metrics["loss"]))


def test_cosine_schedule_warms_up_and_decays():
  """Cosine: 0 at step 0, the peak after warmup, ~0 at the last step."""
  config = default.get_config().train
  config.update(schedule="cosine", warmup_steps=10, steps=100, lr=1e-2)
  schedule = train.learning_rate(config)
  assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1e-2)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-8)


def test_due_logs_evaluates_and_saves_on_their_periods_and_all_at_the_end():
  """log / evaluate / save every log_every / eval_every / ckpt_every steps (eval_every 0:
  never), all three at the last step, and a save whenever a stop was requested."""
  config = default.get_config().train
  config.update(steps=12, log_every=2, eval_every=0, ckpt_every=5)
  got = {s: train.due(s, config) for s in range(1, 13)}
  assert [s for s, d in got.items() if d.log] == [2, 4, 6, 8, 10, 12]
  assert [s for s, d in got.items() if d.evaluate] == [12]
  assert [s for s, d in got.items() if d.save] == [5, 10, 12]
  assert train.due(3, config, preempted=True) == train.Due(log=False, evaluate=False, save=True)


def test_nan_update_stops_the_run_at_that_step(tiny_config, nan_updates, tmp_path):
  """NaN updates poison the params in step 1: the run stops at step 1 (not at step 2, where
  the loss first shows it) with advice."""
  nan_updates()
  config = tiny_config()
  with pytest.raises(UserError, match="update at step 1 made the parameters non-finite.*lower "
                                      "train.lr"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_nan_between_read_backs_is_found_before_the_save(tiny_config, nan_updates, tmp_path):
  """With results read back only every 5 steps, the NaN that began in step 1's update is
  reported as step 1 at the step-5 read-back, which comes before the step-5 save."""
  nan_updates()
  config = tiny_config(train={"log_every": 5, "ckpt_every": 5})
  with pytest.raises(UserError, match="update at step 1 made the parameters non-finite"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert checkpoint.manager(tmp_path / "run").all_steps() == []
  assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""


def test_train_rows_have_the_documented_fields(tiny_config, tmp_path):
  """Train rows: step, split, loss, grad_norm, lr, tokens_per_s, elapsed_s, in that order."""
  train.train_and_evaluate(tiny_config(train={"log_every": 2}), str(tmp_path / "run"))
  rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == [2, 4, 5]
  assert list(train_rows[0]) == ["step", "split", "loss", "grad_norm", "lr", "tokens_per_s",
                                 "elapsed_s"]
  assert all(r["tokens_per_s"] > 0 for r in train_rows)


def test_training_beats_the_unigram_model(tiny_config, tmp_path):
  """A small LSTM on The Time Machine ends well below the unigram perplexity of the text."""
  config = tiny_config(model={"hidden_size": 128, "embed_dim": 32},
                       data={"corpus": "timemachine", "batch_size": 32, "seq_len": 32},
                       train={"steps": 300, "eval_lanes": 16})
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  vocab, ids = lm.prepare_data(config)
  counts = collections.Counter(ids["train"].tolist())
  probs = np.array([counts.get(i, 0) + 1 for i in range(len(vocab))], np.float64)
  probs /= probs.sum()
  unigram = math.exp(-np.mean(np.log(probs[ids["val"][1:]])))
  assert result["perplexity"] < 0.6 * unigram, (result["perplexity"], unigram)


def test_mingru_trains_the_lm_with_no_other_change(tiny_config, tmp_path):
  """--config.model.cell=mingru alone: a short LM run ends well below the uniform loss log |V|."""
  config = tiny_config(model={"cell": "mingru"}, train={"steps": 30, "lr": 1e-2})
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  vocab, _ = lm.prepare_data(config)
  assert math.isfinite(result["val_loss"]) and result["val_loss"] < 0.9 * math.log(len(vocab))


def test_an_exploding_run_saves_nothing_non_finite(tiny_config, tmp_path):
  """A ReLU RNN under SGD at lr 100 without clipping: a finite loss with an infinite gradient,
  then NaN parameters. The run stops there, and every checkpoint it left is finite."""
  config = tiny_config(model={"cell": "rnn", "nonlinearity": "relu"},
                       train={"optimizer": "sgd", "lr": 100.0, "clip_norm": 0.0, "steps": 50,
                              "ckpt_every": 3, "log_every": 3})
  with pytest.raises(UserError, match="non-finite|loss is"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  mngr = checkpoint.manager(tmp_path / "run")
  for step in mngr.all_steps():
    params = checkpoint.load_run(str(tmp_path / "run"), step)[2]
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params)), step


def test_a_diverged_validation_stops_the_run(tiny_config, tmp_path, monkeypatch):
  """A validation loss past exp's range (perplexity overflows) stops the run with the guard's
  message before the step is saved, instead of an OverflowError."""
  real = lm.make_evaluator

  def huge(config, devs=None):
    evaluate = real(config, devs)
    return lambda params, ids: {**evaluate(params, ids), "loss": 800.0, "perplexity": math.inf}

  monkeypatch.setattr(lm, "make_evaluator", huge)
  with pytest.raises(UserError, match="val loss is 800 nats at step 5.*lower train.lr"):
    train.train_and_evaluate(tiny_config(train={"eval_every": 5}), str(tmp_path / "run"))
  assert checkpoint.manager(tmp_path / "run").all_steps() == []
