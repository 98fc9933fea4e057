"""Semantic segmentation as a trainer task: per-pixel cross-entropy, mIoU over a split."""

import jax.numpy as jnp
import numpy as np
import optax

from zoo import metrics as zoo_metrics
from zoo import visualization
from zoo.data.labels import IGNORE_LABEL
from zoo.layers import center_crop
from zoo.training.task import (SumEvaluator, Task, check_class_count, check_labels,
                               register_task)


@register_task("semantic_segmentation")
class SemanticSegmentation(Task):
  """Per-pixel softmax cross-entropy; evaluation by mIoU over a whole split.

  The model gets `images` (B, H, W, 3) and returns logits (B, h, w, num_classes). A model
  whose output is smaller than its input (U-Net with VALID padding) is compared with the
  centre of the target, the region its output pixels are centred on. A model with a CRF
  outputs log-probabilities, which serve as logits unchanged.

  Args:
    num_classes: the model's number of classes; labels must lie in [0, num_classes) or be
      `ignore_label`.
    ignore_label: the label of pixels that count in neither loss nor evaluation.
    key: the batch key holding the (B, H, W) int32 labels.
  """

  def __init__(self, num_classes: int, ignore_label: int = IGNORE_LABEL,
               key: str = "segmentation"):
    self.num_classes = num_classes
    self.ignore_label = ignore_label
    self.key = key

  @property
  def features(self):
    return ("image", self.key)

  def model_inputs(self, batch, *, train):
    del train
    return {"images": batch["image"]}

  def check_batch(self, batch):
    """Labels must lie in [0, num_classes) or be `ignore_label` (ValueError otherwise)."""
    labels = np.asarray(batch[self.key])
    check_labels(labels[labels != self.ignore_label], self.num_classes,
                 what=f"{self.key} labels (ignore label {self.ignore_label} aside)")

  def _targets(self, logits, batch):
    check_class_count(logits, self.num_classes)
    return center_crop(batch[self.key], logits.shape[1:3])

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

  def eval_outputs(self, logits, batch):
    """The (C, C) confusion matrix of this batch (padded examples carry the ignore label)."""
    return zoo_metrics.confusion_matrix(
        jnp.argmax(logits, -1), self._targets(logits, batch),
        num_classes=self.num_classes, ignore_label=self.ignore_label)

  def summarize(self, confusion) -> dict:
    """mIoU, pixel accuracy and per-class IoU of a split's summed confusion matrix."""
    result = zoo_metrics.mean_iou(confusion)
    summary = {"miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"]}
    summary.update({f"iou/{c}": float(v) for c, v in enumerate(result["iou"])})
    return summary

  def evaluator(self):
    return SumEvaluator(self.summarize)

  def predictions(self, logits, batch):
    del batch
    return jnp.argmax(logits, -1)

  def draw(self, batch, predictions, index, class_names=None):
    """image | ground truth | prediction, enlarged 4x (a VALID-padding model predicts only
    the centre: the uncovered border is drawn grey) | a legend naming the colours of the
    classes drawn (those in the ground truth or the prediction; class 0 is left uncoloured)."""
    image, target = batch["image"][index], batch[self.key][index]
    prediction = visualization.pad_to_center(np.asarray(predictions)[index], target.shape)
    panels = [visualization.to_uint8(image), visualization.overlay(image, target),
              visualization.overlay(image, prediction)]
    panels = [visualization.enlarge(p) for p in panels]
    drawn = np.union1d(np.unique(target), np.unique(prediction))
    drawn = drawn[(drawn > 0) & (drawn != self.ignore_label)]
    entries = [(visualization.class_name(c, class_names), colour)
               for c, colour in zip(drawn, visualization.colorize(drawn))]
    return panels + [visualization.legend(entries, height=panels[0].shape[0])]
