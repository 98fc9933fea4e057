"""The detection task scores a split as the benchmarks define it, end to end: TFDS-layout
examples -> zoo.data.detection_sources (resized onto a canvas, crowd / difficult objects kept
apart) -> the pipeline's eval batches -> Detection.eval_outputs -> its evaluator, against
pycocotools' COCOeval on the original images' annotations (crowd regions, annotated areas)
and against a transcription of the VOC devkit's voc_eval (difficult objects, 1-based pixel
indices) on the original XML boxes."""

import numpy as np
import pytest

from tests.metrics.test_coco import KEYS, pycocotools_evaluate, voc_eval_transcription
from zoo.data import pipeline
from zoo.data.detection_sources import DetectionSource
from zoo.detection.task import Detection

CANVAS = 96


def random_images(rng, num_images, num_classes):
  """Original images (h, w) with objects [x, y, w, h] in their pixels, labels 0..C-1."""
  images = []
  for _ in range(num_images):
    height, width = (int(v) for v in rng.integers(150, 400, 2))
    n = int(rng.integers(1, 7))
    size = rng.uniform(8, 0.6 * min(height, width), (n, 2))          # small to large objects
    xy = rng.uniform(0, 1, (n, 2)) * ([width, height] - size)
    images.append({"shape": (height, width), "xywh": np.concatenate([xy, size], 1),
                   "labels": rng.integers(0, num_classes, n), "ignored": rng.random(n) < 0.3})
  return images


def random_detections(rng, xywh, labels, num_classes, count=12):
  """Detections near the objects (jittered, or shrunk into them: crowd regions match those),
  their classes (mostly the object's) and distinct scores."""
  pick = rng.integers(0, len(xywh), count)
  box = xywh[pick] * [1, 1, 1, 1]
  jitter = rng.normal(0, 0.15, (count, 4)) * np.tile(box[:, 2:], 2)
  inside = rng.random(count) < 0.3                                    # a sub-box of the object
  box = np.where(inside[:, None], box + np.concatenate(
      [box[:, 2:] * rng.uniform(0, 0.4, (count, 2)), -box[:, 2:] * 0.5], 1), box + jitter)
  box[:, 2:] = np.maximum(box[:, 2:], 2.0)
  classes = np.where(rng.random(count) < 0.8, labels[pick], rng.integers(0, num_classes, count))
  return box, classes, rng.random(count)


def evaluate(task, source, detections_of, max_objects=8, batch_size=4):
  """The task's numbers over `source` through the pipeline; `detections_of(index, scale)` ->
  (D, 4) canvas (x1, y1, x2, y2), (D,) scores, (D,) detector classes."""
  evaluator = task.evaluator()
  for batch in pipeline.eval_batches(source, global_batch_size=batch_size,
                                     features=task.features + task.eval_features + ("id",),
                                     max_objects=max_objects):
    boxes, scores, classes, valid = [], [], [], []
    for index, scale in zip(batch["id"], batch["image_scale"]):
      # Padding rows get a detection too: the task must not count it.
      b, s, c = detections_of(max(int(index), 0), scale)
      boxes.append(b)
      scores.append(s)
      classes.append(c)
      valid.append(np.ones(len(s), bool))
    detections = {"boxes": np.float32(boxes), "scores": np.float32(scores),
                  "classes": np.int32(classes), "valid": np.array(valid)}
    evaluator.update(task.eval_outputs(detections, batch), batch)
  return evaluator.result()


def canvas_boxes(xyxy, scale):
  """(D, 4) original-image (x1, y1, x2, y2) pixel edges -> canvas pixels, scale (sy, sx)."""
  return xyxy * np.tile(np.asarray(scale, np.float64)[::-1], 2)


def test_coco_crowd_regions_and_annotated_areas_give_pycocotools_numbers(rng):
  pytest.importorskip("pycocotools", reason="pycocotools (the `test` extra) not installed")
  num_classes = 3
  images = random_images(rng, 6, num_classes)
  examples, annotations, detections, dets = [], [], [], []
  for i, image in enumerate(images):
    (height, width), xywh = image["shape"], image["xywh"]
    # Annotated areas are the masks', smaller than the boxes and independent of the resizing.
    areas = np.round(xywh[:, 2] * xywh[:, 3] * rng.uniform(0.4, 0.9, len(xywh)))
    y1, x1 = xywh[:, 1] / height, xywh[:, 0] / width
    bbox = np.stack([y1, x1, y1 + xywh[:, 3] / height, x1 + xywh[:, 2] / width], 1)
    examples.append({"image": np.zeros((height, width, 3), np.uint8), "objects": {
        "bbox": bbox.astype(np.float32), "label": image["labels"], "area": areas.astype(np.int64),
        "is_crowd": image["ignored"]}})
    for j in range(len(xywh)):
      annotations.append({"id": 100 * i + j + 1, "image_id": i, "category_id": int(
          image["labels"][j]) + 1, "bbox": xywh[j].tolist(), "area": float(areas[j]),
          "iscrowd": int(image["ignored"][j])})
    box, classes, scores = random_detections(rng, xywh, image["labels"], num_classes)
    scores = np.round(scores, 2)  # ties: pycocotools' order among them is kept too
    detections.append((np.concatenate([box[:, :2], box[:, :2] + box[:, 2:]], 1), scores,
                       classes + 1))
    dets += [{"image_id": i, "category_id": int(c) + 1, "bbox": b.tolist(), "score": float(s)}
             for b, c, s in zip(box, classes, scores)]
  ground_truth = {"images": [{"id": i, "height": im["shape"][0], "width": im["shape"][1]}
                             for i, im in enumerate(images)],
                  "annotations": annotations,
                  "categories": [{"id": c} for c in range(1, num_classes + 1)]}
  want = pycocotools_evaluate(ground_truth, dets, "bbox")

  def detections_of(index, scale):
    xyxy, scores, classes = detections[index]
    return canvas_boxes(xyxy, scale), scores, classes

  source = DetectionSource(examples, "coco", size=CANVAS)
  got = evaluate(Detection(num_classes), source, detections_of)
  assert want["AP"] > 0.03 and len({want["APs"], want["APm"], want["APl"]} - {-1.0}) >= 2
  for key in KEYS:
    assert got[f"box_{key}"] == pytest.approx(want[key], abs=1e-9), key
  # The crowd regions matter here: as ordinary objects they would change the numbers.
  for annotation in annotations:
    annotation["iscrowd"] = 0
  assert pycocotools_evaluate(ground_truth, dets, "bbox") != want


def test_coco_mask_ap_with_crowd_masks_equals_pycocotools(rng):
  mask_utils = pytest.importorskip("pycocotools.mask")
  num_b, num_g, num_d, size = 3, 4, 10, 40
  gt_masks = rng.random((num_b, num_g, size, size)) < 0.05
  gt_boxes = np.zeros((num_b, num_g, 4), np.float32)
  for i in range(num_b):
    for j in range(num_g):
      x, y = rng.integers(0, size - 12, 2)
      w, h = rng.integers(5, 12, 2)
      gt_masks[i, j, y:y + h, x:x + w] = True
      ys, xs = np.nonzero(gt_masks[i, j])
      gt_boxes[i, j] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
  pick = rng.integers(0, num_g, (num_b, num_d))
  det_masks = np.take_along_axis(gt_masks, pick[..., None, None], 1).copy()
  det_masks[:, ::2, :, :size // 2] = False                              # half of some masks
  det_boxes = np.take_along_axis(gt_boxes, pick[..., None], 1) + rng.normal(0, 1, (num_b, num_d, 4))
  gt_labels = rng.integers(1, 3, (num_b, num_g))
  outputs = {"boxes": det_boxes.astype(np.float32), "scores": rng.random((num_b, num_d)),
             "classes": np.where(rng.random((num_b, num_d)) < 0.8,
                                 np.take_along_axis(gt_labels, pick, 1), 1),
             "valid": np.ones((num_b, num_d), bool), "masks": det_masks,
             "gt_boxes": gt_boxes, "gt_labels": gt_labels,
             "gt_valid": np.ones((num_b, num_g), bool),
             "gt_ignored": rng.random((num_b, num_g)) < 0.3, "gt_masks": gt_masks,
             "gt_areas": np.where(rng.random((num_b, num_g)) < 0.5, -1.0,
                                  rng.uniform(10, 2000, (num_b, num_g))),
             "image_scale": np.ones((num_b, 2), np.float32)}
  got = Detection(2, masks=True).summarize(outputs)

  def rle(mask):
    code = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return dict(code, counts=code["counts"].decode())

  xywh = lambda b: [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]
  annotations = [{"id": 10 * i + j + 1, "image_id": i, "category_id": int(gt_labels[i, j]),
                  "segmentation": rle(gt_masks[i, j]), "bbox": xywh(gt_boxes[i, j]),
                  "iscrowd": int(outputs["gt_ignored"][i, j]),
                  "area": float(outputs["gt_areas"][i, j]) if outputs["gt_areas"][i, j] >= 0
                  else float(gt_masks[i, j].sum())}
                 for i in range(num_b) for j in range(num_g)]
  # detectron2's result files: each detection with its box (which gives its area) and mask.
  dets = [{"image_id": i, "category_id": int(outputs["classes"][i, d]),
           "score": float(outputs["scores"][i, d]), "bbox": xywh(outputs["boxes"][i, d]),
           "segmentation": rle(det_masks[i, d])} for i in range(num_b) for d in range(num_d)]
  ground_truth = {"images": [{"id": i, "height": size, "width": size} for i in range(num_b)],
                  "annotations": annotations, "categories": [{"id": 1}, {"id": 2}]}
  want = pycocotools_evaluate(ground_truth, dets, "segm")
  assert want["AP"] > 0.05
  for key in KEYS:
    assert got[f"mask_{key}"] == pytest.approx(want[key], abs=1e-9), key


@pytest.mark.parametrize("evaluation", ["voc2007", "voc"])
def test_voc_difficult_objects_give_the_devkit_numbers(rng, evaluation):
  num_classes = 3
  images = random_images(rng, 12, num_classes)
  examples, ground_truth, detections = [], [], []
  for image in images:
    (height, width), xywh = image["shape"], image["xywh"]
    # The devkit's boxes: 1-based pixel indices, both ends included.
    devkit = np.round(np.concatenate([xywh[:, :2] + 1, xywh[:, :2] + xywh[:, 2:]], 1))
    examples.append({"image": np.zeros((height, width, 3), np.uint8), "objects": {
        "bbox": (devkit[:, [1, 0, 3, 2]] / [height, width, height, width]).astype(np.float32),
        "label": image["labels"], "is_difficult": image["ignored"]}})
    ground_truth.append({"boxes": devkit, "labels": image["labels"],
                         "difficult": image["ignored"]})
    # Distinct scores: the devkit's unstable sort leaves the order of equal ones undefined.
    box, classes, scores = random_detections(rng, xywh, image["labels"], num_classes, count=20)
    # Detections as pixel edges; detectron2 writes them to the devkit as (x1 + 1, y1 + 1, x2, y2).
    edges = np.concatenate([box[:, :2], box[:, :2] + box[:, 2:]], 1)
    detections.append({"edges": edges, "boxes": edges + [1, 1, 0, 0], "scores": scores,
                       "labels": classes})

  def detections_of(index, scale):
    d = detections[index]
    return canvas_boxes(d["edges"], scale), d["scores"], d["labels"] + 1

  source = DetectionSource(examples, "voc", size=CANVAS)
  got = evaluate(Detection(num_classes, evaluation=evaluation), source, detections_of)
  use_07 = evaluation == "voc2007"
  want = {}
  for label in range(num_classes):
    if sum(int(np.sum((g["labels"] == label) & ~g["difficult"])) for g in ground_truth):
      want[label] = voc_eval_transcription(ground_truth, detections, label, 0.5, use_07)
  assert set(got) == {"box_mAP"} | {f"box_AP/{label + 1}" for label in want}
  for label, ap in want.items():
    assert got[f"box_AP/{label + 1}"] == pytest.approx(ap, abs=1e-9), label
  assert got["box_mAP"] == pytest.approx(np.mean(list(want.values())), abs=1e-9)
  assert 0.1 < got["box_mAP"] < 1
  # The difficult objects matter here: counted as objects they would change the numbers.
  counted = [dict(g, difficult=np.zeros_like(g["difficult"])) for g in ground_truth]
  assert any(voc_eval_transcription(counted, detections, label, 0.5, use_07) != ap
             for label, ap in want.items())


def test_evaluation_option_is_checked():
  with pytest.raises(ValueError, match="'coco'.*'voc2007'.*'voc'"):
    Detection(3, evaluation="voc2012")
  with pytest.raises(ValueError, match="scores boxes only"):
    Detection(3, masks=True, evaluation="voc")
