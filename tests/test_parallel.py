"""Tests for data parallelism: 1, 2 and 4 simulated CPU devices, and two processes, agree."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, run_script
from jaxrnn import checkpoint


def train_flags(tiny_flags, workdir, steps, batch_size=8):
  """A two-layer LM with dropout, 8 lanes (so 1, 2 and 4 devices divide them), 64 wide so that
  auto runs the CPU kernels (evaluation in oneDNN, training in the core) where they are built."""
  return tiny_flags(workdir, model={"num_layers": 2, "dropout": 0.1, "hidden_size": 64},
                    data={"batch_size": batch_size},
                    train={"steps": steps, "eval_every": 10, "ckpt_every": 10, "eval_lanes": 4})


def losses(workdir) -> list[float]:
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.fixture(scope="module")
def four_and_one(tiny_flags, tmp_path_factory):
  """The same 20-step run on 4 devices and on 1."""
  out = {}
  for n in (4, 1):
    workdir = tmp_path_factory.mktemp(f"dev{n}")
    proc = run_script("train.py", *train_flags(tiny_flags, workdir, 20), devices=n)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["devices"] == n
    out[n] = workdir
  return out


def test_four_devices_match_one(four_and_one):
  """Losses and final params of 4 devices equal 1 device's within 1e-5 (dropout on)."""
  np.testing.assert_allclose(losses(four_and_one[4]), losses(four_and_one[1]), rtol=1e-5)
  *_, params4, _ = checkpoint.load_run(str(four_and_one[4]))
  *_, params1, _ = checkpoint.load_run(str(four_and_one[1]))
  for a, b in zip(jax.tree.leaves(params4), jax.tree.leaves(params1), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # three eval.py processes; test_four_devices_match_one stays fast
def test_validation_perplexity_is_identical_across_device_counts(four_and_one):
  """eval.py on the same checkpoint prints the same figures on 1, 2 and 4 devices."""
  results = []
  for n in (1, 2, 4):
    proc = run_script("eval.py", f"--workdir={four_and_one[4]}", devices=n)
    assert proc.returncode == 0, proc.stderr
    results.append(json.loads(proc.stdout))
  assert results[0] == results[1] == results[2]


@pytest.mark.slow  # two more multi-device runs; test_four_devices_match_one stays in the fast suite
def test_four_device_checkpoint_resumes_on_two(tiny_flags, four_and_one, tmp_path):
  """Stop a 4-device run at step 10, resume on 2 devices: the losses of the straight run."""
  workdir = tmp_path / "run"
  assert run_script("train.py", *train_flags(tiny_flags, workdir, 10), devices=4).returncode == 0
  proc = run_script("train.py", *train_flags(tiny_flags, workdir, 20), devices=2)
  assert proc.returncode == 0, proc.stderr
  np.testing.assert_allclose(losses(workdir), losses(four_and_one[4]), rtol=1e-5)


@pytest.mark.slow  # two more multi-device runs; dropout across devices stays in the fast suite
def test_every_regularizer_on_gives_the_same_run_on_four_devices_and_one(tiny_flags, tmp_path):
  """Locked and per-position dropout, embedding dropout, weight drop, tying, AR / TAR, uniform
  init, the step schedule and NT-ASGD together: 4 devices train as 1 (1e-5), since row masks
  come from global row indices and the shared masks from one key on every device; the 4
  devices also run their lanes as 2 micro-batches each (train.accumulate)."""
  regularized = {"model": {"num_layers": 2, "hidden_size": 8, "dropout": 0.1, "dropout_in": 0.2,
                           "locked_dropout": True, "embed_dropout": 0.1, "weight_drop": 0.3,
                           "tie_embedding": True, "ar": 2.0, "tar": 1.0, "init_scale": 0.1},
                 "data": {"batch_size": 8},
                 "train": {"steps": 12, "eval_every": 2, "ckpt_every": 6, "eval_lanes": 4,
                           "optimizer": "sgd", "lr": 2.0, "schedule": "step", "decay_after": 1,
                           "asgd_patience": 1}}
  for n in (4, 1):
    accumulate = {"train": {**regularized["train"], "accumulate": 2 if n == 4 else 1}}
    proc = run_script("train.py", *tiny_flags(tmp_path / str(n), **{**regularized, **accumulate}),
                      devices=n)
    assert proc.returncode == 0, proc.stderr
  np.testing.assert_allclose(losses(tmp_path / "4"), losses(tmp_path / "1"), rtol=1e-5)
  *_, params4, _ = checkpoint.load_run(str(tmp_path / "4"))
  *_, params1, _ = checkpoint.load_run(str(tmp_path / "1"))
  for a, b in zip(jax.tree.leaves(params4), jax.tree.leaves(params1), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # two more multi-device runs; test_four_devices_match_one stays in the fast suite
def test_mlstm_trains_the_same_on_four_devices_and_one(tiny_flags, tmp_path):
  """mlstm, whose carry holds a d x d memory per head beside h, n and m: its lanes' states
  shard over 4 devices like any carry, and the run equals 1 device's (1e-5)."""
  config = {"model": {"cell": "mlstm", "num_heads": 2, "hidden_size": 8, "dropout": 0.1},
            "train": {"steps": 8, "ckpt_every": 4, "eval_lanes": 4}}
  for n in (4, 1):
    proc = run_script("train.py", *tiny_flags(tmp_path / str(n), **config), devices=n)
    assert proc.returncode == 0, proc.stderr
  np.testing.assert_allclose(losses(tmp_path / "4"), losses(tmp_path / "1"), rtol=1e-5)


def test_indivisible_batch_is_refused_with_nearest_sizes(tiny_flags, tmp_path):
  """Batch 6 on 4 devices: exit 2 before compiling, suggesting 4 or 8."""
  proc = run_script("train.py", *train_flags(tiny_flags, tmp_path / "run", 5, batch_size=6),
                    devices=4)
  assert proc.returncode == 2
  assert "data.batch_size=6 does not split evenly over 4 devices; use 4 or 8" in proc.stderr


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # three processes started; test_four_devices_match_one stays fast
def test_two_processes_match_one_process_with_four_devices(tiny_flags, four_and_one, tmp_path):
  """2 processes x 2 CPU devices (jax.distributed, gloo) train like 1 process x 4 devices."""
  workdir = tmp_path / "run"
  address = f"127.0.0.1:{free_port()}"
  flags = train_flags(tiny_flags, workdir, 20) + [f"--coordinator_address={address}",
                                              "--num_processes=2"]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  procs = [subprocess.Popen([sys.executable, str(REPO_ROOT / "scripts" / "train.py"), *flags,
                             f"--process_id={i}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=240) for p in procs]
  finally:
    for p in procs:  # a hung collective ignores SIGTERM's save request: kill outright
      p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err
  assert json.loads(outputs[0][0].splitlines()[-1])["devices"] == 4
  np.testing.assert_allclose(losses(workdir), losses(four_and_one[4]), rtol=1e-5)
  *_, params, step = checkpoint.load_run(str(workdir))
  *_, params4, _ = checkpoint.load_run(str(four_and_one[4]))
  assert step == 20
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params4), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_classifier_on_two_devices_matches_one(tmp_path):
  """The sentence classifier (no carried state) trains and validates alike on 2 devices and 1."""
  flags = ["--config", str(REPO_ROOT / "configs" / "classify_rt.py"), "--config.model.hidden_size=8",
           "--config.model.embed_dim=8", "--config.data.max_vocab=300",
           "--config.data.batch_size=8", "--config.train.steps=6", "--config.train.log_every=1",
           "--config.train.eval_every=3"]
  results = {}
  for n in (2, 1):
    proc = run_script("train.py", f"--workdir={tmp_path / str(n)}", *flags, devices=n)
    assert proc.returncode == 0, proc.stderr
    results[n] = json.loads(proc.stdout.splitlines()[-1])
  assert results[2]["devices"] == 2
  np.testing.assert_allclose(losses(tmp_path / "2"), losses(tmp_path / "1"), rtol=1e-5)
  assert results[2]["val_accuracy"] == results[1]["val_accuracy"]
  assert results[2]["val_loss"] == pytest.approx(results[1]["val_loss"], rel=1e-5)


def test_one_device_runs_jit_and_equals_pmap_of_one_device_bit_for_bit(tiny_config):
  """On one device `parallel.pmap` is a jax.jit of the step (no pmap in its lowering), and 4
  steps of it give the parameters, carries and losses of jax.pmap over that one device with
  the cross-device mean, bit for bit."""
  import functools
  from jaxrnn import model, optim, parallel, train
  from jaxrnn.tasks import lm
  config = tiny_config(model={"num_layers": 2, "dropout": 0.1})
  vocab, ids = lm.prepare_data(config)
  tx = optim.make_optimizer(config.train)
  devs = parallel.devices(1)
  assert devs.single
  step = lambda across: functools.partial(train.train_step, config=config, tx=tx,
                                          across_devices=across)
  runs = {"jit": parallel.pmap(step(False), devs),
          "pmap": jax.pmap(step(True), axis_name=parallel.AXIS, devices=devs.local)}
  assert "pmap" not in str(runs["jit"].lower(
      *parallel.replicate((train.create_train_state(config, len(vocab), tx),), devs),
      parallel.shard(next(lm.train_batches(ids["train"], config, 0))[1], devs),
      parallel.shard(model.initial_carry(config.model, 4), devs)).as_text())
  finals = {}
  for name, fn in runs.items():
    state = parallel.replicate(train.create_train_state(config, len(vocab), tx), devs)
    carry = parallel.shard(model.initial_carry(config.model, 4), devs)
    batches, seen = lm.train_batches(ids["train"], config, 0), []
    for _ in range(4):
      state, carry, metrics = fn(state, parallel.shard(next(batches)[1], devs), carry)
      seen.append(float(parallel.unreplicate(metrics)["loss"]))
    finals[name] = (jax.device_get(parallel.unreplicate(state.params)),
                    parallel.unshard(carry), seen)
  for a, b in zip(jax.tree.leaves(finals["jit"]), jax.tree.leaves(finals["pmap"]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
