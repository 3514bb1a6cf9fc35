"""The language model task: predict each next token of a corpus, with the state carried.

Metrics are sums (`nll_sum`, `tokens`), turned into perplexity `exp(nll_sum / tokens)` and
bits per character `nll_sum / tokens / ln 2` on the host; per-batch figures are never
averaged. Batches: inputs, targets<int>[b, t] (and mask<float>[b, t] in evaluation).
"""

import functools
import math
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrnn import UserError, blocks, data, model, parallel

Config = Any  # ml_collections.ConfigDict
UNIT = "tokens"
FINAL_SPLITS = ("val", "test")
_MAX_LOG = math.log(sys.float_info.max)  # about 709.78: exp of more overflows
init = model.init
initial_carry = model.initial_carry


def prepare_data(config: Config, vocab: data.Vocab | None = None
                 ) -> tuple[data.Vocab, dict[str, np.ndarray]]:
  """The vocabulary (built on the training split unless given) and each split as ids<int>[n].

  Refuses more evaluation lanes than a split has targets (each lane would be mostly padding,
  and the evaluation step's memory grows with the lanes).
  """
  splits, level = data.load_splits(config.data)
  vocab = data.Vocab.build(splits["train"], level) if vocab is None else vocab
  ids = {name: vocab.encode(text) for name, text in splits.items()}
  lanes = config.train.eval_lanes
  for name in FINAL_SPLITS:
    if 0 < size(ids[name]) < lanes:
      raise UserError(f"train.eval_lanes={lanes} is more than the {size(ids[name]):,} targets of "
                      f"the {name} split; use at most {size(ids[name]):,} (16 is the default)")
  return vocab, ids


def size(ids: np.ndarray) -> int:
  """Targets in a split."""
  return len(ids) - 1


def train_batches(ids: np.ndarray, config: Config, position: int) -> data.SequentialBatches:
  """The training stream (`data.batching`) from batch `position` on."""
  return data.train_batches(ids, config.data, config.train.seed, position)


def nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood<float>[b, t] in nats."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def penalties(ys: jax.Array, dropped: jax.Array, model_config: Config) -> jax.Array | float:
  """AR + TAR (Merity et al. 2018) on the last layer's outputs ys, dropped<float>[b, t, h].

  AR: `ar` times the mean square of the dropped outputs; TAR: `tar` times the mean square of
  the raw outputs' change from one step to the next. The Python 0.0 when both are 0.
  """
  total = 0.0
  if model_config.ar:
    total += model_config.ar * jnp.mean(dropped ** 2)
  if model_config.tar:
    total += model_config.tar * jnp.mean((ys[:, 1:] - ys[:, :-1]) ** 2)
  return total


def chance_loss(config: Config, vocab_size: int) -> float:
  """The loss of a uniform guess, log |V| nats per token: where training starts."""
  del config
  return math.log(vocab_size)


def loss(params: Any, carry: Any, batch: dict[str, jax.Array], model_config: Config,
         rng: model.Rngs) -> tuple[jax.Array, Any]:
  """(mean next-token loss of batch {inputs, targets}<int>[b, t] plus `penalties`, final carry)."""
  carry, ys, dropped = model.outputs(params, carry, batch["inputs"], model_config=model_config,
                                     train=True, rng=rng)
  logits = model.head(params, dropped, blocks.cell(model_config).dtype,
                      model_config.logits_soft_cap)
  return nll(logits, batch["targets"]).mean() + penalties(ys, dropped, model_config), carry


def eval_step(params: Any, batch: dict[str, jax.Array], carry: Any, *,
              model_config: Config) -> tuple[Any, jax.Array, jax.Array]:
  """(carry, nll<float>[b], tokens<float>[b]) summed over one masked chunk, per lane; no dropout."""
  carry, logits = model.apply(params, carry, batch["inputs"], model_config=model_config)
  token_nll = nll(logits, batch["targets"]) * batch["mask"]
  return carry, token_nll.sum(axis=1), batch["mask"].sum(axis=1)


def make_evaluator(config: Config, devs: parallel.Devices | None = None
                   ) -> Callable[[Any, np.ndarray], dict[str, float]]:
  """`evaluate(params, ids<int>[n])`: loss, perplexity, bpc and tokens over a whole split.

  The split is cut into `train.eval_lanes` contiguous lanes read side by side (split over
  the devices), the state carried along each lane; every target counts once, padding never.
  Per-lane sums are added up on the host in float64, in lane order, whatever the device count.
  One lane is the exact sequential evaluation; 16 lanes differ from it only by the 15 lane
  starts from a zero state. `devs`: all local devices by default.
  """
  devs = devs or parallel.devices()
  lanes, chunk = config.train.eval_lanes, config.train.eval_chunk
  parallel.check_divisible(lanes, devs, "train.eval_lanes")
  step = parallel.pmap(functools.partial(eval_step, model_config=config.model), devs)
  zeros = model.initial_carry(config.model, lanes)

  def evaluate(params, ids):
    params = parallel.replicate(params, devs)
    carry = parallel.shard(parallel.process_rows(zeros, devs), devs)
    nll_sum, tokens = 0.0, 0.0
    for batch in data.eval_chunks(ids, lanes, chunk):
      carry, chunk_nll, chunk_tokens = step(
          params, parallel.shard(parallel.process_rows(batch, devs), devs), carry)
      nll_sum += parallel.unshard(chunk_nll).astype(np.float64)
      tokens += parallel.unshard(chunk_tokens).astype(np.float64)
    nll_sum, tokens = parallel.all_rows((nll_sum, tokens), devs)
    mean = float(nll_sum.sum() / tokens.sum())
    perplexity = math.exp(mean) if mean < _MAX_LOG else math.inf  # past float64's range
    return {"loss": mean, "perplexity": perplexity, "bpc": mean / math.log(2),
            "tokens": int(tokens.sum())}

  return evaluate


def summary(split: str, figures: dict[str, Any]) -> dict[str, Any]:
  """Result keys: val_loss, perplexity, bpc, tokens; test_loss, test_perplexity, ..."""
  prefix = "" if split == "val" else f"{split}_"
  return {f"{split}_loss": figures["loss"],
          **{prefix + k: figures[k] for k in ("perplexity", "bpc", "tokens")}}
