"""MultiLabelClassification: multi-hot targets from the valid objects, loss, split summary."""

import jax.numpy as jnp
import numpy as np
import pytest

from zoo.classification.task import MultiLabelClassification
from zoo.training.task import create_task


def test_multi_label_targets_loss_and_summary_by_hand():
  task = MultiLabelClassification(num_classes=4)
  batch = {"labels": jnp.array([[1, 3, 3, 0], [2, 0, 0, 0]]),
           "objects_valid": jnp.array([[True, True, True, False], [True, False, False, False]]),
           "example_valid": jnp.array([True, True])}
  np.testing.assert_array_equal(task.targets(batch), [[0, 1, 0, 1], [0, 0, 1, 0]])
  logits = jnp.array([[-2.0, 3.0, -1.0, 1.0],    # exactly right
                      [1.0, -1.0, -1.0, -1.0]])  # one false positive, one false negative
  loss, metrics = task.loss(logits, batch)
  targets = np.array([[0, 1, 0, 1], [0, 0, 1, 0]], np.float64)
  x = np.asarray(logits, np.float64)
  expected = np.mean(np.maximum(x, 0) - x * targets + np.log1p(np.exp(-np.abs(x))))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert metrics["exact_accuracy"] == pytest.approx(0.5)
  evaluator = task.evaluator()
  half = {k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}
  for part, part_logits in zip(half, (logits[:1], logits[1:])):  # a split of two batches
    evaluator.update(task.eval_outputs(part_logits, part), part)
  summary = evaluator.result()
  assert summary["exact_accuracy"] == pytest.approx(0.5)
  assert summary["decision_accuracy"] == pytest.approx(6 / 8)
  assert summary["precision"] == pytest.approx(2 / 3)
  assert summary["recall"] == pytest.approx(2 / 3)


def test_padding_examples_do_not_count():
  task = MultiLabelClassification(num_classes=3)
  batch = {"labels": jnp.array([[0], [1]]), "objects_valid": jnp.array([[True], [False]]),
           "example_valid": jnp.array([True, False])}
  sums = task.eval_outputs(jnp.array([[5.0, -5.0, -5.0], [5.0, 5.0, 5.0]]), batch)
  assert float(sums["examples"]) == 1 and float(sums["fp"]) == 0


def test_create_task_by_name():
  from ml_collections import ConfigDict
  task = create_task(ConfigDict(dict(name="multi_label_classification", num_classes=10)))
  assert isinstance(task, MultiLabelClassification) and task.num_classes == 10
