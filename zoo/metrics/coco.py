"""COCO detection metrics (box and mask AP/AR, exactly as pycocotools' COCOeval) and VOC AP.

`coco_evaluate(ground_truth, detections, iou_type)` takes the COCO interchange format and
returns the 12 standard numbers; `coco_evaluate_padded` gives the same numbers from padded
box arrays (what a detector's eval step returns), without building dicts. Both run one
NumPy matching engine that is vectorised over images, area ranges and IoU thresholds.

What "exactly as COCOeval" means here (pycocotools 2.0, `cocoeval.py`, `coco.py::loadRes`,
`common/maskApi.c`), each rule reproduced, quirks included:

- images: every image of the ground truth (sorted ids); categories: every category listed in
  it; detections of other categories are dropped; a detection on an unknown image is an error.
- per image and category, detections sorted by score (stable: equal scores keep list order),
  at most 100 (maxDets[-1]); ground truth with `iscrowd` is "ignore" (the annotation's own
  `ignore` key has no effect: COCOeval overwrites it with `iscrowd`), so is ground truth
  whose `area` field is outside the area range.
- box IoU in float64 on [x, y, w, h]; against a crowd region IoU = intersection / detection
  area; mask IoU the same on rasterised masks; 0 when there is no intersection.
- greedy matching per IoU threshold t (0.5:0.05:0.95, compared with min(t, 1 - 1e-10)):
  each detection in score order takes the unmatched (crowd: any) ground truth of highest
  IoU >= t, the last one among equals, preferring non-ignored ground truth; a detection
  matched to ignored ground truth is ignored, so is an unmatched one outside the area range.
  A match to ground truth whose `id` is 0 counts as no match (COCOeval stores matches as ids).
- detection area (for the area ranges): the box's w * h when the detections carry `bbox`
  (pycocotools decides this from the first detection), else the mask's pixel count; for
  "segm", a detection with a box and no segmentation is the box's polygon.
- precision at the 101 recall points 0:0.01:1 from the monotone (right-to-left maximum)
  envelope, found with `searchsorted(..., side="left")`, 0 beyond the last recall reached;
  -1 for a category/area with no non-ignored ground truth; each number the mean over the
  entries that are not -1 (-1 when there are none).
- masks: polygons rasterised as `rleFrPoly` does (coordinates upsampled by 5 and rounded,
  boundary walked, y-crossings sampled back), parts merged (a part needs 3 points or more);
  RLE as compressed strings (COCO's 6-bit LEB128-like code) or uncompressed count lists.

Differences: an empty detection list gives 0 (pycocotools' loadRes cannot take one);
duplicate ground-truth ids and a missing `area` are errors instead of silent misbehaviour.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
             "ARl")
# pycocotools' Params.setDetParams, with the same linspace calls (np.arange drifts).
IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)
MAX_DETECTIONS = (1, 10, 100)
AREA_RANGES = ((0 ** 2, 1e5 ** 2), (0 ** 2, 32 ** 2), (32 ** 2, 96 ** 2), (96 ** 2, 1e5 ** 2))
AREA_NAMES = ("all", "small", "medium", "large")
# Elements of one image batch's matching arrays (~ images x detections x ground truth x 10).
_MATCH_BUDGET = 2 ** 24


# ------------------------------------------------------------------------------ RLE

def _counts_from_string(s: str | bytes) -> np.ndarray:
  """COCO's compressed counts: 5 bits a char (offset 48), bit 0x20 = more, 0x10 = sign;
  from the fourth count on, each is stored as the difference to the count two before."""
  if isinstance(s, bytes):
    s = s.decode("ascii")
  counts = []
  p = 0
  while p < len(s):
    x, k, more = 0, 0, True
    while more:
      c = ord(s[p]) - 48
      x |= (c & 0x1f) << (5 * k)
      more = bool(c & 0x20)
      p += 1
      k += 1
      if not more and (c & 0x10):
        x |= -1 << (5 * k)
    if len(counts) > 2:
      x += counts[-2]
    counts.append(x)
  return np.asarray(counts, np.int64)


def _counts_to_string(counts: np.ndarray) -> str:
  out = []
  for i, count in enumerate(np.asarray(counts, np.int64).tolist()):
    x = count - counts[i - 2] if i > 2 else count
    x = int(x)
    more = True
    while more:
      c = x & 0x1f
      x >>= 5
      more = (x != -1) if (c & 0x10) else (x != 0)
      if more:
        c |= 0x20
      out.append(chr(c + 48))
  return "".join(out)


def _counts_from_mask(mask: np.ndarray) -> np.ndarray:
  """Run lengths of a (H, W) mask in column-major order, starting with a run of zeros."""
  flat = np.asarray(mask, bool).ravel(order="F")
  change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  edges = np.concatenate([[0], change, [flat.size]])
  counts = np.diff(edges)
  if flat.size and flat[0]:
    counts = np.concatenate([[0], counts])
  return counts.astype(np.int64)


def _flat_mask_from_counts(counts: np.ndarray, height: int, width: int) -> np.ndarray:
  counts = np.asarray(counts, np.int64)
  if counts.sum() != height * width or (counts < 0).any():
    raise ValueError(f"RLE counts sum to {counts.sum()} but the mask has {height} x {width} = "
                     f"{height * width} pixels; the segmentation's 'size' must be [height, width] "
                     f"of its image.")
  return np.repeat(np.arange(counts.size) % 2 == 1, counts)


def rle_encode(mask: np.ndarray) -> dict:
  """(H, W) binary mask -> {"size": [H, W], "counts": str} (compressed, as pycocotools' encode)."""
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"rle_encode takes one (H, W) mask; got shape {mask.shape}.")
  return {"size": [int(mask.shape[0]), int(mask.shape[1])],
          "counts": _counts_to_string(_counts_from_mask(mask))}


def rle_decode(rle: Mapping[str, Any]) -> np.ndarray:
  """{"size": [H, W], "counts": str | bytes | list} -> (H, W) uint8 mask."""
  height, width = (int(v) for v in rle["size"])
  return _flat_mask_from_counts(_rle_counts(rle), height, width).reshape(
      (height, width), order="F").astype(np.uint8)


def rle_area(rle: Mapping[str, Any]) -> int:
  """Number of foreground pixels."""
  return int(_rle_counts(rle)[1::2].sum())


def rle_to_bbox(rle: Mapping[str, Any]) -> list[float]:
  """[x, y, w, h] of the mask, as `rleToBbox` (a run crossing columns spans the full height)."""
  height, width = (int(v) for v in rle["size"])
  counts = _rle_counts(rle)
  m = (counts.size // 2) * 2
  if m == 0:
    return [0.0, 0.0, 0.0, 0.0]
  ends = np.cumsum(counts[:m]) - np.arange(m) % 2  # first pixel of each run, last of each 1-run
  y, x = ends % height, ends // height
  x_start, x_end = x[0::2], x[1::2]
  y0, y1 = y.min(), y.max()
  if (x_start < x_end).any():
    y0, y1 = 0, height - 1
  return [float(x.min()), float(y0), float(x.max() - x.min() + 1), float(y1 - y0 + 1)]


def _rle_counts(rle: Mapping[str, Any]) -> np.ndarray:
  if not isinstance(rle, Mapping) or "counts" not in rle or "size" not in rle:
    raise ValueError(f"An RLE is a dict with 'size' [height, width] and 'counts'; got {rle!r:.80}.")
  counts = rle["counts"]
  if isinstance(counts, (str, bytes)):
    return _counts_from_string(counts)
  return np.asarray(counts, np.int64)


def _polygon_counts(xy: Sequence[float], height: int, width: int) -> np.ndarray:
  """One polygon [x1, y1, x2, y2, ...] -> RLE counts, the way maskApi.c's rleFrPoly does it.

  The vertices are scaled by 5 and rounded (C casts: toward zero), the closed boundary is
  walked one upsampled unit at a time along its major axis, and every x-step of the walk that
  lands on a pixel column centre gives the first covered row of that column (y rounded up).
  The sorted column-major positions of these crossings are the run boundaries.
  """
  scale = 5.0
  xy = np.asarray(xy, np.float64)
  x = np.trunc(scale * xy[0::2] + .5).astype(np.int64)
  y = np.trunc(scale * xy[1::2] + .5).astype(np.int64)
  x, y = np.append(x, x[0]), np.append(y, y[0])
  us, vs = [], []
  for j in range(len(x) - 1):
    xs, xe, ys, ye = x[j], x[j + 1], y[j], y[j + 1]
    dx, dy = abs(xe - xs), abs(ys - ye)
    flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
    if flip:
      xs, xe, ys, ye = xe, xs, ye, ys
    if dx >= dy:
      t = np.arange(dx + 1)
      t = dx - t if flip else t
      s = (ye - ys) / dx if dx else 0.0  # a repeated vertex: one point, never a crossing
      us.append(t + xs)
      vs.append(np.trunc(ys + s * t + .5).astype(np.int64))
    else:
      t = np.arange(dy + 1)
      t = dy - t if flip else t
      s = (xe - xs) / dy
      vs.append(t + ys)
      us.append(np.trunc(xs + s * t + .5).astype(np.int64))
  u, v = np.concatenate(us), np.concatenate(vs)
  step = np.flatnonzero(u[1:] != u[:-1]) + 1
  xd = np.where(u[step] < u[step - 1], u[step], u[step] - 1).astype(np.float64)
  xd = (xd + .5) / scale - .5
  yd = np.minimum(v[step], v[step - 1]).astype(np.float64)
  yd = (yd + .5) / scale - .5
  keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= width - 1)
  yd = np.ceil(np.clip(yd[keep], 0, height))
  positions = np.sort(np.concatenate([xd[keep].astype(np.int64) * height + yd.astype(np.int64),
                                      [height * width]]))
  runs = np.diff(np.concatenate([[0], positions]))
  # Zero-length runs merge the two runs around them (an even-odd crossing pair cancels).
  counts = [int(runs[0])]
  j = 1
  while j < len(runs):
    if runs[j] > 0:
      counts.append(int(runs[j]))
      j += 1
    else:
      j += 1
      if j < len(runs):
        counts[-1] += int(runs[j])
        j += 1
  return np.asarray(counts, np.int64)


def _box_polygon(box: Sequence[float]) -> list[list[float]]:
  x, y, w, h = (float(v) for v in box)
  return [[x, y, x, y + h, x + w, y + h, x + w, y]]


def segmentation_to_mask(segmentation, height: int, width: int) -> np.ndarray:
  """A COCO `segmentation` (polygons, compressed or uncompressed RLE) -> (H * W,) bool mask,
  column-major (the RLE order); polygon parts are merged (union), as `COCO.annToRLE`."""
  if isinstance(segmentation, (list, tuple)):
    if not segmentation:
      return np.zeros(height * width, bool)
    if isinstance(segmentation[0], Mapping):
      return np.any([segmentation_to_mask(s, height, width) for s in segmentation], axis=0)
    parts = list(segmentation)
    if any(len(p) < 6 or len(p) % 2 for p in parts):
      # pycocotools takes a first part of 4 numbers for an [x, y, w, h] box and then fails.
      raise ValueError("A polygon is a flat list [x1, y1, x2, y2, ...] of at least 3 points; "
                       "got a part with %d numbers." % min(len(p) for p in parts))
    mask = np.zeros(height * width, bool)
    for part in parts:
      mask |= _flat_mask_from_counts(_polygon_counts(part, height, width), height, width)
    return mask
  h, w = (int(v) for v in segmentation["size"])
  if (h, w) != (height, width):
    raise ValueError(f"An RLE of size {[h, w]} on an image of size {[height, width]}; the "
                     f"segmentation's 'size' must be its image's [height, width].")
  return _flat_mask_from_counts(_rle_counts(segmentation), h, w)


def polygons_to_rle(polygons: Sequence[Sequence[float]], height: int, width: int) -> dict:
  """Polygons (one object, parts merged) -> compressed RLE, as pycocotools' frPyObjects + merge."""
  mask = segmentation_to_mask(list(polygons), height, width)
  return rle_encode(mask.reshape((height, width), order="F"))


# ------------------------------------------------------------------------------ IoU

def _box_iou_xywh(dets: np.ndarray, gts: np.ndarray, crowd: np.ndarray) -> np.ndarray:
  """(D, 4) x (G, 4) [x, y, w, h] float64 -> (D, G), maskApi.c's bbIou."""
  d, g = dets[:, None, :], gts[None, :, :]
  w = np.minimum(d[..., 2] + d[..., 0], g[..., 2] + g[..., 0]) - np.maximum(d[..., 0], g[..., 0])
  h = np.minimum(d[..., 3] + d[..., 1], g[..., 3] + g[..., 1]) - np.maximum(d[..., 1], g[..., 1])
  inter = w * h
  det_area, gt_area = d[..., 2] * d[..., 3], g[..., 2] * g[..., 3]
  union = np.where(crowd[None, :], det_area, det_area + gt_area - inter)
  ok = (w > 0) & (h > 0)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(ok, inter / np.where(ok, union, 1), 0.0)


def _mask_iou(dets: np.ndarray, gts: np.ndarray, crowd: np.ndarray) -> np.ndarray:
  """(D, P) x (G, P) bool masks -> (D, G) IoU (crowd: intersection / detection area)."""
  dtype = np.float32 if dets.shape[1] < 2 ** 24 else np.float64  # exact integer counts
  d, g = dets.astype(dtype), gts.astype(dtype)
  inter = (d @ g.T).astype(np.float64)
  det_area, gt_area = d.sum(1, dtype=np.float64), g.sum(1, dtype=np.float64)
  union = np.where(crowd[None, :], det_area[:, None], det_area[:, None] + gt_area[None, :] - inter)
  return np.where(inter > 0, inter / np.where(inter > 0, union, 1), 0.0)


# ------------------------------------------------------------------------------ matching

def _match(ious, det_cat, det_valid, det_area, gt_cat, gt_valid, gt_crowd, gt_area, gt_id):
  """COCOeval.evaluateImg for a batch of images, every category, area range and threshold.

  Args:
    ious: (B, D, G) float64, only same-category pairs are read.
    det_*: (B, D); each image's detections sorted by score (stable), at most 100 per category.
    gt_*: (B, G) in annotation order.

  Returns:
    tp, fp: (A, T, B, D) bool, gt_ignored: (A, B, G) bool.
  """
  num_b, num_d, num_g = det_valid.shape + gt_valid.shape[1:]
  lo = np.array([r[0] for r in AREA_RANGES])[:, None, None]
  hi = np.array([r[1] for r in AREA_RANGES])[:, None, None]
  gt_ignored = gt_crowd[None] | (gt_area[None] < lo) | (gt_area[None] > hi)  # (A, B, G)
  thresholds = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)[None, :, None, None]
  num_a, num_t = len(AREA_RANGES), len(IOU_THRESHOLDS)
  taken = np.zeros((num_a, num_t, num_b, num_g), bool)
  matched = np.full((num_a, num_t, num_b, num_d), -1, np.int64)
  ignored_gt = gt_ignored[:, None]  # (A, 1, B, G)
  crowd = gt_crowd[None, None]
  a_idx, t_idx, b_idx = np.meshgrid(np.arange(num_a), np.arange(num_t), np.arange(num_b),
                                    indexing="ij")
  for j in range(num_d if num_g else 0):
    iou = ious[:, j, :]  # (B, G)
    same = det_valid[:, j, None] & gt_valid & (gt_cat == det_cat[:, j, None])
    candidate = same[None, None] & (iou[None, None] >= thresholds) & (~taken | crowd)
    regular = candidate & ~ignored_gt
    pool = np.where(regular.any(-1, keepdims=True), regular, candidate & ignored_gt)
    value = np.where(pool, iou[None, None], -np.inf)
    best = num_g - 1 - np.argmax(value[..., ::-1], axis=-1)  # the last of equal maxima
    found = pool.any(-1)
    matched[..., j] = np.where(found, best, -1)
    taken[a_idx, t_idx, b_idx, best] |= found
  hit = matched >= 0
  gather = np.maximum(matched, 0)
  batch = np.arange(num_b)[None, None, :, None]
  matched_id = np.where(hit, gt_id[batch, gather], 0)
  det_ignored = hit & np.take_along_axis(
      np.broadcast_to(gt_ignored[:, None], (num_a, num_t, num_b, num_g)), gather, axis=-1)
  outside = (det_area[None] < lo) | (det_area[None] > hi)  # (A, B, D)
  det_ignored |= (matched_id == 0) & outside[:, None]
  counted = det_valid[None, None] & ~det_ignored
  return counted & (matched_id != 0), counted & (matched_id == 0), gt_ignored


class _Evaluation:
  """Per-detection and per-ground-truth results gathered over batches of images."""

  def __init__(self):
    self.det = {k: [] for k in ("image", "rank", "cat", "score", "tp", "fp")}
    self.gt = {k: [] for k in ("cat", "ignored")}

  def add(self, image_index, det_rank, det_score, det_cat, det_valid, det_area, gt_cat, gt_valid,
          gt_crowd, gt_area, gt_id, ious):
    tp, fp, gt_ignored = _match(ious, det_cat, det_valid, det_area, gt_cat, gt_valid, gt_crowd,
                                gt_area, gt_id)
    b, d = np.nonzero(det_valid)
    self.det["image"].append(image_index[b])
    self.det["rank"].append(det_rank[b, d])
    self.det["cat"].append(det_cat[b, d])
    self.det["score"].append(det_score[b, d])
    self.det["tp"].append(tp[:, :, b, d])
    self.det["fp"].append(fp[:, :, b, d])
    b, g = np.nonzero(gt_valid)
    self.gt["cat"].append(gt_cat[b, g])
    self.gt["ignored"].append(gt_ignored[:, b, g])

  def summarize(self, categories: Sequence[int]) -> dict[str, float]:
    """COCOeval.accumulate + summarize."""
    det = {k: (np.concatenate(v, axis=-1) if v else None) for k, v in self.det.items()}
    gt = {k: (np.concatenate(v, axis=-1) if v else None) for k, v in self.gt.items()}
    num_t, num_r, num_k = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(categories)
    num_a, num_m = len(AREA_RANGES), len(MAX_DETECTIONS)
    precision = -np.ones((num_t, num_r, num_k, num_a, num_m))
    recall = -np.ones((num_t, num_k, num_a, num_m))
    for k, category in enumerate(categories):
      in_k = np.flatnonzero(det["cat"] == category) if det["cat"] is not None else np.zeros(0, int)
      # pycocotools concatenates images in id order, each by score, then merge-sorts by score.
      in_k = in_k[np.lexsort((det["rank"][in_k], det["image"][in_k], -det["score"][in_k]))] if (
          in_k.size) else in_k
      gt_k = gt["cat"] == category if gt["cat"] is not None else np.zeros(0, bool)
      for a in range(num_a):
        npig = np.count_nonzero(gt_k & ~gt["ignored"][a]) if gt_k.size else 0
        if npig == 0:
          continue
        for m, max_det in enumerate(MAX_DETECTIONS):
          sel = in_k[det["rank"][in_k] < max_det] if in_k.size else in_k
          nd = sel.size
          if nd == 0:
            recall[:, k, a, m] = 0
            precision[:, :, k, a, m] = 0
            continue
          tp_sum = np.cumsum(det["tp"][a][:, sel], axis=1).astype(float)
          fp_sum = np.cumsum(det["fp"][a][:, sel], axis=1).astype(float)
          rc = tp_sum / npig
          pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
          recall[:, k, a, m] = rc[:, -1]
          pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
          for t in range(num_t):
            inds = np.searchsorted(rc[t], RECALL_THRESHOLDS, side="left")
            precision[t, :, k, a, m] = np.where(inds < nd, pr[t][np.minimum(inds, nd - 1)], 0)
    return _summarize(precision, recall)


def _summarize(precision: np.ndarray, recall: np.ndarray) -> dict[str, float]:
  def mean(s):
    s = s[s > -1]
    return float(np.mean(s)) if s.size else -1.0

  def ap(iou=None, area="all", max_det=100):
    s = precision
    if iou is not None:
      s = s[np.where(iou == IOU_THRESHOLDS)[0]]
    return mean(s[:, :, :, AREA_NAMES.index(area), MAX_DETECTIONS.index(max_det)])

  def ar(area="all", max_det=100):
    return mean(recall[:, :, AREA_NAMES.index(area), MAX_DETECTIONS.index(max_det)])

  values = [ap(), ap(.5), ap(.75), ap(area="small"), ap(area="medium"), ap(area="large"),
            ar(max_det=1), ar(max_det=10), ar(), ar("small"), ar("medium"), ar("large")]
  return dict(zip(COCO_KEYS, values))


def _rank_within_category(scores: np.ndarray, cats: np.ndarray):
  """Stable order by decreasing score and each detection's rank within its category."""
  order = np.argsort(-scores, kind="mergesort")
  ranks = np.zeros(len(scores), np.int64)
  for c in np.unique(cats):
    members = order[cats[order] == c]
    ranks[members] = np.arange(members.size)
  return order, ranks


# ------------------------------------------------------------------------------ COCO format

def _check_ground_truth(ground_truth) -> None:
  if not isinstance(ground_truth, Mapping) or not all(
      k in ground_truth for k in ("images", "annotations", "categories")):
    raise ValueError("ground_truth must be a COCO dict with 'images', 'annotations' and "
                     "'categories' (e.g. json.load of instances_val2017.json).")


def coco_evaluate(ground_truth: Mapping[str, Any], detections: Sequence[Mapping[str, Any]],
                  iou_type: str = "bbox", *, batch_images: int = 64) -> dict[str, float]:
  """The 12 COCO numbers of `detections` against `ground_truth`, as pycocotools' COCOeval.

  Args:
    ground_truth: COCO dict: `images` (id, height, width), `annotations` (id, image_id,
      category_id, bbox [x, y, w, h] pixels, area, iscrowd, and for "segm" segmentation),
      `categories` (id).
    detections: list of dicts with image_id, category_id, score, and bbox [x, y, w, h]
      (for "bbox") or segmentation (for "segm": RLE {"size", "counts" str/bytes/list} or
      polygons [[x1, y1, ...], ...]).
    iou_type: "bbox" or "segm".
    batch_images: images matched together (memory vs. speed; results do not depend on it).

  Returns:
    {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}:
    floats in [0, 1], or -1 where nothing could be measured (e.g. no small objects).
  """
  if iou_type not in ("bbox", "segm"):
    raise ValueError(f"iou_type must be 'bbox' or 'segm'; got {iou_type!r} (keypoints are not "
                     f"supported).")
  _check_ground_truth(ground_truth)
  images = {img["id"]: img for img in ground_truth["images"]}
  image_ids = sorted(images)
  categories = sorted({c["id"] for c in ground_truth["categories"]})
  category_set = set(categories)
  image_position = {i: n for n, i in enumerate(image_ids)}

  gts_per_image = {i: [] for i in image_ids}
  seen = set()
  for ann in ground_truth["annotations"]:
    if ann["image_id"] not in images or ann["category_id"] not in category_set:
      continue  # COCOeval only loads annotations of its images and categories
    if ann["id"] in seen:
      raise ValueError(f"Ground-truth annotation id {ann['id']} appears twice; COCO ids must be "
                       f"unique (pycocotools would silently evaluate one of them twice).")
    if iou_type == "segm" and "segmentation" not in ann:
      raise ValueError(f"Ground-truth annotation {ann['id']} has no 'segmentation'; "
                       f"iou_type='segm' needs every object's mask (polygons or RLE).")
    if "area" not in ann:
      raise ValueError(f"Ground-truth annotation {ann['id']} has no 'area'; COCOeval's area "
                       f"ranges read it (for boxes: w * h; for masks: the mask's pixel count).")
    seen.add(ann["id"])
    gts_per_image[ann["image_id"]].append(ann)

  detections = list(detections)
  box_areas = bool(detections) and bool(detections[0].get("bbox"))  # loadRes's branch
  dets_per_image = {i: [] for i in image_ids}
  for det in detections:
    if det.get("image_id") not in images:
      raise ValueError(f"Detection on image_id {det.get('image_id')!r}, which the ground truth "
                       f"does not have; every detection's image must be in ground_truth['images'].")
    if det["category_id"] in category_set:
      dets_per_image[det["image_id"]].append(det)
  # loadRes's branches: with boxes, areas are w * h (and "segm" uses the segmentation, or the
  # box's polygon where there is none); without, areas and boxes come from the masks.
  needs = {"bbox"} if box_areas else {"segmentation"}
  for det in detections:
    for need in needs:
      if need not in det:
        raise ValueError(f"A detection lacks '{need}': for iou_type={iou_type!r} with "
                         f"{'boxes' if box_areas else 'masks'} in the first detection, every "
                         f"detection needs {sorted(needs)}.")
  result = _Evaluation()

  def flush(chunk, prepared):
    num_d = max([p["det_cat"].size for p in prepared] + [1])
    num_g = max([p["gt_cat"].size for p in prepared] + [1])
    batch = {k: np.stack([_pad(p[k], num_d if k.startswith("det") else num_g) for p in prepared])
             for k in prepared[0] if k != "ious"}
    ious = np.zeros((len(chunk), num_d, num_g))
    for b, p in enumerate(prepared):
      ious[b, :p["ious"].shape[0], :p["ious"].shape[1]] = p["ious"]
    result.add(np.array([image_position[i] for i in chunk]), batch["det_rank"], batch["det_score"],
               batch["det_cat"], batch["det_valid"], batch["det_area"], batch["gt_cat"],
               batch["gt_valid"], batch["gt_crowd"], batch["gt_area"], batch["gt_id"], ious)

  # Up to `batch_images` images at a time, fewer when they hold many detections: the
  # matching state is (areas x thresholds x images x max detections [x max ground truth]).
  chunk, prepared, widest = [], [], (1, 1)
  for i in image_ids:
    p = _prepare_image(images[i], gts_per_image[i], dets_per_image[i], iou_type, box_areas)
    grown = (max(widest[0], p["det_cat"].size), max(widest[1], p["gt_cat"].size))
    if chunk and (len(chunk) == batch_images or
                  (len(chunk) + 1) * grown[0] * grown[1] * len(IOU_THRESHOLDS) > _MATCH_BUDGET):
      flush(chunk, prepared)
      chunk, prepared, grown = [], [], (max(p["det_cat"].size, 1), max(p["gt_cat"].size, 1))
    chunk.append(i)
    prepared.append(p)
    widest = grown
  if chunk:
    flush(chunk, prepared)
  return result.summarize(categories)


def _pad(x: np.ndarray, n: int) -> np.ndarray:
  out = np.zeros((n,), x.dtype)
  out[:x.size] = x
  return out


def _prepare_image(image, gts, dets, iou_type, box_areas):
  """One image's arrays: detections by score (at most 100 per category), IoUs (D, G)."""
  scores = np.array([d["score"] for d in dets], np.float64)
  det_cat = np.array([d["category_id"] for d in dets], np.int64)
  order, ranks = _rank_within_category(scores, det_cat)
  order = order[ranks[order] < MAX_DETECTIONS[-1]]
  dets = [dets[i] for i in order]
  gt_cat = np.array([g["category_id"] for g in gts], np.int64)
  gt_crowd = np.array([bool(g.get("iscrowd", 0)) for g in gts], bool)
  height, width = int(image.get("height", 0)), int(image.get("width", 0))
  if iou_type == "segm" and (height <= 0 or width <= 0):
    raise ValueError(f"Image {image['id']} needs 'height' and 'width' to rasterise masks.")
  masks = None
  if iou_type == "segm" or not box_areas:
    if dets and (height <= 0 or width <= 0):
      raise ValueError(f"Image {image['id']} needs 'height' and 'width' to rasterise masks.")
    # loadRes gives a box without a segmentation the box's polygon.
    masks = [segmentation_to_mask(d["segmentation"] if "segmentation" in d else
                                  _box_polygon(d["bbox"]), height, width) for d in dets]
  if box_areas:
    det_boxes = np.array([d["bbox"] for d in dets], np.float64).reshape(-1, 4)
    det_area = det_boxes[:, 2] * det_boxes[:, 3]
  else:
    det_area = np.array([m.sum() for m in masks], np.float64)
    det_boxes = np.array([rle_to_bbox(rle_encode(m.reshape((height, width), order="F")))
                          for m in masks], np.float64).reshape(-1, 4)
  ious = np.zeros((len(dets), len(gts)))
  if dets and gts:
    d_cat, g_cat = det_cat[order], gt_cat
    for c in np.intersect1d(d_cat, g_cat):
      di, gi = np.flatnonzero(d_cat == c), np.flatnonzero(g_cat == c)
      if iou_type == "bbox":
        gt_boxes = np.array([gts[g]["bbox"] for g in gi], np.float64).reshape(-1, 4)
        block = _box_iou_xywh(det_boxes[di], gt_boxes, gt_crowd[gi])
      else:
        gt_masks = np.stack([segmentation_to_mask(gts[g]["segmentation"], height, width)
                             for g in gi])
        block = _mask_iou(np.stack([masks[d] for d in di]), gt_masks, gt_crowd[gi])
      ious[np.ix_(di, gi)] = block
  return {
      "det_rank": ranks[order], "det_score": scores[order], "det_cat": det_cat[order],
      "det_valid": np.ones(len(dets), bool), "det_area": det_area,
      "gt_cat": gt_cat, "gt_valid": np.ones(len(gts), bool), "gt_crowd": gt_crowd,
      "gt_area": np.array([g["area"] for g in gts], np.float64),
      "gt_id": np.array([g["id"] for g in gts], np.int64), "ious": ious}


# ------------------------------------------------------------------------------ padded arrays

def coco_evaluate_padded(gt_boxes, gt_classes, gt_valid, det_boxes, det_scores, det_classes,
                         det_valid, *, gt_crowd=None, gt_areas=None, gt_masks=None,
                         det_masks=None) -> dict[str, float]:
  """The COCO numbers from padded arrays, e.g. the outputs of a jitted eval step.

  Box AP, or mask AP when `gt_masks` and `det_masks` are given. Equal to `coco_evaluate` on
  the same objects written as COCO dicts (image i, ground-truth ids 1, 2, ... in array order,
  detections with `bbox` (so their areas are w * h) and, for masks, their RLE). Vectorised
  over images (in batches bounded by memory).

  Args:
    gt_boxes: (B, G, 4) float (x1, y1, x2, y2) pixels.
    gt_classes: (B, G) int category ids.
    gt_valid: (B, G) bool, False for padding.
    det_boxes: (B, D, 4) float (x1, y1, x2, y2) pixels.
    det_scores: (B, D) float.
    det_classes: (B, D) int category ids.
    det_valid: (B, D) bool, False for padding.
    gt_crowd: (B, G) bool iscrowd regions; None: none.
    gt_areas: (B, G) float areas for the area ranges (COCO's `area`); None: the mask pixel
      counts with masks, else the box areas.
    gt_masks: (B, G, H, W) bool instance masks in image pixels, or None.
    det_masks: (B, D, H, W) bool (e.g. pasted and thresholded at 0.5), or None.

  Returns:
    the 12 numbers, as `coco_evaluate`.
  """
  gt_boxes, det_boxes = np.asarray(gt_boxes, np.float64), np.asarray(det_boxes, np.float64)
  gt_classes, det_classes = np.asarray(gt_classes, np.int64), np.asarray(det_classes, np.int64)
  gt_valid, det_valid = np.asarray(gt_valid, bool), np.asarray(det_valid, bool)
  det_scores = np.asarray(det_scores, np.float64)
  num_b, num_g = gt_valid.shape
  num_d = det_valid.shape[1]
  if gt_boxes.shape != (num_b, num_g, 4) or det_boxes.shape != (num_b, num_d, 4) or \
      det_scores.shape != (num_b, num_d) or gt_classes.shape != (num_b, num_g) or \
      det_classes.shape != (num_b, num_d):
    raise ValueError(
        f"coco_evaluate_padded needs gt_boxes (B, G, 4), gt_classes/gt_valid (B, G), det_boxes "
        f"(B, D, 4), det_scores/det_classes/det_valid (B, D); got {gt_boxes.shape}, "
        f"{gt_classes.shape}, {gt_valid.shape}, {det_boxes.shape}, {det_scores.shape}, "
        f"{det_classes.shape}, {det_valid.shape}.")
  if (gt_masks is None) != (det_masks is None):
    raise ValueError("Give both gt_masks and det_masks (mask AP) or neither (box AP).")
  if gt_masks is not None:
    gt_masks, det_masks = np.asarray(gt_masks, bool), np.asarray(det_masks, bool)
    if gt_masks.ndim != 4 or gt_masks.shape[:2] != (num_b, num_g) or \
        det_masks.shape != (num_b, num_d) + gt_masks.shape[2:]:
      raise ValueError(f"gt_masks must be (B, G, H, W) and det_masks (B, D, H, W) for the same "
                       f"image size; got {gt_masks.shape} and {det_masks.shape}.")
    gt_masks = gt_masks.reshape(num_b, num_g, -1)
    det_masks = det_masks.reshape(num_b, num_d, -1)
  gt_crowd = np.zeros((num_b, num_g), bool) if gt_crowd is None else np.asarray(gt_crowd, bool)
  gt_xywh = np.concatenate([gt_boxes[..., :2], gt_boxes[..., 2:] - gt_boxes[..., :2]], -1)
  det_xywh = np.concatenate([det_boxes[..., :2], det_boxes[..., 2:] - det_boxes[..., :2]], -1)
  if gt_areas is not None:
    gt_areas = np.asarray(gt_areas, np.float64)
  elif gt_masks is not None:
    gt_areas = gt_masks.sum(-1).astype(np.float64)
  else:
    gt_areas = gt_xywh[..., 2] * gt_xywh[..., 3]
  # Per image: stable sort by score (invalid last), rank within category, keep 100 per category.
  order = np.argsort(np.where(det_valid, -det_scores, np.inf), axis=1, kind="mergesort")
  take = lambda x: np.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
  det_xywh, det_scores, det_classes, det_valid = (take(det_xywh), take(det_scores),
                                                  take(det_classes), take(det_valid))
  if det_masks is not None:
    det_masks = take(det_masks)
  same = (det_classes[:, :, None] == det_classes[:, None, :]) & det_valid[:, None, :]
  rank = np.sum(np.tril(np.ones((num_d, num_d), bool), -1)[None] & same, axis=2)
  det_valid = det_valid & (rank < MAX_DETECTIONS[-1])
  gt_ids = np.broadcast_to(np.arange(1, num_g + 1), (num_b, num_g))
  result = _Evaluation()
  step = max(1, _MATCH_BUDGET // (max(num_d, 1) * max(num_g, 1) * len(IOU_THRESHOLDS)))
  for start in range(0, num_b, step):
    part = slice(start, start + step)
    ious = np.zeros((len(range(num_b)[part]), num_d, num_g))
    for n, b in enumerate(range(num_b)[part]):
      if num_d and num_g:
        if gt_masks is None:
          ious[n] = _box_iou_xywh(det_xywh[b], gt_xywh[b], gt_crowd[b])
        else:
          ious[n] = _mask_iou(det_masks[b], gt_masks[b], gt_crowd[b])
    result.add(np.arange(num_b)[part], rank[part], det_scores[part], det_classes[part],
               det_valid[part], det_xywh[part, :, 2] * det_xywh[part, :, 3], gt_classes[part],
               gt_valid[part], gt_crowd[part], gt_areas[part], gt_ids[part], ious)
  return result.summarize(np.unique(gt_classes[gt_valid]).tolist())


# ------------------------------------------------------------------------------ VOC

def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
  """PASCAL VOC average precision from a precision/recall curve (detectron2's `voc_ap`).

  Args:
    recall, precision: (N,) float, cumulative over detections by decreasing score.
    use_07_metric: VOC2007's 11-point interpolated AP (max precision at recall >= 0, 0.1, ...,
      1); False: VOC2010+ all-point AP (area under the monotone precision envelope).
  """
  recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
  if use_07_metric:
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
      p = np.max(precision[recall >= t]) if np.sum(recall >= t) else 0.0
      ap += p / 11.0
    return float(ap)
  mrec = np.concatenate(([0.0], recall, [1.0]))
  mpre = np.concatenate(([0.0], precision, [0.0]))
  mpre = np.maximum.accumulate(mpre[::-1])[::-1]
  i = np.flatnonzero(mrec[1:] != mrec[:-1])
  return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def voc_evaluate(ground_truth: Sequence[Mapping[str, Any]], detections: Sequence[Mapping[str, Any]],
                 *, iou_threshold: float = 0.5, use_07_metric: bool = True,
                 inclusive_pixels: bool = True) -> dict[str, Any]:
  """Per-class PASCAL VOC AP with "difficult" objects (the devkit's / detectron2's `voc_eval`).

  A detection matches the unmatched ground truth of its class with the highest IoU above
  `iou_threshold` (strictly); matching a difficult object is neither a true nor a false
  positive; difficult objects do not count in the recall.

  Args:
    ground_truth: per image, {"boxes": (G, 4) x1 y1 x2 y2, "labels": (G,) int,
      "difficult": (G,) bool (optional)}.
    detections: per image (same order), {"boxes": (D, 4), "scores": (D,), "labels": (D,)}.
    iou_threshold: 0.5 for VOC.
    use_07_metric: 11-point AP (VOC2007 test) or all-point AP (VOC2010+).
    inclusive_pixels: the devkit's convention: integer pixel coordinates whose boxes include
      both ends (width x2 - x1 + 1); False for continuous coordinates (width x2 - x1).

  Returns:
    {"AP": {label: ap}, "mAP": mean over labels with ground truth}.
  """
  if len(ground_truth) != len(detections):
    raise ValueError(f"ground_truth has {len(ground_truth)} images and detections "
                     f"{len(detections)}; give one entry per image, in the same order.")
  one = 1.0 if inclusive_pixels else 0.0
  labels = set()
  for g in ground_truth:
    labels.update(np.asarray(g["labels"]).tolist())
  aps = {}
  for label in sorted(labels):
    gt_boxes, gt_difficult, npos = [], [], 0
    for g in ground_truth:
      sel = np.asarray(g["labels"]) == label
      boxes = np.asarray(g["boxes"], np.float64).reshape(-1, 4)[sel]
      difficult = np.asarray(g.get("difficult", np.zeros(sel.size, bool)), bool)[sel]
      gt_boxes.append(boxes)
      gt_difficult.append(difficult)
      npos += int(np.sum(~difficult))
    image_ids, scores, boxes = [], [], []
    for i, d in enumerate(detections):
      sel = np.asarray(d["labels"]) == label
      image_ids.extend([i] * int(sel.sum()))
      scores.append(np.asarray(d["scores"], np.float64)[sel])
      boxes.append(np.asarray(d["boxes"], np.float64).reshape(-1, 4)[sel])
    scores, boxes = np.concatenate(scores), np.concatenate(boxes)
    order = np.argsort(-scores, kind="stable")
    taken = [np.zeros(len(b), bool) for b in gt_boxes]
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for n, i in enumerate(order):
      image, box, gts = image_ids[i], boxes[i], gt_boxes[image_ids[i]]
      best, j = -np.inf, -1
      if gts.size:
        iw = np.maximum(np.minimum(gts[:, 2], box[2]) - np.maximum(gts[:, 0], box[0]) + one, 0.0)
        ih = np.maximum(np.minimum(gts[:, 3], box[3]) - np.maximum(gts[:, 1], box[1]) + one, 0.0)
        inter = iw * ih
        union = ((box[2] - box[0] + one) * (box[3] - box[1] + one) +
                 (gts[:, 2] - gts[:, 0] + one) * (gts[:, 3] - gts[:, 1] + one) - inter)
        overlaps = inter / union
        j = int(np.argmax(overlaps))
        best = overlaps[j]
      if best > iou_threshold:
        if not gt_difficult[image][j]:
          if not taken[image][j]:
            tp[n] = 1.0
            taken[image][j] = True
          else:
            fp[n] = 1.0
      else:
        fp[n] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    recall = tp / float(npos) if npos else np.zeros_like(tp)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    aps[label] = voc_ap(recall, precision, use_07_metric) if npos else float("nan")
  valid = [v for v in aps.values() if not np.isnan(v)]
  return {"AP": aps, "mAP": float(np.mean(valid)) if valid else float("nan")}
