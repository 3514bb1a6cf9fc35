"""Tests for jaxrnn.tasks: every registered task brings what the training loop calls."""

import pytest

from jaxrnn import tasks

INTERFACE = ("UNIT", "FINAL_SPLITS", "prepare_data", "size", "init", "initial_carry", "loss",
             "train_batches", "make_evaluator", "summary")


@pytest.mark.parametrize("name", tasks.TASKS)
def test_each_task_module_provides_the_interface(name):
  """The names tasks/__init__.py documents, callables where they are functions."""
  task = tasks.get(name)
  for attr in INTERFACE:
    assert hasattr(task, attr), f"task {name} lacks {attr}"
    assert attr.isupper() or callable(getattr(task, attr)), attr
  assert "val" in task.FINAL_SPLITS and isinstance(task.UNIT, str)
