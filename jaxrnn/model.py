"""Models as pure functions: the character (or word) language model and the sentence classifier.

LM: `init(key, model_config, vocab_size) -> params` and
`apply(params, carry, tokens, model_config=...)`. Classifier: `init_classifier(key, model_config,
vocab_size)` and `apply_classifier(params, tokens, lengths, model_config=...)`. `model_config` is
the `model` section of a jaxrnn config, checked by `config.validate`. Shapes: tokens<int>[b, t]
batch-major; c is the number of classifier outputs.
"""

from typing import Any

import jax
import jax.numpy as jnp

from jaxrnn import cells, layers
from jaxrnn.cells import Carry

Config = Any  # ml_collections.ConfigDict (the `model` section)


def _init(key: jax.Array, model_config: Config, input_size: int, head_size: int,
          directions: int) -> dict[str, Any]:
  """layers, head<h', head_size>, and embedding<v, e> unless `model_config.one_hot`.

  One params dict per layer, or a {'fwd', 'bwd'} pair of them for two directions; h' is h
  per direction. The embedding is N(0, embed_scale^2); the head U(-1/sqrt(h'), 1/sqrt(h')) as
  torch.nn.Linear.
  """
  cell = cells.from_config(model_config)
  h, n = model_config.hidden_size, directions
  k_embed, k_head_w, k_head_b, *k_layers = jax.random.split(key, 3 + model_config.num_layers)

  def layer(k, d):
    if n == 1:
      return cell.init(k, d, h)
    k_f, k_b = jax.random.split(k)
    return {"fwd": cell.init(k_f, d, h), "bwd": cell.init(k_b, d, h)}

  d = input_size if model_config.one_hot else model_config.embed_dim
  bound = 1.0 / jnp.sqrt(n * h)
  params = {
      "layers": [layer(k, d if i == 0 else n * h) for i, k in enumerate(k_layers)],
      "head": {"w": jax.random.uniform(k_head_w, (n * h, head_size), jnp.float32, -bound, bound),
               "b": jax.random.uniform(k_head_b, (head_size,), jnp.float32, -bound, bound)},
  }
  if not model_config.one_hot:
    params["embed"] = model_config.embed_scale * jax.random.normal(
        k_embed, (input_size, model_config.embed_dim), jnp.float32)
  return params


def _dropout_keys(rng: jax.Array | None, rows: int) -> tuple[jax.Array | None, ...]:
  """Keys for dropout on the inputs, inside the stack and on the outputs; Nones without rng."""
  return tuple(layers.split_rows(rng, 3, rows)) if rng is not None else (None,) * 3


def _head(params: dict[str, Any], y: jax.Array, dtype: Any) -> jax.Array:
  """y<float>[..., h'] -> logits<float>[..., head_size]."""
  return cells.matmul(y, params["head"]["w"], dtype) + params["head"]["b"]


def init(key: jax.Array, model_config: Config, vocab_size: int) -> dict[str, Any]:
  """LM parameters: embedding<v, e> (unless one-hot), one params dict per layer, head<h, v>."""
  return _init(key, model_config, vocab_size, vocab_size, directions=1)


def initial_carry(model_config: Config, batch_size: int) -> list[Carry]:
  """Zero carries, one per layer, each for b = batch_size."""
  cell = cells.from_config(model_config)
  return [cell.initial_carry(batch_size, model_config.hidden_size)
          for _ in range(model_config.num_layers)]


def apply(params: dict[str, Any], carry: list[Carry], tokens: jax.Array, *,
          model_config: Config, train: bool = False,
          rng: jax.Array | None = None) -> tuple[list[Carry], jax.Array]:
  """tokens<int>[b, t] -> (carry, logits<float>[b, t, v]); dropout only when `train`.

  Dropout (rate `model_config.dropout`) is applied to the embeddings, between layers and
  before the head, as in Zaremba et al. 2014; `rng` is one key or keys<key>[b], one per row
  (see `layers.row_keys`).
  """
  cell = cells.from_config(model_config)
  vocab_size = params["head"]["b"].shape[0]
  if model_config.one_hot:
    x = jax.nn.one_hot(tokens, vocab_size, dtype=jnp.float32)
  else:
    x = params["embed"][tokens]
  k_in, k_stack, k_out = _dropout_keys(rng if train else None, tokens.shape[0])
  x = layers.dropout(x, model_config.dropout, k_in)
  carry, y = layers.run_stack(cell, params["layers"], carry, x, dropout_rate=model_config.dropout,
                              rng=k_stack, unroll=model_config.unroll, impl=model_config.impl)
  y = layers.dropout(y, model_config.dropout, k_out)
  return carry, _head(params, y, cell.dtype)


def init_classifier(key: jax.Array, model_config: Config, vocab_size: int) -> dict[str, Any]:
  """Classifier parameters: embedding<v, e>, layers (pairs if bidirectional), head<h', c>.

  h' is h, or 2h if bidirectional; c = `model_config.num_classes` (1: one sigmoid unit).
  """
  return _init(key, model_config, vocab_size, model_config.num_classes,
               directions=2 if model_config.bidirectional else 1)


def _pool(ys: jax.Array, lengths: jax.Array, pooling: str, bidirectional: bool) -> jax.Array:
  """ys<float>[b, t, h'] -> features<float>[b, h'] from each row's first lengths[b] steps.

  'last': the output at the last valid step; the backward half of bidirectional outputs is
  taken at step 0, where that direction ends. 'mean': the mean over valid steps.
  """
  if pooling == "mean":
    valid = jnp.arange(ys.shape[1]) < lengths[:, None]  # [b, t]
    return (ys * valid[..., None]).sum(axis=1) / lengths[:, None]
  last = jnp.take_along_axis(ys, (lengths - 1)[:, None, None], axis=1)[:, 0]
  if not bidirectional:
    return last
  h = ys.shape[-1] // 2
  return jnp.concatenate([last[:, :h], ys[:, 0, h:]], axis=-1)


def apply_classifier(params: dict[str, Any], tokens: jax.Array, lengths: jax.Array, *,
                     model_config: Config, train: bool = False,
                     rng: jax.Array | None = None) -> jax.Array:
  """tokens<int>[b, t], each row padded after its lengths<int>[b] (>= 1) words -> logits<float>[b, c].

  Embedding -> cell stack from a zero state -> pooled valid outputs (`model_config.pooling`) ->
  head; padding never reaches the logits. Dropout as in `apply`.
  """
  cell = cells.from_config(model_config)
  bidirectional = model_config.bidirectional
  k_in, k_stack, k_out = _dropout_keys(rng if train else None, tokens.shape[0])
  zeros = cell.initial_carry(tokens.shape[0], model_config.hidden_size)
  carries = [(zeros, zeros) if bidirectional else zeros] * model_config.num_layers
  x = layers.dropout(params["embed"][tokens], model_config.dropout, k_in)
  _, ys = layers.run_stack(cell, params["layers"], carries, x, dropout_rate=model_config.dropout,
                           rng=k_stack, unroll=model_config.unroll, impl=model_config.impl,
                           bidirectional=bidirectional, lengths=lengths)
  features = _pool(ys, lengths, model_config.pooling, bidirectional)
  features = layers.dropout(features, model_config.dropout, k_out)
  return _head(params, features, jnp.float32)  # float32, as the classifier always had


def num_params(params: Any) -> int:
  """Total number of scalars in a params pytree."""
  return sum(x.size for x in jax.tree.leaves(params))
