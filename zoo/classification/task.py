"""Multi-label classification as a trainer task: which classes an image holds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zoo import visualization
from zoo.training.task import (SumEvaluator, Task, check_class_count, check_labels,
                               register_task)


@register_task("multi_label_classification")
class MultiLabelClassification(Task):
  """Which classes appear in the image: one sigmoid per class, binary cross-entropy.

  The model gets `images` (B, H, W, 3) and returns logits (B, num_classes). Targets are the
  multi-hot set of the valid objects' labels (a digit canvas holds several digits).
  Evaluation over a split: exact-set accuracy (every class decided right at 0.5),
  per-decision accuracy, and micro precision/recall/F1.
  """

  features = ("image", "labels", "objects_valid")

  def __init__(self, num_classes: int):
    self.num_classes = num_classes

  def model_inputs(self, batch, *, train):
    del train
    return {"images": batch["image"]}

  def check_batch(self, batch):
    """The valid objects' labels must lie in [0, num_classes) (ValueError otherwise)."""
    check_labels(np.asarray(batch["labels"])[np.asarray(batch["objects_valid"], bool)],
                 self.num_classes)

  def targets(self, batch):
    """(B, num_classes) float32 multi-hot."""
    hot = jax.nn.one_hot(batch["labels"], self.num_classes) * batch["objects_valid"][..., None]
    return jnp.max(hot, axis=1)

  def loss(self, logits, batch):
    """Mean binary cross-entropy. logits: (B, num_classes); batch: labels (B, M), objects_valid (B, M)."""
    check_class_count(logits, self.num_classes)
    targets = self.targets(batch)
    logits = logits.astype(jnp.float32)
    loss = optax.sigmoid_binary_cross_entropy(logits, targets).mean()
    exact = jnp.all((logits > 0) == (targets > 0.5), axis=-1).mean()
    return loss, {"loss": loss, "exact_accuracy": exact}

  def eval_outputs(self, logits, batch):
    """This batch's counts of examples, exact sets, right decisions, tp, fp and fn."""
    check_class_count(logits, self.num_classes)
    valid = batch.get("example_valid", jnp.ones(logits.shape[:1], bool))
    predicted, targets = logits > 0, self.targets(batch) > 0.5
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

  def evaluator(self):
    return SumEvaluator(self.summarize)

  def predictions(self, logits, batch):
    del batch
    return logits > 0

  def draw(self, batch, predictions, index, class_names=None):
    """The image enlarged 4x with a strip below: true classes (top row) and predicted
    classes (bottom row), one cell per class, coloured where present; then a legend naming
    the colours of the classes present or predicted. `class_names` are indexed as the
    segmentation and detection classes of the same data (0 = background): class c is
    `class_names[c + 1]`, drawn in palette colour c + 1."""
    image = visualization.enlarge(visualization.to_uint8(batch["image"][index]))
    truth = np.asarray(jax.device_get(self.targets(batch)))[index] > 0.5
    predicted = np.asarray(predictions)[index]
    cell = image.shape[1] // self.num_classes
    strip = np.full((2 * cell, image.shape[1], 3), 255, np.uint8)
    palette = visualization.SEGMENTATION_PALETTE
    colours = [palette[(c + 1) % len(palette)] for c in range(self.num_classes)]
    for c in range(self.num_classes):
      for row, present in enumerate((truth[c], predicted[c])):
        if present:
          strip[row * cell:(row + 1) * cell - 1, c * cell:(c + 1) * cell - 1] = colours[c]
    panel = np.concatenate([image, strip], axis=0)
    entries = [(visualization.class_name(c + 1, class_names), colours[c])
               for c in np.flatnonzero(truth | predicted)]
    return [panel, visualization.legend(entries, height=panel.shape[0])]
