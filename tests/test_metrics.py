"""Tests for jaxrnn.metrics: the metrics.jsonl log as resumed runs and failures meet it."""

import json

import pytest

from jaxrnn import metrics


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
  """Processes other than the main one (enabled=False) leave no file behind."""
  with metrics.Log(tmp_path, steps=5, enabled=False) as log:
    log.write({"step": 1, "split": "val", "loss": 2.0})
  assert not (tmp_path / "metrics.jsonl").exists()


def test_a_torn_last_line_is_dropped_and_the_run_goes_on(tmp_path, capsys):
  """Half a line at the end (a crash or a full disk mid-write) is dropped with a note; the
  rewrite keeps every whole row and leaves no temporary file behind."""
  with metrics.Log(tmp_path, steps=30) as log:
    for step in (10, 20):
      log.write({"step": step, "split": "val", "loss": 1.0})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 30, "split": "tra')
  with metrics.Log(tmp_path, steps=30, resumed_at=20) as log:
    log.write({"step": 30, "split": "val", "loss": 0.5})
  assert [r["step"] for r in rows(tmp_path)] == [10, 20, 30]
  assert "dropped 1 unreadable line" in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
