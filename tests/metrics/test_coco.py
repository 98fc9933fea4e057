"""zoo.metrics.coco: hand-computed cases (always), and pycocotools' COCOeval on random and edge
cases when pycocotools is importable (it is in the `test` extra, so CI runs them)."""

import contextlib
import copy
import io

import numpy as np
import pytest

from zoo import metrics
from zoo.metrics import coco

KEYS = coco.COCO_KEYS


def box_gt(boxes, areas=None, crowd=None, categories=(1,), image_size=(100, 100), ids=None):
  """One-image ground truth from [x, y, w, h] boxes (category 1 unless (box, cat) pairs)."""
  anns = []
  for n, b in enumerate(boxes):
    box, cat = (b, 1) if not isinstance(b[0], (list, tuple)) else b
    anns.append({"id": (ids[n] if ids else n + 1), "image_id": 1, "category_id": cat,
                 "bbox": list(box), "iscrowd": int(bool(crowd and crowd[n])),
                 "area": float(areas[n] if areas else box[2] * box[3])})
  return {"images": [{"id": 1, "height": image_size[0], "width": image_size[1]}],
          "annotations": anns, "categories": [{"id": c} for c in categories]}


def det(box, score, cat=1, image=1):
  return {"image_id": image, "category_id": cat, "bbox": list(box), "score": score}


# ------------------------------------------------------------------ hand-computed

def test_perfect_detections_give_one_and_minus_one_for_empty_areas():
  gt = box_gt([[0, 0, 10, 10], [20, 20, 40, 40]])  # areas 100 (small) and 1600 (medium)
  result = metrics.coco_evaluate(gt, [det([0, 0, 10, 10], 0.9), det([20, 20, 40, 40], 0.8)])
  for key in ("AP", "AP50", "AP75", "APs", "APm", "AR10", "AR100", "ARs", "ARm"):
    assert result[key] == pytest.approx(1.0)
  assert result["APl"] == -1 and result["ARl"] == -1  # no large objects


def test_perfect_detections_ar1_counts_one_detection_per_image_and_category():
  gt = box_gt([[0, 0, 10, 10], [20, 20, 40, 40]])
  result = metrics.coco_evaluate(gt, [det([0, 0, 10, 10], 0.9), det([20, 20, 40, 40], 0.8)])
  assert result["AR1"] == pytest.approx(0.5)


def test_false_positive_first_then_a_match_at_iou_068():
  # IoU([0,0,10,10], [0,0,10,6.8]) = 0.68: a match at thresholds .50 .55 .60 .65 (4 of 10).
  # Detections by score: FP, TP -> precision 1/2 at every recall point up to 1 -> AP@t = 0.5.
  gt = box_gt([[0, 0, 10, 10]])
  result = metrics.coco_evaluate(gt, [det([50, 50, 10, 10], 0.9), det([0, 0, 10, 6.8], 0.8)])
  want = {"AP": 4 * 0.5 / 10, "AP50": 0.5, "AP75": 0.0, "APs": 0.2, "APm": -1, "APl": -1,
          "AR1": 0.0, "AR10": 0.4, "AR100": 0.4, "ARs": 0.4, "ARm": -1, "ARl": -1}
  assert result == pytest.approx(want)


def test_crowd_region_swallows_detections_inside_it():
  # The detection inside the crowd region has IoU = intersection / its own area = 1 with it:
  # matched to ignored ground truth, so ignored (not a false positive ahead of the true one).
  gt = box_gt([[0, 0, 10, 10], [50, 50, 50, 50]], crowd=[0, 1])
  dets = [det([60, 60, 10, 10], 0.9), det([0, 0, 10, 10], 0.8)]
  assert metrics.coco_evaluate(gt, dets)["AP"] == pytest.approx(1.0)
  gt["annotations"][1]["iscrowd"] = 0  # now it is an object the first detection misses
  # FP then TP of 2 objects: recall 0, 1/2 and precision 0, 1/2 -> precision 1/2 at the 51
  # recall points 0 ... 0.5, 0 at the 50 above.
  assert metrics.coco_evaluate(gt, dets)["AP50"] == pytest.approx(0.5 * 51 / 101)


def test_categories_without_ground_truth_and_images_without_anything():
  gt = box_gt([[0, 0, 10, 10]], categories=(1, 2))
  gt["images"].append({"id": 2, "height": 50, "width": 50})
  base = metrics.coco_evaluate(gt, [det([0, 0, 10, 10], 0.9)])
  # A detection of category 2 (no ground truth anywhere) changes nothing: category 2 is -1.
  assert metrics.coco_evaluate(gt, [det([0, 0, 10, 10], 0.9), det([0, 0, 5, 5], 0.95, cat=2)]) == base
  # A detection of category 1 on image 2 (no objects) is a false positive after the match.
  later = metrics.coco_evaluate(gt, [det([0, 0, 10, 10], 0.9), det([0, 0, 5, 5], 0.5, image=2)])
  assert later["AP"] == pytest.approx(1.0)
  earlier = metrics.coco_evaluate(gt, [det([0, 0, 10, 10], 0.9), det([0, 0, 5, 5], 0.95, image=2)])
  assert earlier["AP"] == pytest.approx(0.5)
  # No detections at all: 0 where there is ground truth.
  empty = metrics.coco_evaluate(gt, [])
  assert empty["AP"] == 0 and empty["AR100"] == 0 and empty["APm"] == -1


def test_rle_and_polygon_hand_cases():
  mask = np.zeros((3, 3), np.uint8)
  mask[1, 1] = 1
  # Column-major runs 4 zeros, 1 one, 4 zeros -> chars 48+4, 48+1, 48+4.
  assert coco.rle_encode(mask) == {"size": [3, 3], "counts": "414"}
  np.testing.assert_array_equal(coco.rle_decode({"size": [3, 3], "counts": "414"}), mask)
  np.testing.assert_array_equal(coco.rle_decode({"size": [3, 3], "counts": [4, 1, 4]}), mask)
  assert coco.rle_area({"size": [3, 3], "counts": "414"}) == 1
  assert coco.rle_to_bbox({"size": [3, 3], "counts": "414"}) == [1, 1, 1, 1]
  # A square with corners on pixel boundaries 0 and 4 covers the 4 x 4 pixels.
  square = coco.rle_decode(coco.polygons_to_rle([[0, 0, 4, 0, 4, 4, 0, 4]], 6, 6))
  want = np.zeros((6, 6), np.uint8)
  want[:4, :4] = 1
  np.testing.assert_array_equal(square, want)
  # A triangle: pycocotools 2.0.11's frPyObjects + decode gave these 3 pixels.
  triangle = coco.rle_decode(coco.polygons_to_rle([[1.5, 0.5, 4.5, 0.5, 1.5, 3.5]], 6, 6))
  np.testing.assert_array_equal(np.argwhere(triangle), [[1, 2], [1, 3], [2, 2]])
  # Long counts use the delta-to-two-before code and multi-char numbers: round trip.
  rng = np.random.default_rng(0)
  big = rng.random((64, 80)) < 0.02
  big[10:50, 20:70] = True
  np.testing.assert_array_equal(coco.rle_decode(coco.rle_encode(big)), big)


def test_mask_evaluation_with_masks_equal_to_ground_truth():
  gt = box_gt([[0, 0, 10, 10], [20, 20, 40, 40]], image_size=(80, 90))
  polys = [[0, 0, 10, 0, 10, 10, 0, 10], [20, 20, 60, 20, 60, 60, 20, 60]]
  for ann, poly in zip(gt["annotations"], polys):
    ann["segmentation"] = [poly]
    ann["area"] = float(coco.segmentation_to_mask([poly], 80, 90).sum())
  dets = [{"image_id": 1, "category_id": 1, "score": 0.9,
           "segmentation": coco.polygons_to_rle([polys[0]], 80, 90)},
          {"image_id": 1, "category_id": 1, "score": 0.8, "segmentation": [polys[1]]}]
  result = metrics.coco_evaluate(gt, dets, "segm")
  assert result["AP"] == pytest.approx(1.0) and result["AR100"] == pytest.approx(1.0)


def test_voc_ap_hand_cases():
  recall, precision = np.array([0.5, 1.0]), np.array([1.0, 0.5])
  assert metrics.voc_ap(recall, precision, use_07_metric=True) == pytest.approx((6 + 5 * 0.5) / 11)
  assert metrics.voc_ap(recall, precision, use_07_metric=False) == pytest.approx(0.75)
  # Envelope: a later higher precision lifts the earlier points.
  assert metrics.voc_ap([0.25, 0.5, 1.0], [0.5, 1.0, 0.5]) == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)


def test_voc_evaluate_with_difficult_objects():
  gt = [{"boxes": [[0, 0, 9, 9], [20, 20, 29, 29]], "labels": [3, 3], "difficult": [False, True]},
        {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, int)}]
  dets = [{"boxes": [[50, 50, 59, 59], [20, 20, 29, 29], [0, 0, 9, 9], [0, 0, 9, 9]],
           "scores": [0.95, 0.9, 0.8, 0.7], "labels": [3, 3, 3, 3]},
          {"boxes": [[0, 0, 9, 9]], "scores": [0.1], "labels": [3]}]
  # By score: FP, difficult (neither), TP, duplicate (FP), FP on the empty image.
  # recall 0 0 1 1 1, precision 0 0 .5 .33 .25 -> 11-point AP .5, all-point AP .5.
  for use_07 in (True, False):
    result = metrics.voc_evaluate(gt, dets, use_07_metric=use_07)
    assert result["AP"][3] == pytest.approx(0.5) and result["mAP"] == pytest.approx(0.5)
  # With continuous coordinates the 9-pixel boxes still match themselves exactly.
  assert metrics.voc_evaluate(gt, dets, inclusive_pixels=False)["mAP"] == pytest.approx(0.5)


def voc_eval_transcription(gt, dets, label, threshold, use_07):
  """detectron2's pascal_voc_evaluation.voc_eval, transcribed (its per-class loop, +1 widths)."""
  class_recs, npos = {}, 0
  for i, g in enumerate(gt):
    sel = np.asarray(g["labels"]) == label
    bbox = np.asarray(g["boxes"], float).reshape(-1, 4)[sel]
    difficult = np.asarray(g["difficult"], bool)[sel]
    npos += int(np.sum(~difficult))
    class_recs[i] = {"bbox": bbox, "difficult": difficult, "det": [False] * len(bbox)}
  ids, confidence, boxes = [], [], []
  for i, d in enumerate(dets):
    for box, score, lab in zip(d["boxes"], d["scores"], d["labels"]):
      if lab == label:
        ids.append(i)
        confidence.append(score)
        boxes.append(box)
  sorted_ind = np.argsort(-np.array(confidence))
  bb_all = np.array(boxes, float).reshape(-1, 4)[sorted_ind]
  ids = [ids[x] for x in sorted_ind]
  tp, fp = np.zeros(len(ids)), np.zeros(len(ids))
  for d in range(len(ids)):
    r = class_recs[ids[d]]
    bb, ovmax, bbgt = bb_all[d], -np.inf, r["bbox"]
    if bbgt.size > 0:
      ixmin, iymin = np.maximum(bbgt[:, 0], bb[0]), np.maximum(bbgt[:, 1], bb[1])
      ixmax, iymax = np.minimum(bbgt[:, 2], bb[2]), np.minimum(bbgt[:, 3], bb[3])
      iw, ih = np.maximum(ixmax - ixmin + 1.0, 0.0), np.maximum(iymax - iymin + 1.0, 0.0)
      inters = iw * ih
      uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0) +
             (bbgt[:, 2] - bbgt[:, 0] + 1.0) * (bbgt[:, 3] - bbgt[:, 1] + 1.0) - inters)
      overlaps = inters / uni
      ovmax, jmax = np.max(overlaps), np.argmax(overlaps)
    if ovmax > threshold:
      if not r["difficult"][jmax]:
        if not r["det"][jmax]:
          tp[d], r["det"][jmax] = 1.0, True
        else:
          fp[d] = 1.0
    else:
      fp[d] = 1.0
  fp, tp = np.cumsum(fp), np.cumsum(tp)
  rec = tp / float(npos)
  prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
  if use_07:
    return sum((np.max(prec[rec >= t]) if np.sum(rec >= t) else 0) / 11.0
               for t in np.arange(0.0, 1.1, 0.1))
  mrec, mpre = np.concatenate(([0.0], rec, [1.0])), np.concatenate(([0.0], prec, [0.0]))
  for i in range(mpre.size - 1, 0, -1):
    mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
  i = np.where(mrec[1:] != mrec[:-1])[0]
  return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voc_evaluate_matches_transcription_on_random_data(seed):
  rng = np.random.default_rng(seed)
  gt, dets = [], []
  for _ in range(12):
    n = int(rng.integers(0, 6))
    xy = rng.integers(0, 200, (n, 2))
    boxes = np.concatenate([xy, xy + rng.integers(5, 150, (n, 2))], 1).astype(float)
    labels = rng.integers(0, 3, n)
    gt.append({"boxes": boxes, "labels": labels, "difficult": rng.random(n) < 0.2})
    m = int(rng.integers(0, 8))
    pick = rng.integers(0, max(n, 1), m)
    near = boxes[pick] + rng.normal(0, 8, (m, 4)) if n else rng.uniform(0, 300, (m, 4))
    near[:, 2:] = np.maximum(near[:, 2:], near[:, :2] + 2)
    dets.append({"boxes": near, "scores": rng.random(m),  # distinct scores: no tie order
                 "labels": np.where(rng.random(m) < 0.8, labels[pick] if n else 0,
                                    rng.integers(0, 3, m))})
  for use_07 in (True, False):
    result = metrics.voc_evaluate(gt, dets, use_07_metric=use_07)
    for label, ap in result["AP"].items():
      npos = sum(int(np.sum((np.asarray(g["labels"]) == label) & ~g["difficult"])) for g in gt)
      if npos:
        assert ap == pytest.approx(voc_eval_transcription(gt, dets, label, 0.5, use_07), abs=1e-12)


def test_bad_input_raises_clear_errors():
  gt = box_gt([[0, 0, 10, 10]])
  with pytest.raises(ValueError, match="iou_type"):
    metrics.coco_evaluate(gt, [], "keypoints")
  with pytest.raises(ValueError, match="'images'"):
    metrics.coco_evaluate({"annotations": []}, [])
  with pytest.raises(ValueError, match="image_id 7"):
    metrics.coco_evaluate(gt, [det([0, 0, 1, 1], 0.5, image=7)])
  with pytest.raises(ValueError, match="has no 'segmentation'"):
    metrics.coco_evaluate(gt, [det([0, 0, 1, 1], 0.5)], "segm")
  with pytest.raises(ValueError, match="lacks 'segmentation'"):
    metrics.coco_evaluate(gt, [{"image_id": 1, "category_id": 1, "score": 0.5}])
  dup = copy.deepcopy(gt)
  dup["annotations"].append(dict(dup["annotations"][0]))
  with pytest.raises(ValueError, match="twice"):
    metrics.coco_evaluate(dup, [])
  with pytest.raises(ValueError, match="size"):
    coco.segmentation_to_mask({"size": [4, 4], "counts": [16]}, 5, 5)
  with pytest.raises(ValueError, match="3 points"):
    coco.segmentation_to_mask([[0, 0, 5, 5]], 5, 5)
  with pytest.raises(ValueError, match="same order"):
    metrics.voc_evaluate([], [{}])
  with pytest.raises(ValueError, match="both gt_masks and det_masks"):
    metrics.coco_evaluate_padded(np.zeros((1, 1, 4)), np.zeros((1, 1)), np.ones((1, 1)),
                                 np.zeros((1, 1, 4)), np.zeros((1, 1)), np.zeros((1, 1)),
                                 np.ones((1, 1)), gt_masks=np.zeros((1, 1, 4, 4)))
  with pytest.raises(ValueError, match=r"\(B, G, 4\)"):
    metrics.coco_evaluate_padded(np.zeros((1, 2, 4)), np.zeros((1, 2)), np.ones((1, 3)),
                                 np.zeros((1, 1, 4)), np.zeros(1), np.zeros((1, 1)), np.ones((1, 1)))


# ------------------------------------------------------------------ against pycocotools

def random_polygon(rng, x, y, w, h):
  n = int(rng.integers(3, 9))
  angle = np.sort(rng.uniform(0, 2 * np.pi, n))
  radius = rng.uniform(0.3, 0.5, n)
  return np.stack([x + w / 2 + radius * w * np.cos(angle),
                   y + h / 2 + radius * h * np.sin(angle)], 1).ravel().round(2).tolist()


def random_dataset(seed, iou_type="bbox", n_images=8, det_masks="mixed", det_boxes=True):
  """Random COCO ground truth and detections with the edge cases COCOeval has rules for:
  crowd regions, an image without objects, images without detections, a category without
  ground truth, > 100 detections of one category in one image, equal scores, boxes of every
  area range, detections of wrong categories, multi-part polygons."""
  rng = np.random.default_rng(seed)
  cats = [1, 2, 3, 5, 7]  # 7 never has ground truth
  images, anns, dets, shapes = [], [], [], {}
  next_id = 1
  for i in range(n_images):
    image_id = int(rng.integers(1, 1000)) * 10 + i  # unsorted, non-contiguous ids
    h, w = int(rng.integers(120, 260)), int(rng.integers(120, 260))
    images.append({"id": image_id, "height": h, "width": w})
    for _ in range(int(rng.integers(0, 7)) if i % 4 else 0):
      bw, bh = rng.uniform(2, w * 0.7), rng.uniform(2, h * 0.7)
      x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
      cat = int(rng.choice(cats[:4]))
      crowd = int(rng.random() < 0.15)
      ann = {"id": next_id, "image_id": image_id, "category_id": cat, "bbox": [x, y, bw, bh],
             "iscrowd": crowd, "area": float(bw * bh * rng.uniform(0.5, 1.0))}
      poly = random_polygon(rng, x, y, bw, bh)
      if iou_type == "segm":
        if crowd:  # crowd regions come as uncompressed RLE in COCO
          m = coco.segmentation_to_mask([poly], h, w)
          counts = coco._counts_from_mask(m.reshape((h, w), order="F"))
          ann["segmentation"] = {"size": [h, w], "counts": counts.tolist()}
        elif rng.random() < 0.7:
          ann["segmentation"] = [poly]
        else:
          ann["segmentation"] = [poly, random_polygon(rng, x, y, bw / 2, bh / 2)]
        ann["area"] = float(coco.segmentation_to_mask(ann["segmentation"], h, w).sum())
      anns.append(ann)
      next_id += 1
      for _ in range(int(rng.integers(0, 4))):  # detections near this object
        jitter = rng.normal(0, 0.12, 4) * [bw, bh, bw, bh]
        box = [x + jitter[0], y + jitter[1], max(bw + jitter[2], 1), max(bh + jitter[3], 1)]
        d = {"image_id": image_id, "category_id": cat if rng.random() < 0.8 else int(rng.choice(cats)),
             "bbox": [float(v) for v in box], "score": float(np.round(rng.random(), 1))}
        shift = np.tile(jitter[:2], len(poly) // 2)
        d["_poly"] = (np.asarray(poly) + shift).round(2).tolist()
        dets.append(d)
    if i % 3 != 2:  # images 2, 5: no detections except near objects
      for _ in range(int(rng.integers(0, 6))):
        bw, bh = rng.uniform(2, w * 0.5), rng.uniform(2, h * 0.5)
        x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        dets.append({"image_id": image_id, "category_id": int(rng.choice(cats)),
                     "bbox": [float(x), float(y), float(bw), float(bh)],
                     "score": float(np.round(rng.random(), 2)),
                     "_poly": random_polygon(rng, x, y, bw, bh)})
    if i == 1:  # more than 100 detections of one category
      for _ in range(130):
        bw, bh = rng.uniform(5, 60), rng.uniform(5, 60)
        x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        dets.append({"image_id": image_id, "category_id": 2,
                     "bbox": [float(x), float(y), float(bw), float(bh)],
                     "score": float(np.round(rng.random(), 2)),
                     "_poly": random_polygon(rng, x, y, bw, bh)})
    shapes[image_id] = (h, w)
  order = rng.permutation(len(dets))
  dets = [dets[i] for i in order]
  for n, d in enumerate(dets):
    poly = d.pop("_poly")
    if iou_type == "segm":
      h, w = shapes[d["image_id"]]
      if det_masks == "rle" or (det_masks == "mixed" and n % 2):
        d["segmentation"] = coco.polygons_to_rle([poly], h, w)
      else:
        d["segmentation"] = [poly]
      if not det_boxes:
        del d["bbox"]
  rng.shuffle(anns)
  gt = {"images": images, "annotations": anns, "categories": [{"id": c} for c in cats]}
  return gt, dets


def pycocotools_evaluate(gt, dets, iou_type):
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  with contextlib.redirect_stdout(io.StringIO()):
    truth = COCO()
    truth.dataset = copy.deepcopy(gt)
    truth.createIndex()
    evaluation = COCOeval(truth, truth.loadRes(copy.deepcopy(dets)), iou_type)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
  return dict(zip(KEYS, evaluation.stats.tolist()))


def assert_close(got, want):
  assert set(got) == set(KEYS)
  for key in KEYS:
    assert got[key] == pytest.approx(want[key], abs=1e-4), (key, got, want)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_box_ap_matches_pycocotools(seed, monkeypatch):
  pytest.importorskip("pycocotools", reason="pycocotools (the `test` extra) not installed")
  gt, dets = random_dataset(seed, "bbox")
  want = pycocotools_evaluate(gt, dets, "bbox")
  assert_close(metrics.coco_evaluate(gt, dets, "bbox"), want)
  # Image batches cut by count and by the memory budget give the same numbers.
  assert_close(metrics.coco_evaluate(gt, dets, "bbox", batch_images=3), want)
  monkeypatch.setattr(coco, "_MATCH_BUDGET", 20000)
  assert_close(metrics.coco_evaluate(gt, dets, "bbox"), want)


@pytest.mark.parametrize("seed,det_masks,det_boxes", [(0, "mixed", True), (1, "polygon", True),
                                                      (2, "rle", False)])
def test_mask_ap_matches_pycocotools(seed, det_masks, det_boxes):
  pytest.importorskip("pycocotools", reason="pycocotools (the `test` extra) not installed")
  gt, dets = random_dataset(seed, "segm", n_images=6, det_masks=det_masks, det_boxes=det_boxes)
  want = pycocotools_evaluate(gt, dets, "segm")
  assert want["AP50"] > 0.05  # the detections do overlap their objects
  assert_close(metrics.coco_evaluate(gt, dets, "segm"), want)
  if not det_boxes:  # "bbox" from detections without boxes: boxes from the masks (toBbox)
    assert_close(metrics.coco_evaluate(gt, dets, "bbox"), pycocotools_evaluate(gt, dets, "bbox"))
  else:  # "segm" of box detections without masks: the boxes' polygons
    boxes_only = [{k: v for k, v in d.items() if k != "segmentation"} for d in dets]
    assert_close(metrics.coco_evaluate(gt, boxes_only, "segm"),
                 pycocotools_evaluate(gt, boxes_only, "segm"))


def test_quirks_match_pycocotools():
  pytest.importorskip("pycocotools", reason="pycocotools (the `test` extra) not installed")
  # A ground-truth id 0 (COCOeval's match table reads it as "unmatched"), an 'ignore' key
  # (overwritten by iscrowd), equal scores across images, IoU exactly at a threshold.
  gt = box_gt([[0, 0, 10, 10], [20, 0, 10, 10], [40, 0, 10, 10]], ids=[0, 5, 9])
  gt["annotations"][2]["ignore"] = 1
  gt["images"].append({"id": 0, "height": 100, "width": 100})
  gt["annotations"].append({"id": 11, "image_id": 0, "category_id": 1, "bbox": [0, 0, 10, 10],
                            "iscrowd": 0, "area": 100.0})
  dets = [det([0, 0, 10, 10], 0.5), det([20, 0, 10, 7.5], 0.5), det([40, 0, 10, 10], 0.5),
          det([50, 50, 10, 10], 0.5, image=0), det([0, 0, 10, 10], 0.5, image=0)]
  assert_close(metrics.coco_evaluate(gt, dets), pycocotools_evaluate(gt, dets, "bbox"))


@pytest.mark.parametrize("seed", [0, 1])
def test_padded_arrays_match_pycocotools(seed):
  pytest.importorskip("pycocotools", reason="pycocotools (the `test` extra) not installed")
  rng = np.random.default_rng(seed)
  num_b, num_g, num_d = 5, 6, 120
  xy = rng.uniform(0, 150, (num_b, num_g, 2))
  gt_boxes = np.concatenate([xy, xy + rng.uniform(3, 120, (num_b, num_g, 2))], -1)
  gt_classes = rng.integers(0, 3, (num_b, num_g))
  gt_valid = rng.random((num_b, num_g)) < 0.7
  gt_valid[0] = False  # an image without objects
  gt_crowd = rng.random((num_b, num_g)) < 0.1
  pick = rng.integers(0, num_g, (num_b, num_d))
  det_boxes = np.take_along_axis(gt_boxes, pick[..., None], 1) + rng.normal(0, 4, (num_b, num_d, 4))
  det_boxes[..., 2:] = np.maximum(det_boxes[..., 2:], det_boxes[..., :2] + 1)
  det_classes = np.where(rng.random((num_b, num_d)) < 0.8,
                         np.take_along_axis(gt_classes, pick, 1), rng.integers(0, 4, (num_b, num_d)))
  det_scores = np.round(rng.random((num_b, num_d)), 2)
  det_valid = rng.random((num_b, num_d)) < 0.9
  det_valid[2] = False  # an image without detections
  got = metrics.coco_evaluate_padded(gt_boxes, gt_classes, gt_valid, det_boxes, det_scores,
                                     det_classes, det_valid, gt_crowd=gt_crowd)
  # The same as COCO dicts.
  xywh = lambda b: [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]
  anns = [{"id": g + 1, "image_id": b, "category_id": int(gt_classes[b, g]),
           "bbox": xywh(gt_boxes[b, g]), "iscrowd": int(gt_crowd[b, g]),
           "area": xywh(gt_boxes[b, g])[2] * xywh(gt_boxes[b, g])[3]}
          for b in range(num_b) for g in range(num_g) if gt_valid[b, g]]
  for n, a in enumerate(anns):
    a["id"] = n + 1 + 1000 * a["image_id"]
  gt = {"images": [{"id": b, "height": 300, "width": 300} for b in range(num_b)],
        "annotations": anns, "categories": [{"id": c} for c in range(4)]}
  dets = [{"image_id": b, "category_id": int(det_classes[b, d]), "bbox": xywh(det_boxes[b, d]),
           "score": float(det_scores[b, d])}
          for b in range(num_b) for d in range(num_d) if det_valid[b, d]]
  want = pycocotools_evaluate(gt, dets, "bbox")
  assert want["AP"] > 0.1
  assert_close(got, want)
  assert_close(metrics.coco_evaluate(gt, dets), want)


@pytest.mark.parametrize("seed", [0, 1])
def test_padded_masks_match_pycocotools(seed):
  pytest.importorskip("pycocotools", reason="pycocotools (the `test` extra) not installed")
  rng = np.random.default_rng(seed)
  num_b, num_g, num_d, h, w = 4, 5, 30, 72, 96
  gt_masks = np.zeros((num_b, num_g, h, w), bool)
  det_masks = np.zeros((num_b, num_d, h, w), bool)
  gt_boxes = np.zeros((num_b, num_g, 4))
  det_boxes = np.zeros((num_b, num_d, 4))
  polygons, pick = {}, rng.integers(0, num_g, (num_b, num_d))
  for b in range(num_b):
    for g in range(num_g):
      x, y = rng.uniform(0, w - 20), rng.uniform(0, h - 20)
      bw, bh = rng.uniform(6, w - x), rng.uniform(6, h - y)
      polygons[b, g] = random_polygon(rng, x, y, bw, bh)
      gt_masks[b, g] = coco.segmentation_to_mask([polygons[b, g]], h, w).reshape((h, w), order="F")
      gt_boxes[b, g] = [x, y, x + bw, y + bh]
    for d in range(num_d):
      g = pick[b, d]
      shift = np.tile(rng.normal(0, 3, 2), len(polygons[b, g]) // 2)
      det_masks[b, d] = coco.segmentation_to_mask([(np.asarray(polygons[b, g]) + shift).tolist()],
                                                  h, w).reshape((h, w), order="F")
      det_boxes[b, d] = gt_boxes[b, g] + np.tile(shift[:2], 2)
  gt_classes = rng.integers(0, 3, (num_b, num_g))
  gt_valid = rng.random((num_b, num_g)) < 0.8
  gt_crowd = rng.random((num_b, num_g)) < 0.15
  det_classes = np.where(rng.random((num_b, num_d)) < 0.8, np.take_along_axis(gt_classes, pick, 1),
                         rng.integers(0, 3, (num_b, num_d)))
  det_scores = np.round(rng.random((num_b, num_d)), 2)
  det_valid = rng.random((num_b, num_d)) < 0.9
  got = metrics.coco_evaluate_padded(gt_boxes, gt_classes, gt_valid, det_boxes, det_scores,
                                     det_classes, det_valid, gt_crowd=gt_crowd, gt_masks=gt_masks,
                                     det_masks=det_masks)
  xywh = lambda v: [float(v[0]), float(v[1]), float(v[2] - v[0]), float(v[3] - v[1])]
  anns = [{"id": 100 * b + g + 1, "image_id": b, "category_id": int(gt_classes[b, g]),
           "bbox": xywh(gt_boxes[b, g]), "iscrowd": int(gt_crowd[b, g]),
           "segmentation": coco.rle_encode(gt_masks[b, g]), "area": float(gt_masks[b, g].sum())}
          for b in range(num_b) for g in range(num_g) if gt_valid[b, g]]
  gt = {"images": [{"id": b, "height": h, "width": w} for b in range(num_b)],
        "annotations": anns, "categories": [{"id": c} for c in range(3)]}
  dets = [{"image_id": b, "category_id": int(det_classes[b, d]), "bbox": xywh(det_boxes[b, d]),
           "score": float(det_scores[b, d]), "segmentation": coco.rle_encode(det_masks[b, d])}
          for b in range(num_b) for d in range(num_d) if det_valid[b, d]]
  want = pycocotools_evaluate(gt, dets, "segm")
  assert want["AP50"] > 0.05
  assert_close(got, want)
