"""Tests for jaxrnn.train: the optimizer, the train step, when the loop logs, evaluates and
saves, the NaN guard, and training end to end."""

import collections
import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from jaxrnn import UserError, checkpoint, model, optim, train
from jaxrnn.tasks import classify, lm


def first_batch(config, ids):
  _, batch = next(lm.train_batches(ids["train"], config, 0))
  return batch


def test_clipping_bounds_the_update(tiny_config):
  """SGD with lr 1 and clip_norm 1e-3: the parameter change has global norm exactly 1e-3."""
  config = tiny_config(train={"optimizer": "sgd", "lr": 1.0, "clip_norm": 1e-3})
  vocab, ids = lm.prepare_data(config)
  tx = optim.make_optimizer(config.train)
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
  tx = optim.make_optimizer(config.train)
  state = train.create_train_state(config, len(vocab), tx)
  carry = model.initial_carry(config.model, config.data.batch_size)
  new, _, _ = train.train_step(state, first_batch(config, ids), carry, config=config, tx=tx)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.params, state.params)
  assert all(jax.tree.leaves(changed)), changed


@pytest.mark.parametrize("cell", ["lstm", "rglru", "slstm", "mlstm"])
def test_classify_train_step_changes_every_parameter(tiny_classify_config, cell):
  """One Adam step on a bidirectional classifier moves every leaf; no carry comes back."""
  config = tiny_classify_config(model={"bidirectional": True, "dropout": 0.1, "cell": cell},
                                data={"seq_len": 24, "max_vocab": 500})
  vocab, splits = classify.prepare_data(config)
  tx = optim.make_optimizer(config.train)
  state = train.create_train_state(config, len(vocab), tx)
  _, batch = next(classify.train_batches(splits["train"], config, 0))
  step = jax.jit(functools.partial(train.train_step, config=config, tx=tx))
  new, carry, metrics = step(state, batch, ())
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.params, state.params)
  assert all(jax.tree.leaves(changed)), changed
  assert carry == () and np.isfinite(float(metrics["loss"]))


def run_steps(config, steps):
  """(losses, grad norms, params, final carry) of `steps` jit-compiled train steps of `config`."""
  vocab, ids = lm.prepare_data(config)
  tx = optim.make_optimizer(config.train)
  state = train.create_train_state(config, len(vocab), tx)
  carry = model.initial_carry(config.model, config.data.batch_size)
  step = jax.jit(functools.partial(train.train_step, config=config, tx=tx))
  batches, losses, norms = lm.train_batches(ids["train"], config, 0), [], []
  for _ in range(steps):
    _, batch = next(batches)
    state, carry, metrics = step(state, batch, carry)
    losses.append(float(metrics["loss"]))
    norms.append(float(metrics["grad_norm"]))
  return losses, norms, state.params, carry


@pytest.mark.parametrize("model_config", [
    {"num_layers": 2},
    pytest.param({"num_layers": 2, "dropout": 0.2, "weight_drop": 0.3, "embed_dropout": 0.1,
                  "ar": 1.0, "tar": 1.0}, marks=pytest.mark.slow),
], ids=["plain", "regularized"])
def test_micro_batches_give_the_large_batch_update(tiny_config, model_config):
  """k = 4 micro-batches of b/k lanes (train.accumulate) step like one batch of b lanes (1e-6 in
  float32): same losses, gradient norms, parameters and carried states after 3 steps. Each
  lane's dropout key is its row's, so the regularized model's masks are the same too."""
  config = lambda k: tiny_config(model=model_config, data={"batch_size": 8},
                                 train={"accumulate": k})
  losses, norms, params, carry = run_steps(config(1), 3)
  k_losses, k_norms, k_params, k_carry = run_steps(config(4), 3)
  np.testing.assert_allclose(k_losses, losses, rtol=1e-6)
  np.testing.assert_allclose(k_norms, norms, rtol=1e-6)
  for a, b in zip(jax.tree.leaves((k_params, k_carry)), jax.tree.leaves((params, carry)),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_accumulate_must_divide_the_lanes(tiny_config, tmp_path):
  """train.accumulate that does not divide the batch is a one-line error naming the field."""
  with pytest.raises(UserError, match=r"train\.accumulate=3 must divide data\.batch_size=4"):
    train.train_and_evaluate(tiny_config(train={"accumulate": 3}), str(tmp_path))


def test_with_every_new_field_off_the_losses_are_those_recorded_before_the_regularizers(
    tiny_config):
  """Three train_steps of a 2-layer LSTM with dropout 0.3: the losses af64bc1 (the commit before
  the regularizers) printed, to 1e-6 (equal to the bit on the machine that recorded them)."""
  config = tiny_config(model={"num_layers": 2, "dropout": 0.3}, train={"lr": 1e-2})
  vocab, ids = lm.prepare_data(config)
  tx = optim.make_optimizer(config.train)
  state = train.create_train_state(config, len(vocab), tx)
  carry = model.initial_carry(config.model, config.data.batch_size)
  step = jax.jit(lambda s, b, c: train.train_step(s, b, c, config=config, tx=tx))
  batches, losses = lm.train_batches(ids["train"], config, 0), []
  for _ in range(3):
    state, carry, step_metrics = step(state, next(batches)[1], carry)
    losses.append(float(step_metrics["loss"]))
  np.testing.assert_allclose(losses, [3.430013418197632, 3.3725476264953613, 3.359971046447754],
                             rtol=1e-6)


def test_epochs_as_the_unit_convert_to_steps():
  """train.unit=epochs: steps, warmup, evaluation and checkpoint periods times the epoch length."""
  from jaxrnn import config as config_lib
  config = default.get_config()
  config.train.update(unit="epochs", steps=13, eval_every=1, ckpt_every=2, log_every=10)
  converted = config_lib.in_steps(config, 464)
  assert (converted.train.steps, converted.train.eval_every, converted.train.ckpt_every,
          converted.train.log_every, converted.train.unit) == (13 * 464, 464, 928, 10, "steps")
  assert config.train.steps == 13  # the given config is left alone
  config.train.unit = "steps"
  assert config_lib.in_steps(config, 464) is config


def test_nt_asgd_starts_averaging_in_the_loop_when_validation_stalls(tiny_config, tmp_path,
                                                                    monkeypatch, capsys):
  """Validation losses 3, 2, 2.5, 3.5, ... (scripted) with patience 1: the 4th validation (step
  20) is worse than min(3, 2), so averaging starts there; the last checkpoint then holds the
  mean of the 20 iterates after it, and load_run returns that mean."""
  scripted = iter([3.0, 2.0, 2.5, 3.5] + [1.0] * 10)
  real = lm.make_evaluator

  def make_evaluator(config, devs=None):
    evaluate = real(config, devs)
    return lambda params, ids: {**evaluate(params, ids), "loss": next(scripted)}

  monkeypatch.setattr(lm, "make_evaluator", make_evaluator)
  config = tiny_config(train={"steps": 40, "eval_every": 5, "ckpt_every": 40,
                              "asgd_patience": 1})
  train.train_and_evaluate(config, str(tmp_path))
  assert ("validation loss 3.5000 is worse than 2.0000, the best before the last 1 validations: "
          "averaging the iterates after step 20 (NT-ASGD)") in capsys.readouterr().err
  mngr = checkpoint.manager(tmp_path)
  vocab, _ = lm.prepare_data(config)
  template = train.create_train_state(config, len(vocab), optim.make_optimizer(config.train))
  state, *_ = checkpoint.restore(mngr, template, model.initial_carry(config.model, 4))
  assert int(state.opt_state.count) == 20
  *_, params, _ = checkpoint.load_run(str(tmp_path))
  for got, mean in zip(jax.tree.leaves(params), jax.tree.leaves(state.opt_state.mean), strict=True):
    np.testing.assert_array_equal(got, mean)
  assert not np.array_equal(jax.tree.leaves(params)[0], jax.tree.leaves(state.params)[0])


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
  with pytest.raises(UserError, match=r"update at step 1 made the parameters non-finite.*no "
                                      r"checkpoint was saved before it: lower --config\.train\.lr"):
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


@pytest.mark.parametrize("model_config, steps", [
    ({"cell": "mingru"}, 30),
    ({"cell": "rglru", "num_layers": 2, "dropout": 0.1}, 30),
    ({"cell": "slstm", "num_layers": 2, "dropout": 0.1, "num_heads": 2}, 30),
    ({"cell": "mlstm", "num_layers": 2, "dropout": 0.1, "num_heads": 2}, 80),  # long memories
], ids=lambda m: m["cell"] if isinstance(m, dict) else str(m))
def test_a_cell_swap_alone_trains_the_lm(tiny_config, tmp_path, model_config, steps):
  """--config.model.cell=<name> alone (with heads and a stack for xLSTM's cells): a short LM
  run ends well below the uniform loss log |V|."""
  config = tiny_config(model=model_config, train={"steps": steps, "lr": 1e-2})
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  vocab, _ = lm.prepare_data(config)
  assert math.isfinite(result["val_loss"]) and result["val_loss"] < 0.9 * math.log(len(vocab))


@pytest.mark.diverges
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
  with pytest.raises(UserError, match=r"val loss is 800 nats at step 5.*lower --config\.train\.lr"):
    train.train_and_evaluate(tiny_config(train={"eval_every": 5}), str(tmp_path / "run"))
  assert checkpoint.manager(tmp_path / "run").all_steps() == []


def test_training_gives_back_what_an_evaluation_freed(tiny_config, tmp_path, monkeypatch):
  """After each whole-split evaluation the loop hands the freed memory back to the kernel
  (cli.release_freed_memory), which under keep_freed_memory's settings a process would keep at
  its peak: a freed 400 MB block leaves the resident set after it, not before."""
  from jaxrnn import cli
  calls = []
  monkeypatch.setattr(cli, "release_freed_memory", lambda: calls.append(1))
  train.train_and_evaluate(tiny_config(train={"steps": 6, "eval_every": 3}), str(tmp_path / "r"))
  assert len(calls) == 2  # steps 3 and 6
  code = ("import ctypes, numpy as np\n"
          "from jaxrnn import cli\n"
          "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20\n"
          "print(cli.keep_freed_memory())\n"
          "blocks = [np.ones(2**20) for _ in range(50)]\n"  # 50 x 8 MB, from malloc's heap
          "del blocks\n"
          "kept = rss()\n"
          "cli.release_freed_memory()\n"
          "print(kept, rss())\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                        env={k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"})
  assert proc.returncode == 0, proc.stderr
  tuned, sizes = proc.stdout.split("\n", 1)
  if tuned != "True":
    pytest.skip("not glibc: nothing kept, nothing to give back")
  kept, after = map(int, sizes.split())
  assert kept > after + 300, (kept, after)
