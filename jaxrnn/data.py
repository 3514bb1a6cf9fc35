"""Corpora, vocabularies, splits and batch iterators (NumPy only; no JAX).

A named corpus is looked for, file by file, in `$JAXRNN_DATA_DIR`, then in the cache
(`$JAXRNN_CACHE_DIR`, default `~/.cache/jaxrnn`), then downloaded into the cache with its
checksum checked and an atomic rename. `data.corpus` may also be a path to a UTF-8 text file.
Labelled sentence corpora (one file per class) are registered here too; reading them into
sentences is the classifier's (`tasks/classify.py`). Token ids are int32; batches are
batch-major <int>[b, t], and training iterators yield (reset, batch) pairs.
"""

import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import tempfile
import urllib.request
import zipfile
from typing import Any, Iterator

import numpy as np

from jaxrnn import UserError

Batch = tuple[bool, dict[str, np.ndarray]]  # (reset: start from a zero carry, arrays<b, ...>)
UNK = "<unk>"
EOS = "<eos>"
PAD = "<pad>"
_PTB_URL = ("https://raw.githubusercontent.com/arthurdehgan/IFT6135_assignment_2/"
            "191820cabc95c8d8af11d0bf3679207dd3b97e08/data/")
_RT_URL = ("https://raw.githubusercontent.com/dennybritz/cnn-text-classification-tf/"
           "18762b459e21d9c70e5c242f8d43fc4e6db37a0d/data/rt-polaritydata/")


@dataclasses.dataclass(frozen=True)
class Source:
  """One file of a corpus: where it lives locally, where to fetch it, how to check it."""
  file: str  # path under the data dir and the cache
  url: str
  sha256: str | None  # of the downloaded object (the archive, for zips); None: size checked
  member: str | None = None  # the file inside a zip archive
  size: int | None = None  # bytes of the (extracted) file


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A named corpus: one file cut by fractions, train/valid/test files, or one file per class."""
  sources: tuple[Source, ...]
  encoding: str = "utf-8"  # "utf-8", "detect" (UTF-8, else cp1252), "bytes" or "ptb_char"
  tokens: str = "char"  # default vocabulary level: "char" or "word"
  fractions: tuple[float, float] = (0.1, 0.0)  # (val, test) for single-file and sentence corpora
  classes: tuple[str, ...] = ()  # sentence corpora: the label of each source, in order


CORPORA: dict[str, Corpus] = {
    "tinyshakespeare": Corpus((Source(
        "tinyshakespeare.txt",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),)),
    "timemachine": Corpus((Source(
        "timemachine.txt", "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt",
        "8424dbd9532ac81f7e5f0b6add90e6952baea29158309d7d1bf3884f4e12c516"),)),
    "ptb_char": Corpus((
        Source("ptb/ptb.char.train.txt", _PTB_URL + "ptb.char.train.txt",
               "e313d91425e06c4f0a8fb6e881dcce0c291f2a0e9f4dda54833069b122f91da9"),
        Source("ptb/ptb.char.valid.txt", _PTB_URL + "ptb.char.valid.txt",
               "21661f63ec355085879458b6524644d4add5573541b4be14fb52ab2e2e995eb8"),
        Source("ptb/ptb.char.test.txt", _PTB_URL + "ptb.char.test.txt",
               "1ef5607ac3c463b16e38bfe7900dd3bfc91de5a96e0f21e7eab5188b465b8ebe"),
    ), encoding="ptb_char"),
    "ptb": Corpus((
        Source("ptb/ptb.train.txt", _PTB_URL + "ptb.train.txt",
               "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
        Source("ptb/ptb.valid.txt", _PTB_URL + "ptb.valid.txt",
               "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
        Source("ptb/ptb.test.txt", _PTB_URL + "ptb.test.txt",
               "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
    ), tokens="word"),
    # The usual 90M / 5M / 5M split of 10^8 bytes. No copy of these archives was reachable to
    # hash when this table was written, so the extracted size is checked instead.
    "enwik8": Corpus((Source("enwik8", "http://mattmahoney.net/dc/enwik8.zip", None,
                             member="enwik8", size=100_000_000),),
                     encoding="bytes", fractions=(0.05, 0.05)),
    "text8": Corpus((Source("text8", "http://mattmahoney.net/dc/text8.zip", None,
                            member="text8", size=100_000_000),),
                    fractions=(0.05, 0.05)),
    # Pang & Lee's sentence polarity v1.0: 5,331 sentences per class. dennybritz's UTF-8 copy;
    # the original release is cp1252, which "detect" reads as well.
    "rt-polarity": Corpus((
        Source("rt-polarity/rt-polarity.neg", _RT_URL + "rt-polarity.neg",
               "2d11cfbc790f1cd96d78339f41ce53ced1efa83cd22d37d6788fa3fe3d17e2fd"),
        Source("rt-polarity/rt-polarity.pos", _RT_URL + "rt-polarity.pos",
               "4134882974a28d0c7b5151256f0e33a6169984ee7372c279e673f1114f475d58"),
    ), encoding="detect", tokens="word", fractions=(0.1, 0.1), classes=("negative", "positive")),
}


def cache_dir() -> pathlib.Path:
  """Where downloaded corpora are kept."""
  return pathlib.Path(os.environ.get("JAXRNN_CACHE_DIR", pathlib.Path.home() / ".cache" / "jaxrnn"))


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _download(source: Source, target: pathlib.Path) -> None:
  """Fetches `source` into `target`: checksum first, then an atomic rename."""
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    raw = pathlib.Path(tmp) / "download"
    with urllib.request.urlopen(source.url, timeout=60) as response, open(raw, "wb") as f:
      while block := response.read(1 << 20):
        f.write(block)
    if source.sha256 is not None and (got := _sha256(raw)) != source.sha256:
      raise UserError(f"checksum mismatch for {source.url}: sha256 {got}, expected "
                      f"{source.sha256}; the download is corrupt or the file changed upstream")
    if source.member is not None:
      with zipfile.ZipFile(raw) as archive, archive.open(source.member) as m, \
          open(pathlib.Path(tmp) / "member", "wb") as out:
        while block := m.read(1 << 20):
          out.write(block)
      raw = pathlib.Path(tmp) / "member"
    if source.size is not None and raw.stat().st_size != source.size:
      raise UserError(f"{source.url} gave {raw.stat().st_size} bytes, expected {source.size}")
    os.replace(raw, target)


def locate(source: Source) -> pathlib.Path:
  """The local path of one corpus file: data dir, then cache, then a fresh download."""
  data_dir = os.environ.get("JAXRNN_DATA_DIR")
  if data_dir and (path := pathlib.Path(data_dir) / source.file).is_file():
    return path
  cached = cache_dir() / source.file
  if cached.is_file():
    return cached
  try:
    _download(source, cached)
  except (OSError, zipfile.BadZipFile) as e:
    where = f"$JAXRNN_DATA_DIR ({data_dir})" if data_dir else "$JAXRNN_DATA_DIR (unset)"
    raise UserError(f"{source.file} is not in {where} or the cache ({cache_dir()}), and the "
                    f"download from {source.url} failed ({e}); put the file at {cached} or "
                    f"set JAXRNN_DATA_DIR to a directory that holds {source.file}") from None
  return cached


def decode(raw: bytes, encoding: str = "utf-8", origin: str = "corpus") -> str:
  """Corpus bytes -> text; `bytes` maps each byte to one character, `ptb_char` drops separators.

  `detect`: strict UTF-8 when the bytes are valid UTF-8 (as text in other 8-bit encodings
  almost never is), else Windows-1252.
  """
  if not raw:
    raise UserError(f"{origin} is empty; give a file with some text in it")
  if not raw.strip():
    raise UserError(f"{origin} holds only whitespace ({len(raw):,} bytes); give a file with "
                    "some text in it")
  if encoding == "bytes":
    return raw.decode("latin-1")
  if encoding == "detect":
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError:
      pass
    try:
      return raw.decode("cp1252")
    except UnicodeDecodeError as e:
      raise UserError(f"{origin} is neither UTF-8 nor Windows-1252 (byte {e.start} is "
                      f"{raw[e.start:e.start + 1]!r}); convert it to UTF-8 first") from None
  if encoding == "ptb_char":  # one symbol per field: "c o n s u m e r s _ ..."
    if len(raw) % 2 or np.any(np.frombuffer(raw, np.uint8)[1::2] != ord(" ")):
      raise UserError(f"{origin} is not in PTB character format (each symbol followed by a space)")
    raw = raw[0::2]
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{origin} is not valid UTF-8: byte {e.start} is {raw[e.start:e.start + 1]!r}; "
                    "convert it first, e.g. `iconv -f cp1252 -t utf-8`") from None


def read(path: pathlib.Path) -> bytes:
  """The bytes of a corpus file; a UserError naming it and the cause where the system refuses
  (no read permission, an I/O error)."""
  try:
    return path.read_bytes()
  except OSError as e:
    raise UserError(f"cannot read the corpus file {path}: {e.strerror or e}; make it readable "
                    "(e.g. chmod u+r) or use another corpus") from None


def fractions(corpus: Corpus, data_config: Any) -> tuple[float, float]:
  """(val, test) fractions: `data_config`'s where set, else the corpus'."""
  val_frac = corpus.fractions[0] if data_config.val_frac is None else data_config.val_frac
  test_frac = corpus.fractions[1] if data_config.test_frac is None else data_config.test_frac
  if not (0.0 <= val_frac < 1 and 0.0 <= test_frac < 1 and val_frac + test_frac < 1):
    raise UserError(f"data.val_frac and data.test_frac: split fractions val={val_frac}, "
                    f"test={test_frac} must be in [0, 1) with val + test < 1")
  return val_frac, test_frac


def split_text(text: str, val_frac: float, test_frac: float) -> dict[str, str]:
  """Contiguous train/val/test: the first 1 - val - test of the text, then val, then test."""
  n = len(text)
  # Floor of the train fraction, as nanoGPT's `int(n * 0.9)`; the epsilon absorbs float error.
  val_start = math.floor(n * (1.0 - val_frac - test_frac) + 1e-6)
  test_start = math.floor(n * (1.0 - test_frac) + 1e-6)
  return {"train": text[:val_start], "val": text[val_start:test_start], "test": text[test_start:]}


def text_file(name: str) -> pathlib.Path:
  """The path a corpus name that is not in CORPORA stands for; a UserError if no such file."""
  path = pathlib.Path(name).expanduser()
  if not path.is_file():
    raise UserError(f"unknown corpus {name!r}: neither a file nor one of {', '.join(CORPORA)}")
  return path


def load_splits(data_config: Any) -> tuple[dict[str, str], str]:
  """({'train', 'val', 'test'} texts, vocabulary level) for `data_config.corpus`, a text
  corpus' name or a path."""
  name = data_config.corpus
  corpus = CORPORA.get(name)
  if corpus is None:
    path = text_file(name)
    corpus, paths = Corpus(()), [path]
  else:
    paths = [locate(s) for s in corpus.sources]
  texts = [decode(read(p), corpus.encoding, str(p)) for p in paths]
  level = data_config.tokens or corpus.tokens
  if len(texts) == 3:
    return dict(zip(("train", "val", "test"), texts)), level
  return split_text(texts[0], *fractions(corpus, data_config)), level


def _words(text: str) -> list[str]:
  """Whitespace words with an end-of-sentence token per line (the PTB convention)."""
  return [w for line in text.splitlines() for w in line.split() + [EOS]]


@dataclasses.dataclass(frozen=True)
class Vocab:
  """id <-> token. Char vocabularies are sorted code points then `<unk>`; word ones end in `<unk>`
  (sentence vocabularies, from `word_vocab`, also start with `<pad>`)."""
  tokens: tuple[str, ...]
  level: str = "char"

  @classmethod
  def build(cls, text: str, level: str = "char") -> "Vocab":
    """The vocabulary of a (training) text: every distinct symbol, plus `<unk>`."""
    if level == "char":
      return cls(tuple(sorted(set(text))) + (UNK,), level)
    if level == "word":
      words = sorted(set(_words(text)) - {UNK})
      return cls(tuple(words) + (UNK,), level)
    raise UserError(f"data.tokens must be 'char' or 'word', got {level!r}")

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def unk_id(self) -> int:
    return len(self.tokens) - 1

  @functools.cached_property
  def _table(self) -> np.ndarray:
    """Code point -> id for every Unicode code point (4.4 MB), so encoding is one gather."""
    table = np.full(0x110000, self.unk_id, np.int32)
    table[[ord(t) for t in self.tokens[:-1]]] = np.arange(len(self.tokens) - 1, dtype=np.int32)
    return table

  @functools.cached_property
  def _index(self) -> dict[str, int]:
    return {t: i for i, t in enumerate(self.tokens)}

  def encode(self, text: str) -> np.ndarray:
    """text -> ids<int32>[n]; unknown symbols become `<unk>`. Vectorised for char vocabularies."""
    if self.level == "word":
      return np.array([self._index.get(w, self.unk_id) for w in _words(text)], np.int32)
    return self._table[np.frombuffer(text.encode("utf-32-le"), np.uint32)]

  def unknown(self, text: str) -> list[str]:
    """The distinct symbols (chars or words) of `text` outside the vocabulary, in order."""
    symbols = _words(text) if self.level == "word" else list(text)
    return list(dict.fromkeys(s for s in symbols if s not in self._index))

  def decode(self, ids: Any) -> str:
    """ids -> text (words joined by spaces, `<eos>` as a newline)."""
    tokens = [self.tokens[i] for i in np.asarray(ids).reshape(-1)]
    if self.level == "word":
      return "\n".join(" ".join(line.split()) for line in " ".join(tokens).split(EOS))
    return "".join(tokens)

  def to_json(self) -> str:
    return json.dumps({"level": self.level, "tokens": list(self.tokens)})

  @classmethod
  def from_json(cls, text: str) -> "Vocab":
    d = json.loads(text)
    return cls(tuple(d["tokens"]), d["level"])


class SequentialBatches:
  """Truncated-BPTT batches: the stream cut into b contiguous lanes, read t columns at a time.

  Yields (reset, {inputs, targets}<int>[b, t]). Batch k continues batch k - 1 in every lane,
  so the hidden state carries over; at the end of an epoch the lanes start again from their
  beginnings and `reset` is True. `position` (batches drawn) is the whole resumable state.
  """

  def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, position: int = 0):
    check_shape(batch_size, seq_len)
    lane_len = (len(ids) - 1) // batch_size
    if lane_len < seq_len:
      raise UserError(f"the training split ({len(ids)} tokens) is shorter than one batch "
                      f"(batch_size {batch_size} x seq_len {seq_len} + 1): lower data.batch_size "
                      "or data.seq_len, or use a longer corpus")
    self.inputs = ids[:batch_size * lane_len].reshape(batch_size, lane_len)
    self.targets = ids[1:batch_size * lane_len + 1].reshape(batch_size, lane_len)
    self.seq_len = seq_len
    self.batches_per_epoch = lane_len // seq_len
    self.position = position

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    k = self.position % self.batches_per_epoch
    self.position += 1
    cols = slice(k * self.seq_len, (k + 1) * self.seq_len)
    return k == 0, {"inputs": self.inputs[:, cols], "targets": self.targets[:, cols]}


class RandomWindows:
  """Batches of b windows at random offsets, each from a fresh zero state (`reset` always True).

  Yields (True, {inputs, targets}<int>[b, t]). Window offsets for batch k come from
  `np.random.default_rng([seed, k])`, so `position` alone resumes the stream.
  """

  def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, seed: int, position: int = 0):
    check_shape(batch_size, seq_len)
    if len(ids) < seq_len + 1:
      raise UserError(f"the training split ({len(ids)} tokens) is shorter than seq_len + 1 "
                      f"({seq_len + 1}): lower data.seq_len or use a longer corpus")
    self.ids, self.batch_size, self.seq_len, self.seed = ids, batch_size, seq_len, seed
    self.batches_per_epoch = max(1, (len(ids) - 1) // (batch_size * seq_len))  # tokens' worth
    self.position = position

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    rng = np.random.default_rng([self.seed, self.position])
    self.position += 1
    starts = rng.integers(0, len(self.ids) - self.seq_len, self.batch_size)
    window = starts[:, None] + np.arange(self.seq_len + 1)
    tokens = self.ids[window]
    return True, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def check_shape(batch_size: int, seq_len: int) -> None:
  """Refuses a batch shape no iterator can fill."""
  if seq_len <= 0:
    raise UserError(f"data.seq_len must be positive, got {seq_len}")
  if batch_size <= 0:
    raise UserError(f"data.batch_size must be positive, got {batch_size}")


BATCHINGS = ("sequential", "random")


def train_batches(ids: np.ndarray, data_config: Any, seed: int,
                  position: int = 0) -> SequentialBatches | RandomWindows:
  """The training iterator named by `data_config.batching` (one of BATCHINGS)."""
  if data_config.batching == "sequential":
    return SequentialBatches(ids, data_config.batch_size, data_config.seq_len, position)
  if data_config.batching == "random":
    return RandomWindows(ids, data_config.batch_size, data_config.seq_len, seed, position)
  raise UserError(f"data.batching must be one of {', '.join(BATCHINGS)}, got "
                  f"{data_config.batching!r}")


def eval_chunks(ids: np.ndarray, lanes: int, chunk_len: int) -> Iterator[dict[str, np.ndarray]]:
  """The whole split as `lanes` contiguous lanes read `chunk_len` columns at a time.

  Every target of the split appears exactly once with mask 1; the last lane and the last
  chunk are padded with mask 0, so shapes stay fixed and padding is never counted.
  """
  n = len(ids) - 1  # targets
  if n < 1:
    raise UserError("an evaluation split needs at least two tokens")
  lane_len = -(-n // lanes)
  padded = -(-lane_len // chunk_len) * chunk_len
  grid = np.zeros((lanes, padded), np.int32), np.zeros((lanes, padded), np.int32)
  mask = np.zeros((lanes, padded), np.float32)
  for lane in range(lanes):
    lo, hi = lane * lane_len, min((lane + 1) * lane_len, n)
    if lo < hi:
      grid[0][lane, :hi - lo] = ids[lo:hi]
      grid[1][lane, :hi - lo] = ids[lo + 1:hi + 1]
      mask[lane, :hi - lo] = 1.0
  for start in range(0, padded, chunk_len):
    cols = slice(start, start + chunk_len)
    yield {"inputs": grid[0][:, cols], "targets": grid[1][:, cols], "mask": mask[:, cols]}
