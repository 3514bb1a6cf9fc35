"""Evaluates a saved run on a whole split and prints one JSON line.

  python scripts/eval.py --workdir runs/lstm --split test --step best

The config and vocabulary come from the checkpoint; --corpus evaluates on another text
(symbols outside the run's vocabulary count as <unk>). A language model reports perplexity,
bpc and tokens; a classifier accuracy and examples; both their loss.
"""


from jaxrnn import cli

cli.restart_with_huge_pages(__file__)  # first: glibc reads its tunables at process start

from absl import flags, logging  # noqa: E402  (after the restart: jax loads once)

from jaxrnn import UserError, checkpoint, config as config_lib, data, metrics, tasks  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir.", required=True)
_SPLIT = flags.DEFINE_enum("split", "val", ["train", "val", "test"], "Split to evaluate.")
_CORPUS = flags.DEFINE_string("corpus", None, "Corpus name or path; default: the run's.")
_STEP = flags.DEFINE_string("step", "latest", "Checkpoint: a step number, 'best' or 'latest'.")


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  config, vocab, params, step = checkpoint.load_run(_WORKDIR.value, _STEP.value)
  if _CORPUS.value:
    config.data.corpus = _CORPUS.value
    config_lib.validate(config, training=False)  # the corpus must suit the run's task
  task = tasks.get(config.task)
  _, splits = task.prepare_data(config, vocab)
  if task.size(splits[_SPLIT.value]) < 1:
    # Only a corpus cut from one text by fractions lacks a split (data.test_frac is 0 unless set).
    split, corpus = _SPLIT.value, config.data.corpus
    val_frac, test_frac = data.fractions(data.CORPORA.get(corpus, data.Corpus(())), config.data)
    files = [name for name, c in data.CORPORA.items() if len(c.sources) == 3]  # train/valid/test
    also = (f", or a --corpus with a {split} file ({', '.join(files)})"
            if config.task == "lm" else "")
    raise UserError(f"the corpus {corpus} has no {split} split: the run cut it into train, val "
                    f"and test by data.val_frac={val_frac} and data.test_frac={test_frac}; "
                    f"evaluate another --split{also}, or a run trained with a {split} fraction "
                    "above 0")
  result = task.make_evaluator(config)(params, splits[_SPLIT.value])
  print(metrics.dumps({"step": step, "split": _SPLIT.value, **result}))


if __name__ == "__main__":
  cli.run(main)
