"""Object detection and instance segmentation as a trainer task (Faster / Mask R-CNN).

The loss is the sum of every stage's losses (detectron2's defaults, zoo.detection.losses), from
the targets the model sampled in training (zoo.detection.rpn, zoo.detection.roi_heads).

Evaluation collects every image's detections (a ConcatenatingEvaluator joins them over the
split) and scores them as the benchmark named by `evaluation` does, with `zoo.metrics`:
- "coco": COCO's 12 box numbers (and mask numbers with masks), exactly as pycocotools'
  COCOeval. The source's ignored objects (COCO's crowd regions) are iscrowd regions: a
  detection matched to one (IoU = intersection / the detection's area) is neither a true nor
  a false positive. The small / medium / large ranges read the objects' annotated areas in
  original-image pixels (`areas`; where the source has none, the boxes' or, with masks, the
  masks' areas), and a detection's area is its box's, in original-image pixels
  (`image_scale`), as in detectron2's result files (boxes with the masks).
- "voc2007" / "voc": PASCAL VOC's per-class box AP at IoU > 0.5 and their mean, as the devkit
  (and detectron2's `voc_eval`) computes it: 11-point interpolated (VOC2007 test) or the area
  under the precision envelope (VOC2010 and later). The ignored objects (VOC's difficult ones)
  count neither for recall nor, when a detection's best match, as a true or false positive.
  Boxes are pixel edges (the source's conversion of the devkit's 1-based inclusive indices),
  so a width is x2 - x1, the devkit's xmax - xmin + 1.
Category ids are the dataset labels + 1 (0 is the model's background). Masks
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

from zoo import visualization
from zoo.detection.losses import detection_losses
from zoo.detection.roi_heads import paste_masks
from zoo.metrics import coco
from zoo.training.task import ConcatenatingEvaluator, Task, check_labels, register_task


def _completed(outputs: dict) -> dict:
  """`outputs` with the ground-truth fields a caller may leave out (`Detection.summarize`)."""
  valid = np.asarray(outputs["gt_valid"])
  defaults = {"gt_ignored": np.zeros(valid.shape, bool), "gt_areas": np.full(valid.shape, -1.0),
              "image_scale": np.ones((valid.shape[0], 2))}
  return {**defaults, **outputs}


@register_task("detection")
class Detection(Task):
  """Faster R-CNN / Mask R-CNN losses and COCO or VOC evaluation (module doc).

  The model gets `images` (B, H, W, 3); in training also `targets` {boxes (B, M, 4),
  labels (B, M), objects_valid (B, M), instance_masks (B, M, H, W) with masks}, which it
  samples anchors and RoIs against; with `proposals="data"` also `proposals` (B, P, 4) and
  `proposals_valid` (B, P), in training and evaluation.
  """

  def __init__(self, num_classes: int, masks: bool = False,
               proposals: str | None = None, evaluation: str = "coco"):
    if evaluation not in ("coco", "voc2007", "voc"):
      raise ValueError(f"Detection evaluation must be 'coco' (COCO AP), 'voc2007' (VOC2007's "
                       f"11-point AP) or 'voc' (VOC2010+'s area AP); got {evaluation!r}.")
    if masks and evaluation != "coco":
      raise ValueError(f"evaluation={evaluation!r} scores boxes only; with masks=True use "
                       "evaluation='coco' (or set masks=False).")
    if proposals not in (None, "data"):
      raise ValueError(f"Detection proposals must be None (the model's RPN proposes) or 'data' "
                       f"(the batch's proposals: set config.data.proposals); got {proposals!r}.")
    self.num_classes = num_classes
    self.masks = masks
    self.proposals = proposals
    self.evaluation = evaluation
    self._targets = ("boxes", "labels", "objects_valid") + (("instance_masks",) if masks else ())
    # What the evaluation reads besides the targets (zoo.data.features).
    self._evaluated = ("ignored_boxes", "ignored_labels", "ignored_valid", "areas",
                       "image_scale") + (("ignored_masks",) if masks else ())

  @property
  def features(self):
    proposals = ("proposals", "proposals_valid") if self.proposals else ()
    return ("image",) + self._targets + proposals

  @property
  def eval_features(self):
    return self._evaluated

  def check_batch(self, batch):
    """The valid objects' labels must lie in [0, num_classes): the detector's classes are the
    labels + 1, class 0 being the background (ValueError otherwise)."""
    check_labels(np.asarray(batch["labels"])[np.asarray(batch["objects_valid"], bool)],
                 self.num_classes)

  def model_inputs(self, batch, *, train):
    inputs = {"images": batch["image"]}
    if self.proposals:
      inputs.update(proposals=batch["proposals"], proposals_valid=batch["proposals_valid"])
    if train:
      inputs["targets"] = {k: batch[k] for k in self._targets}
    return inputs

  def loss(self, outputs, batch):
    """The sum of every stage's losses (zoo.detection.losses), each also a metric."""
    del batch  # the model sampled its targets from it
    losses = detection_losses(outputs)
    total = sum(losses.values())
    return total, dict(losses, loss=total)

  def eval_outputs(self, detections, batch):
    """Per-image detections and ground truth, concatenated over the split by the evaluator.

    The ground truth is the objects, then the ignored objects (B, 2M): "gt_boxes",
    "gt_labels" (class ids), "gt_valid", "gt_ignored" (bool), "gt_areas" (original-image
    pixels, -1 where unknown), "gt_masks" with masks; "image_scale" (B, 2) (y, x).
    """
    out = {k: detections[k] for k in ("boxes", "scores", "classes", "valid")}
    example_valid = batch["example_valid"][:, None]
    out["valid"] = out["valid"] & example_valid
    ignored = batch["ignored_valid"]
    both = lambda objects, others: jnp.concatenate([objects, others], axis=1)
    out.update(gt_boxes=both(batch["boxes"], batch["ignored_boxes"]),
               gt_labels=both(batch["labels"], batch["ignored_labels"]) + 1,
               gt_valid=both(batch["objects_valid"], ignored) & example_valid,
               gt_ignored=both(jnp.zeros_like(ignored), ignored),
               gt_areas=both(batch["areas"], jnp.full(ignored.shape, -1.0, batch["areas"].dtype)),
               image_scale=batch["image_scale"])
    if self.masks:
      size = batch["image"].shape[1:3]
      out["masks"] = jax.vmap(lambda m, b: paste_masks(m, b, size) >= 0.5)(
          detections["masks"], detections["boxes"])
      out["gt_masks"] = both(batch["instance_masks"], batch["ignored_masks"])
    return out

  def compact(self, outputs: dict) -> dict:
    """One batch's eval outputs on the host with the masks as RLE (module doc).

    "masks" (B, D, H, W) and "gt_masks" (B, G, H, W) become object arrays (B, D) / (B, G) of
    COCO RLE dicts (None where not valid); unknown "gt_areas" (B, G) become the gt masks'
    pixel counts in original-image pixels.
    """
    if not self.masks:
      return outputs
    out = _completed(outputs)
    scale = np.prod(out["image_scale"].astype(np.float64), axis=-1)[:, None]
    counts = np.asarray(outputs["gt_masks"]).sum((-2, -1)) / scale
    out["gt_areas"] = np.where(out["gt_areas"] >= 0, out["gt_areas"], counts)
    for key, valid in (("masks", "valid"), ("gt_masks", "gt_valid")):
      masks, keep = np.asarray(outputs[key]), np.asarray(outputs[valid])
      codes = np.full(keep.shape, None, object)
      for i, j in zip(*np.nonzero(keep)):
        codes[i, j] = coco.rle_encode(masks[i, j])
      out[key] = codes
    return out

  def summarize(self, gathered) -> dict:
    """The split's numbers (module doc) from `eval_outputs` concatenated over it; "gt_ignored",
    "gt_areas" and "image_scale" may be left out (no ignored objects, areas unknown, scale 1).

    Returns:
      "coco": {"box_AP", ..., "box_ARl"} (COCO's 12) and with masks {"mask_AP", ...};
      "voc2007" / "voc": {"box_mAP"} and {"box_AP/<class id>"} per class with ground truth.
    """
    g = _completed({k: np.asarray(v) for k, v in gathered.items()})
    if self.masks and g["gt_masks"].dtype != object:   # called without the evaluator's compaction
      g = {k: np.asarray(v) for k, v in self.compact(g).items()}
    # Boxes in original-image pixels: IoUs do not change, areas become the annotations'.
    scale_y, scale_x = np.moveaxis(g["image_scale"].astype(np.float64), -1, 0)
    per_box = np.stack([scale_x, scale_y, scale_x, scale_y], -1)[:, None]
    g["gt_boxes"], g["boxes"] = g["gt_boxes"] / per_box, g["boxes"] / per_box
    if self.evaluation != "coco":
      return self._voc_ap(g)
    box_areas = np.prod(g["gt_boxes"][..., 2:] - g["gt_boxes"][..., :2], axis=-1)
    gt_areas = np.where(g["gt_areas"] >= 0, g["gt_areas"], box_areas)
    result = {f"box_{k}": v for k, v in coco.coco_evaluate_padded(
        g["gt_boxes"], g["gt_labels"], g["gt_valid"], g["boxes"], g["scores"], g["classes"],
        g["valid"], gt_crowd=g["gt_ignored"], gt_areas=gt_areas).items()}
    if self.masks:
      result.update({f"mask_{k}": v for k, v in self._mask_ap(g).items()})
    return result

  def _voc_ap(self, g) -> dict:
    """VOC AP per class and its mean (module doc), with the ignored objects as difficult."""
    ground_truth = [{"boxes": g["gt_boxes"][i][v], "labels": g["gt_labels"][i][v],
                     "difficult": g["gt_ignored"][i][v]} for i, v in enumerate(g["gt_valid"])]
    detections = [{"boxes": g["boxes"][i][v], "scores": g["scores"][i][v],
                   "labels": g["classes"][i][v]} for i, v in enumerate(g["valid"])]
    voc = coco.voc_evaluate(ground_truth, detections, use_07_metric=self.evaluation == "voc2007",
                            inclusive_pixels=False)
    per_class = {f"box_AP/{c}": ap for c, ap in voc["AP"].items() if not np.isnan(ap)}
    return {"box_mAP": voc["mAP"], **per_class}

  def _mask_ap(self, g) -> dict:
    """COCO mask AP from the masks' RLEs, through the COCO interchange format; detections
    carry their boxes (original-image pixels), which give their areas (COCO's loadRes)."""
    images, annotations, detections = [], [], []
    for i in range(g["gt_valid"].shape[0]):
      for j in np.flatnonzero(g["gt_valid"][i]):
        x1, y1, x2, y2 = (float(v) for v in g["gt_boxes"][i, j])
        annotations.append({"id": len(annotations) + 1, "image_id": i,
                            "iscrowd": int(g["gt_ignored"][i, j]),
                            "category_id": int(g["gt_labels"][i, j]),
                            "segmentation": g["gt_masks"][i, j], "area": float(g["gt_areas"][i, j]),
                            "bbox": [x1, y1, x2 - x1, y2 - y1]})
      for j in np.flatnonzero(g["valid"][i]):
        x1, y1, x2, y2 = (float(v) for v in g["boxes"][i, j])
        detections.append({"image_id": i, "category_id": int(g["classes"][i, j]),
                           "score": float(g["scores"][i, j]), "segmentation": g["masks"][i, j],
                           "bbox": [x1, y1, x2 - x1, y2 - y1]})
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
