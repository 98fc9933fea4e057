"""The two-stage detectors' losses, detectron2's defaults, from the outputs a detector returns in
training (each stage's raw predictions with the targets it sampled: zoo.detection.rpn,
zoo.detection.roi_heads). Evaluation is zoo.detection.task's.

- RPN (`rpn_losses`; Fast R-CNN has none): binary cross-entropy of the sampled anchors'
  objectness, and L1 (smooth L1 with beta 0) of the positive anchors' deltas, both summed and
  divided by the anchors sampled, batch_size_per_image x B (detectron2's `RPN.losses`);
- box head (`box_losses`): softmax cross-entropy over the sampled RoIs (mean), L1 of the
  positive RoIs' gt-class deltas summed and divided by the number of sampled RoIs
  (detectron2's `FastRCNNOutputLayers.losses`);
- mask head (`mask_loss`): per-pixel binary cross-entropy of the positive RoIs' gt-class masks,
  mean over pixels and positives (detectron2's `mask_rcnn_loss`).
"""

import jax
import jax.numpy as jnp
import optax


def _l1(x, y, weight):
  # where, not a product: the targets of unmatched slots in an image without objects are
  # encoded against a zero-size box (-inf), and inf * 0 is NaN under jit.
  return jnp.sum(jnp.where(weight, jnp.abs(x - y).sum(-1), 0.0))


def rpn_losses(rpn: dict) -> dict:
  """{"rpn_objectness", "rpn_box"} from the RPN's training outputs: logits, labels, valid,
  positive (B, S), deltas and target_deltas (B, S, 4), S = batch_size_per_image."""
  normalizer = rpn["logits"].shape[0] * rpn["logits"].shape[1]
  objectness = jnp.sum(optax.sigmoid_binary_cross_entropy(rpn["logits"], rpn["labels"])
                       * rpn["valid"]) / normalizer
  return {"rpn_objectness": objectness,
          "rpn_box": _l1(rpn["deltas"], rpn["target_deltas"], rpn["positive"]) / normalizer}


def box_losses(box: dict) -> dict:
  """{"box_cls", "box_reg"} from the box head's training outputs: class_logits (B, S, C+1),
  classes, valid, positive (B, S), deltas (of the gt class) and target_deltas (B, S, 4)."""
  sampled = jnp.maximum(box["valid"].sum(), 1)
  box_cls = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
      box["class_logits"], box["classes"]) * box["valid"]) / sampled
  return {"box_cls": box_cls,
          "box_reg": _l1(box["deltas"], box["target_deltas"], box["positive"]) / sampled}


def mask_loss(mask: dict) -> jax.Array:
  """The mask head's loss from its training outputs: logits and targets (B, S_m, M, M) (of the
  gt class), valid (B, S_m) (the positives)."""
  per_roi = optax.sigmoid_binary_cross_entropy(mask["logits"], mask["targets"]).mean((-2, -1))
  return jnp.sum(per_roi * mask["valid"]) / jnp.maximum(mask["valid"].sum(), 1)


def detection_losses(outputs: dict) -> dict:
  """Every stage's losses of a detector's training outputs ("rpn", "box", "mask" where present):
  {"rpn_objectness", "rpn_box", "box_cls", "box_reg", "mask"}; the total is their sum."""
  losses = {}
  if "rpn" in outputs:
    losses.update(rpn_losses(outputs["rpn"]))
  losses.update(box_losses(outputs["box"]))
  if "mask" in outputs:
    losses["mask"] = mask_loss(outputs["mask"])
  return losses
