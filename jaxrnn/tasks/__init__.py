"""Tasks: what the one training loop in `train.py` can learn, one module each.

A task module is the whole of its task, so a new task is one module and one line in TASKS
(looked up by `config.task`, as big_vision looks models up by name). Each provides:

  UNIT, FINAL_SPLITS              what `size` counts; the splits evaluated after the last step
  prepare_data(config, vocab=None) -> (vocab, splits)   every split encoded
  size(split) -> int              what an encoded split holds to learn from or evaluate
  init(key, model_config, vocab_size) -> params
  initial_carry(model_config, b) -> carry               the state carried across batches
  loss(params, carry, batch, model_config, rng: model.Rngs) -> (mean loss, carry)
  train_batches(train_split, config, position)          iterator of (reset, batch), `.position`
  make_evaluator(config, devs=None) -> evaluate(params, split) -> {figure: value}
  summary(split, figures) -> {result key: value}        the final stdout JSON's keys
  chance_loss(config, vocab_size) -> float              a uniform guess' loss (`guard.py`)
"""

from types import ModuleType

from jaxrnn.tasks import classify, lm

TASKS: dict[str, ModuleType] = {"lm": lm, "classify": classify}


def get(name: str) -> ModuleType:
  """The task module registered as `name` (`config.validate` has checked it exists)."""
  return TASKS[name]
