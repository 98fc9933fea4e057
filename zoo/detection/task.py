"""Object detection and instance segmentation as a trainer task (Faster / Mask R-CNN).

Losses are detectron2's defaults, from the targets the model sampled (zoo.detection.rcnn):
- RPN (when the outputs have one; Fast R-CNN has none): binary cross-entropy of the sampled
  anchors' objectness, and L1 (smooth L1 with beta 0) of the positive anchors' deltas, both
  summed and divided by rpn_batch_size_per_image x B;
- box head: softmax cross-entropy over the sampled RoIs (mean), L1 of the positive RoIs'
  gt-class deltas summed and divided by the number of sampled RoIs;
- mask head: per-pixel binary cross-entropy of the positive RoIs' gt-class masks (mean).

Evaluation collects every image's detections (a ConcatenatingEvaluator joins them over the
split) and computes COCO's box AP (and mask AP with masks) on them with
`zoo.metrics`. Category ids are the dataset labels + 1 (0 is the model's background). Masks
leave the device pasted and thresholded, (B, D, H, W) per batch, and are kept on the host as
COCO run-length codes of the valid detections and objects only (`compact`), so a
split's masks take about what its COCO result file would (COCO val at 800 x 800 as dense
masks would be 5000 x 100 x 800 x 800 bytes).

`proposals` says where a model without an RPN (Fast R-CNN, zoo.detection.fast_rcnn) gets its
regions: "data" = the batch's `proposals` and `proposals_valid` (a proposal file joined to the
data source, or the embedded data's stand-in proposals: `config.data.proposals`), handed to the
model as keyword arguments in training and evaluation; None = the model proposes its own (an RPN).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zoo.detection.roi_heads import paste_masks
from zoo import visualization
from zoo.metrics import coco
from zoo.training.task import ConcatenatingEvaluator, Task, register_task


def _l1(x, y, weight):
  # where, not a product: the targets of unmatched slots in an image without objects are
  # encoded against a zero-size box (-inf), and inf * 0 is NaN under jit.
  return jnp.sum(jnp.where(weight, jnp.abs(x - y).sum(-1), 0.0))


@register_task("detection")
class Detection(Task):
  """Faster R-CNN / Mask R-CNN losses and COCO evaluation (module doc).

  The model gets `images` (B, H, W, 3); in training also `targets` {boxes (B, M, 4),
  labels (B, M), objects_valid (B, M), instance_masks (B, M, H, W) with masks}, which it
  samples anchors and RoIs against; with `proposals="data"` also `proposals` (B, P, 4) and
  `proposals_valid` (B, P), in training and evaluation.
  """

  def __init__(self, num_classes: int, masks: bool = False, rpn_batch_size_per_image: int = 256,
               proposals: str | None = None):
    if proposals not in (None, "data"):
      raise ValueError(f"Detection proposals must be None (the model's RPN proposes) or 'data' "
                       f"(the batch's proposals: set config.data.proposals); got {proposals!r}.")
    self.num_classes = num_classes
    self.masks = masks
    self.rpn_batch_size_per_image = rpn_batch_size_per_image
    self.proposals = proposals
    self._targets = ("boxes", "labels", "objects_valid") + (("instance_masks",) if masks else ())

  @property
  def features(self):
    return ("image",) + self._targets + (("proposals", "proposals_valid") if self.proposals else ())

  def model_inputs(self, batch, *, train):
    inputs = {"images": batch["image"]}
    if self.proposals:
      inputs.update(proposals=batch["proposals"], proposals_valid=batch["proposals_valid"])
    if train:
      inputs["targets"] = {k: batch[k] for k in self._targets}
    return inputs

  def loss(self, outputs, batch):
    box = outputs["box"]
    losses = {}
    if "rpn" in outputs:
      rpn = outputs["rpn"]
      normalizer = self.rpn_batch_size_per_image * rpn["logits"].shape[0]
      losses["rpn_objectness"] = jnp.sum(optax.sigmoid_binary_cross_entropy(
          rpn["logits"], rpn["labels"]) * rpn["valid"]) / normalizer
      losses["rpn_box"] = _l1(rpn["deltas"], rpn["target_deltas"], rpn["positive"]) / normalizer
    sampled = jnp.maximum(box["valid"].sum(), 1)
    box_cls = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
        box["class_logits"], box["classes"]) * box["valid"]) / sampled
    box_reg = _l1(box["deltas"], box["target_deltas"], box["positive"]) / sampled
    losses.update(box_cls=box_cls, box_reg=box_reg)
    if self.masks:
      mask = outputs["mask"]
      per_roi = optax.sigmoid_binary_cross_entropy(mask["logits"], mask["targets"]).mean((-2, -1))
      losses["mask"] = jnp.sum(per_roi * mask["valid"]) / jnp.maximum(mask["valid"].sum(), 1)
    total = sum(losses.values())
    return total, dict(losses, loss=total)

  def eval_outputs(self, detections, batch):
    """Per-image detections and ground truth, concatenated over the split by the evaluator."""
    out = {k: detections[k] for k in ("boxes", "scores", "classes", "valid")}
    out["valid"] = out["valid"] & batch["example_valid"][:, None]
    out.update(gt_boxes=batch["boxes"], gt_labels=batch["labels"] + 1,
               gt_valid=batch["objects_valid"] & batch["example_valid"][:, None])
    if self.masks:
      size = batch["image"].shape[1:3]
      out["masks"] = jax.vmap(lambda m, b: paste_masks(m, b, size) >= 0.5)(
          detections["masks"], detections["boxes"])
      out["gt_masks"] = batch["instance_masks"]
    return out

  def compact(self, outputs: dict) -> dict:
    """One batch's eval outputs on the host with the masks as RLE (module doc).

    "masks" (B, D, H, W) and "gt_masks" (B, G, H, W) become object arrays (B, D) / (B, G) of
    COCO RLE dicts (None where not valid); "gt_areas" (B, G) float64 counts the gt pixels.
    """
    if not self.masks:
      return outputs
    out = dict(outputs)
    out["gt_areas"] = np.asarray(outputs["gt_masks"]).sum((-2, -1)).astype(np.float64)
    for key, valid in (("masks", "valid"), ("gt_masks", "gt_valid")):
      masks, keep = np.asarray(outputs[key]), np.asarray(outputs[valid])
      codes = np.full(keep.shape, None, object)
      for i, j in zip(*np.nonzero(keep)):
        codes[i, j] = coco.rle_encode(masks[i, j])
      out[key] = codes
    return out

  def summarize(self, gathered) -> dict:
    g = {k: np.asarray(v) for k, v in gathered.items()}
    if self.masks and g["gt_masks"].dtype != object:   # called without the evaluator's compaction
      g = {k: np.asarray(v) for k, v in self.compact(g).items()}
    gt_areas = g["gt_areas"] if self.masks else None
    result = {f"box_{k}": v for k, v in coco.coco_evaluate_padded(
        g["gt_boxes"], g["gt_labels"], g["gt_valid"], g["boxes"], g["scores"], g["classes"],
        g["valid"], gt_areas=gt_areas).items()}
    if self.masks:
      result.update({f"mask_{k}": v for k, v in self._mask_ap(g).items()})
    return result

  def _mask_ap(self, g) -> dict:
    """COCO mask AP from the masks' RLEs, through the COCO interchange format."""
    images, annotations, detections = [], [], []
    for i in range(g["gt_valid"].shape[0]):
      for j in np.flatnonzero(g["gt_valid"][i]):
        x1, y1, x2, y2 = (float(v) for v in g["gt_boxes"][i, j])
        annotations.append({"id": len(annotations) + 1, "image_id": i, "iscrowd": 0,
                            "category_id": int(g["gt_labels"][i, j]),
                            "segmentation": g["gt_masks"][i, j], "area": float(g["gt_areas"][i, j]),
                            "bbox": [x1, y1, x2 - x1, y2 - y1]})
      for j in np.flatnonzero(g["valid"][i]):
        detections.append({"image_id": i, "category_id": int(g["classes"][i, j]),
                           "score": float(g["scores"][i, j]), "segmentation": g["masks"][i, j]})
      codes = [c for c in (*g["gt_masks"][i], *g["masks"][i]) if c is not None]
      height, width = codes[0]["size"] if codes else (1, 1)
      images.append({"id": i, "height": height, "width": width})
    categories = [{"id": c} for c in range(1, self.num_classes + 1)]
    ground_truth = {"images": images, "annotations": annotations, "categories": categories}
    return coco.coco_evaluate(ground_truth, detections, iou_type="segm")

  def evaluator(self):
    return ConcatenatingEvaluator(self.summarize, self.compact)

  def predictions(self, detections, batch):
    """The detections, with masks pasted into the image (B, D, H, W) float in [0, 1]."""
    if not self.masks:
      return detections
    size = batch["image"].shape[1:3]
    pasted = jax.vmap(lambda m, b: paste_masks(m, b, size))(detections["masks"], detections["boxes"])
    return dict(detections, masks=pasted)

  def draw(self, batch, detections, index, class_names=None):
    """image | ground truth boxes and masks | detections (boxes, class, score, masks), each
    enlarged 4x. `class_names` are indexed by the detector's classes (0 = background)."""
    image = batch["image"][index]
    masks = batch.get("instance_masks")
    truth = visualization.draw_detections(
        image, batch["boxes"][index], batch["labels"][index] + 1, batch["objects_valid"][index],
        masks=None if masks is None else masks[index], class_names=class_names)
    pasted = np.asarray(detections["masks"][index]) >= 0.5 if "masks" in detections else None
    found = visualization.draw_detections(
        image, detections["boxes"][index], detections["classes"][index],
        detections["valid"][index], scores=detections["scores"][index], masks=pasted,
        class_names=class_names)
    return [visualization.enlarge(visualization.to_uint8(image)), truth, found]
