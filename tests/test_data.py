"""Tests for jaxrnn.data: corpus lookup and download, decoding, splits, vocabularies, batches."""

import errno
import hashlib
import io
import os
import pathlib
import subprocess
import sys
import urllib.error
import zipfile

import ml_collections
import numpy as np
import pytest

from conftest import REPO_ROOT, TINY_TEXT, run_script
from jaxrnn import UserError, data

SHARED = pathlib.Path(os.environ["JAXRNN_DATA_DIR"])


def data_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(corpus="tinyshakespeare", tokens=None, val_frac=None,
                                          test_frac=None, batching="sequential", batch_size=4,
                                          seq_len=8))
  config.update(overrides)
  return config


def fake_urlopen(payload: bytes):
  """A stand-in for urllib.request.urlopen that serves `payload`."""
  return lambda url, timeout=None: io.BytesIO(payload)


@pytest.mark.parametrize("name", [n for n, c in data.CORPORA.items() if c.sources[0].sha256])
def test_registry_checksums_match_the_shared_files(name):
  """Every registered sha256 is the hash of the real file (where ../shared/data holds it)."""
  present = [s for s in data.CORPORA[name].sources if (SHARED / s.file).is_file()]
  if not present:
    pytest.skip(f"{name} is not in {SHARED}")
  for source in present:
    assert hashlib.sha256((SHARED / source.file).read_bytes()).hexdigest() == source.sha256


def test_lookup_prefers_data_dir_then_cache(tmp_path, monkeypatch):
  """The data dir wins over the cache; without it the cached copy is used, no download."""
  source = data.Source("corpus.txt", "http://unreachable.invalid/corpus.txt", None)
  (tmp_path / "dd").mkdir()
  (tmp_path / "dd" / "corpus.txt").write_text("from data dir")
  (tmp_path / "cache").mkdir()
  (tmp_path / "cache" / "corpus.txt").write_text("from cache")
  monkeypatch.setenv("JAXRNN_DATA_DIR", str(tmp_path / "dd"))
  monkeypatch.setenv("JAXRNN_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setattr(data.urllib.request, "urlopen", None)  # any download would fail
  assert data.locate(source).read_text() == "from data dir"
  monkeypatch.delenv("JAXRNN_DATA_DIR")
  assert data.locate(source).read_text() == "from cache"


def test_download_checks_sha256_and_lands_in_cache(tmp_path, monkeypatch):
  """A good download is stored in the cache; a corrupt one raises and leaves nothing behind."""
  payload = b"hello corpus\n"
  good = data.Source("x/c.txt", "http://host/c.txt", hashlib.sha256(payload).hexdigest())
  bad = data.Source("x/d.txt", "http://host/d.txt", "0" * 64)
  monkeypatch.delenv("JAXRNN_DATA_DIR", raising=False)
  monkeypatch.setenv("JAXRNN_CACHE_DIR", str(tmp_path))
  monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen(payload))
  assert data.locate(good).read_bytes() == payload
  with pytest.raises(UserError, match="checksum mismatch"):
    data.locate(bad)
  assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["c.txt"]


def test_download_extracts_zip_member_and_checks_size(tmp_path, monkeypatch):
  """Archives (enwik8, text8) are unzipped into the cache; a wrong size is refused."""
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    archive.writestr("member", b"abc" * 10)
  monkeypatch.delenv("JAXRNN_DATA_DIR", raising=False)
  monkeypatch.setenv("JAXRNN_CACHE_DIR", str(tmp_path))
  monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen(buffer.getvalue()))
  ok = data.Source("m", "http://host/a.zip", None, member="member", size=30)
  assert data.locate(ok).read_bytes() == b"abc" * 10
  with pytest.raises(UserError, match="expected 31"):
    data.locate(data.Source("n", "http://host/a.zip", None, member="member", size=31))


def test_offline_error_says_where_to_put_the_file(tmp_path, monkeypatch):
  """No data dir, no cache, no network: a UserError naming the cache path to fill."""
  def offline(url, timeout=None):
    raise urllib.error.URLError("no network")
  monkeypatch.delenv("JAXRNN_DATA_DIR", raising=False)
  monkeypatch.setenv("JAXRNN_CACHE_DIR", str(tmp_path))
  monkeypatch.setattr(data.urllib.request, "urlopen", offline)
  with pytest.raises(UserError) as e:
    data.locate(data.CORPORA["timemachine"].sources[0])
  assert str(tmp_path / "timemachine.txt") in str(e.value) and "JAXRNN_DATA_DIR" in str(e.value)


def test_bad_corpus_files_give_clear_errors(tmp_path):
  """Empty and non-UTF-8 files are refused with what is wrong; the bad byte's offset is named."""
  empty, latin = tmp_path / "empty.txt", tmp_path / "latin.txt"
  empty.write_bytes(b"")
  latin.write_bytes(b"caf\xe9 au lait")
  with pytest.raises(UserError, match="empty"):
    data.load_splits(data_config(corpus=str(empty)))
  with pytest.raises(UserError, match="byte 3"):
    data.load_splits(data_config(corpus=str(latin)))
  with pytest.raises(UserError, match="unknown corpus 'nope'.*tinyshakespeare"):
    data.load_splits(data_config(corpus="nope"))


def test_fraction_split_is_contiguous_and_nanogpt_compatible():
  """Tiny Shakespeare: first 90% train, last 10% validation, nothing lost or reordered."""
  splits, level = data.load_splits(data_config())
  text = (SHARED / "tinyshakespeare.txt").read_text()
  assert level == "char"
  assert splits["train"] == text[:int(len(text) * 0.9)]  # nanoGPT's prepare.py cut
  assert splits["train"] + splits["val"] == text and splits["test"] == ""


def test_archive_corpus_split_90_5_5_bytes(tmp_path, monkeypatch):
  """enwik8's split logic on a small synthetic file: 90/5/5 contiguous, one token per byte."""
  raw = bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8))
  (tmp_path / "enwik8").write_bytes(raw)
  monkeypatch.setenv("JAXRNN_DATA_DIR", str(tmp_path))
  splits, _ = data.load_splits(data_config(corpus="enwik8"))
  assert [len(splits[k]) for k in ("train", "val", "test")] == [1800, 100, 100]
  assert "".join(splits[k] for k in ("train", "val", "test")).encode("latin-1") == raw


def test_ptb_char_symbols_are_fields_not_spaces():
  """ptb_char: one token per space-separated field, `_` for word breaks; vocab from the files."""
  splits, _ = data.load_splits(data_config(corpus="ptb_char"))
  fields = (SHARED / "ptb" / "ptb.char.valid.txt").read_text().split(" ")[:-1]
  assert list(splits["val"]) == fields
  vocab = data.Vocab.build(splits["train"])
  assert " " not in vocab.tokens and "_" in vocab.tokens
  assert len(vocab) == len(set(splits["train"])) + 1


def test_ptb_word_vocabulary_is_the_standard_10k():
  """Word-level PTB: 10,000 types including <unk> and <eos> (Mikolov's setup)."""
  splits, level = data.load_splits(data_config(corpus="ptb"))
  vocab = data.Vocab.build(splits["train"], level)
  assert level == "word" and len(vocab) == 10000
  ids = vocab.encode(splits["val"])
  assert len(ids) == sum(len(line.split()) + 1 for line in splits["val"].splitlines())


@pytest.mark.parametrize("level", ["char", "word"])
def test_vocab_round_trip_unknown_and_json(level):
  """encode/decode round-trips; unseen symbols map to <unk>; JSON restores the same ids."""
  vocab = data.Vocab.build("the cat sat\non the mat\n", level)
  text = "the mat sat\n"
  assert vocab.decode(vocab.encode(text)) == text
  unseen = vocab.encode("dog" if level == "word" else "z")
  assert list(unseen) == [vocab.unk_id] + ([vocab.tokens.index(data.EOS)] if level == "word" else [])
  again = data.Vocab.from_json(vocab.to_json())
  assert np.array_equal(again.encode(text), vocab.encode(text))


def test_char_encoding_matches_a_python_loop():
  """The vectorised encoder equals a per-character dict lookup, non-ASCII included."""
  text = "Ünïcode — ok?\n" * 7
  vocab = data.Vocab.build(text[:20])
  index = {t: i for i, t in enumerate(vocab.tokens)}
  assert list(vocab.encode(text)) == [index.get(c, vocab.unk_id) for c in text]


def test_sequential_lanes_reproduce_the_corpus():
  """Lane b over consecutive batches is a contiguous slice; targets are inputs shifted by one."""
  ids = np.arange(1000, dtype=np.int32)
  batches = data.SequentialBatches(ids, batch_size=4, seq_len=10)
  resets, drawn = zip(*[next(batches) for _ in range(batches.batches_per_epoch)])
  lane_len = 999 // 4
  for b in range(4):
    lane = np.concatenate([d["inputs"][b] for d in drawn])
    assert np.array_equal(lane, ids[b * lane_len:b * lane_len + len(lane)])
    assert np.array_equal(np.concatenate([d["targets"][b] for d in drawn]), lane + 1)
  assert list(resets) == [True] + [False] * (len(drawn) - 1)
  assert next(batches)[0] and np.array_equal(next(batches)[1]["inputs"], drawn[1]["inputs"])


@pytest.mark.parametrize("batching", ["sequential", "random"])
def test_iterators_resume_from_position(batching):
  """An iterator rebuilt at position k yields what the original yields after k batches."""
  ids = np.arange(500, dtype=np.int32)
  config = data_config(batching=batching)
  first = data.train_batches(ids, config, seed=3)
  for _ in range(7):
    next(first)
  resumed = data.train_batches(ids, config, seed=3, position=first.position)
  for _ in range(5):
    (reset_a, a), (reset_b, b) = next(first), next(resumed)
    assert reset_a == reset_b
    assert np.array_equal(a["inputs"], b["inputs"]) and np.array_equal(a["targets"], b["targets"])


def test_random_windows_are_shifted_pairs():
  """Random windows: targets[:, :-1] == inputs[:, 1:], and each window is a corpus slice."""
  ids = np.arange(300, dtype=np.int32) * 7
  reset, batch = next(data.RandomWindows(ids, 5, 12, seed=0))
  assert np.array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
  assert np.all(np.diff(batch["inputs"], axis=1) == 7) and reset


def test_bad_batch_shapes_are_refused():
  """seq_len <= 0 and a corpus shorter than one batch give UserErrors that say what to change."""
  ids = np.arange(50, dtype=np.int32)
  with pytest.raises(UserError, match="seq_len must be positive"):
    data.SequentialBatches(ids, 2, 0)
  with pytest.raises(UserError, match="shorter than one batch"):
    data.SequentialBatches(ids, 8, 10)


@pytest.mark.parametrize("lanes,chunk", [(1, 7), (3, 5), (16, 4)])
def test_eval_chunks_count_every_target_once(lanes, chunk):
  """Masked targets, read lane by lane, are exactly ids[1:]; inputs precede their targets."""
  ids = np.arange(1, 102, dtype=np.int32)
  chunks = list(data.eval_chunks(ids, lanes, chunk))
  targets = np.concatenate([c["targets"] for c in chunks], axis=1)
  inputs = np.concatenate([c["inputs"] for c in chunks], axis=1)
  mask = np.concatenate([c["mask"] for c in chunks], axis=1).astype(bool)
  assert np.array_equal(targets[mask], ids[1:])
  assert np.array_equal(inputs[mask] + 1, targets[mask])
  assert all(c["inputs"].shape == (lanes, chunk) for c in chunks)


def test_detect_reads_utf8_else_cp1252():
  """'detect': strict UTF-8 first, then cp1252, whose 0x85 is an ellipsis, not a line break;
  bytes neither can read are refused, naming the byte."""
  text = "café — naïve…\nsecond line\n"
  assert data.decode(text.encode("utf-8"), "detect") == text
  assert data.decode(text.encode("cp1252"), "detect") == text
  assert data.decode(b"wait\x85 what\n", "detect").split("\n") == ["wait… what", ""]
  with pytest.raises(UserError, match="neither UTF-8 nor Windows-1252.*byte 1"):
    data.decode(b"a\x81b", "detect")


def _refused(monkeypatch, locked: pathlib.Path) -> None:
  """From now on the system refuses to read `locked`, as chmod 000 makes it refuse any user but
  root (who runs these tests, and whom no permission stops)."""
  read = pathlib.Path.read_bytes

  def refusing(path):
    if os.path.abspath(path) == str(locked):
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    return read(path)
  monkeypatch.setattr(pathlib.Path, "read_bytes", refusing)


def test_an_unreadable_corpus_is_one_line_naming_it_and_the_cause(tmp_path, monkeypatch):
  """A corpus file the system refuses to read: a UserError naming the path and the cause."""
  locked = tmp_path / "locked.txt"
  locked.write_text("some text\n" * 10)
  _refused(monkeypatch, locked)
  with pytest.raises(UserError, match=f"cannot read the corpus file {locked}: Permission denied; "
                                      "make it readable"):
    data.load_splits(data_config(corpus=str(locked)))


# scripts/<name> (argv[2:]) where the system refuses to read argv[1] (`_refused`).
_REFUSING = """
import errno, os, pathlib, runpy, sys
locked, sys.argv = sys.argv[1], sys.argv[2:]
read = pathlib.Path.read_bytes
def refusing(path):
  if os.path.abspath(path) == locked:
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
  return read(path)
pathlib.Path.read_bytes = refusing
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def trained(tiny_flags, tmp_path_factory) -> pathlib.Path:
  """The workdir of a 2-step tiny LM run on the tiny corpus (no test split: test_frac 0)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  proc = run_script("train.py", *tiny_flags(workdir, train={"steps": 2}))
  assert proc.returncode == 0, proc.stderr
  return workdir


def test_scripts_name_an_unreadable_corpus_in_one_line(trained, tiny_flags, tmp_path):
  """train.py and eval.py --corpus on a file the system refuses to read: `error: ...` naming
  the file and the cause, exit status 2, no traceback."""
  locked = tmp_path / "locked.txt"
  locked.write_text(TINY_TEXT)
  for name, *args in (("train.py", *tiny_flags(tmp_path / "run", data={"corpus": locked})),
                      ("eval.py", f"--workdir={trained}", f"--corpus={locked}")):
    proc = subprocess.run([sys.executable, "-c", _REFUSING, str(locked), f"scripts/{name}", *args],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 2, (name, proc.stderr)
    assert proc.stderr == (f"error: cannot read the corpus file {locked}: Permission denied; "
                           "make it readable (e.g. chmod u+r) or use another corpus\n"), name


def test_eval_of_a_split_the_corpus_lacks_says_so(trained, corpus, script):
  """eval.py --split test on a run whose corpus was cut with no test split (test_frac 0, the
  default of a text file) says so, how the splits were cut, and what to do, in one line."""
  proc = script("eval.py", f"--workdir={trained}", "--split=test")
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr == (f"error: the corpus {corpus} has no test split: the run cut it into "
                         "train, val and test by data.val_frac=0.1 and data.test_frac=0.0; "
                         "evaluate another --split, or a --corpus with a test file (ptb_char, "
                         "ptb), or a run trained with a test fraction above 0\n")
  assert script("eval.py", f"--workdir={trained}", "--split=val").returncode == 0
