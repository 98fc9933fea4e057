"""Tasks: what the generic trainer asks of a problem (loss, evaluation, predictions).

A task reads the model's raw outputs and a batch (a dict of arrays, keys as in
`zoo.data.pipeline`); it never calls the model. The trainer jits everything it calls, so
task methods are pure jax.numpy on static shapes.

    loss(outputs, batch) -> (scalar loss, {name: scalar metric})
    eval_sums(outputs, batch) -> pytree of totals, added up over every batch of a split
    summarize(sums) -> {name: float}, computed once from the split's totals
    predict(outputs) -> what predict.py draws
"""

from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zoo import metrics as zoo_metrics
from zoo.data import IGNORE_LABEL
from zoo.layers import center_crop


class Task(Protocol):
  features: tuple[str, ...]  # The batch keys the task (and the model input) need.

  def loss(self, outputs, batch) -> tuple[jax.Array, dict]: ...
  def eval_sums(self, outputs, batch): ...
  def summarize(self, sums) -> dict: ...
  def predict(self, outputs): ...


class SemanticSegmentation:
  """Per-pixel softmax cross-entropy; evaluation by mIoU over a whole split.

  A model whose output is smaller than its input (U-Net with VALID padding) is compared
  with the centre of the target, the region its output pixels are centred on.
  """

  features = ("image", "segmentation")

  def __init__(self, num_classes: int, ignore_label: int = IGNORE_LABEL):
    self.num_classes = num_classes
    self.ignore_label = ignore_label

  def _targets(self, logits, batch):
    return center_crop(batch["segmentation"], logits.shape[1:3])

  def loss(self, logits, batch):
    """Mean cross-entropy over the pixels whose target is not `ignore_label`.

    Args:
      logits: (B, h, w, num_classes) float.
      batch: `segmentation` (B, H, W) int32 with H >= h, W >= w.
    """
    targets = self._targets(logits, batch)
    counted = targets != self.ignore_label
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.where(counted, targets, 0))
    num_counted = jnp.maximum(counted.sum(), 1)
    loss = jnp.where(counted, per_pixel, 0.0).sum() / num_counted
    accuracy = ((jnp.argmax(logits, -1) == targets) & counted).sum() / num_counted
    return loss, {"loss": loss, "pixel_accuracy": accuracy}

  def eval_sums(self, logits, batch):
    """The (C, C) confusion matrix of this batch (padded examples carry the ignore label)."""
    return zoo_metrics.confusion_matrix(
        jnp.argmax(logits, -1), self._targets(logits, batch),
        num_classes=self.num_classes, ignore_label=self.ignore_label)

  def summarize(self, confusion) -> dict:
    result = zoo_metrics.mean_iou(confusion)
    summary = {"miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"]}
    summary.update({f"iou/{c}": float(v) for c, v in enumerate(result["iou"])})
    return summary

  def predict(self, logits):
    return jnp.argmax(logits, -1)


TASKS = {"semantic_segmentation": SemanticSegmentation}


def create_task(task_config) -> Task:
  """Builds the task named by `task_config.name` with the config's other fields."""
  name = task_config.name
  if name not in TASKS:
    raise ValueError(f"Unknown task.name {name!r}; choose one of {', '.join(sorted(TASKS))}.")
  kwargs = {k: v for k, v in task_config.items() if k != "name"}
  try:
    return TASKS[name](**kwargs)
  except TypeError as e:
    raise ValueError(f"Bad task config {task_config.to_dict()}: {e}") from None
