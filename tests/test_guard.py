"""Tests for jaxrnn.guard: which states become checkpoints, and a diverged run resumed as its
message says."""

import json
import math
import pathlib

import pytest

from conftest import run_script
from jaxrnn import guard

CHANCE = math.log(60)  # about 4.09 nats: a 60-symbol vocabulary


def make_guard(recent=()):
  written, notes = [], []

  def advice(what):
    return guard.Diverged(what)

  g = guard.Guard(CHANCE, list(recent), written.append, notes.append, advice)
  return g, written, notes


def rows(*losses, finite=True):
  return [{"loss": l, "grad_norm": 1.0, "params_finite": finite} for l in losses]


def test_the_bound_is_the_running_level_or_chance_plus_chance():
  """By hand: with no history the bound is 2 log V; with a level below chance still 2 log V;
  with a level above chance (the median of the window) that level plus log V."""
  g, *_ = make_guard()
  assert g.bound() == pytest.approx(2 * CHANCE)
  g, *_ = make_guard([1.4, 1.5, 1.3])
  assert g.bound() == pytest.approx(2 * CHANCE)
  g, *_ = make_guard([5.0, 9.0, 6.0])
  assert g.bound() == pytest.approx(6.0 + CHANCE)
  g, *_ = make_guard([1.0] * 10 + [7.0] * (guard.WINDOW - 1))  # the window forgets the oldest
  assert g.history() == ([1.0] * 10 + [7.0] * (guard.WINDOW - 1))[-guard.WINDOW:]


@pytest.mark.diverges
def test_a_held_checkpoint_is_written_only_when_the_next_loss_of_its_parameters_is_sane():
  """Held at step 3: step 4's loss 2.0 writes it; held at step 6: step 7's loss 56 drops it with
  a note naming both steps, and 56 does not join the running level."""
  g, written, notes = make_guard()
  g.steps(1, rows(4.1, 3.9, 3.7))
  g.hold(3, "state 3")
  assert g.waiting and written == []
  g.steps(4, rows(2.0, 1.9, 1.8))
  assert written == ["state 3"] and not g.waiting
  g.hold(6, "state 6")
  g.steps(7, rows(56.0))
  assert written == ["state 3"] and not g.waiting
  assert "checkpoint of step 6" in notes[0] and "training loss of step 7, 56 nats" in notes[0]
  assert 56.0 not in g.history() and g.history() == [4.1, 3.9, 3.7, 2.0, 1.9, 1.8]


@pytest.mark.parametrize("bad", ["nan loss", "inf loss", "non-finite update"])
def test_a_non_finite_step_stops_the_run_and_drops_the_held_checkpoint(bad):
  """A NaN or inf loss, or an update that left a parameter non-finite, raises Diverged naming
  the step; the checkpoint held for the step before is never written."""
  g, written, _ = make_guard()
  g.steps(1, rows(4.0, 3.9))
  g.hold(2, "state 2")
  bad_rows = {"nan loss": rows(math.nan), "inf loss": rows(math.inf),
              "non-finite update": rows(3.8, finite=False)}[bad]
  with pytest.raises(guard.Diverged, match="at step 3"):
    g.steps(3, bad_rows)
  assert written == [] and not g.waiting


@pytest.mark.diverges
def test_a_validation_loss_judges_the_checkpoint_of_its_own_step():
  g, written, notes = make_guard([1.5] * 5)
  g.hold(10, "state 10")
  assert g.measured(10, 1.6, "validation loss") and written == ["state 10"]
  g.hold(20, "state 20")
  assert not g.measured(20, 800.0, "validation loss") and written == ["state 10"]
  assert "validation loss, 800 nats" in notes[0]


def issue_flags(workdir: pathlib.Path, corpus: pathlib.Path) -> list[str]:
  """Issue 26's poisoning command: a ReLU RNN under SGD at lr 5 without clipping, saving every 3
  steps, on 100 KB of Tiny Shakespeare (2 x 64, batch 8 x 32)."""
  return [f"--workdir={workdir}", f"--config.data.corpus={corpus}",
          "--config.model.cell=rnn", "--config.model.nonlinearity=relu",
          "--config.model.num_layers=2", "--config.model.hidden_size=64",
          "--config.data.batch_size=8", "--config.data.seq_len=32",
          "--config.train.optimizer=sgd", "--config.train.lr=5", "--config.train.clip_norm=0",
          "--config.train.ckpt_every=3", "--config.train.log_every=1", "--config.train.steps=60"]


@pytest.mark.diverges
def test_a_diverged_run_resumes_from_a_sane_checkpoint_as_its_message_says(tmp_path):
  """The command that left a blown-up checkpoint as the only resume point (issue 26): it stops
  in one line that says to turn clipping on (clip_norm 0 is off) and names the step it will
  resume from; every checkpoint it left has finite parameters. The same command with clipping
  on, as the message says, resumes from that step and trains on to a finite loss that beats
  chance."""
  corpus = tmp_path / "shakespeare_100k.txt"
  text = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" /
          "tinyshakespeare.txt").read_text()[:100_000]
  corpus.write_text(text)
  workdir = tmp_path / "run"
  proc = run_script("train.py", *issue_flags(workdir, corpus))
  assert proc.returncode == 2, proc.stderr
  error = proc.stderr.strip().splitlines()[-1]
  assert error.startswith("error: ") and "Traceback" not in proc.stderr
  assert "turn gradient clipping on (--config.train.clip_norm=1.0; 0 is off)" in error
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  if saved:
    assert f"resume from step {saved[-1]}" in error
    for step in saved:
      evaluated = run_script("eval.py", f"--workdir={workdir}", f"--step={step}")
      assert evaluated.returncode == 0, evaluated.stderr
      assert math.isfinite(json.loads(evaluated.stdout)["loss"])
  else:
    assert "no checkpoint was saved before it" in error
  resumed = run_script("train.py", *issue_flags(workdir, corpus), "--config.train.clip_norm=1.0")
  assert resumed.returncode == 0, resumed.stderr
  if saved:
    assert f"resuming from the checkpoint at step {saved[-1]}" in resumed.stderr
  result = json.loads(resumed.stdout.strip().splitlines()[-1])
  assert result["step"] == 60 and result["val_loss"] < math.log(60)


@pytest.mark.slow  # the diverged-run test resumes through resume_step in the fast suite
def test_resume_step_moves_the_newer_checkpoints_aside_once(tiny_config, tmp_path, capsys):
  """train.resume_step=5 on a run saved at 5, 10, 15: it resumes from 5, moves 10 and 15 to
  damaged/, and trains on; the same config again resumes from its own latest save, moving
  nothing; a step that was never saved is a one-line error listing the saved ones."""
  from jaxrnn import UserError, train
  workdir = tmp_path / "run"
  config = lambda steps, resume="latest": tiny_config(
      train={"steps": steps, "ckpt_every": 5, "keep": 5, "log_every": 5, "resume_step": resume})
  train.train_and_evaluate(config(15), str(workdir))
  capsys.readouterr()
  train.train_and_evaluate(config(20, "5"), str(workdir))
  assert "resuming from the checkpoint at step 5" in capsys.readouterr().err
  assert sorted(p.name for p in (workdir / "damaged").iterdir()) == ["10", "15"]
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [5, 10, 15, 20]
  train.train_and_evaluate(config(25, "5"), str(workdir))
  err = capsys.readouterr().err
  assert "resuming from the checkpoint at step 20" in err and "moved" not in err
  with pytest.raises(UserError, match=r"no checkpoint for step 7 .*saved steps: \[25, 20, 15, 10"):
    train.train_and_evaluate(config(30, "7"), str(workdir))


@pytest.mark.parametrize("name", [
    "default",
    pytest.param("ptb_small", marks=pytest.mark.slow),
    pytest.param("shakespeare_cpu", marks=pytest.mark.slow),
])
def test_the_readme_configs_never_trip_the_guard(name, tmp_path):
  """The quickstart, PTB and Shakespeare configs, 40 steps saving every 3: every held
  checkpoint is written (none judged insane: the suite's autouse fixture fails the test if
  one is), the last ones kept."""
  import importlib
  from jaxrnn import checkpoint, train
  config = importlib.import_module(f"configs.{name}").get_config()
  config.train.update(unit="steps", steps=40, ckpt_every=3, eval_every=0, log_every=10,
                      keep=2, tensorboard=False,  # a warmup longer than the run is refused:
                      warmup_steps=min(config.train.warmup_steps, 40))  # the lr's full height
  train.train_and_evaluate(config, str(tmp_path))
  assert checkpoint.manager(tmp_path).all_steps() == [39, 40]
