"""The sentence classification task: one label per sentence, from a labelled sentence corpus.

Each corpus file holds one class, one sentence per line; words are whitespace-separated.
Sentences are cut to `data.seq_len` words and padded after their length. Batches:
inputs<int>[b, t], lengths<int>[b], targets<int>[b] (and mask<float>[b] in evaluation).
Metrics are sums over sentences, turned into mean loss (nats per sentence) and accuracy on
the host. Nothing is carried across batches: the carry is empty.
"""

import collections
import functools
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrnn import UserError, data, model, parallel

Config = Any  # ml_collections.ConfigDict
UNIT = "sentences"
FINAL_SPLITS = ("val",)  # the test split is left to eval.py: read once per reported figure
init = model.init_classifier


def initial_carry(model_config: Config, batch_size: int) -> tuple[()]:
  """Nothing crosses batches."""
  del model_config, batch_size
  return ()


Sentences = tuple[list[list[str]], np.ndarray]  # (sentences as word lists, labels<int32>[n])


def load_sentences(data_config: Config) -> tuple[dict[str, Sentences], tuple[str, ...]]:
  """({'train', 'val', 'test'}: (word lists, labels)), class names) of a labelled sentence corpus.

  Each source file holds one class, one sentence per line, words separated by whitespace.
  The split is a shuffle seeded by `data_config.split_seed`, then the test and validation
  fractions are cut off its front: fixed for a given seed whatever the training seed.
  """
  corpus = data.CORPORA[data_config.corpus]
  sentences, labels = [], []
  for label, source in enumerate(corpus.sources):
    path = data.locate(source)
    text = data.decode(data.read(path), corpus.encoding, str(path))
    # '\n' only: str.splitlines() also breaks lines at U+0085, U+2028 and other characters.
    lines = [words for line in text.split("\n") if (words := line.split())]
    sentences += lines
    labels += [label] * len(lines)
  val_frac, test_frac = data.fractions(corpus, data_config)
  n = len(sentences)
  order = np.random.default_rng(data_config.split_seed).permutation(n)
  n_test, n_val = round(n * test_frac), round(n * val_frac)
  parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val],
           "train": order[n_test + n_val:]}
  labels = np.asarray(labels, np.int32)
  splits = {k: ([sentences[i] for i in rows], labels[rows]) for k, rows in parts.items()}
  return splits, corpus.classes


def word_vocab(sentences: list[list[str]], max_size: int = 0) -> data.Vocab:
  """`<pad>` (id 0), the most frequent words (ties in alphabetical order), `<unk>`: at most
  `max_size` tokens in all; 0 keeps every word."""
  counts = collections.Counter(w for words in sentences for w in words)
  words = sorted(set(counts) - {data.PAD, data.UNK}, key=lambda w: (-counts[w], w))
  return data.Vocab((data.PAD, *words[:max_size - 2 if max_size else None], data.UNK), "word")


def encode_sentences(split: Sentences, vocab: data.Vocab, seq_len: int) -> dict[str, np.ndarray]:
  """{inputs<int32>[n, t], lengths<int32>[n], targets<int32>[n]} with t = seq_len.

  Each sentence's first t word ids, then `<pad>` (id 0); unknown words are `<unk>`.
  """
  data.check_shape(1, seq_len)
  sentences, labels = split
  inputs = np.zeros((len(sentences), seq_len), np.int32)
  lengths = np.zeros(len(sentences), np.int32)
  for row, words in enumerate(sentences):
    ids = [vocab._index.get(w, vocab.unk_id) for w in words[:seq_len]]
    inputs[row, :len(ids)] = ids
    lengths[row] = len(ids)
  return {"inputs": inputs, "lengths": lengths, "targets": np.asarray(labels, np.int32)}


class SentenceBatches:
  """Shuffled batches of b encoded sentences (`encode_sentences`), each from a zero state.

  Epoch e reads the sentences in the order `np.random.default_rng([seed, e]).permutation(n)`,
  leaving its last n mod b out, so `position` (batches drawn) is the whole resumable state.
  Yields (True, {inputs, lengths, targets}): nothing is carried from one batch to the next.
  """

  def __init__(self, split: dict[str, np.ndarray], batch_size: int, seed: int, position: int = 0):
    data.check_shape(batch_size, 1)
    n = len(split["targets"])
    if n < batch_size:
      raise UserError(f"the training split has {n} sentences, fewer than data.batch_size "
                      f"({batch_size}): lower data.batch_size")
    self.split, self.batch_size, self.seed, self.position = split, batch_size, seed, position
    self.batches_per_epoch = n // batch_size

  def __iter__(self) -> Iterator[data.Batch]:
    return self

  def __next__(self) -> data.Batch:
    epoch, k = divmod(self.position, self.batches_per_epoch)
    self.position += 1
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self.split["targets"]))
    rows = order[k * self.batch_size:(k + 1) * self.batch_size]
    return True, {key: value[rows] for key, value in self.split.items()}


def sentence_chunks(split: dict[str, np.ndarray], rows: int) -> Iterator[dict[str, np.ndarray]]:
  """The whole split in order, `rows` sentences at a time, with mask<float32>[rows].

  The last chunk is filled with one-word padding rows of mask 0, so shapes stay fixed and
  padding is never counted.
  """
  n = len(split["targets"])
  padded = -(-n // rows) * rows
  filler = {"inputs": 0, "lengths": 1, "targets": 0}
  grid = {k: np.concatenate([v, np.full((padded - n,) + v.shape[1:], filler[k], v.dtype)])
          for k, v in split.items()}
  mask = (np.arange(padded) < n).astype(np.float32)
  for start in range(0, padded, rows):
    yield {**{k: v[start:start + rows] for k, v in grid.items()}, "mask": mask[start:start + rows]}


def prepare_data(config: Config, vocab: data.Vocab | None = None
                 ) -> tuple[data.Vocab, dict[str, dict[str, np.ndarray]]]:
  """The word vocabulary (built on the training split unless given) and each split encoded."""
  splits, _ = load_sentences(config.data)
  if vocab is None:
    vocab = word_vocab(splits["train"][0], config.data.max_vocab)
  return vocab, {name: encode_sentences(split, vocab, config.data.seq_len)
                 for name, split in splits.items()}


def size(split: dict[str, np.ndarray]) -> int:
  """Sentences in an encoded split."""
  return len(split["targets"])


def train_batches(split: dict[str, np.ndarray], config: Config, position: int) -> SentenceBatches:
  """Shuffled training batches from batch `position` on."""
  return SentenceBatches(split, config.data.batch_size, config.train.seed, position)


def label_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-sentence cross-entropy<float>[b] in nats: binary for one (sigmoid) output, else softmax."""
  if logits.shape[-1] == 1:
    return optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(logits.dtype))
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def predictions(logits: jax.Array) -> jax.Array:
  """labels<int>[b] from logits<float>[b, c]: logit > 0 for one sigmoid output, else argmax."""
  if logits.shape[-1] == 1:
    return (logits[:, 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1)


def chance_loss(config: Config, vocab_size: int) -> float:
  """The loss of a uniform guess, log of the classes (2 for one sigmoid unit), per sentence."""
  del vocab_size
  return math.log(max(2, config.model.num_classes))


def loss(params: Any, carry: tuple[()], batch: dict[str, jax.Array], model_config: Config,
         rng: model.Rngs) -> tuple[jax.Array, tuple[()]]:
  """(mean cross-entropy of batch {inputs, lengths, targets}, the (empty) carry unchanged)."""
  logits = model.apply_classifier(params, batch["inputs"], batch["lengths"],
                                  model_config=model_config, train=True, rng=rng)
  return label_nll(logits, batch["targets"]).mean(), carry


def eval_step(params: Any, batch: dict[str, jax.Array], *,
              model_config: Config) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(nll<float>[b], correct<float>[b], mask<float>[b]) of one masked chunk of sentences."""
  logits = model.apply_classifier(params, batch["inputs"], batch["lengths"],
                                  model_config=model_config)
  correct = (predictions(logits) == batch["targets"]).astype(jnp.float32)
  mask = batch["mask"]
  return label_nll(logits, batch["targets"]) * mask, correct * mask, mask


def make_evaluator(config: Config, devs: parallel.Devices | None = None
                   ) -> Callable[[Any, dict[str, np.ndarray]], dict[str, float]]:
  """`evaluate(params, split)`: loss (nats/sentence), accuracy and examples over a whole split.

  The split (`encode_sentences`) is read `train.eval_lanes` sentences at a time, split over
  the devices; per-row sums are added up on the host in float64, in row order, whatever the
  device count. `devs`: all local devices by default.
  """
  devs = devs or parallel.devices()
  parallel.check_divisible(config.train.eval_lanes, devs, "train.eval_lanes")
  step = parallel.pmap(functools.partial(eval_step, model_config=config.model), devs)

  def evaluate(params, split):
    if not size(split):
      raise UserError("no sentences to evaluate in this split: raise data.val_frac or "
                      "data.test_frac above 0")
    params = parallel.replicate(params, devs)
    sums = 0.0
    for chunk in sentence_chunks(split, config.train.eval_lanes):
      out = step(params, parallel.shard(parallel.process_rows(chunk, devs), devs))
      sums += np.stack(parallel.unshard(out)).astype(np.float64)  # [3, b_process]
    nll, correct, count = parallel.all_rows(sums.T, devs).sum(axis=0)
    return {"loss": float(nll / count), "accuracy": float(correct / count),
            "examples": int(count)}

  return evaluate


def summary(split: str, figures: dict[str, Any]) -> dict[str, Any]:
  """Result keys: val_loss, val_accuracy, val_examples."""
  return {f"{split}_{k}": v for k, v in figures.items()}
