"""Tasks: what the generic trainer asks of a problem (loss, evaluation, predictions).

A task reads the model's raw outputs and a batch (a dict of arrays, keys as in
`zoo.data.pipeline`); it never calls the model. The trainer jits everything it calls, so
task methods are pure jax.numpy on static shapes.

    loss(outputs, batch) -> (scalar loss, {name: scalar metric})
    eval_sums(outputs, batch) -> pytree of totals, added up over every batch of a split
    summarize(sums) -> {name: float}, computed once from the split's totals
    predict(outputs) -> what predict.py draws

A task whose summary is not additive (detection AP) sets `eval_concatenates = True`: the
trainer then concatenates every batch's `eval_sums` over the split (NumPy, on the host) and
hands that to `summarize`. It may also define `compact_eval_outputs(host_outputs) -> outputs`,
applied to each batch on the host before concatenation, to keep the split's outputs small
(e.g. masks as run-length codes: a split of full-image masks would not fit in memory).
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


class MultiLabelClassification:
  """Which classes appear in the image: one sigmoid per class, binary cross-entropy.

  Targets are the multi-hot set of the valid objects' labels (a digit canvas holds several
  digits). Evaluation over a split: exact-set accuracy (every class decided right at 0.5),
  per-decision accuracy, and micro precision/recall/F1.
  """

  features = ("image", "labels", "objects_valid")

  def __init__(self, num_classes: int):
    self.num_classes = num_classes

  def _targets(self, batch):
    """(B, num_classes) float32 multi-hot."""
    hot = jax.nn.one_hot(batch["labels"], self.num_classes) * batch["objects_valid"][..., None]
    return jnp.max(hot, axis=1)

  def loss(self, logits, batch):
    """Mean binary cross-entropy. logits: (B, num_classes); batch: labels (B, M), objects_valid (B, M)."""
    targets = self._targets(batch)
    logits = logits.astype(jnp.float32)
    loss = optax.sigmoid_binary_cross_entropy(logits, targets).mean()
    exact = jnp.all((logits > 0) == (targets > 0.5), axis=-1).mean()
    return loss, {"loss": loss, "exact_accuracy": exact}

  def eval_sums(self, logits, batch):
    valid = batch.get("example_valid", jnp.ones(logits.shape[:1], bool))
    predicted, targets = logits > 0, self._targets(batch) > 0.5
    count = lambda x: jnp.sum(x * valid[:, None])
    return {"examples": valid.sum(), "exact": jnp.sum(jnp.all(predicted == targets, -1) & valid),
            "correct": count(predicted == targets), "tp": count(predicted & targets),
            "fp": count(predicted & ~targets), "fn": count(~predicted & targets)}

  def summarize(self, sums) -> dict:
    sums = {k: float(v) for k, v in sums.items()}
    examples = max(sums["examples"], 1.0)
    precision = sums["tp"] / max(sums["tp"] + sums["fp"], 1.0)
    recall = sums["tp"] / max(sums["tp"] + sums["fn"], 1.0)
    return {"exact_accuracy": sums["exact"] / examples,
            "decision_accuracy": sums["correct"] / (examples * self.num_classes),
            "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / max(precision + recall, 1e-12)}

  def predict(self, logits):
    return logits > 0


def _detection(**kwargs):
  from zoo.detection.task import Detection  # imports the detector's code only when asked for
  return Detection(**kwargs)


TASKS = {"semantic_segmentation": SemanticSegmentation,
         "multi_label_classification": MultiLabelClassification,
         "detection": _detection}


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
