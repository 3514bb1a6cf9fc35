"""Trains a jaxrnn model and prints the final validation figures as one JSON line on stdout.

  python scripts/train.py --config configs/lstm.py --workdir runs/lstm \
      --config.model.hidden_size=512 --config.train.steps=2000

Progress goes to stderr, every logged row to <workdir>/metrics.jsonl. Run the same command
again on the same workdir to resume from its latest checkpoint; SIGTERM or Ctrl-C saves one.
"""

import json
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxrnn import UserError, train

_DEFAULT = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "default.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, config and vocabulary.",
                               required=True)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  try:
    result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if result.get("preempted"):
    print(f"preempted at step {result['step']}: checkpoint saved; run the same command to resume",
          file=sys.stderr)
    return
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
