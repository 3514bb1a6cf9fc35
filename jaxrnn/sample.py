"""Text generation: warm the state up on a prefix, then sample (or beam-search) inside one
`jax.lax.scan`.

Shapes: prefix<int>[p] (one prefix shared by all samples), output<int>[n, p + length].
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxrnn import UserError, model


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """Scaled logits<float>[n, v] with tokens outside the top-k / nucleus (top-p) set to -inf."""
  logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits), order, axis=-1)
    # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
    drop_sorted = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs > top_p
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    logits = jnp.where(drop, -jnp.inf, logits)
  return logits


@functools.partial(jax.jit, static_argnames=("model_config", "length", "num_samples",
                                             "temperature", "top_k", "top_p"))
def _generate(params, prefix, rng, *, model_config, length, num_samples, temperature, top_k, top_p):
  carry = model.initial_carry(model_config, num_samples)
  tokens = jnp.broadcast_to(prefix, (num_samples, prefix.shape[0]))
  carry, _ = model.apply(params, carry, tokens[:, :-1], model_config=model_config)

  def step(state, key):
    carry, token = state
    carry, logits = model.apply(params, carry, token[:, None], model_config=model_config)
    logits = logits[:, 0]
    if temperature == 0.0:
      token = jnp.argmax(logits, axis=-1)
    else:
      token = jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p))
    return (carry, token.astype(jnp.int32)), token.astype(jnp.int32)

  _, generated = jax.lax.scan(step, (carry, tokens[:, -1]), jax.random.split(rng, length))
  return jnp.concatenate([tokens, generated.T], axis=1)


def generate(params: Any, model_config: Any, prefix: jax.Array, length: int, *, seed: int = 0,
             num_samples: int = 1, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0) -> jax.Array:
  """Samples `num_samples` continuations of prefix<int>[p] -> tokens<int>[n, p + length].

  temperature 0 is greedy decoding; top_k 0 and top_p 1 turn those filters off.
  """
  if prefix.shape[0] < 1:
    raise UserError("the prefix must hold at least one token")
  if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0 or length < 0 or num_samples < 1:
    raise UserError("need temperature >= 0, top_k >= 0, 0 < top_p <= 1, length >= 0, "
                    "num_samples >= 1")
  vocab_size = params["head"]["b"].shape[0]
  if top_k > vocab_size:
    raise UserError(f"--top_k {top_k} is more than the vocabulary ({vocab_size} tokens); use 0 "
                    f"(keep all) or at most {vocab_size}")
  return _generate(params, jnp.asarray(prefix, jnp.int32), jax.random.key(seed),
                   model_config=ml_collections.FrozenConfigDict(model_config), length=length,
                   num_samples=num_samples, temperature=float(temperature), top_k=int(top_k),
                   top_p=float(top_p))


@functools.partial(jax.jit, static_argnames=("model_config", "length", "beam"))
def _beam_search(params, prefix, *, model_config, length, beam):
  carry = model.initial_carry(model_config, 1)
  carry, _ = model.apply(params, carry, prefix[None, :-1], model_config=model_config)
  carry = jax.tree.map(lambda c: jnp.repeat(c, beam, axis=0), carry)
  # One live beam at the start (the others would repeat it): -inf never wins while a finite
  # candidate is left, so beam <= vocab ** length keeps every returned sequence finite.
  scores = jnp.full((beam,), -jnp.inf).at[0].set(0.0)
  tokens = jnp.full((beam,), prefix[-1], jnp.int32)
  history = jnp.zeros((beam, length), jnp.int32)

  def step(state, t):
    carry, tokens, scores, history = state
    carry, logits = model.apply(params, carry, tokens[:, None], model_config=model_config)
    log_probs = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32))
    vocab = log_probs.shape[-1]
    # The beam best continuations of all beam x vocab, ranked by their total log-probability.
    scores, flat = jax.lax.top_k((scores[:, None] + log_probs).reshape(-1), beam)
    parent, tokens = flat // vocab, (flat % vocab).astype(jnp.int32)
    carry = jax.tree.map(lambda c: c[parent], carry)
    return (carry, tokens, scores, history[parent].at[:, t].set(tokens)), None

  (_, _, scores, history), _ = jax.lax.scan(step, (carry, tokens, scores, history),
                                            jnp.arange(length))
  return jnp.concatenate([jnp.broadcast_to(prefix, (beam, prefix.shape[0])), history], 1), scores


def beam_search(params: Any, model_config: Any, prefix: jax.Array, length: int,
                beam: int) -> tuple[jax.Array, jax.Array]:
  """The `beam` most likely continuations of prefix<int>[p] by beam search, best first:
  (tokens<int>[beam, p + length], log_probs<float>[beam]), each log-probability (nats) that of
  the `length` generated tokens given the prefix. Beam 1 is greedy decoding; a beam of
  vocab ** (length - 1) or more is an exhaustive search."""
  if prefix.shape[0] < 1:
    raise UserError("the prefix must hold at least one token")
  if length < 0 or beam < 1:
    raise UserError(f"need --length >= 0 and --beam >= 1, got {length} and {beam}")
  vocab_size = params["head"]["b"].shape[0]
  if beam > (sequences := vocab_size ** length):  # a Python int: no overflow
    raise UserError(f"--beam {beam} is more than the {sequences} continuations of --length "
                    f"{length} over {vocab_size} tokens; use at most {sequences}")
  return _beam_search(params, jnp.asarray(prefix, jnp.int32),
                      model_config=ml_collections.FrozenConfigDict(model_config), length=length,
                      beam=beam)
