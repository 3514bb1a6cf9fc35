"""The GPU path: cuDNN against the XLA recurrences, `auto`'s GPU table, runs resumed and moved
between a GPU and the CPU, jit on one GPU against the CPU, bfloat16 compute, sampling and beam
search; and, on every machine, the refusals that keep a kernel off a platform it cannot run on.

Tests marked `gpu` are collected everywhere and skipped, with their reason, where JAX has no GPU
(conftest.py); `scripts/gpu_check.py` runs them on one (docs/devices.md). Comparisons between
implementations run at float32 precision (`jax.default_matmul_precision("highest")`): on a GPU
JAX's default lets XLA and cuDNN use TF32 products, whose 10-bit mantissas would hide a wrong
gate under their rounding.
"""

import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_script
from jaxrnn import UserError, cells, checkpoint, config as config_lib, kernels, layers, train

gpu = pytest.mark.gpu
CPU = {"JAX_PLATFORMS": "cpu"}  # a script's environment on the CPU of the same machine
HIGHEST = {"JAX_DEFAULT_MATMUL_PRECISION": "highest"}


def _assert_close(got, want, rtol):
  """Equal within rtol of each array's largest entry."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    w = np.asarray(w)
    np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=rtol * np.abs(w).max())


def _script(name: str, *args: str, env: dict[str, str] | None = None):
  """scripts/<name> run as a user would, with `env` added to the environment; it must succeed."""
  proc = run_script(name, *args, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr
  return proc


def _last_json(proc) -> dict:
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _train_losses(workdir) -> list[tuple[int, float]]:
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text()
          .splitlines()]
  return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]


# ------------------------------------------------------------------------------ on a GPU

@gpu
@pytest.mark.parametrize("b, t, d, h, zero_state", [
    (3, 37, 5, 6, False),      # odd batch and hidden sizes, carried state
    (3, 37, 5, 6, True),       # zero state
    (5, 1, 7, 9, False),       # one step
    (4, 1000, 8, 33, False),   # a long sequence
    (64, 64, 128, 1024, False),  # where auto picks cuDNN
])
def test_cudnn_matches_fused_and_scan(b, t, d, h, zero_state):
  """cuDNN's LSTM layer: values and gradients (params, carry, inputs) equal the fused and the
  plain scan's, two layers deep, at float32 precision."""
  cell = cells.get("lstm")
  keys = jax.random.split(jax.random.key(t), 6)
  params = [cell.init(keys[0], d, h), cell.init(keys[1], h, h)]
  carries = [cell.initial_carry(b, h)] * 2
  if not zero_state:
    carries = [jax.tree.map(lambda z, k=k: jax.random.normal(k, z.shape), c)
               for c, k in zip(carries, keys[2:4])]
  xs = jax.random.normal(keys[4], (b, t, d))
  d_ys = jax.random.normal(keys[5], (b, t, h))

  def loss(impl, params, carries, xs):
    final, ys = layers.run_stack(cell, params, carries, xs, impl=impl)
    return jnp.sum(ys * d_ys) + sum(jnp.sum(jnp.tanh(c)) for c in jax.tree.leaves(final))

  with jax.default_matmul_precision("highest"):
    run = lambda impl: jax.jit(functools.partial(layers.run_stack, cell, impl=impl))(
        params, carries, xs)
    grad = lambda impl: jax.jit(jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2)))(
        params, carries, xs)
    cudnn, cudnn_grad = run("cudnn"), grad("cudnn")
    for impl in layers.XLA_IMPLS:
      _assert_close(cudnn, run(impl), rtol=1e-4)
      _assert_close(cudnn_grad, grad(impl), rtol=1e-4)


@gpu
def test_cudnn_takes_zero_steps():
  """t = 0: the carry comes back unchanged, with no outputs."""
  cell = cells.get("lstm")
  params = cell.init(jax.random.key(0), 5, 6)
  carry = jax.tree.map(lambda z: z + 1.5, cell.initial_carry(2, 6))
  new, ys = layers.run(cell, params, carry, jnp.zeros((2, 0, 5)), impl="cudnn")
  assert ys.shape == (2, 0, 6)
  _assert_close(new, carry, rtol=0)


@gpu
@pytest.mark.parametrize("name, hidden, want", [
    ("lstm", 1024, "cudnn"), ("lstm", 512, "fused"), ("gru", 1024, "fused"),
    ("rnn", 1024, "fused"), ("mingru", 256, "fused")])
def test_auto_follows_its_gpu_table_here(name, hidden, want):
  """On this GPU, `auto` makes the choice of each row of its GPU table, and that impl runs."""
  cell = cells.get(name)
  assert layers.resolve(cell, "auto", hidden, 64) == want
  params = cell.init(jax.random.key(0), 8, hidden)
  _, ys = layers.run(cell, params, cell.initial_carry(2, hidden), jnp.ones((2, 3, 8)))
  assert ys.shape == (2, 3, hidden) and bool(jnp.all(jnp.isfinite(ys)))


def _gpu_flags(tiny_flags, workdir, steps, **model):
  """A two-layer tiny LSTM with the cuDNN layer in the loop, evaluated and saved every 5 steps."""
  return tiny_flags(workdir, model={"num_layers": 2, "dropout": 0.1, "impl": "cudnn", **model},
                    train={"steps": steps, "eval_every": 5, "ckpt_every": 5})


@gpu
@pytest.mark.parametrize("name", ["lstm", "gru", "rnn"])
def test_the_pallas_kernel_trains_as_the_fused_scan_does(tiny_config, tmp_path, name):
  """model.impl=pallas, compiled for this GPU: 20 steps of a two-layer model (dropout on) give
  the fused scan's losses to float tolerance, at float32 precision."""
  losses = {}
  with jax.default_matmul_precision("highest"):
    for impl in ("pallas", "fused"):
      config = tiny_config(model={"cell": name, "num_layers": 2, "dropout": 0.1, "impl": impl},
                           train={"steps": 20})
      train.train_and_evaluate(config, str(tmp_path / impl))
      losses[impl] = [loss for _, loss in _train_losses(tmp_path / impl)]
  np.testing.assert_allclose(losses["pallas"], losses["fused"], rtol=1e-4)


@gpu
def test_a_gpu_run_with_cudnn_resumes_bit_for_bit(tiny_flags, tmp_path):
  """10 steps, stop, resume to 20 == 20 straight on the GPU, cuDNN in every layer: the same
  params bit for bit and the same losses."""
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  _script("train.py", *_gpu_flags(tiny_flags, straight, 20))
  _script("train.py", *_gpu_flags(tiny_flags, resumed, 10))
  _script("train.py", *_gpu_flags(tiny_flags, resumed, 20))
  *_, params_a, step_a = checkpoint.load_run(str(straight))
  *_, params_b, step_b = checkpoint.load_run(str(resumed))
  assert step_a == step_b == 20
  for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert _train_losses(straight) == _train_losses(resumed)


@gpu
def test_checkpoints_move_between_the_gpu_and_the_cpu(tiny_flags, tmp_path):
  """A run saved on the GPU (cuDNN) evaluates on the CPU, its impl re-resolved there with a
  note, to the GPU's perplexity; a run saved on the CPU (an impl of the CPU's) evaluates on the
  GPU the same way."""
  on_gpu, on_cpu = tmp_path / "gpu", tmp_path / "cpu"
  _script("train.py", *_gpu_flags(tiny_flags, on_gpu, 10), env=HIGHEST)
  cpu_impl = "scan" if kernels.unavailable("core") else "core"  # the core where it is built
  _script("train.py", *_gpu_flags(tiny_flags, on_cpu, 10, impl=cpu_impl), env={**CPU, **HIGHEST})
  gpu_env, cpu_env = HIGHEST, {**CPU, **HIGHEST}
  for workdir, home, away in ((on_gpu, gpu_env, cpu_env), (on_cpu, cpu_env, gpu_env)):
    at_home = _script("eval.py", f"--workdir={workdir}", env=home)
    moved = _script("eval.py", f"--workdir={workdir}", env=away)
    if workdir == on_gpu or cpu_impl == "core":  # an impl the other platform lacks
      assert "model.impl=auto" in moved.stderr
    assert _last_json(moved)["loss"] == pytest.approx(_last_json(at_home)["loss"], rel=1e-5)


@gpu
def test_jit_on_one_gpu_gives_the_cpus_losses(tiny_flags, tmp_path):
  """The same 20 steps (dropout included) on the GPU and on the CPU: the same losses to float
  tolerance, step by step, at float32 precision on both."""
  flags = lambda w: tiny_flags(w, model={"num_layers": 2, "dropout": 0.1, "impl": "fused"},
                               train={"steps": 20})
  _script("train.py", *flags(tmp_path / "gpu"), env=HIGHEST)
  _script("train.py", *flags(tmp_path / "cpu"), env={**CPU, **HIGHEST})
  gpu_losses, cpu_losses = _train_losses(tmp_path / "gpu"), _train_losses(tmp_path / "cpu")
  assert [s for s, _ in gpu_losses] == [s for s, _ in cpu_losses] == list(range(1, 21))
  np.testing.assert_allclose([l for _, l in gpu_losses], [l for _, l in cpu_losses], rtol=1e-4)


@gpu
@pytest.mark.parametrize("name", ["lstm", "gru", "rnn"])
def test_bfloat16_compute_trains_on_a_gpu(tiny_config, tmp_path, name):
  """compute_dtype=bfloat16 on the GPU: fused and scan agree in bfloat16, and 30 steps of
  training land within 2% of float32's loss."""
  cell = cells.get(name, compute_dtype="bfloat16")
  params = cell.init(jax.random.key(0), 8, 64)
  xs = jax.random.normal(jax.random.key(1), (4, 16, 8))
  carry = cell.initial_carry(4, 64)
  _assert_close(layers.run(cell, params, carry, xs, impl="fused"),
                layers.run(cell, params, carry, xs, impl="scan"), rtol=2e-2)
  losses = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_config(model={"cell": name, "compute_dtype": dtype}, train={"steps": 30})
    losses[dtype] = train.train_and_evaluate(config, str(tmp_path / dtype))["val_loss"]
  assert np.isfinite(losses["bfloat16"])
  assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)


@gpu
def test_sampling_and_beam_search_on_a_gpu_match_the_cpu(tiny_flags, tmp_path):
  """sample.py and --beam on a GPU-trained run: greedy text and beam log-probabilities equal
  the CPU's for the same checkpoint; a seed gives the same sample twice."""
  workdir = tmp_path / "run"
  _script("train.py", *_gpu_flags(tiny_flags, workdir, 10))
  args = (f"--workdir={workdir}", "--prefix=the ", "--length=40")
  greedy = [_script("sample.py", *args, "--temperature=0", env=env).stdout for env in ({}, CPU)]
  assert greedy[0] == greedy[1]
  seeded = [_script("sample.py", *args, "--seed=3").stdout for _ in range(2)]
  assert seeded[0] == seeded[1]
  beams = [_script("sample.py", *args, "--beam=3", env={**env, **HIGHEST}) for env in ({}, CPU)]
  assert beams[0].stdout == beams[1].stdout
  probs = [[float(x) for x in p.stderr.split("best first: ")[1].splitlines()[0].split(", ")]
           for p in beams]
  np.testing.assert_allclose(*probs, rtol=1e-4)


# ------------------------------------------------------------------------ on every machine

@pytest.mark.parametrize("impl, platform, can", [
    ("core", "gpu", "auto, fused, scan, cudnn, pallas"),
    ("onednn", "gpu", "auto, fused, scan, cudnn, pallas"),
    ("cudnn", "cpu", "auto, fused, scan, core, onednn"),
    ("pallas", "cpu", "auto, fused, scan, core, onednn"), ("core", "tpu", "auto, fused, scan")])
def test_a_kernel_on_a_platform_it_cannot_run_on_is_refused_in_one_line(impl, platform, can):
  """CPU kernels asked for on a GPU (or TPU), cuDNN and Pallas' kernel on a CPU: one line naming
  the impls that do run there, before anything is built."""
  with pytest.raises(UserError) as e:
    layers.check(cells.get("lstm"), impl, platform)
  assert str(e.value) == (f"model.impl={impl} runs on a {kernels.PLATFORMS[impl]} only (this "
                          f"platform: {platform}); use model.impl={can}")


def test_a_cpu_kernel_is_refused_by_validation_on_a_gpu(tiny_config, monkeypatch):
  """config.validate, as every script calls it, refuses model.impl=core where JAX's backend is
  a GPU (simulated here), rather than failing inside XLA's compiler."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(UserError, match=r"^model.impl=core runs on a cpu only \(this platform: "
                     r"gpu\); use model.impl=auto, fused, scan, cudnn, pallas$"):
    config_lib.validate(tiny_config(model={"impl": "core"}))


def test_train_refuses_a_kernel_of_another_platform_in_one_line(tiny_flags, tmp_path):
  """train.py with a kernel this platform cannot run (cuDNN on a CPU, the core on a GPU): exit 2,
  one line naming the impls that run here, no traceback, and no checkpoint written. (eval.py
  and sample.py re-resolve a saved impl this machine cannot run:
  test_checkpoints_move_between_the_gpu_and_the_cpu.)"""
  here = jax.default_backend()
  impl = "cudnn" if here == "cpu" else "core"
  workdir = tmp_path / "run"
  proc = run_script("train.py", *tiny_flags(workdir, model={"impl": impl}))
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in proc.stderr
  assert lines[0].endswith(f"model.impl={impl} runs on a {kernels.PLATFORMS[impl]} only (this "
                           f"platform: {here}); use model.impl="
                           f"{', '.join(layers.runnable_impls(here))}")
  assert not (workdir / "checkpoints").exists()
