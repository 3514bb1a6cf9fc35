"""Tests for jaxrnn.sample: greedy decoding by hand, seeds, top-k and top-p filters, beam search
against an exhaustive search."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from jaxrnn import UserError, cells, model, sample

V = 11


@pytest.fixture(scope="module")
def setup():
  config = default.get_config().model
  config.update(cell="gru", hidden_size=12, num_layers=2, embed_dim=6)
  params = model.init(jax.random.key(0), config, V)
  params["head"]["w"] = params["head"]["w"] * 8.0  # peaked distributions, so greedy != random
  return config, params


def greedy_by_hand(params, prefix, length):
  """Argmax decoding with cells.get('gru').step, one token and one layer at a time."""
  cell = cells.get("gru")
  carry = [jnp.zeros((1, 12)) for _ in range(2)]

  def feed(token):
    x = params["embed"][jnp.array([token])]
    for i, layer in enumerate(params["layers"]):
      carry[i], x = cell.step(layer, carry[i], x)
    return x @ params["head"]["w"] + params["head"]["b"]

  for token in prefix[:-1]:
    feed(token)
  out, token = list(prefix), prefix[-1]
  for _ in range(length):
    token = int(jnp.argmax(feed(token)[0]))
    out.append(token)
  return out


def test_greedy_equals_argmax_decoding_by_hand(setup):
  """temperature 0 gives the hand-rolled argmax sequence, prefix included."""
  config, params = setup
  prefix = [3, 1, 4, 1, 5]
  got = sample.generate(params, config, jnp.array(prefix), 20, temperature=0.0)
  assert got.tolist() == [greedy_by_hand(params, prefix, 20)]


def test_seeds_decide_the_text(setup):
  """The same seed gives the same samples; another seed gives others; samples differ per row."""
  config, params = setup
  prefix = jnp.array([2, 7])
  a = sample.generate(params, config, prefix, 40, seed=1, num_samples=3)
  b = sample.generate(params, config, prefix, 40, seed=1, num_samples=3)
  c = sample.generate(params, config, prefix, 40, seed=2, num_samples=3)
  assert np.array_equal(a, b) and not np.array_equal(a, c)
  assert not np.array_equal(a[0], a[1])
  assert a.shape == (3, 42) and np.all(a[:, :2] == np.array([2, 7]))


def test_top_k_one_is_greedy(setup):
  """top_k=1 leaves one token, so any temperature and seed decode greedily."""
  config, params = setup
  prefix = jnp.array([0, 9, 4])
  greedy = sample.generate(params, config, prefix, 25, temperature=0.0)
  top1 = sample.generate(params, config, prefix, 25, temperature=1.5, top_k=1, seed=5, num_samples=2)
  assert np.array_equal(top1, np.repeat(greedy, 2, axis=0))


def test_filters_keep_the_right_tokens():
  """top-k keeps the k largest logits; top-p keeps the smallest prefix covering p, at least one."""
  logits = jnp.log(jnp.array([[0.5, 0.05, 0.3, 0.15]]))
  kept = lambda f: np.isfinite(np.asarray(f))[0].tolist()
  assert kept(sample.filter_logits(logits, 1.0, 2, 1.0)) == [True, False, True, False]
  assert kept(sample.filter_logits(logits, 1.0, 0, 0.75)) == [True, False, True, False]
  assert kept(sample.filter_logits(logits, 1.0, 0, 0.81)) == [True, False, True, True]
  assert kept(sample.filter_logits(logits, 1.0, 0, 0.1)) == [True, False, False, False]


def test_bad_arguments_are_user_errors(setup):
  """An empty prefix or a negative temperature is refused with a clear message."""
  config, params = setup
  with pytest.raises(UserError, match="at least one token"):
    sample.generate(params, config, jnp.array([], jnp.int32), 5)
  with pytest.raises(UserError, match="temperature >= 0"):
    sample.generate(params, config, jnp.array([1]), 5, temperature=-1.0)


def exhaustive(params, config, prefix, length):
  """(continuations<int>[V ** length, length], their log-probabilities given the prefix), from
  one batched forward pass over every continuation."""
  continuations = np.array(list(itertools.product(range(V), repeat=length)), np.int32)
  tokens = np.concatenate([np.broadcast_to(prefix, (len(continuations), len(prefix))),
                           continuations], axis=1)
  _, logits = model.apply(params, model.initial_carry(config, len(tokens)), jnp.asarray(tokens[:, :-1]),
                          model_config=config)
  log_probs = np.asarray(jax.nn.log_softmax(logits[:, len(prefix) - 1:]), np.float64)
  return continuations, np.take_along_axis(log_probs, continuations[..., None], -1)[..., 0].sum(1)


def test_a_full_beam_finds_the_exhaustive_search_ranking(setup):
  """A beam of V ** (length - 1) keeps every prefix until the last step, so its best sequences
  and log-probabilities are the exhaustive search's top ones, in order."""
  config, params = setup
  prefix, length = np.array([3, 1, 4]), 3
  continuations, log_probs = exhaustive(params, config, prefix, length)
  order = np.argsort(-log_probs)[:V ** (length - 1)]
  tokens, scores = sample.beam_search(params, config, jnp.asarray(prefix), length, V ** (length - 1))
  np.testing.assert_array_equal(np.asarray(tokens)[:, 3:], continuations[order])
  np.testing.assert_array_equal(np.asarray(tokens)[:, :3], np.broadcast_to(prefix, (len(order), 3)))
  np.testing.assert_allclose(scores, log_probs[order], rtol=1e-5)


def test_a_narrow_beam_reports_the_true_log_probabilities(setup):
  """Whatever the width, each returned sequence's log-probability is its exhaustive one, best
  first, and sequences are distinct."""
  config, params = setup
  prefix, length = np.array([2, 7]), 3
  continuations, log_probs = exhaustive(params, config, prefix, length)
  index = {tuple(c): i for i, c in enumerate(continuations.tolist())}
  tokens, scores = sample.beam_search(params, config, jnp.asarray(prefix), length, 4)
  found = [index[tuple(row)] for row in np.asarray(tokens)[:, 2:].tolist()]
  assert len(set(found)) == 4 and list(scores) == sorted(scores, reverse=True)
  np.testing.assert_allclose(scores, log_probs[found], rtol=1e-5)


def test_beam_one_is_greedy_decoding(setup):
  """beam 1 follows the argmax at every step: temperature 0's sequence."""
  config, params = setup
  prefix = jnp.array([5, 0, 8])
  tokens, _ = sample.beam_search(params, config, prefix, 30, 1)
  np.testing.assert_array_equal(tokens, sample.generate(params, config, prefix, 30, temperature=0.0))


def test_bad_beams_are_user_errors(setup):
  """A beam below 1, or wider than the continuations there are, is refused with the limit."""
  config, params = setup
  with pytest.raises(UserError, match="--beam >= 1"):
    sample.beam_search(params, config, jnp.array([1]), 5, 0)
  with pytest.raises(UserError, match=f"more than the {V * V} continuations.*at most {V * V}"):
    sample.beam_search(params, config, jnp.array([1]), 2, V * V + 1)


# Slow: four script runs; test_kernels.py checks every kernel at t = 0 in the default suite.
@pytest.mark.slow
def test_a_one_character_prefix_samples_the_same_text_with_a_kernel(tiny_flags, script, tmp_path):
  """sample.py on a run trained in the core (model.impl=core, kept for sampling): the default
  one-character prefix warms up on zero steps, which once left the kernel's final state
  unwritten (garbage, different each run); two runs with a seed, and two beam searches, agree."""
  from jaxrnn import kernels
  if kernels.unavailable("core"):
    pytest.skip(f"jaxrnn's core cannot run: {kernels.unavailable('core')}")
  workdir = tmp_path / "run"
  trained = script("train.py", *tiny_flags(workdir, model={"impl": "core", "cell": "gru"}))
  assert trained.returncode == 0, trained.stderr
  texts = [script("sample.py", f"--workdir={workdir}", "--seed=0", "--length=30") for _ in "ab"]
  beams = [script("sample.py", f"--workdir={workdir}", "--beam=3", "--prefix=t", "--length=8")
           for _ in "ab"]
  assert all(p.returncode == 0 for p in texts + beams)
  assert texts[0].stdout == texts[1].stdout and beams[0].stdout == beams[1].stdout
  log_probs = [p.stderr.split("best first: ")[1] for p in beams]
  assert log_probs[0] == log_probs[1]
