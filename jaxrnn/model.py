"""Models as pure functions: the character (or word) language model and the sentence classifier.

LM: `init(key, config, vocab_size) -> params` and `apply(params, carry, tokens, config=...)`.
Classifier: `init_classifier(key, config, vocab_size)` and
`apply_classifier(params, tokens, lengths, config=...)`. `config` is the `model` part of a jaxrnn
config. Shapes: tokens<int>[b, t] batch-major; c is the number of classifier outputs.
"""

from typing import Any

import jax
import jax.numpy as jnp

from jaxrnn import UserError, cells, layers
from jaxrnn.cells import Carry

Config = Any  # ml_collections.ConfigDict (the `model` section)


def _input_size(config: Config, vocab_size: int) -> int:
  return vocab_size if config.one_hot else config.embed_dim


def _directions(config: Config) -> int:
  return 2 if config.get("bidirectional", False) else 1


def _init(key: jax.Array, config: Config, vocab_size: int, head_size: int) -> dict[str, Any]:
  """embedding<v, e> (unless one-hot), layers, head<h', head_size>.

  One params dict per layer, or a {'fwd', 'bwd'} pair of them if bidirectional; h' is h per
  direction. The embedding is N(0, embed_scale^2); the head U(-1/sqrt(h'), 1/sqrt(h')) as
  torch.nn.Linear.
  """
  if config.num_layers < 1 or config.hidden_size < 1:
    raise UserError("model.num_layers and model.hidden_size must be >= 1")
  if not config.one_hot and config.embed_dim < 1:
    raise UserError("model.embed_dim must be >= 1 (or set model.one_hot=True)")
  cell = cells.from_config(config)
  h, n = config.hidden_size, _directions(config)
  k_embed, k_head_w, k_head_b, *k_layers = jax.random.split(key, 3 + config.num_layers)

  def layer(k, d):
    if n == 1:
      return cell.init(k, d, h)
    k_f, k_b = jax.random.split(k)
    return {"fwd": cell.init(k_f, d, h), "bwd": cell.init(k_b, d, h)}

  d = _input_size(config, vocab_size)
  bound = 1.0 / jnp.sqrt(n * h)
  params = {
      "layers": [layer(k, d if i == 0 else n * h) for i, k in enumerate(k_layers)],
      "head": {"w": jax.random.uniform(k_head_w, (n * h, head_size), jnp.float32, -bound, bound),
               "b": jax.random.uniform(k_head_b, (head_size,), jnp.float32, -bound, bound)},
  }
  if not config.one_hot:
    params["embed"] = config.get("embed_scale", 1.0) * jax.random.normal(
        k_embed, (vocab_size, config.embed_dim), jnp.float32)
  return params


def init(key: jax.Array, config: Config, vocab_size: int) -> dict[str, Any]:
  """LM parameters: embedding<v, e> (unless one-hot), one params dict per layer, head<h, v>."""
  if config.get("bidirectional", False):
    raise UserError("model.bidirectional=True would let the language model see the future (the "
                    "backward direction reads the tokens it must predict); set it to False, or "
                    "use task=classify")
  return _init(key, config, vocab_size, vocab_size)


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


def init_classifier(key: jax.Array, config: Config, vocab_size: int) -> dict[str, Any]:
  """Classifier parameters: embedding<v, e>, layers (pairs if bidirectional), head<h', c>.

  h' is h, or 2h if bidirectional; c = `config.num_classes` (1: one sigmoid unit).
  """
  if config.one_hot:
    raise UserError("the classifier reads words through an embedding: set model.one_hot=False")
  if config.num_classes < 1:
    raise UserError(f"model.num_classes must be >= 1 (1: one sigmoid unit), got {config.num_classes}")
  if config.pooling not in ("last", "mean"):
    raise UserError(f"model.pooling must be 'last' or 'mean', got {config.pooling!r}")
  return _init(key, config, vocab_size, config.num_classes)


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
                     config: Config, train: bool = False,
                     rng: jax.Array | None = None) -> jax.Array:
  """tokens<int>[b, t], each row padded after its lengths<int>[b] (>= 1) words -> logits<float>[b, c].

  Embedding -> cell stack from a zero state -> pooled valid outputs (`config.pooling`) -> head;
  padding never reaches the logits. Dropout as in `apply`.
  """
  cell = cells.from_config(config)
  rng = rng if train else None
  k_in, k_stack, k_out = layers.split_rows(rng, 3, tokens.shape[0]) if rng is not None else (None,) * 3
  zeros = cell.initial_carry(tokens.shape[0], config.hidden_size)
  carries = [(zeros, zeros) if config.bidirectional else zeros] * config.num_layers
  x = layers.dropout(params["embed"][tokens], config.dropout, k_in)
  _, ys = layers.run_stack(cell, params["layers"], carries, x, dropout_rate=config.dropout,
                           rng=k_stack, unroll=config.unroll, impl=config.get("impl", "fused"),
                           bidirectional=config.bidirectional, lengths=lengths)
  features = _pool(ys, lengths, config.pooling, config.bidirectional)
  features = layers.dropout(features, config.dropout, k_out)
  return features @ params["head"]["w"] + params["head"]["b"]


def num_params(params: Any) -> int:
  """Total number of scalars in a params pytree."""
  return sum(x.size for x in jax.tree.leaves(params))
