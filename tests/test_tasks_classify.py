"""Tests for jaxrnn.tasks.classify: labelled sentences, their batches, and whole-split figures."""

import os
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrnn import UserError, model, optim, train
from jaxrnn.tasks import classify

SHARED = pathlib.Path(os.environ["JAXRNN_DATA_DIR"])


def sentence_config(tiny_classify_config, **data_overrides):
  return tiny_classify_config(data={"max_vocab": 0, **data_overrides}).data


def test_rt_polarity_split_is_fixed_balanced_and_complete(tiny_classify_config):
  """5,331 sentences per class; 80/10/10 by a seeded shuffle, disjoint, the same every time;
  another split_seed gives another split."""
  splits, classes = classify.load_sentences(sentence_config(tiny_classify_config))
  assert classes == ("negative", "positive")
  assert {k: len(v[0]) for k, v in splits.items()} == {"train": 8530, "val": 1066, "test": 1066}
  labels = np.concatenate([v[1] for v in splits.values()])
  assert np.bincount(labels).tolist() == [5331, 5331]
  lines = (SHARED / "rt-polarity" / "rt-polarity.pos").read_text().split("\n")[:-1]
  assert lines[0].split() in splits["train"][0] + splits["val"][0] + splits["test"][0]
  again, _ = classify.load_sentences(sentence_config(tiny_classify_config))
  assert all(again[k][0] == splits[k][0] for k in splits)
  other, _ = classify.load_sentences(sentence_config(tiny_classify_config, split_seed=1))
  assert other["test"][0] != splits["test"][0]
  assert sorted(map(" ".join, other["train"][0] + other["val"][0] + other["test"][0])) == \
      sorted(map(" ".join, splits["train"][0] + splits["val"][0] + splits["test"][0]))


def test_rt_polarity_cp1252_copy_reads_the_same(tiny_classify_config, tmp_path, monkeypatch):
  """The original Windows-1252 files, found under the corpus' file names, give the same splits."""
  (tmp_path / "rt-polarity").mkdir()
  for name in ("rt-polarity.pos", "rt-polarity.neg"):
    raw = (SHARED / "rt-polarity" / "cp1252" / name).read_bytes()
    with pytest.raises(UnicodeDecodeError):
      raw.decode("utf-8")
    (tmp_path / "rt-polarity" / name).write_bytes(raw)
  expected, _ = classify.load_sentences(sentence_config(tiny_classify_config))
  monkeypatch.setenv("JAXRNN_DATA_DIR", str(tmp_path))
  got, _ = classify.load_sentences(sentence_config(tiny_classify_config))
  assert all(got[k][0] == expected[k][0] and np.array_equal(got[k][1], expected[k][1])
             for k in expected)


def test_word_vocab_caps_by_frequency():
  """<pad> first, <unk> last, then the most frequent words, ties alphabetical, capped in total."""
  sentences = [["b", "a", "c"], ["a", "b", "d"], ["a"]]
  assert classify.word_vocab(sentences).tokens == ("<pad>", "a", "b", "c", "d", "<unk>")
  capped = classify.word_vocab(sentences, max_size=4)
  assert capped.tokens == ("<pad>", "a", "b", "<unk>") and capped.unk_id == 3


def test_encode_sentences_pads_cuts_and_marks_unknowns():
  """Ids then <pad> (0) to seq_len; longer sentences cut to seq_len; lengths count the kept words."""
  vocab = classify.word_vocab([["a", "b"]])
  encoded = classify.encode_sentences(([["a", "z"], ["b", "a", "b", "a"]], np.array([1, 0])),
                                      vocab, 3)
  a, b, unk = 1, 2, vocab.unk_id
  assert encoded["inputs"].tolist() == [[a, unk, 0], [b, a, b]]
  assert encoded["lengths"].tolist() == [2, 3] and encoded["targets"].tolist() == [1, 0]


def _toy_split(n=10, t=4):
  return {"inputs": np.arange(n * t, dtype=np.int32).reshape(n, t),
          "lengths": np.arange(1, n + 1, dtype=np.int32) % t + 1,
          "targets": np.arange(n, dtype=np.int32) % 2}


def test_sentence_batches_cover_each_epoch_and_resume():
  """An epoch reads each sentence at most once (n mod b left out), epochs differ, and an
  iterator rebuilt at a position continues the stream; every batch starts from a zero state."""
  split = _toy_split()
  batches = classify.SentenceBatches(split, 3, seed=4)
  epoch = [next(batches) for _ in range(batches.batches_per_epoch)]
  assert all(reset for reset, _ in epoch)
  epoch = [b for _, b in epoch]
  rows = np.concatenate([b["inputs"][:, 0] // 4 for b in epoch])
  assert len(rows) == len(set(rows)) == 9
  for b in epoch:
    assert np.array_equal(split["targets"][b["inputs"][:, 0] // 4], b["targets"])
  resumed = classify.SentenceBatches(split, 3, seed=4, position=batches.position)
  for _ in range(4):
    assert np.array_equal(next(batches)[1]["inputs"], next(resumed)[1]["inputs"])
  with pytest.raises(UserError, match="fewer than data.batch_size"):
    classify.SentenceBatches(split, 11, seed=0)


def test_sentence_chunks_count_every_sentence_once():
  """Masked rows, in order, are exactly the split; shapes fixed; padding rows have length 1."""
  split = _toy_split()
  chunks = list(classify.sentence_chunks(split, 4))
  assert all(c["inputs"].shape == (4, 4) for c in chunks)
  mask = np.concatenate([c["mask"] for c in chunks]).astype(bool)
  for key in split:
    assert np.array_equal(np.concatenate([c[key] for c in chunks])[mask], split[key])
  assert np.concatenate([c["lengths"] for c in chunks])[~mask].tolist() == [1, 1]


def reference_figures(params, config, split):
  """Mean cross-entropy and accuracy of a whole split from one apply and float64 NumPy."""
  logits = np.asarray(model.apply_classifier(params, jnp.asarray(split["inputs"]),
                                             jnp.asarray(split["lengths"]),
                                             model_config=config.model), np.float64)
  y = split["targets"]
  if logits.shape[1] == 1:
    z = logits[:, 0]
    nll = np.logaddexp(0.0, -z) * y + np.logaddexp(0.0, z) * (1 - y)
    predictions = (z > 0).astype(int)
  else:
    nll = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1) \
        - logits[np.arange(len(y)), y]
    predictions = logits.argmax(1)
  return nll.mean(), (predictions == y).mean()


@pytest.mark.parametrize("num_classes", [1, 2])
def test_evaluator_equals_one_pass_over_the_split(tiny_classify_config, num_classes):
  """Chunked, masked evaluation equals cross-entropy (binary for one sigmoid unit) and accuracy
  of the whole split computed at once."""
  config = tiny_classify_config(model={"num_classes": num_classes},
                                data={"seq_len": 24, "max_vocab": 500},
                                train={"eval_lanes": 128})
  vocab, splits = classify.prepare_data(config)
  params = train.create_train_state(config, len(vocab), optim.make_optimizer(config.train)).params
  got = classify.make_evaluator(config)(params, splits["val"])
  loss, accuracy = reference_figures(params, config, splits["val"])
  assert got["examples"] == 1066 == classify.size(splits["val"])
  assert got["loss"] == pytest.approx(loss, rel=1e-5)
  assert got["accuracy"] == pytest.approx(accuracy, abs=1e-9)


def test_summary_prefixes_every_figure_with_the_split():
  """Validation figures become val_loss, val_accuracy, val_examples."""
  assert classify.summary("val", {"loss": 0.5, "accuracy": 0.75, "examples": 8}) == \
      {"val_loss": 0.5, "val_accuracy": 0.75, "val_examples": 8}

