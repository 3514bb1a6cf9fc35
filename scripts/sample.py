"""Samples text from a saved run: the prefix, then generated characters, on stdout.

  python scripts/sample.py --workdir runs/lstm --prefix "ROMEO:" --length 500 --temperature 0.8
  python scripts/sample.py --workdir runs/lstm --prefix "ROMEO:" --length 40 --beam 5

Samples are separated by a blank line; everything else goes to stderr. `--beam N` searches
for the N most likely continuations instead (best first, their log-probabilities on stderr).
"""

import sys
import time

from absl import flags, logging

from jaxrnn import UserError, checkpoint, cli, data, sample

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir.", required=True)
_PREFIX = flags.DEFINE_string("prefix", "\n", "Text to warm the state up on.")
_LENGTH = flags.DEFINE_integer("length", 500, "Tokens to generate after the prefix.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 keeps all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 keeps all.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed: the same seed gives the same text.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples drawn side by side.")
_BEAM = flags.DEFINE_integer("beam", 0, "Beam search with this many beams, printing the best "
                             "that many sequences; 0 samples instead.")
_STEP = flags.DEFINE_string("step", "latest", "Checkpoint: a step number, 'best' or 'latest'.")


SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "seed", "num_samples")  # not for --beam


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  if _BEAM.value < 0:
    raise UserError(f"--beam must be >= 1 (or 0 to sample), got {_BEAM.value}")
  if _BEAM.value and (given := [f"--{n}" for n in SAMPLING_FLAGS if flags.FLAGS[n].present]):
    raise UserError(f"--beam searches for the most likely sequences; {', '.join(given)} shape "
                    "random sampling: drop them, or drop --beam")
  config, vocab, params, step = checkpoint.load_run(_WORKDIR.value, _STEP.value)
  if config.task != "lm":
    raise UserError(f"{_WORKDIR.value} holds a {config.task} run: sampling needs a language model")
  if unknown := vocab.unknown(_PREFIX.value):
    print(f"warning: the prefix has symbols outside the run's vocabulary, read as {data.UNK}: "
          f"{', '.join(map(repr, unknown))}", file=sys.stderr)
  prefix, start = vocab.encode(_PREFIX.value), time.perf_counter()
  if _BEAM.value:
    tokens, log_probs = sample.beam_search(params, config.model, prefix, _LENGTH.value,
                                           _BEAM.value)
  else:
    tokens = sample.generate(params, config.model, prefix, _LENGTH.value, seed=_SEED.value,
                             num_samples=_NUM_SAMPLES.value, temperature=_TEMPERATURE.value,
                             top_k=_TOP_K.value, top_p=_TOP_P.value)
  print(f"step {step}: {len(tokens)} x {_LENGTH.value} tokens in "
        f"{time.perf_counter() - start:.2f} s", file=sys.stderr)
  if _BEAM.value:
    print("log-probabilities of the continuations (nats), best first: "
          + ", ".join(f"{float(x):.3f}" for x in log_probs), file=sys.stderr)
  print("\n\n".join(vocab.decode(row) for row in tokens.tolist()))


if __name__ == "__main__":
  cli.run(main)
