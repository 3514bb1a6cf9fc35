"""Tests for jaxrnn.optim: the schedules, NT-ASGD's trigger and its average of the iterates."""

import jax
import numpy as np
import pytest

from configs import default
from jaxrnn import model, optim, train
from jaxrnn.tasks import lm


def test_cosine_schedule_warms_up_and_decays():
  """Cosine: 0 at step 0, the peak after warmup, ~0 at the last step."""
  config = default.get_config().train
  config.update(schedule="cosine", warmup_steps=10, steps=100, lr=1e-2)
  schedule = optim.learning_rate(config)
  assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1e-2)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-8)


def test_linear_schedule_warms_up_and_decays_to_zero_by_hand():
  """Linear: up from 0 over the warmup, then a straight line to 0 at the last step."""
  config = default.get_config().train
  config.update(schedule="linear", warmup_steps=10, steps=110, lr=1e-2)
  schedule = optim.learning_rate(config)
  by_hand = {0: 0.0, 5: 5e-3, 10: 1e-2, 35: 7.5e-3, 60: 5e-3, 110: 0.0}
  for step, lr in by_hand.items():
    assert float(schedule(step)) == pytest.approx(lr, abs=1e-9), step
  config.update(warmup_steps=0, steps=100)  # no warmup: the peak at step 0
  schedule = optim.learning_rate(config)
  assert [float(schedule(s)) for s in (0, 50, 100)] == pytest.approx([1e-2, 5e-3, 0.0], abs=1e-9)


def test_adams_betas_reach_the_update():
  """train.b1 / b2 are adam's: one update from zero moments is g / (|g| + eps) at step 1 whatever
  the betas, so compare the second update, where b2 weighs the two squared gradients."""
  for optimizer in ("adam", "adamw"):  # adamw's decay is 0 here: the same update
    config = default.get_config().train
    config.update(optimizer=optimizer, lr=1.0, clip_norm=0.0, b1=0.0, b2=0.5)
    tx = optim.make_optimizer(config)
    params = {"w": np.zeros(1, np.float32)}
    state = tx.init(params)
    _, state = tx.update({"w": np.array([1.0], np.float32)}, state, params)
    update, _ = tx.update({"w": np.array([3.0], np.float32)}, state, params)
    # b1 = 0: m = 3; v = 0.5 * 0.5 * 1 + 0.5 * 9 = 4.75, debiased by 1 - 0.25: 6.333
    want = -3.0 / (np.sqrt(4.75 / 0.75) + 1e-8)
    assert float(update["w"][0]) == pytest.approx(want, rel=1e-6), optimizer


def test_step_schedule_is_zarembas_by_hand():
  """Zaremba et al.'s small recipe: lr 1 for epochs 0-3, then halved each epoch (epoch of
  step s = s // steps_per_epoch); the medium one divides by 1.2 after epoch 5."""
  config = default.get_config().train
  config.update(schedule="step", lr=1.0, decay_factor=0.5, decay_after=4)
  schedule = optim.learning_rate(config, steps_per_epoch=100)
  by_hand = {0: 1.0, 399: 1.0, 400: 0.5, 499: 0.5, 500: 0.25, 1299: 0.5 ** 9}
  for step, lr in by_hand.items():
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-6), step
  config.update(decay_factor=1 / 1.2, decay_after=6)
  schedule = optim.learning_rate(config, steps_per_epoch=7)
  assert float(schedule(7 * 6 - 1)) == 1.0
  assert float(schedule(7 * 38)) == pytest.approx(1.2 ** -33, rel=1e-5)  # the 39th epoch


def test_nt_trigger_is_awd_lstms_non_monotone_condition():
  """Worse than the best validation before the last n: AWD-LSTM's `val_loss >
  min(best_val_loss[:-nonmono])`, checked only once more than n validations are in."""
  history = [5.0, 4.0, 3.0, 3.1, 3.2]
  assert not optim.nt_trigger(history[:2], 4.5, 2)  # only two earlier validations
  assert optim.nt_trigger(history[:3], 5.5, 2)  # 5.5 > min([5.0])
  assert not optim.nt_trigger(history[:3], 4.5, 2)  # 4.5 < min([5.0])
  assert optim.nt_trigger(history, 3.05, 2)  # 3.05 > min([5.0, 4.0, 3.0])
  assert not optim.nt_trigger(history, 3.0, 2)  # not worse
  assert not optim.nt_trigger(history, 2.9, 2)


def test_averaged_parameters_are_the_mean_of_the_iterates_since_the_trigger(tiny_config):
  """asgd_patience > 0: nothing is averaged before start_averaging; after it, the mean
  equals the mean of the parameters after each later update (float64 NumPy), and it is what
  eval_params reports."""
  config = tiny_config(model={"dropout": 0.1, "weight_drop": 0.3},
                       train={"optimizer": "sgd", "lr": 1.0, "asgd_patience": 1})
  vocab, ids = lm.prepare_data(config)
  tx = optim.make_optimizer(config.train)
  state = train.create_train_state(config, len(vocab), tx)
  carry = model.initial_carry(config.model, config.data.batch_size)
  step = jax.jit(lambda s, b, c: train.train_step(s, b, c, config=config, tx=tx))
  batches = lm.train_batches(ids["train"], config, 0)
  for _ in range(3):
    state, carry, _ = step(state, next(batches)[1], carry)
  assert int(state.opt_state.count) == -1
  assert train.eval_params(state) is state.params
  state, iterates = state.replace(opt_state=optim.start_averaging(state.opt_state)), []
  for _ in range(4):
    state, carry, _ = step(state, next(batches)[1], carry)
    iterates.append(jax.tree.map(lambda x: np.asarray(x, np.float64), state.params))
  assert int(state.opt_state.count) == 4
  mean = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *iterates)
  for got, expected in zip(jax.tree.leaves(train.eval_params(state)), jax.tree.leaves(mean),
                           strict=True):
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  assert not np.allclose(jax.tree.leaves(state.params)[0], jax.tree.leaves(mean)[0])
