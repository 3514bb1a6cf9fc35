"""Tests for jaxrnn.metrics: the metrics.jsonl log and its TensorBoard twin as resumed runs and
failures meet them."""

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from jaxrnn import UserError, metrics, train


def rows(workdir):
  return [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_resume_drops_rows_past_the_restored_step_and_keeps_the_clock(tmp_path):
  """Rows after the checkpoint's step are dropped (those steps run again); elapsed_s goes on
  from the last kept row."""
  with metrics.Log(tmp_path, steps=30) as log:
    for step in (10, 20, 30):
      log.write({"step": step, "split": "val", "loss": 1.0})
  kept = [dict(r, elapsed_s=100.0 + r["step"]) for r in rows(tmp_path)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
  with metrics.Log(tmp_path, steps=30, resumed_at=20) as log:
    log.write({"step": 30, "split": "val", "loss": 0.5})
  got = rows(tmp_path)
  assert [r["step"] for r in got] == [10, 20, 30] and got[-1]["loss"] == 0.5
  assert got[-1]["elapsed_s"] >= 120.0


def test_the_file_is_closed_when_the_run_fails(tmp_path):
  """An exception inside the block still closes the file, with every written row flushed."""
  with pytest.raises(RuntimeError):
    with metrics.Log(tmp_path, steps=5) as log:
      log.write({"step": 1, "split": "val", "loss": 2.0})
      raise RuntimeError("boom")
  assert log.file.closed and [r["step"] for r in rows(tmp_path)] == [1]


def test_a_disabled_log_writes_nothing(tmp_path):
  """Processes other than the main one (enabled=False) leave no file behind, TensorBoard's
  included."""
  with metrics.Log(tmp_path, steps=5, enabled=False, tensorboard=True) as log:
    log.write({"step": 1, "split": "val", "loss": 2.0})
  assert not list(tmp_path.iterdir())


def test_a_torn_last_line_is_dropped_and_the_run_goes_on(tmp_path, capsys):
  """Half a line at the end (a crash or a full disk mid-write) is dropped with a note; the
  rewrite keeps every whole row and leaves no temporary file behind."""
  with metrics.Log(tmp_path, steps=30, tensorboard=False) as log:
    for step in (10, 20):
      log.write({"step": step, "split": "val", "loss": 1.0})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 30, "split": "tra')
  with metrics.Log(tmp_path, steps=30, resumed_at=20, tensorboard=False) as log:
    log.write({"step": 30, "split": "val", "loss": 0.5})
  assert [r["step"] for r in rows(tmp_path)] == [10, 20, 30]
  assert "dropped 1 unreadable line" in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def read_events(workdir) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} of a workdir's event files, through TensorBoard's own reader."""
  from tensorboard.backend.event_processing import event_accumulator
  events = event_accumulator.EventAccumulator(str(workdir))
  events.Reload()
  return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
          for tag in events.Tags()["scalars"]}


def test_tensorboard_scalars_are_the_jsonl_rows(tiny_config, tmp_path):
  """A tiny run with train.tensorboard=True: TensorBoard reads back every number of every
  metrics.jsonl row (train loss, lr, gradient norm, tokens/s; validation loss, perplexity,
  bpc) as `<split>/<figure>` at its step, and nothing else."""
  config = tiny_config(train={"steps": 6, "log_every": 2, "eval_every": 3, "tensorboard": True})
  train.train_and_evaluate(config, str(tmp_path))
  expected = {}
  for row in rows(tmp_path):
    for tag, value in metrics.scalars(row).items():
      expected.setdefault(tag, []).append((row["step"], value))
  assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss",
          "val/perplexity", "val/bpc"} <= set(expected)
  got = read_events(tmp_path)
  assert sorted(got) == sorted(expected)
  for tag, points in expected.items():
    assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
    assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_a_resumed_log_continues_its_curves_without_repeated_steps(tmp_path):
  """Steps past the restored one (run again after a resume) appear once in TensorBoard, with
  the new run's values."""
  with metrics.Log(tmp_path, steps=30) as log:
    for step in (10, 20, 30):
      log.write({"step": step, "split": "val", "loss": 1.0})
  with metrics.Log(tmp_path, steps=40, resumed_at=20) as log:
    for step in (30, 40):
      log.write({"step": step, "split": "val", "loss": 0.5})
  assert read_events(tmp_path) == {"val/loss": [(10, 1.0), (20, 1.0), (30, 0.5), (40, 0.5)]}


def test_without_tensorboardx_training_goes_on_and_says_once_how_to_enable_it(
    tiny_config, tmp_path, monkeypatch, capsys):
  """tensorboardX missing: train.tensorboard None trains, writes metrics.jsonl and no events,
  and says once how to turn curves on; True is a one-line error naming the extra."""
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import tensorboardX raises
  train.train_and_evaluate(tiny_config(train={"steps": 3}), str(tmp_path / "run"))
  assert capsys.readouterr().err.count("pip install -e '.[tensorboard]'") == 1
  assert [r["step"] for r in rows(tmp_path / "run") if r["split"] == "train"] == [1, 2, 3]
  assert not list((tmp_path / "run").glob(metrics.EVENTS))
  with pytest.raises(UserError, match=r"train\.tensorboard=True needs tensorboardX"):
    train.train_and_evaluate(tiny_config(train={"steps": 3, "tensorboard": True}),
                             str(tmp_path / "required"))


def test_a_validation_row_lost_to_a_torn_line_is_written_again_from_the_checkpoint(
    tiny_config, tmp_path):
  """A crash tore the line of step 5's validation: the resumed run writes it again from the
  checkpoint's copy of the run's evaluations, in step order, with its figures."""
  config = lambda steps: tiny_config(train={"steps": steps, "log_every": 5, "eval_every": 5,
                                            "ckpt_every": 5, "tensorboard": False})
  train.train_and_evaluate(config(10), str(tmp_path))
  before = rows(tmp_path)
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  torn = next(i for i, r in enumerate(before) if r["split"] == "val" and r["step"] == 5)
  lines[torn] = lines[torn][:20]
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  train.train_and_evaluate(config(15), str(tmp_path))
  after = rows(tmp_path)
  assert [(r["step"], r["split"]) for r in after] == [
      (5, "train"), (5, "val"), (10, "train"), (10, "val"), (15, "train"), (15, "val")]
  assert after[1] == before[torn]


def test_every_written_row_is_strict_json_even_with_non_finite_figures(tmp_path):
  """A gradient norm that overflowed to inf is written as the string "inf" (no bare Infinity,
  which strict JSON readers refuse), and reads back as a float with float()."""
  with metrics.Log(tmp_path, steps=1, tensorboard=False) as log:
    log.write({"step": 1, "split": "train", "loss": 3.0, "grad_norm": float("inf"),
               "lr": float("nan")})
  line = (tmp_path / "metrics.jsonl").read_text()
  row = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
  assert row["grad_norm"] == "inf" and float(row["grad_norm"]) == float("inf")
  assert row["lr"] == "nan"


def test_training_with_tensorboard_never_imports_torch(tiny_flags, tmp_path):
  """In a process of its own with torch installed (the [dev] extra), a training run that
  writes TensorBoard events loads no torch module, and so no second OpenMP runtime."""
  assert importlib.util.find_spec("torch") is not None  # installed: the test means something
  code = ("import atexit, runpy, sys; atexit.register(lambda: print('TORCH' if any("
          "m == 'torch' or m.startswith('torch.') for m in sys.modules) else 'NO TORCH')); "
          "sys.argv = ['train.py'] + sys.argv[1:]; "
          "runpy.run_path('scripts/train.py', run_name='__main__')")
  proc = subprocess.run([sys.executable, "-c", code,
                         *tiny_flags(tmp_path / "run", train={"steps": 3,
                                                              "tensorboard": True})],
                        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert list((tmp_path / "run").glob(metrics.EVENTS))
  assert proc.stdout.strip().splitlines()[-1] == "NO TORCH"
