"""Models as pure functions: the character (or word) language model and the sentence classifier.

LM: `init(key, model_config, vocab_size) -> params` and
`apply(params, carry, tokens, model_config=...)` (`outputs` and `head` are its two halves, for
losses that read the last layer's outputs). The regularizers of the Penn Treebank recipes
(embedding dropout, per-position and locked dropout, weight drop, tying, uniform init) live
here and in `layers`; training keys come as `Rngs`. Classifier: `init_classifier(key, model_config,
vocab_size)` and `apply_classifier(params, tokens, lengths, model_config=...)`. `model_config` is
the `model` section of a jaxrnn config, checked by `config.validate`. Shapes: tokens<int>[b, t]
batch-major; c is the number of classifier outputs.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn import UserError, blocks, cells, layers
from jaxrnn.cells import Carry

Config = Any  # ml_collections.ConfigDict (the `model` section)


class Rngs(NamedTuple):
  """The keys of one training step's random masks.

  rows: keys<key>[b], one per batch row, for masks on activations (dropout), so a row's mask is
    the same however the batch is split over devices;
  shared: one key for the masks the whole batch shares (embedding rows, recurrent weights),
    the same on every device.
  """
  rows: jax.Array
  shared: jax.Array


def layer_sizes(model_config: Config) -> list[int]:
  """Each layer's width: hidden_size, except a tied stack's last layer, which is embed_dim wide
  (a residual stream is hidden_size wide throughout)."""
  sizes = [model_config.hidden_size] * model_config.num_layers
  if model_config.tie_embedding and model_config.block == "stack":
    sizes[-1] = model_config.embed_dim
  return sizes


def dropout_rates(model_config: Config) -> tuple[float, float, float]:
  """(on the embedding output, between layers, before the head): each its own field or `dropout`."""
  return tuple(model_config.dropout if r is None else r for r in
               (model_config.dropout_in, model_config.dropout_hidden, model_config.dropout_out))


def _uniform_init(key: jax.Array, params: Any, scale: float) -> Any:
  """Every parameter redrawn from U(-scale, scale), as in Zaremba et al. 2014."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.fold_in(key, len(leaves)), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.uniform(k, x.shape, x.dtype, -scale, scale)
                                      for k, x in zip(keys, leaves)])


def _init(key: jax.Array, model_config: Config, input_size: int, head_size: int,
          directions: int) -> dict[str, Any]:
  """layers, head<h', head_size>, and embedding<v, e> unless `model_config.one_hot`.

  One params dict per layer, or a {'fwd', 'bwd'} pair of them for two directions; h' is the
  last layer's width (`layer_sizes`) times the directions. The embedding is
  N(0, embed_scale^2); the head U(-1/sqrt(h'), 1/sqrt(h')) as torch.nn.Linear; a tied head
  has only its bias, its weight being the embedding's transpose. With `init_scale` > 0 every
  parameter is U(-init_scale, init_scale) instead.
  """
  sizes, n = layer_sizes(model_config), directions
  k_embed, k_head_w, k_head_b, *k_layers = jax.random.split(key, 3 + model_config.num_layers)
  d = input_size if model_config.one_hot else model_config.embed_dim
  bound = 1.0 / jnp.sqrt(n * sizes[-1])
  params = {
      **blocks.init(k_layers, model_config, d, sizes, n),
      "head": {"w": jax.random.uniform(k_head_w, (n * sizes[-1], head_size), jnp.float32, -bound,
                                       bound),
               "b": jax.random.uniform(k_head_b, (head_size,), jnp.float32, -bound, bound)},
  }
  if model_config.tie_embedding:
    del params["head"]["w"]
  if not model_config.one_hot:
    params["embed"] = model_config.embed_scale * jax.random.normal(
        k_embed, (input_size, model_config.embed_dim), jnp.float32)
  if model_config.init_scale > 0:
    params = _uniform_init(key, params, model_config.init_scale)
  return params


def _dropout_keys(rng: jax.Array | None, rows: int) -> tuple[jax.Array | None, ...]:
  """Keys for dropout on the inputs, inside the stack and on the outputs; Nones without rng."""
  return tuple(layers.split_rows(rng, 3, rows)) if rng is not None else (None,) * 3


def head(params: dict[str, Any], y: jax.Array, dtype: Any = jnp.float32,
         soft_cap: float = 0.0) -> jax.Array:
  """y<float>[..., h'] -> logits<float>[..., head_size]; a tied head reads the embedding; a
  `soft_cap` c > 0 bounds them smoothly, c * tanh(logits / c) (recurrentgemma's)."""
  w = params["head"]["w"] if "w" in params["head"] else params["embed"].T
  logits = cells.matmul(y, w, dtype) + params["head"]["b"]
  return soft_cap * jnp.tanh(logits / soft_cap) if soft_cap else logits


def vocabulary_ids(tokens: jax.Array, vocab_size: int) -> jax.Array:
  """tokens<int>[b, t] clipped to [0, vocab_size): the one rule for an id outside the vocabulary.

  Every input path would read such an id its own way (a gather clips it, or wraps a negative
  one; a folded embedding's rows clip it, its one-hot rows make it a zero input), so the model
  clips it before any of them. Ids given as concrete arrays (`apply` called outside jit) are
  checked instead, and refused: the data module never makes one, so one is a caller's bug.
  """
  if not isinstance(tokens, jax.core.Tracer) and tokens.size:
    ids = np.asarray(tokens)  # on the host: jnp would trace it inside a caller's jit
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
      raise UserError(f"token ids must lie in [0, {vocab_size}), the vocabulary's, got ids from "
                      f"{low} to {high}: encode text with the run's vocabulary (data.Vocab)")
  return jnp.clip(tokens, 0, vocab_size - 1)


def embed(params: dict[str, Any], tokens: jax.Array, model_config: Config, vocab_size: int,
           rng: jax.Array | None) -> jax.Array:
  """tokens<int>[b, t] -> x<float>[b, t, e] (or one-hot [b, t, v]).

  Embedding dropout (Gal & Ghahramani 2016; AWD-LSTM's dropoute): with `rng` (one key for the
  batch) whole rows of the embedding, i.e. every occurrence of a word, are zeroed with
  probability `embed_dropout`, the others scaled by 1 / (1 - embed_dropout).
  """
  if model_config.one_hot:
    return jax.nn.one_hot(tokens, vocab_size, dtype=jnp.float32)
  x = params["embed"][tokens]
  rate = model_config.embed_dropout
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, (vocab_size,))
  return x * jnp.where(keep, 1.0 / (1.0 - rate), 0.0)[tokens][..., None]


def folds_embedding(model_config: Config, vocab_size: int, shape: tuple[int, int],
                    input_dropout: bool) -> bool:
  """Whether `outputs` feeds the first layer the tokens<int>[b, t] (`shape`) and W_ih' = E W_ih
  for E[tokens].

  The two are equal for a stack of kernel cells (the input enters only through x W_ih + b):
  the first layer's input product becomes the tokens' rows of W_ih' (gathered in the core, a
  one-hot product elsewhere) and its weight gradient sums the gates' gradients per token (dx,
  which only the embedding's gradient needed, is not formed), beside one [v, e] x [e, g]
  product. Folded where the vocabulary is smaller than the batch (characters, not words or
  the single steps of sampling) and either the layer trains in the core, where the rows cost
  a copy (the quickstart's 1 x 256 LSTM, e 64: 12% off its step on the 2-core EPYC), or v (e
  + rows) < rows e, where the one-hot product is the smaller (a 2 x 256 LSTM, e 256: 12-15%
  off; at e 64 it measured 15% slower, a product over 65 columns running far below the CPU's
  peak). Not with dropout on the embedded positions.
  """
  b, t = shape
  rows, e = b * t, model_config.embed_dim
  cell = blocks.cell(model_config)
  if (model_config.block != "stack" or model_config.one_hot or input_dropout
      or cell.kernel is None or vocab_size >= rows):
    return False
  impl = layers.resolve(cell, model_config.impl, layer_sizes(model_config)[0], t)
  trains_in_core = impl.split("/")[-1] == "core"  # "a/b": b is the training kernel
  return trains_in_core or vocab_size * (e + rows) < rows * e


def _shared_keys(shared_rng: jax.Array | None) -> tuple[jax.Array | None, jax.Array | None]:
  """(embedding-dropout key, weight-drop key) from the batch's shared key; Nones without it."""
  if shared_rng is None:
    return None, None
  return jax.random.fold_in(shared_rng, 0), jax.random.fold_in(shared_rng, 1)


def init(key: jax.Array, model_config: Config, vocab_size: int) -> dict[str, Any]:
  """LM parameters: embedding<v, e> (unless one-hot), one params dict per layer, head<h, v>."""
  return _init(key, model_config, vocab_size, vocab_size, directions=1)


def initial_carry(model_config: Config, batch_size: int) -> list[Carry]:
  """Zero carries, one per layer (`blocks.initial_carry`), each for b = batch_size."""
  return blocks.initial_carry(model_config, batch_size, layer_sizes(model_config))


def outputs(params: dict[str, Any], carry: list[Carry], tokens: jax.Array, *,
            model_config: Config, train: bool = False, rng: Rngs | None = None
            ) -> tuple[list[Carry], jax.Array, jax.Array]:
  """tokens<int>[b, t] -> (carry, ys<float>[b, t, h], dropped ys<float>[b, t, h]).

  The last layer's outputs, before and after the dropout that precedes the head. When `train`
  (with `rng`): embedding dropout and weight drop from `rng.shared`; dropout (rates
  `dropout_rates`, locked if `locked_dropout`) on the embeddings, between layers and before
  the head, as in Zaremba et al. 2014, from `rng.rows`.
  """
  vocab_size = params["head"]["b"].shape[0]
  tokens = vocabulary_ids(tokens, vocab_size)
  rng = rng if train else None
  k_embed, k_weight = _shared_keys(None if rng is None else rng.shared)
  k_in, k_stack, k_out = _dropout_keys(None if rng is None else rng.rows, tokens.shape[0])
  rate_in, rate_hidden, rate_out = dropout_rates(model_config)
  locked = model_config.locked_dropout
  stack = params
  if folds_embedding(model_config, vocab_size, tokens.shape, k_in is not None and rate_in > 0):
    table = embed(params, jnp.arange(vocab_size), model_config, vocab_size, k_embed)  # [v, e]
    first = params["layers"][0]
    folded = cells.matmul(table, first["w_ih"], blocks.cell(model_config).dtype)
    stack = {**params, "layers": [{**first, "w_ih": folded},
                                  *params["layers"][1:]]}
    x = tokens  # the first layer picks their rows of W_ih' (`layers.run`)
  else:
    x = layers.dropout(embed(params, tokens, model_config, vocab_size, k_embed), rate_in, k_in,
                       locked)
  carry, y = blocks.run(stack, carry, x, model_config=model_config, dropout_rate=rate_hidden,
                        rng=k_stack, weight_rng=k_weight)
  return carry, y, layers.dropout(y, rate_out, k_out, locked)


def apply(params: dict[str, Any], carry: list[Carry], tokens: jax.Array, *,
          model_config: Config, train: bool = False,
          rng: Rngs | None = None) -> tuple[list[Carry], jax.Array]:
  """tokens<int>[b, t] -> (carry, logits<float>[b, t, v]); regularizers only when `train`.

  See `outputs` for what `train` and `rng` switch on.
  """
  carry, _, y = outputs(params, carry, tokens, model_config=model_config, train=train, rng=rng)
  return carry, head(params, y, blocks.cell(model_config).dtype, model_config.logits_soft_cap)


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
                     rng: Rngs | None = None) -> jax.Array:
  """tokens<int>[b, t], each row padded after its lengths<int>[b] (>= 1) words -> logits<float>[b, c].

  Embedding -> cell stack from a zero state -> pooled valid outputs (`model_config.pooling`) ->
  head; padding never reaches the logits. Regularizers as in `outputs`.
  """
  bidirectional = model_config.bidirectional
  tokens = vocabulary_ids(tokens, params["embed"].shape[0])
  rng = rng if train else None
  k_embed, k_weight = _shared_keys(None if rng is None else rng.shared)
  k_in, k_stack, k_out = _dropout_keys(None if rng is None else rng.rows, tokens.shape[0])
  rate_in, rate_hidden, rate_out = dropout_rates(model_config)
  locked = model_config.locked_dropout
  carries = initial_carry(model_config, tokens.shape[0])
  if bidirectional:
    carries = [(zeros, zeros) for zeros in carries]
  x = embed(params, tokens, model_config, params["embed"].shape[0], k_embed)
  x = layers.dropout(x, rate_in, k_in, locked)
  _, ys = blocks.run(params, carries, x, model_config=model_config, dropout_rate=rate_hidden,
                     rng=k_stack, weight_rng=k_weight, bidirectional=bidirectional,
                     lengths=lengths)
  features = _pool(ys, lengths, model_config.pooling, bidirectional)
  features = layers.dropout(features, rate_out, k_out)
  return head(params, features)  # float32, as the classifier always had


def num_params(params: Any) -> int:
  """Total number of scalars in a params pytree."""
  return sum(x.size for x in jax.tree.leaves(params))
