"""Semantic-segmentation metrics: a confusion matrix accumulated over a whole split, and mIoU.

Accumulate `confusion_matrix` over every batch of a split (it is jit-able and sums across a
sharded batch), then call `mean_iou` once on the total: averaging per-batch IoUs instead
would weight small batches and rare classes wrongly.
"""

import jax.numpy as jnp
import numpy as np


def confusion_matrix(predictions, targets, *, num_classes: int, ignore_label: int | None = 255):
  """Counts (target, prediction) pairs over all pixels.

  Args:
    predictions: (...,) integer class ids in [0, num_classes) or `ignore_label`.
    targets: (...,) integer class ids of the same shape, likewise.
    num_classes: C.
    ignore_label: pixels where the target OR the prediction equals it are not counted
      (a padded evaluation example carries it in its target; a model that abstains, e.g.
      after CRF post-processing with a void label, carries it in its prediction). Any other
      id outside [0, C) is not counted either.

  Returns:
    (C, C) int32 counts; entry [t, p] is the number of pixels of target class t predicted p.
  """
  if predictions.shape != targets.shape:
    raise ValueError(f"predictions {predictions.shape} and targets {targets.shape} must have "
                     "the same shape: crop or resize the logits to the target size first.")
  predictions = jnp.asarray(predictions, jnp.int32).reshape(-1)
  targets = jnp.asarray(targets, jnp.int32).reshape(-1)
  counted = (targets >= 0) & (targets < num_classes) & (predictions >= 0) & (predictions < num_classes)
  if ignore_label is not None:
    counted &= (targets != ignore_label) & (predictions != ignore_label)
  pair = jnp.where(counted, targets * num_classes + predictions, 0)
  counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[pair].add(counted.astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def mean_iou(confusion) -> dict:
  """IoU per class, their mean, and pixel accuracy from a summed confusion matrix.

  Args:
    confusion: (C, C) counts, [target, prediction], as from `confusion_matrix`.

  Returns:
    dict with `iou` (C,) float64 (NaN for a class absent from both targets and predictions),
    `miou` the mean over the classes that are present (NaN if none), and `pixel_accuracy`.
  """
  confusion = np.asarray(confusion, np.float64)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f"confusion must be a square (C, C) matrix, got shape {confusion.shape}.")
  true_positive = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - true_positive
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, true_positive / union, np.nan)
  present = ~np.isnan(iou)
  total = confusion.sum()
  return {
      "iou": iou,
      "miou": float(iou[present].mean()) if present.any() else float("nan"),
      "pixel_accuracy": float(true_positive.sum() / total) if total > 0 else float("nan"),
  }
