"""Trains a jaxrnn model and prints the final validation figures as one JSON line on stdout.

  python scripts/train.py --config configs/lstm.py --workdir runs/lstm \
      --config.model.hidden_size=512 --config.train.steps=2000

Progress goes to stderr, every logged row to <workdir>/metrics.jsonl. Run the same command
again on the same workdir to resume from its latest checkpoint; SIGTERM or Ctrl-C saves one.
"""

import pathlib
import sys

from jaxrnn import cli

cli.restart_with_huge_pages(__file__)  # first: glibc reads its tunables at process start

from absl import app, flags, logging  # noqa: E402  (after the restart: jax loads once)

from jaxrnn import metrics, parallel, train  # noqa: E402

_DEFAULT = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "default.py")
_CONFIG = cli.define_config(_DEFAULT)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, config and vocabulary.",
                               required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process' index in [0, num_processes).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if result.get("preempted"):
    print(f"preempted at step {result['step']}: checkpoint saved; run the same command to resume",
          file=sys.stderr)
    return
  if parallel.devices().is_main:
    print(metrics.dumps(result))


if __name__ == "__main__":
  cli.run(main)
