"""Hawk and Griffin (jaxrnn/blocks/griffin.py) against Google DeepMind's recurrentgemma 1.0.1,
the authors' own JAX code, run unchanged (tests/authors.py): the whole language model (blocks in
the authors' pattern, final norm, tied embedding, logits soft-cap) on the same weights, outputs
and gradients over a sequence cut in two with the state carried, then one more token from the
carried state; and the initialisation, tensor by tensor, against the authors' init code.

float32 at 1e-5: recurrentgemma's RG-LRU scan accumulates in float32 and its attention's softmax
runs in float32 whatever the parameters' dtype (tests/authors.py), so float64 would test float32
rounding, not the equations.
"""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import authors
from configs import default
from jaxrnn import blocks, model

B, T, SPLIT, VOCAB = 2, 11, 4, 11  # a sequence of T tokens, run as [0, SPLIT) then [SPLIT, T)
WINDOW = 4  # SPLIT and T - SPLIT both reach past it: the carried window rolls over


def _model_config(block: str, width: int = 32, num_layers: int = 4, lru_width: int = 48,
                  **fields) -> ml_collections.ConfigDict:
  config = default.get_config().model
  config.update(block=block, cell="rglru", hidden_size=width, embed_dim=width,
                tie_embedding=True, num_layers=num_layers, num_heads=4, lru_width=lru_width,
                mlp_expansion=3, logits_soft_cap=30.0, **{"impl": "scan", **fields})
  if block == "griffin":
    config.attention_window = WINDOW
  return config


def _authors_model(rg, model_config: ml_collections.ConfigDict):
  """recurrentgemma's Griffin LM with the same sizes (block_types in the authors' pattern for
  griffin, all recurrent for hawk; the Griffin paper's embeddings_scale_by_sqrt_dim=False)."""
  kinds = rg.common.TemporalBlockType
  pattern = (itertools.cycle([kinds.RECURRENT, kinds.RECURRENT, kinds.ATTENTION])
             if model_config.block == "griffin" else itertools.repeat(kinds.RECURRENT))
  config = rg.common.GriffinConfig(
      vocab_size=VOCAB, width=model_config.hidden_size,
      mlp_expanded_width=model_config.mlp_expansion * model_config.hidden_size,
      num_heads=model_config.num_heads, lru_width=model_config.lru_width or None,
      block_types=tuple(itertools.islice(pattern, model_config.num_layers)),
      embeddings_scale_by_sqrt_dim=False,
      attention_window_size=model_config.get("attention_window", WINDOW),
      logits_soft_cap=model_config.logits_soft_cap)
  return rg.package.jax.griffin.Griffin(config)


def _from_authors(p: dict, model_config: ml_collections.ConfigDict) -> dict:
  """jaxrnn's LM params from the authors' Flax tree (`params`), name by name."""
  dense = lambda q: {"w": q["kernel"], **({"b": q["bias"]} if "bias" in q else {})}
  gate = lambda q: {"w": q["w"], "b": q["b"].reshape(-1)}
  layers = []
  for i in range(model_config.num_layers):
    block = p[f"blocks.{i}"]
    up = block["mlp_block"]["ffw_up"]
    layer = {"temporal_pre_norm": block["temporal_pre_norm"]["scale"],
             "channel_pre_norm": block["channel_pre_norm"]["scale"],
             "mlp": {"up": {"w": up["w"], "b": up["b"].reshape(2, -1)},
                     "down": dense(block["mlp_block"]["ffw_down"])}}
    if "attention_block" in block:
      layer.update({name: dense(q) for name, q in block["attention_block"].items()})
    else:
      rb = block["recurrent_block"]
      layer.update({"linear_y": dense(rb["linear_y"]), "linear_x": dense(rb["linear_x"]),
                    "conv": {"w": rb["conv_1d"]["w"], "b": rb["conv_1d"]["b"]},
                    "input_gate": gate(rb["rg_lru"]["input_gate"]),
                    "a_gate": gate(rb["rg_lru"]["a_gate"]), "a_param": rb["rg_lru"]["a_param"],
                    "linear_out": dense(rb["linear_out"])})
    layers.append(layer)
  embedding = p["embedder"]["input_embedding"]
  return {"embed": embedding, "head": {"b": jnp.zeros((embedding.shape[0],))},
          "layers": layers, "norm": p["final_norm"]["scale"]}


def _positions(t: int) -> jax.Array:
  """The authors' segment_pos for t tokens, from 1: at 0, a document's start, their RG-LRU drops
  the state and skips its input's normalisation sqrt(1 - a^2); jaxrnn carries one stream and
  never resets (docs/blocks.md), so both run the same recurrence on a stream under way."""
  return jnp.broadcast_to(jnp.arange(1, t + 1), (B, t))


def _authors_decode(net, params, tokens):
  """The authors' logits for the prompt tokens[:, :SPLIT], then one token at a time from its
  cache (their recurrent block's cache takes single tokens: it is built for sampling; their
  prompt cache stays consistent at an offset position since the prompt fills the window)."""
  positions = _positions(tokens.shape[1])
  logits, cache = [], None
  apply = jax.jit(net.apply)  # compiled: their type checks then run once per shape, not per call
  for chunk in [slice(0, SPLIT)] + [slice(t, t + 1) for t in range(SPLIT, tokens.shape[1])]:
    out, cache = apply(params, tokens[:, chunk], positions[:, chunk], cache)
    logits.append(out)
  return jnp.concatenate(logits, axis=1)


def _jaxrnn_run(params, tokens, model_config):
  """jaxrnn's logits for tokens[:, :SPLIT], then the rest, from the carried state."""
  carry = model.initial_carry(model_config, tokens.shape[0])
  carry, first = model.apply(params, carry, tokens[:, :SPLIT], model_config=model_config)
  return jnp.concatenate(
      [first, model.apply(params, carry, tokens[:, SPLIT:], model_config=model_config)[1]], 1)


def _close(got, want, atol=1e-5):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=atol)


@pytest.mark.parametrize("block, impl", [("hawk", "fused"), ("griffin", "scan")])
def test_the_language_model_equals_recurrentgemmas(block, impl):
  """Hawk (1 recurrent layer) and Griffin (recurrent, recurrent, attention; window 4), width
  32, 4 heads, RG-LRU width 48, MLP 3x, soft-cap 30, tied embedding, on the authors' own random
  init, jaxrnn's run in two calls (4 and 7 tokens) with the state carried between them (the
  attention's window included), Hawk's under the RG-LRU's parallel form (fused), Griffin's
  under the sequential scan, within 1e-5 of the authors' in float32:
  - the logits against the authors' run of the prompt then token by token (their cache);
  - the gradient of sum(w * logits) with respect to every parameter against the authors' run
    of the 11 tokens at once (the path they train with)."""
  rg = authors.recurrentgemma()
  model_config = _model_config(block, impl=impl, num_layers=3 if block == "griffin" else 1)
  net = _authors_model(rg, model_config)
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, VOCAB)
  theirs = net.init(jax.random.key(0), tokens[:, :SPLIT], _positions(SPLIT))
  ours = _from_authors(theirs["params"], model_config)
  w = jax.random.normal(jax.random.key(2), (B, T, VOCAB))
  want = jax.jit(jax.grad(lambda p: jnp.sum(w * net.apply(p, tokens, _positions(T))[0])))(theirs)

  def loss(params):  # (sum(w * logits), logits)
    logits = _jaxrnn_run(params, tokens, model_config)
    return jnp.sum(w * logits), logits

  got, logits = jax.jit(jax.grad(loss, has_aux=True))(ours)
  _close(logits, _authors_decode(net, theirs, tokens))
  want = _from_authors(want["params"], model_config)
  del want["head"], got["head"]  # jaxrnn's head bias, which the authors' LM lacks
  largest = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                          strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * largest,
                               err_msg=jax.tree_util.keystr(path))


def test_the_initialisation_is_recurrentgemmas():
  """jaxrnn's init of a 3-layer Griffin (width 256, RG-LRU 384, 4 heads) against the authors'
  init code at the same shapes, tensor by tensor: constants (norm scales, biases) equal; the
  rest by mean, std (within 5 standard errors) and range (within 30%: a truncated normal's
  would be half a normal's), RG-LRU's a_param (uniform in area on the ring 0.9 <= a <= 0.999)
  included; the embedding at model.embed_scale = 1 / sqrt(width), the authors' std."""
  rg = authors.recurrentgemma()
  width = 256
  model_config = _model_config("griffin", width=width, num_layers=3, lru_width=384,
                               embed_scale=width ** -0.5)
  net = _authors_model(rg, model_config)
  tokens = jnp.zeros((1, 2), jnp.int32)
  theirs = jax.jit(net.init)(jax.random.key(0), tokens, jnp.arange(2)[None])["params"]
  theirs = _from_authors(theirs, model_config)
  ours = jax.jit(lambda k: model.init(k, model_config, VOCAB))(jax.random.key(1))
  del ours["head"], theirs["head"]  # jaxrnn's head bias (uniform, as torch's), which theirs lacks
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(theirs),
                          strict=True):
    name, a, b = jax.tree_util.keystr(path), np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, name
    if np.ptp(b) == 0:
      np.testing.assert_array_equal(a, b, err_msg=name)
      continue
    # Two samples of n draws: their means differ by ~ std * sqrt(2 / n), their stds by a
    # fraction ~ 1 / sqrt(n); 5 of those is chance once in millions, a wrong scale (a factor of
    # sqrt(2) or more) fails at every size here.
    n, scale = a.size, b.std()
    assert abs(a.mean() - b.mean()) < 5 * scale * np.sqrt(2 / n), (name, a.mean(), b.mean())
    assert abs(a.std() / scale - 1) < 5 / np.sqrt(n), (name, a.std(), scale)
    assert abs(np.ptp(a) / np.ptp(b) - 1) < 0.3, (name, np.ptp(a), np.ptp(b))


def test_the_final_norm_is_the_authors_rmsnorm():
  """The block's final norm (`norm`) is recurrentgemma's RMSNorm, epsilon 1e-6 included: on
  inputs of mean square 1e-6 the epsilon halves the output, so another one fails."""
  rg = authors.recurrentgemma()
  x = 1e-3 * jax.random.normal(jax.random.key(0), (2, 3, 16))
  scale = jax.random.normal(jax.random.key(1), (16,))
  norm = rg.layers.RMSNorm(width=16)
  want = norm.apply({"params": {"scale": scale}}, x)
  _close(blocks.griffin.GRIFFIN.norm(x, scale), want)
