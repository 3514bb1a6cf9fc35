"""Models as pure functions: the character (or word) language model.

`init(key, config, vocab_size) -> params` and `apply(params, carry, tokens, config=...)`;
`config` is the `model` part of a jaxrnn config. Shapes: tokens<int>[b, t] batch-major.
"""

from typing import Any

import jax
import jax.numpy as jnp

from jaxrnn import UserError, cells, layers
from jaxrnn.cells import Carry, Params

Config = Any  # ml_collections.ConfigDict (the `model` section)


def _input_size(config: Config, vocab_size: int) -> int:
  return vocab_size if config.one_hot else config.embed_dim


def init(key: jax.Array, config: Config, vocab_size: int) -> dict[str, Any]:
  """LM parameters: embedding<v, e> (unless one-hot), one params dict per layer, head<h, v>."""
  if config.num_layers < 1 or config.hidden_size < 1:
    raise UserError("model.num_layers and model.hidden_size must be >= 1")
  if not config.one_hot and config.embed_dim < 1:
    raise UserError("model.embed_dim must be >= 1 (or set model.one_hot=True)")
  cell = cells.from_config(config)
  h = config.hidden_size
  k_embed, k_head_w, k_head_b, *k_layers = jax.random.split(key, 3 + config.num_layers)
  d = _input_size(config, vocab_size)
  bound = 1.0 / jnp.sqrt(h)  # torch.nn.Linear's default
  params = {
      "layers": [cell.init(k, d if i == 0 else h, h) for i, k in enumerate(k_layers)],
      "head": {"w": jax.random.uniform(k_head_w, (h, vocab_size), jnp.float32, -bound, bound),
               "b": jax.random.uniform(k_head_b, (vocab_size,), jnp.float32, -bound, bound)},
  }
  if not config.one_hot:
    params["embed"] = jax.random.normal(k_embed, (vocab_size, config.embed_dim), jnp.float32)
  return params


def initial_carry(config: Config, batch_size: int) -> list[Carry]:
  """Zero carries, one per layer, each for b = batch_size."""
  cell = cells.from_config(config)
  return [cell.initial_carry(batch_size, config.hidden_size) for _ in range(config.num_layers)]


def apply(params: dict[str, Any], carry: list[Carry], tokens: jax.Array, *, config: Config,
          train: bool = False, rng: jax.Array | None = None,
          reset: jax.Array | None = None) -> tuple[list[Carry], jax.Array]:
  """tokens<int>[b, t] -> (carry, logits<float>[b, t, v]); dropout only when `train`.

  Dropout (rate `config.dropout`) is applied to the embeddings, between layers and before the
  head, as in Zaremba et al. 2014; `rng` is one key or keys<key>[b], one per row (see
  `layers.row_keys`). reset<bool>[b, t] zeroes the carry before marked steps.
  """
  vocab_size = params["head"]["b"].shape[0]
  if config.one_hot:
    x = jax.nn.one_hot(tokens, vocab_size, dtype=jnp.float32)
  else:
    x = params["embed"][tokens]
  rng = rng if train else None
  k_in, k_stack, k_out = layers.split_rows(rng, 3, tokens.shape[0]) if rng is not None else (None,) * 3
  x = layers.dropout(x, config.dropout, k_in)
  carry, y = layers.run_stack(cells.from_config(config), params["layers"], carry, x,
                              dropout_rate=config.dropout, rng=k_stack, reset=reset,
                              unroll=config.unroll, impl=config.get("impl", "fused"))
  y = layers.dropout(y, config.dropout, k_out)
  dtype = cells.DTYPES[config.get("compute_dtype", "float32")]
  return carry, cells.matmul(y, params["head"]["w"], dtype) + params["head"]["b"]


def num_params(params: Any) -> int:
  """Total number of scalars in a params pytree."""
  return sum(x.size for x in jax.tree.leaves(params))
