"""Tests for jaxrnn.model: shapes, input paths, dropout switching, step-by-step decoding, and the
sentence classifier (masking, pooling, Keras' parameter counts)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from jaxrnn import UserError, kernels, model

CELLS = ["rnn", "gru", "lstm"]
B, T, V, H = 3, 8, 11, 12


def _config(cell="lstm", **overrides):
  """configs/default.py's model section: two layers of H, embedding 6, the LSTM's forget bias 1."""
  config = default.get_config().model
  config.update(cell=cell, hidden_size=H, num_layers=2, embed_dim=6)
  if cell == "lstm":
    config.forget_bias = 1.0
  config.update(overrides)
  return config


def _jit_apply(config):
  return jax.jit(functools.partial(model.apply, model_config=config), static_argnames="train")


def _rngs(seed):
  """A training step's keys: per-row keys split from one key, and a shared key."""
  key = jax.random.key(seed)
  return model.Rngs(rows=key, shared=jax.random.fold_in(key, 1))


def _tokens(seed=0, b=B, t=T):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, size=(b, t)), jnp.int32)


@pytest.mark.parametrize("name", CELLS)
def test_apply_shapes(name):
  """apply maps tokens<b, t> to logits<b, t, v> float32 and carries shaped like initial_carry."""
  config = _config(name)
  params = model.init(jax.random.key(0), config, V)
  carry0 = model.initial_carry(config, B)
  assert len(carry0) == config.num_layers
  carry, logits = model.apply(params, carry0, _tokens(), model_config=config)
  assert logits.shape == (B, T, V)
  assert logits.dtype == jnp.float32
  assert jax.tree.structure(carry) == jax.tree.structure(carry0)
  for got, zero in zip(jax.tree.leaves(carry), jax.tree.leaves(carry0)):
    assert got.shape == zero.shape == (B, H)
  assert np.isfinite(np.asarray(logits)).all()


def test_one_hot_equals_identity_embedding():
  """one_hot=True gives the same logits as an embedding path whose table is the identity."""
  one_hot_config = _config(one_hot=True)
  embed_config = _config(one_hot=False, embed_dim=V)
  params = model.init(jax.random.key(1), one_hot_config, V)
  assert "embed" not in params
  embed_params = {**params, "embed": jnp.eye(V, dtype=jnp.float32)}
  tokens = _tokens(1)
  carry0 = model.initial_carry(one_hot_config, B)
  expected_carry, expected = model.apply(params, carry0, tokens, model_config=one_hot_config)
  got_carry, got = model.apply(embed_params, carry0, tokens, model_config=embed_config)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               got_carry, expected_carry)


def test_eval_ignores_rng():
  """With train=False, passing an rng does not change the logits even with dropout > 0."""
  config = _config(dropout=0.5)
  params = model.init(jax.random.key(2), config, V)
  carry0 = model.initial_carry(config, B)
  tokens = _tokens(2)
  _, without_rng = model.apply(params, carry0, tokens, model_config=config)
  _, with_rng = model.apply(params, carry0, tokens, model_config=config, rng=_rngs(3))
  np.testing.assert_array_equal(with_rng, without_rng)


def test_train_dropout_changes_logits_per_rng():
  """With train=True and dropout > 0, logits differ from eval and between rngs, same for same rng."""
  config = _config(dropout=0.5)
  params = model.init(jax.random.key(4), config, V)
  carry0 = model.initial_carry(config, B)
  tokens = _tokens(4)

  apply = _jit_apply(config)

  def logits(**kwargs):
    return np.asarray(apply(params, carry0, tokens, **kwargs)[1])

  eval_logits = logits()
  first = logits(train=True, rng=_rngs(5))
  second = logits(train=True, rng=_rngs(6))
  assert not np.allclose(first, eval_logits, atol=1e-4)
  assert not np.allclose(first, second, atol=1e-4)
  np.testing.assert_array_equal(logits(train=True, rng=_rngs(5)), first)


@pytest.mark.parametrize("name", CELLS + ["mingru", "minlstm"])
def test_full_sequence_equals_token_by_token(name):
  """One apply over t tokens equals t applies of one token each, threading the carry (for
  mingru / minlstm: the parallel scan equals the sequential sampling mode)."""
  config = _config(name, unroll=3)
  params = model.init(jax.random.key(7), config, V)
  tokens = _tokens(7)
  carry0 = model.initial_carry(config, B)
  apply = _jit_apply(config)
  expected_carry, expected = apply(params, carry0, tokens)
  carry, step_logits = carry0, []
  for t in range(T):
    carry, logits = apply(params, carry, tokens[:, t:t + 1])
    step_logits.append(logits)
  np.testing.assert_allclose(jnp.concatenate(step_logits, axis=1), expected,
                             rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               carry, expected_carry)


def test_unknown_cell_in_config_lists_cells():
  """A config naming an unknown cell raises UserError listing the valid cells."""
  config = _config("nope")
  for build in (lambda: model.init(jax.random.key(0), config, V),
                lambda: model.initial_carry(config, B)):
    with pytest.raises(UserError) as info:
      build()
    for name in CELLS:
      assert name in str(info.value)


def _sentences(seed=0, b=B, t=T):
  """tokens<b, t> padded with 0 after lengths<b> (including a full-length and a one-word row)."""
  rng = np.random.default_rng(seed)
  lengths = np.array([t, 1] + list(rng.integers(1, t + 1, b - 2)))[:b]
  tokens = rng.integers(1, V, size=(b, t))
  tokens[np.arange(t)[None, :] >= lengths[:, None]] = 0
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32)


def test_classifier_shapes():
  """logits<b, c>; a bidirectional layer is a {fwd, bwd} pair, the next one and the head read 2h."""
  config = _config(bidirectional=True, num_classes=3)
  params = model.init_classifier(jax.random.key(0), config, V)
  assert set(params["layers"][1]) == {"fwd", "bwd"}
  assert params["layers"][1]["fwd"]["w_ih"].shape[0] == 2 * H
  assert params["head"]["w"].shape == (2 * H, 3)
  tokens, lengths = _sentences()
  logits = model.apply_classifier(params, tokens, lengths, model_config=config)
  assert logits.shape == (B, 3) and logits.dtype == jnp.float32


@pytest.mark.parametrize("cell, bidirectional, pooling", [
    ("lstm", True, "last"), ("gru", False, "mean"), ("mingru", True, "mean"),
])
def test_appending_padding_does_not_change_logits(cell, bidirectional, pooling):
  """The same sentences padded to t and to t + 5 (with any token ids) give the same logits."""
  config = _config(cell, bidirectional=bidirectional, pooling=pooling)
  params = model.init_classifier(jax.random.key(1), config, V)
  tokens, lengths = _sentences(1)
  longer = jnp.concatenate([tokens, jnp.asarray(np.random.default_rng(2).integers(0, V, (B, 5)),
                                                jnp.int32)], axis=1)
  apply = jax.jit(functools.partial(model.apply_classifier, model_config=config))
  np.testing.assert_allclose(apply(params, longer, lengths), apply(params, tokens, lengths),
                             rtol=1e-5, atol=1e-6)


def test_pooling_reads_each_direction_where_it_ends():
  """'last' = (forward output at step length - 1, backward output at step 0, where each
  direction ends); 'mean' averages the valid steps of both."""
  config = _config(bidirectional=True, num_layers=1)
  params = model.init_classifier(jax.random.key(3), config, V)
  params["head"] = {"w": jnp.eye(2 * H, dtype=jnp.float32), "b": jnp.zeros(2 * H)}  # features out
  tokens, lengths = _sentences(3)
  last = model.apply_classifier(params, tokens, lengths, model_config=config)
  config.pooling = "mean"
  mean = model.apply_classifier(params, tokens, lengths, model_config=config)
  cell = model.cells.get("lstm")
  zeros = cell.initial_carry(B, H)
  _, ys = model.layers.run_bidirectional(cell, params["layers"][0], (zeros, zeros),
                                         params["embed"][tokens], lengths=lengths)
  for b, n in enumerate(np.asarray(lengths)):
    np.testing.assert_allclose(last[b], np.concatenate([ys[b, n - 1, :H], ys[b, 0, H:]]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean[b], ys[b, :n].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_keras_simple_rnn_parameter_counts():
  """The background texts' sentiment model (vocab 10000, embed 32, SimpleRNN 32, one sigmoid
  unit) has Keras' counts: embedding 320,000, SimpleRNN 2,080 = h (h + x) + h, dense 33."""
  config = _config("rnn", hidden_size=32, embed_dim=32, num_layers=1, num_classes=1)
  params = model.init_classifier(jax.random.key(0), config, 10000)
  assert model.num_params(params["embed"]) == 320_000
  assert model.num_params(params["layers"][0]) == 2_080 == 32 * (32 + 32) + 32
  assert model.num_params(params["head"]) == 33
  assert model.num_params(params) == 322_113


def test_embed_scale_scales_only_the_embedding():
  """embed_scale multiplies the N(0, 1) embedding draw; every other parameter stays the same."""
  base = model.init_classifier(jax.random.key(4), _config(), V)
  scaled = model.init_classifier(jax.random.key(4), _config(embed_scale=0.1), V)
  np.testing.assert_allclose(scaled["embed"], 0.1 * base["embed"], rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, scaled["layers"], base["layers"])
  np.testing.assert_array_equal(scaled["head"]["w"], base["head"]["w"])


def test_embedding_dropout_zeroes_whole_words_and_rescales_the_rest():
  """Every occurrence of a dropped word embeds to zeros; kept words to their row / (1 - p)."""
  config, rate = _config(embed_dropout=0.5), 0.5
  params = model.init(jax.random.key(0), config, V)
  tokens = jnp.tile(jnp.arange(V), (4, 3))  # every word, 12 times
  x = np.asarray(model.embed(params, tokens, config, V, jax.random.key(1)))
  embed = np.asarray(params["embed"])
  dropped = set()
  for (row, col), word in np.ndenumerate(np.asarray(tokens)):
    if not x[row, col].any():
      dropped.add(int(word))
    else:
      np.testing.assert_allclose(x[row, col], embed[word] / (1.0 - rate), rtol=1e-6)
  assert 0 < len(dropped) < V
  for word in dropped:  # all of its occurrences, not just some
    assert not x[np.asarray(tokens) == word].any()
  np.testing.assert_array_equal(model.embed(params, tokens, config, V, None), embed[tokens])


def test_tied_head_is_the_embedding_with_gradients_from_both_uses():
  """With tie_embedding the head has no weight of its own: logits read embed^T, and the
  embedding's gradient is the untied model's embedding gradient plus its head gradient^T."""
  config = _config(tie_embedding=True, hidden_size=H, embed_dim=H)
  params = model.init(jax.random.key(0), config, V)
  assert set(params["head"]) == {"b"}
  untied = {**params, "head": {**params["head"], "w": params["embed"].T}}
  tokens, targets = _tokens(1), _tokens(2)
  carry0 = model.initial_carry(config, B)

  def loss(p, cfg):
    logits = model.apply(p, carry0, tokens, model_config=cfg)[1]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).mean()

  untied_config = _config(hidden_size=H, embed_dim=H)
  np.testing.assert_allclose(loss(params, config), loss(untied, untied_config), rtol=1e-6)
  g_tied = jax.grad(loss)(params, config)
  g_untied = jax.grad(loss)(untied, untied_config)
  np.testing.assert_allclose(g_tied["embed"], g_untied["embed"] + g_untied["head"]["w"].T,
                             rtol=1e-5, atol=1e-7)
  assert model.num_params(params) == model.num_params(untied) - H * V


def test_tying_makes_the_last_layer_as_wide_as_the_embedding():
  """AWD-LSTM's shape: hidden_size 20 for the first layers, embed_dim 6 for the last."""
  config = _config(tie_embedding=True, num_layers=3, hidden_size=20, embed_dim=6)
  assert model.layer_sizes(config) == [20, 20, 6]
  params = model.init(jax.random.key(0), config, V)
  carry, logits = model.apply(params, model.initial_carry(config, B), _tokens(), model_config=config)
  assert [c[0].shape for c in carry] == [(B, 20), (B, 20), (B, 6)]
  assert logits.shape == (B, T, V)


def test_uniform_init_draws_every_parameter_from_its_range():
  """init_scale s: every parameter in [-s, s] and spread over it (its std about s / sqrt(3))."""
  config = _config(init_scale=0.05)
  params = model.init(jax.random.key(0), config, V)
  for leaf in jax.tree.leaves(params):
    assert np.abs(leaf).max() <= 0.05
  values = np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])
  assert abs(values.std() - 0.05 / np.sqrt(3)) < 0.002


def _old_apply(params, carry, tokens, config, rng):
  """jaxrnn's LM before the regularizers (af64bc1): embedding, dropout, stack, dropout, head."""
  from jaxrnn import cells, layers
  cell = cells.from_config(config)
  k_in, k_stack, k_out = layers.split_rows(rng, 3, tokens.shape[0])
  x = layers.dropout(params["embed"][tokens], config.dropout, k_in)
  carry, y = layers.run_stack(cell, params["layers"], carry, x, dropout_rate=config.dropout,
                              rng=k_stack, impl=config.impl)
  y = layers.dropout(y, config.dropout, k_out)
  return carry, cells.matmul(y, params["head"]["w"]) + params["head"]["b"]


@pytest.mark.parametrize("name", CELLS)
def test_with_the_new_fields_off_training_logits_are_the_old_ones_bit_for_bit(name):
  """Every new regularizer at its default: the same logits and carries as before, to the bit."""
  config = _config(name, dropout=0.3)
  params = model.init(jax.random.key(0), config, V)
  carry0, tokens, rngs = model.initial_carry(config, B), _tokens(5), _rngs(6)
  got = jax.jit(lambda p: model.apply(p, carry0, tokens, model_config=config, train=True,
                                      rng=rngs))(params)
  expected = jax.jit(lambda p: _old_apply(p, carry0, tokens, config, rngs.rows))(params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(a, b)


def test_the_embedding_is_folded_into_the_first_layer_where_that_saves_work():
  """Characters into a wide embedding and a kernel cell's stack fold; words, single sampled
  steps, one-hot inputs, dropout on the embedded positions, other blocks and cells do not; a
  narrow embedding folds where the core trains the layer (its tokens gather rows), not where
  a one-hot product would replace it."""
  chars = _config("lstm", embed_dim=256)
  assert model.folds_embedding(chars, 65, (32, 64), input_dropout=False)
  assert not model.folds_embedding(chars, 10_000, (32, 64), input_dropout=False)
  assert not model.folds_embedding(chars, 65, (4, 1), input_dropout=False)
  assert not model.folds_embedding(chars, 65, (32, 64), input_dropout=True)
  for cell, other in (("lstm", dict(one_hot=True)), ("lstm", dict(block="residual")),
                      ("mingru", {})):
    assert not model.folds_embedding(_config(cell, embed_dim=256, **other), 65, (32, 64), False)
  narrow = lambda impl: model.folds_embedding(
      _config("lstm", embed_dim=64, hidden_size=256, impl=impl), 65, (32, 64), False)
  assert not narrow("scan")
  if not kernels.unavailable("core"):
    assert narrow("core") and narrow("auto")


def _kernel(impl: str) -> list:
  return [pytest.mark.skipif(bool(kernels.unavailable(impl)),
                             reason=f"jaxrnn's {impl} kernel is not built here")]


@pytest.mark.parametrize("name, impl", [(name, impl) for name in CELLS for impl in ("scan", "auto")]
                         + [pytest.param(name, "core", marks=_kernel("core")) for name in CELLS]
                         + [pytest.param(name, "onednn", marks=_kernel("onednn"))
                            for name in kernels.FAMILIES["onednn"]])
def test_the_folded_embedding_gives_the_embedded_tokens_values_and_gradients(name, impl,
                                                                             monkeypatch):
  """Tokens into E W_ih in the first layer (gathered in the core, one-hot elsewhere) against
  E[tokens] W_ih, in training with
  embedding dropout (its masked rows fold too) and dropout between layers: logits, carries
  and every parameter's gradient (the embedding's and W_ih's included) to 1e-5."""
  config = _config(name, embed_dim=32, embed_dropout=0.3, dropout_in=0.0, dropout_hidden=0.2,
                   impl=impl, hidden_size=16)
  params = model.init(jax.random.key(0), config, V)
  carry = jax.tree.map(lambda c: c + 0.1, model.initial_carry(config, B))
  tokens, rngs = _tokens(3), _rngs(4)
  assert model.folds_embedding(config, V, tokens.shape, input_dropout=False)

  def run(p):
    new, logits = model.apply(p, carry, tokens, model_config=config, train=True, rng=rngs)
    return (logits ** 2).sum() + sum((c ** 2).sum() for c in jax.tree.leaves(new)), (new, logits)

  folded = jax.jit(jax.value_and_grad(run, has_aux=True))(params)
  monkeypatch.setattr(model, "folds_embedding", lambda *args, **kwargs: False)
  embedded = jax.jit(jax.value_and_grad(run, has_aux=True))(params)
  for a, b in zip(jax.tree.leaves(folded), jax.tree.leaves(embedded), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, float(np.abs(b).max())))
  assert float(np.abs(embedded[1]["embed"]).max()) > 0  # the embedding does get gradients


@pytest.mark.parametrize("impl", ["auto", "fused", "scan", "core", "onednn"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_float64_parameters_run_in_xla_or_are_refused(cell, impl):
  """Under jax_enable_x64 with float64 parameters and carries, a 64-wide layer (where `auto`
  picks a float32 kernel on a CPU): auto, fused and scan give the float64 scan's logits, which
  are float32's to float32 precision; a kernel named is refused in one line, never fed float64
  buffers (it read them as float32: logits off by 3.4, or NaN)."""
  if impl in kernels.LAYERS and (why := kernels.unavailable(impl)):
    pytest.skip(why)  # refused as not built instead (test_kernels.py)
  config = _config(cell, hidden_size=64, impl="scan")
  params32 = model.init(jax.random.key(0), config, V)
  carry32 = model.initial_carry(config, B)
  want32 = model.apply(params32, carry32, _tokens(), model_config=config)[1]
  with jax.enable_x64(True):
    to64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)
    params, carry = to64(params32), to64(carry32)
    want = model.apply(params, carry, _tokens(), model_config=config)[1]
    config.impl = impl
    if impl in kernels.LAYERS:
      with pytest.raises(UserError, match=f"^model.impl={impl} takes float32 parameters, "
                         "carries and inputs, not float64: cast them to float32, or use "
                         "model.impl=auto, fused or scan$"):
        model.apply(params, carry, _tokens(), model_config=config)
      return
    got = _jit_apply(config)(params, carry, _tokens())[1]
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(want, want32, atol=1e-5)


@pytest.mark.parametrize("impl", ["auto", "fused", "scan", "core", "onednn"])
def test_ids_outside_the_vocabulary_follow_one_rule_on_every_path(impl):
  """Under jit an id below 0 or at v and above reads as the nearest id of the vocabulary on
  every path (the folded embedding's gathered rows and one-hot inputs, the embedding's gather,
  each kernel); outside jit model.apply refuses it in one line."""
  if impl in kernels.LAYERS and kernels.unavailable(impl):
    pytest.skip(f"{impl} cannot run here: {kernels.unavailable(impl)}")
  config = _config("lstm", hidden_size=64, impl=impl)  # 64 wide: auto folds into a kernel
  params = model.init(jax.random.key(0), config, V)
  carry = model.initial_carry(config, B)
  tokens = _tokens()
  wild = tokens.at[0, :3].set(jnp.array([-1, V, V + 40])).at[1, 0].set(-7)
  clipped = jnp.clip(wild, 0, V - 1)
  got = _jit_apply(config)(params, carry, wild)[1]
  np.testing.assert_allclose(got, _jit_apply(config)(params, carry, clipped)[1], atol=1e-6)
  with pytest.raises(UserError, match=rf"^token ids must lie in \[0, {V}\), the vocabulary's, "
                     rf"got ids from -7 to {V + 40}: encode text"):
    model.apply(params, carry, wild, model_config=config)
