"""Text generation: warm the state up on a prefix, then sample inside one `jax.lax.scan`.

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
