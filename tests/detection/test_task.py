"""The detection task's evaluation: box and mask AP from padded outputs, masks kept as RLE."""

import jax
import numpy as np
import pytest

from zoo.detection.task import Detection


def random_outputs(rng, b=4, g=3, d=5, size=24, classes=3):
  """Padded eval outputs as Detection.eval_outputs gives them: objects and detections with masks."""
  def boxes_and_masks(n):
    xy = rng.integers(0, size - 6, (b, n, 2))
    wh = rng.integers(3, 10, (b, n, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, size)], -1).astype(np.float32)
    masks = np.zeros((b, n, size, size), bool)
    for i in range(b):
      for j in range(n):
        x1, y1, x2, y2 = boxes[i, j].astype(int)
        masks[i, j, y1:y2, x1:x2] = rng.random((y2 - y1, x2 - x1)) < 0.8
    return boxes, masks

  gt_boxes, gt_masks = boxes_and_masks(g)
  det_boxes, det_masks = boxes_and_masks(d)
  gt_valid = rng.random((b, g)) < 0.8
  gt_valid[0] = False                                  # an image without objects
  valid = rng.random((b, d)) < 0.8
  valid[1] = False                                     # an image without detections
  gt_labels = rng.integers(1, classes + 1, (b, g)).astype(np.int32)
  det_classes = rng.integers(1, classes + 1, (b, d)).astype(np.int32)
  # The first detections of the last two images are copies of their ground truth (noisy boxes,
  # exact masks, right classes), so neither AP can be 0 by chance.
  gt_valid[2:] = valid[2:, :g] = True
  det_boxes[2:, :g] = gt_boxes[2:] + rng.normal(0, 0.3, gt_boxes[2:].shape).astype(np.float32)
  det_masks[2:, :g] = gt_masks[2:]
  det_classes[2:, :g] = gt_labels[2:]
  return {"boxes": det_boxes, "scores": rng.random((b, d)).astype(np.float32),
          "classes": det_classes, "valid": valid, "masks": det_masks, "gt_boxes": gt_boxes,
          "gt_labels": gt_labels, "gt_valid": gt_valid, "gt_masks": gt_masks}


def test_compacted_batches_give_the_summary_of_the_dense_split():
  rng = np.random.default_rng()
  task = Detection(3, masks=True)
  dense = random_outputs(rng)
  halves = [{k: v[s] for k, v in dense.items()} for s in (slice(0, 2), slice(2, 4))]
  compact = [task.compact(h) for h in halves]
  assert compact[0]["masks"].dtype == object and compact[0]["masks"][1, 0] is None
  concatenated = jax.tree.map(lambda *xs: np.concatenate(xs), *compact)   # the trainer's way
  summary = task.summarize(concatenated)
  assert summary == task.summarize(dense)
  assert 0 < summary["mask_AP"] <= 1 and 0 < summary["box_AP"] <= 1


def test_mask_ap_equals_pycocotools():
  mask_utils = pytest.importorskip("pycocotools.mask")
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval

  rng = np.random.default_rng()
  task = Detection(3, masks=True)
  g = random_outputs(rng)
  summary = task.summarize(task.compact(g))

  def rle(mask):
    code = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    code["counts"] = code["counts"].decode()
    return code

  b, size = g["gt_valid"].shape[0], g["gt_masks"].shape[-1]
  images = [{"id": i, "height": size, "width": size} for i in range(b)]
  annotations, detections = [], []
  for i, j in zip(*np.nonzero(g["gt_valid"])):
    x1, y1, x2, y2 = (float(v) for v in g["gt_boxes"][i, j])
    annotations.append({"id": len(annotations) + 1, "image_id": int(i), "iscrowd": 0,
                        "category_id": int(g["gt_labels"][i, j]), "segmentation": rle(g["gt_masks"][i, j]),
                        "area": float(g["gt_masks"][i, j].sum()), "bbox": [x1, y1, x2 - x1, y2 - y1]})
  for i, j in zip(*np.nonzero(g["valid"])):
    detections.append({"image_id": int(i), "category_id": int(g["classes"][i, j]),
                       "score": float(g["scores"][i, j]), "segmentation": rle(g["masks"][i, j])})
  gt = COCO()
  gt.dataset = {"images": images, "annotations": annotations,
                "categories": [{"id": c} for c in (1, 2, 3)]}
  gt.createIndex()
  evaluator = COCOeval(gt, gt.loadRes(detections), "segm")
  evaluator.evaluate()
  evaluator.accumulate()
  evaluator.summarize()
  names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
  for name, value in zip(names, evaluator.stats):
    assert summary[f"mask_{name}"] == pytest.approx(value, abs=1e-4), name
