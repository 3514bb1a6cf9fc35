"""Tests for jaxrnn.checkpoint: exact resume, fallback past damaged checkpoints, preemption."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT
from jaxrnn import UserError, checkpoint, config as config_lib, data, model, optim, train
from jaxrnn.tasks import lm


@pytest.fixture
def ckpt_config(tiny_config):
  """ckpt_config(steps, accumulate=1): a two-layer tiny LM with dropout, evaluated and saved
  every 5 steps."""
  return lambda steps, accumulate=1: tiny_config(
      model={"num_layers": 2, "dropout": 0.1},
      train={"steps": steps, "eval_every": 5, "ckpt_every": 5, "accumulate": accumulate})


def train_losses(workdir) -> list[tuple[int, float]]:
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Micro-batches resuming bit for bit also run in the fast suite through test_blocks.py.
@pytest.mark.parametrize("accumulate", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_is_bitwise_identical(ckpt_config, tmp_path, accumulate):
  """10 steps, stop, resume to 20 == 20 steps straight: same params bit for bit, same losses
  (also with the batch run as micro-batches)."""
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train.train_and_evaluate(ckpt_config(20, accumulate), str(straight))
  train.train_and_evaluate(ckpt_config(10, accumulate), str(resumed))
  train.train_and_evaluate(ckpt_config(20, accumulate), str(resumed))
  *_, params_a, step_a = checkpoint.load_run(str(straight))
  *_, params_b, step_b = checkpoint.load_run(str(resumed))
  assert step_a == step_b == 20
  assert_trees_equal(params_a, params_b)
  assert train_losses(straight) == train_losses(resumed)
  assert [s for s, _ in train_losses(resumed)] == list(range(1, 21))


@pytest.mark.slow  # three 14-30 step runs; plain resume stays in the fast suite
def test_resume_with_averaging_and_weight_drop_is_bitwise_identical(tiny_config, tmp_path):
  """NT-ASGD (its history and running mean) and weight drop resume bit for bit: 14 + 16 steps
  == 30 straight, averaging having started before the stop."""
  def config(steps):
    return tiny_config(model={"num_layers": 2, "dropout": 0.1, "weight_drop": 0.3,
                              "embed_dropout": 0.1, "locked_dropout": True},
                       train={"steps": steps, "eval_every": 2, "ckpt_every": 2, "lr": 0.2,
                              "asgd_patience": 1})
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train.train_and_evaluate(config(30), str(straight))
  train.train_and_evaluate(config(14), str(resumed))
  mngr = checkpoint.manager(resumed)
  vocab, _ = lm.prepare_data(config(14))
  template = train.create_train_state(config(14), len(vocab), optim.make_optimizer(config(14).train))
  state, *_ = checkpoint.restore(mngr, template, model.initial_carry(config(14).model, 4))
  assert int(state.opt_state.count) > 0  # averaging had started before the stop
  train.train_and_evaluate(config(30), str(resumed))
  *_, params_a, _ = checkpoint.load_run(str(straight))
  *_, params_b, _ = checkpoint.load_run(str(resumed))
  assert_trees_equal(params_a, params_b)
  assert train_losses(straight) == train_losses(resumed)


def test_restored_iterator_and_carry_continue_the_stream(ckpt_config, tmp_path):
  """What a checkpoint restores (carry, data position) continues the interrupted stream exactly."""
  config = ckpt_config(7)
  vocab, ids = lm.prepare_data(config)
  tx = optim.make_optimizer(config.train)
  state = train.create_train_state(config, len(vocab), tx)
  batches = data.train_batches(ids["train"], config.data, 0)
  carry = model.initial_carry(config.model, config.data.batch_size)
  step = jax.jit(lambda s, b, c: train.train_step(s, b, c, config=config, tx=tx))
  for _ in range(7):
    _, batch = next(batches)
    state, carry, _ = step(state, batch, carry)
  mngr = checkpoint.manager(tmp_path)
  checkpoint.save(mngr, state, carry, batches.position, config, vocab)
  fresh = train.create_train_state(config, len(vocab), tx)
  zeros = model.initial_carry(config.model, config.data.batch_size)
  got_state, got_carry, meta = checkpoint.restore(mngr, fresh, zeros)
  assert_trees_equal(got_carry, carry)
  assert_trees_equal(got_state.opt_state, state.opt_state)
  assert np.array_equal(jax.random.key_data(got_state.rng), jax.random.key_data(state.rng))
  again = data.train_batches(ids["train"], config.data, 0, meta["position"])
  assert np.array_equal(next(again)[1]["inputs"], next(batches)[1]["inputs"])


def truncate_largest_file(step_dir: pathlib.Path) -> None:
  largest = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])


def test_truncated_latest_checkpoint_falls_back(ckpt_config, tmp_path, capsys):
  """A truncated newest checkpoint is reported by step and the next older one is used."""
  workdir = tmp_path / "run"
  train.train_and_evaluate(ckpt_config(15), str(workdir))
  *_, older_params, _ = checkpoint.load_run(str(workdir), 10)
  truncate_largest_file(workdir / "checkpoints" / "15")
  capsys.readouterr()
  *_, params, step = checkpoint.load_run(str(workdir))
  err = capsys.readouterr().err
  assert step == 10
  assert "checkpoint at step 15 is unreadable" in err and "older checkpoint at step 10" in err
  assert_trees_equal(params, older_params)


def test_unfinished_save_is_not_a_checkpoint(ckpt_config, tmp_path):
  """Orbax's temporary directory from a save cut short is never taken as the latest step."""
  workdir = tmp_path / "run"
  train.train_and_evaluate(ckpt_config(10), str(workdir))
  partial = workdir / "checkpoints" / "15.orbax-checkpoint-tmp-1234567"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "junk").write_bytes(b"\0" * 10)
  assert checkpoint.manager(workdir).latest_step() == 10
  *_, step = checkpoint.load_run(str(workdir))
  assert step == 10


@pytest.mark.parametrize("section, field, value, before", [
    ("model", "hidden_size", 32, 16),  # another shape: would fail inside orbax
    ("data", "seq_len", 16, 8),  # the saved data position counts batches of seq_len tokens
])
def test_changing_a_frozen_field_on_resume_is_refused(ckpt_config, tmp_path, section, field,
                                                      value, before):
  """Resuming with another value of a frozen field names the field and both values."""
  workdir = tmp_path / "run"
  train.train_and_evaluate(ckpt_config(5), str(workdir))
  config = ckpt_config(10)
  config[section][field] = value
  with pytest.raises(UserError, match=f"{section}.{field} is {value} but .* trained with {before}"):
    train.train_and_evaluate(config, str(workdir))


def test_nan_loss_keeps_the_good_checkpoint(ckpt_config, nan_updates, tmp_path):
  """A run that turns NaN after resuming stops without saving; the last good checkpoint stays."""
  workdir = tmp_path / "run"
  train.train_and_evaluate(ckpt_config(5), str(workdir))
  *_, good, _ = checkpoint.load_run(str(workdir))
  nan_updates()
  with pytest.raises(UserError, match="at step 6"):
    train.train_and_evaluate(ckpt_config(10), str(workdir))
  assert checkpoint.manager(workdir).all_steps() == [5]
  *_, params, _ = checkpoint.load_run(str(workdir))
  assert_trees_equal(params, good)


def test_a_nan_update_at_a_save_step_keeps_the_good_checkpoint(ckpt_config, nan_updates,
                                                              tmp_path):
  """keep=1: resuming a 10-step run with lr=nan for one more step (a save step, the last)
  stops before saving; checkpoint 10 stays, unchanged, and nothing non-finite is logged."""
  workdir = tmp_path / "run"
  config = ckpt_config(10)
  config.train.keep = 1
  train.train_and_evaluate(config, str(workdir))
  good = checkpoint.load_run(str(workdir))[2]
  config = ckpt_config(11)
  config.train.keep = 1
  nan_updates()
  with pytest.raises(UserError, match="update at step 11 made the parameters non-finite"):
    train.train_and_evaluate(config, str(workdir))
  assert checkpoint.manager(workdir).all_steps() == [10]
  assert_trees_equal(checkpoint.load_run(str(workdir))[2], good)
  assert "NaN" not in (workdir / "metrics.jsonl").read_text()


def test_keeps_latest_and_best(ckpt_config, tmp_path):
  """With keep=1 the latest checkpoint and the best-by-validation one both survive."""
  workdir = tmp_path / "run"
  config = ckpt_config(20)
  config.train.keep = 1
  train.train_and_evaluate(config, str(workdir))
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  val = {r["step"]: r["loss"] for r in rows if r["split"] == "val"}
  best = min(val, key=val.get)
  assert sorted(checkpoint.manager(workdir).all_steps()) == sorted({best, 20})


def script_flags(tiny_flags, workdir, steps):
  return tiny_flags(workdir, train={"steps": steps, "ckpt_every": 100000})


def test_sigterm_saves_the_last_completed_step_and_resumes(tiny_flags, script, tmp_path):
  """SIGTERM mid-run: exit 0 with one line, a checkpoint at the last logged step; resume goes on."""
  workdir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "scripts" / "train.py"),
                           *script_flags(tiny_flags, workdir, 1_000_000)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert out == ""
  saved = checkpoint.manager(workdir).latest_step()
  assert f"preempted at step {saved}" in err.strip().splitlines()[-1]
  assert train_losses(workdir)[-1][0] == saved
  done = script("train.py", *script_flags(tiny_flags, workdir, saved + 3))
  assert done.returncode == 0, done.stderr
  assert json.loads(done.stdout.splitlines()[-1])["step"] == saved + 3
  assert [s for s, _ in train_losses(workdir)] == list(range(1, saved + 4))


def test_eval_script_reproduces_the_logged_perplexity(tiny_flags, script, tmp_path):
  """scripts/eval.py on the saved run gives the validation perplexity training logged."""
  workdir = tmp_path / "run"
  result = script("train.py", *script_flags(tiny_flags, workdir, 6))
  assert result.returncode == 0, result.stderr
  logged = json.loads(result.stdout.splitlines()[-1])
  proc = script("eval.py", f"--workdir={workdir}", "--split=val")
  assert proc.returncode == 0, proc.stderr
  evaluated = json.loads(proc.stdout)
  assert evaluated["step"] == 6 and evaluated["tokens"] == logged["tokens"]
  assert evaluated["perplexity"] == pytest.approx(logged["perplexity"], rel=1e-6)


@pytest.mark.parametrize("name", ["eval.py", "sample.py"])
def test_a_step_that_is_not_a_number_is_a_one_line_error(name, ckpt_config, script, tmp_path):
  """--step abc: exit 2 and one line naming --step and its valid values, no traceback."""
  train.train_and_evaluate(ckpt_config(5), str(tmp_path / "run"))
  proc = script(name, f"--workdir={tmp_path / 'run'}", "--step=abc")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip() == "error: --step must be a step number, 'best' or 'latest', got 'abc'"


@pytest.mark.parametrize("name", ["eval.py", "sample.py"])
def test_missing_workdir_is_a_one_line_error(name, script, tmp_path):
  """No workdir or no checkpoint: exit 2 and one line on stderr, no traceback."""
  proc = script(name, f"--workdir={tmp_path / 'nowhere'}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "no checkpoints" in proc.stderr


def test_classifier_resume_is_bitwise_identical(tiny_classify_config, tmp_path):
  """Classifier (an empty carry, shuffled batches): resuming a copy of a 6-step run from its
  step-3 checkpoint ends with the same params bit for bit and the same losses."""
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  config = tiny_classify_config(model={"dropout": 0.1}, train={"steps": 6, "ckpt_every": 3})
  train.train_and_evaluate(config, str(straight))
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")
  assert checkpoint.manager(resumed).latest_step() == 3
  train.train_and_evaluate(config, str(resumed))
  *_, params_a, step_a = checkpoint.load_run(str(straight))
  *_, params_b, step_b = checkpoint.load_run(str(resumed))
  assert step_a == step_b == 6
  assert_trees_equal(params_a, params_b)
  assert train_losses(straight) == train_losses(resumed)


@pytest.mark.slow  # two training runs
def test_a_checkpoint_from_before_newer_fields_restores_and_resumes(ckpt_config, tmp_path):
  """A checkpoint whose saved config predates fields (task, model.impl, compute_dtype,
  embed_scale) reads their defaults: it evaluates, and it resumes to the same params as a run
  that never stopped."""
  straight, old = tmp_path / "straight", tmp_path / "old"
  train.train_and_evaluate(ckpt_config(10), str(straight))
  train.train_and_evaluate(ckpt_config(5), str(old))
  meta_file = old / "checkpoints" / "5" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  del meta["config"]["task"]
  for field in ("impl", "compute_dtype", "embed_scale"):
    del meta["config"]["model"][field]
  meta_file.write_text(json.dumps(meta))
  config, _, _, step = checkpoint.load_run(str(old))
  assert step == 5 and config.task == "lm" and config.model.impl == "auto"
  train.train_and_evaluate(ckpt_config(10), str(old))
  assert_trees_equal(checkpoint.load_run(str(old))[2], checkpoint.load_run(str(straight))[2])


@pytest.mark.parametrize("damage", ["newest step's meta removed", pytest.param(
    "stray empty step directory", marks=pytest.mark.slow)])  # the same fallback, another damage
def test_resume_passes_a_damaged_newest_step(ckpt_config, tmp_path, damage):
  """A damaged newest checkpoint (or an empty directory named like a step) is reported, moved
  to <workdir>/damaged/, and the run resumes from the step before it and ends bit for bit where
  an uninterrupted run ends, writing that step again."""
  straight, damaged = tmp_path / "straight", tmp_path / "damaged_run"
  train.train_and_evaluate(ckpt_config(20), str(straight))
  train.train_and_evaluate(ckpt_config(15), str(damaged))
  if damage == "stray empty step directory":
    (damaged / "checkpoints" / "20").mkdir()
    moved = 20
  else:
    shutil.rmtree(damaged / "checkpoints" / "15" / "meta")
    moved = 15
  train.train_and_evaluate(ckpt_config(20), str(damaged))
  assert (damaged / "damaged" / str(moved)).is_dir()
  assert_trees_equal(checkpoint.load_run(str(damaged))[2], checkpoint.load_run(str(straight))[2])
  assert train_losses(damaged) == train_losses(straight)


def test_a_second_run_on_a_workdir_is_refused_and_a_dead_runs_lock_is_taken_over(
    ckpt_config, tmp_path):
  """While one run holds the workdir, another is refused naming it; a run killed with SIGKILL
  while holding it leaves nothing that blocks the next."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  with checkpoint.workdir_lock(workdir):
    with pytest.raises(UserError, match=f"in use by a training run \\(pid {os.getpid()} on"):
      train.train_and_evaluate(ckpt_config(5), str(workdir))
  killed = subprocess.run([sys.executable, "-c",
                           "import os, pathlib, signal; from jaxrnn import checkpoint\n"
                           f"with checkpoint.workdir_lock(pathlib.Path({str(workdir)!r})):\n"
                           "  os.kill(os.getpid(), signal.SIGKILL)"])
  assert killed.returncode == -signal.SIGKILL and (workdir / "lock").exists()
  assert train.train_and_evaluate(ckpt_config(5), str(workdir))["step"] == 5


@pytest.mark.slow  # 30 s of a run saving every step beside repeated evaluations
def test_eval_on_a_workdir_still_training_never_advises_deletion(tiny_flags, script, tmp_path):
  """eval.py while a run saves and rotates a checkpoint every step: each try succeeds or says
  to try again, never a traceback, never advice to delete anything."""
  workdir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "scripts" / "train.py"),
                           *tiny_flags(workdir, train={"steps": 1_000_000, "ckpt_every": 1,
                                                       "keep": 1, "log_every": 50})],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    # Polled on the file system: the point is what eval.py does once a step is there.
    while time.time() < deadline and not any(
        d.name.isdigit() for d in (workdir / "checkpoints").glob("*")):
      time.sleep(0.2)
    outcomes = [script("eval.py", f"--workdir={workdir}") for _ in range(4)]
  finally:
    proc.kill()
  for out in outcomes:
    assert "Traceback" not in out.stderr and "delete" not in out.stderr, out.stderr
    assert out.returncode == 0 or "try again" in out.stderr, out.stderr
  assert any(out.returncode == 0 for out in outcomes)


def test_rerunning_a_finished_run_reports_it_without_new_rows(ckpt_config, tmp_path):
  """The same command on a finished workdir prints the same figures and logs nothing again."""
  workdir = tmp_path / "run"
  first = train.train_and_evaluate(ckpt_config(5), str(workdir))
  rows = (workdir / "metrics.jsonl").read_text()
  again = train.train_and_evaluate(ckpt_config(5), str(workdir))
  assert (workdir / "metrics.jsonl").read_text() == rows
  assert again["val_loss"] == first["val_loss"] and again["step"] == 5


def test_a_full_disk_during_a_save_is_one_error_and_keeps_older_checkpoints(ckpt_config,
                                                                            monkeypatch, tmp_path):
  """An ENOSPC from orbax at the step-10 save: a UserError saying what to do; step 5 stays."""
  workdir = tmp_path / "run"
  train.train_and_evaluate(ckpt_config(5), str(workdir))
  real_save = checkpoint.ocp.CheckpointManager.save

  def full_disk(self, step, *args, **kwargs):
    if step == 10:
      raise ValueError("write failed") from OSError(28, "No space left on device")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", full_disk)
  with pytest.raises(UserError, match="could not write the checkpoint at step 10 .*free space"):
    train.train_and_evaluate(ckpt_config(10), str(workdir))
  assert checkpoint.manager(workdir).all_steps() == [5]


def test_listing_steps_that_a_run_rotates_away_is_tried_again():
  """A step directory that vanishes while orbax lists them (a FileNotFoundError, as a run
  still training rotates it away) is listed again; if it keeps changing, try again later."""
  calls = []

  def flaky():
    calls.append(1)
    if len(calls) < 3:
      raise FileNotFoundError("checkpoints/55")
    return "manager"

  assert checkpoint._listed(flaky, "runs/x") == "manager" and len(calls) == 3
  with pytest.raises(UserError, match="kept changing while they were listed.*try again"):
    checkpoint._listed(lambda: (_ for _ in ()).throw(FileNotFoundError("55")), "runs/x")


def rewrite_params(workdir, scale):
  """The latest checkpoint of `workdir` saved again (as step 100) with its params times `scale`."""
  config, vocab, _, _ = checkpoint.load_run(str(workdir))
  mngr = checkpoint.manager(workdir)
  template = train.create_train_state(config, len(vocab), optim.make_optimizer(config.train))
  zeros = model.initial_carry(config.model, config.data.batch_size)
  state, carry, meta = checkpoint.restore(mngr, template, zeros)
  state = state.replace(step=state.step * 0 + 100,
                        params=jax.tree.map(lambda p: p * scale, state.params))
  checkpoint.save(mngr, state, carry, meta["position"], config, vocab)


def test_eval_prints_strict_json_for_a_checkpoint_whose_figures_overflow(ckpt_config, script,
                                                                         tmp_path):
  """Parameters scaled by 1e4: the loss is finite but past exp's range, so perplexity is
  infinite; eval.py prints strict JSON with it as the string "inf"."""
  workdir = tmp_path / "run"
  train.train_and_evaluate(ckpt_config(5), str(workdir))
  rewrite_params(workdir, 1e4)
  proc = script("eval.py", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
  assert result["step"] == 100 and result["loss"] > 709 and result["perplexity"] == "inf"


@pytest.mark.parametrize("name", ["eval.py", pytest.param("sample.py", marks=pytest.mark.slow)])
def test_a_checkpoint_with_non_finite_parameters_is_refused_in_one_line(name, ckpt_config, script,
                                                                        tmp_path):
  """A checkpoint holding NaN parameters (written before the guard existed): eval.py and
  sample.py refuse it in one line that names the older step to read instead."""
  workdir = tmp_path / "run"
  train.train_and_evaluate(ckpt_config(5), str(workdir))
  rewrite_params(workdir, float("nan"))
  proc = script(name, f"--workdir={workdir}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: the checkpoint at step 100 in {workdir.resolve() / 'checkpoints'} has non-finite "
      "parameters (its run diverged); read an older one with --step (saved: [5])")


def test_step_best_before_any_validation_says_so(tiny_config, script, tmp_path):
  """A run that has not validated yet has no best step: --step best says so and suggests
  --step latest, in one line."""
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(train={"steps": 20, "ckpt_every": 5, "eval_every": 20}),
                           str(workdir))
  shutil.rmtree(workdir / "checkpoints" / "20")  # as if stopped before its first validation
  proc = script("eval.py", f"--workdir={workdir}", "--step=best")
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
  assert "has been validated yet, so none is the best; use --step latest" in proc.stderr


def test_saves_between_validations_print_no_orbax_warning(tiny_flags, script, tmp_path):
  """ckpt_every=5, eval_every=10: the checkpoints of steps 5 and 15 carry no validation loss,
  and orbax's warning about it is not printed."""
  proc = script("train.py", *tiny_flags(tmp_path / "run", train={
      "steps": 20, "ckpt_every": 5, "eval_every": 10, "log_every": 5}))
  assert proc.returncode == 0, proc.stderr
  assert "tracked_metric" not in proc.stderr and "did not provide metrics" not in proc.stderr


def test_without_the_kernel_eval_says_the_fallback_once(ckpt_config, tmp_path, monkeypatch,
                                                        capsys):
  """A checkpoint trained with model.impl=onednn read where the kernel is missing (simulated):
  one note says the XLA path runs instead, and the evaluation runs."""
  from jaxrnn import kernels
  config = ckpt_config(5)
  config.model.update(hidden_size=64, impl="scan")
  train.train_and_evaluate(config, str(tmp_path))
  mngr = checkpoint.manager(tmp_path)
  meta = checkpoint.read_meta(mngr)
  meta["config"]["model"]["impl"] = "onednn"
  (tmp_path / "checkpoints" / "5" / "meta" / "metadata").write_text(json.dumps(meta))
  monkeypatch.setattr(kernels, "_load_onednn", lambda: (None, "simulated: not built"))
  kernels.warn_fallback.cache_clear()
  capsys.readouterr()
  saved, vocab, params, _ = checkpoint.load_run(str(tmp_path))
  _, splits = lm.prepare_data(saved, vocab)
  lm.make_evaluator(saved)(params, splits["val"])
  err = capsys.readouterr().err
  assert err.count("simulated: not built") == 1 and err.count("onednn") == 1, err


@pytest.mark.parametrize("block, field, value", [
    (dict(block="griffin", cell="rglru", num_heads=4, hidden_size=16), "num_heads", 2),
    (dict(block="griffin", cell="rglru", num_heads=4, hidden_size=16), "mlp_expansion", 4),
    (dict(block="griffin", cell="rglru", hidden_size=16), "conv_width", 3),
    (dict(block="hawk", cell="rglru", hidden_size=16), "lru_width", 24),
    (dict(block="griffin", cell="rglru", hidden_size=16, num_layers=3), "attention_window", 8),
    (dict(block="xlstm", cell="mlstm", num_heads=2), "num_heads", 4),
    (dict(block="xlstm", cell="mlstm", num_heads=2), "expand", 5),  # 16 x 3 rounds up to 64 too
    (dict(block="xlstm", cell="mlstm", num_heads=2, num_layers=2), "slstm_at", (1,)),
    (dict(block="mamba", cell="mamba"), "state_size", 8),
    (dict(block="mamba", cell="mamba"), "dt_rank", 3),
    (dict(cell="lstm", num_layers=2), "block", "residual"),
    (dict(cell="gru"), "hidden_size", 24),
    (dict(cell="lstm", tie_embedding=False), "embed_dim", 12),
])
def test_a_field_that_shapes_the_model_cannot_change_on_resume(tiny_config, block, field, value):
  """Every field whose change would reshape the params, the optimizer state or the carry is
  refused by name, found from the shapes (no list to keep up to date); fields that shape
  nothing (steps, dropout, lr) pass."""
  saved = tiny_config(model=block)
  shapes = lambda c: config_lib.shapes(c, vocab_size=20)
  checkpoint.check_compatible(saved, tiny_config(model={**block, "dropout": 0.3},
                                                 train={"steps": 50, "lr": 0.5}), shapes)
  changed = tiny_config(model={**block, field: value})
  before = saved.model[field]
  with pytest.raises(UserError) as e:
    checkpoint.check_compatible(saved, changed, shapes)
  assert str(e.value) == (f"model.{field} is {value!r} but the checkpoint in this workdir was "
                          f"trained with {before!r}; keep it, or use a new --workdir")


def test_resuming_with_another_block_is_refused_and_changes_nothing(tiny_flags, script,
                                                                   tmp_path):
  """train.py on a stack run resumed with model.block=residual (which reads as an unreadable
  checkpoint in orbax): exit 2, one line naming the field, and the workdir as it was (its
  config.json, its checkpoints). The shapes' part is tested above without training."""
  workdir = tmp_path / "run"
  first = script("train.py", *tiny_flags(workdir, train={"steps": 2}))
  assert first.returncode == 0, first.stderr
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p.name != "lock"}
  proc = script("train.py", *tiny_flags(workdir, model={"block": "residual"},
                                        train={"steps": 4}))
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines() == [
      "error: model.block is 'residual' but the checkpoint in this workdir was trained with "
      "'stack'; keep it, or use a new --workdir"]
  after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p.name != "lock"}
  assert after == before
