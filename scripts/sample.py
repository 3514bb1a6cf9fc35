"""Samples text from a saved run: the prefix, then generated characters, on stdout.

  python scripts/sample.py --workdir runs/lstm --prefix "ROMEO:" --length 500 --temperature 0.8

Samples are separated by a blank line; everything else goes to stderr.
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
_STEP = flags.DEFINE_string("step", "latest", "Checkpoint: a step number, 'best' or 'latest'.")


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  config, vocab, params, step = checkpoint.load_run(_WORKDIR.value, _STEP.value)
  if config.task != "lm":
    raise UserError(f"{_WORKDIR.value} holds a {config.task} run: sampling needs a language model")
  if unknown := vocab.unknown(_PREFIX.value):
    print(f"warning: the prefix has symbols outside the run's vocabulary, read as {data.UNK}: "
          f"{', '.join(map(repr, unknown))}", file=sys.stderr)
  start = time.perf_counter()
  tokens = sample.generate(params, config.model, vocab.encode(_PREFIX.value), _LENGTH.value,
                           seed=_SEED.value, num_samples=_NUM_SAMPLES.value,
                           temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                           top_p=_TOP_P.value)
  texts = [vocab.decode(row) for row in tokens.tolist()]
  print(f"step {step}: {_NUM_SAMPLES.value} x {_LENGTH.value} tokens in "
        f"{time.perf_counter() - start:.2f} s", file=sys.stderr)
  print("\n\n".join(texts))


if __name__ == "__main__":
  cli.run(main)
