"""The box toolkit of two-stage detectors: IoU, box coder, anchors, matcher, sampler, NMS.

Everything here is jit-able and vmappable with static shapes. Boxes are float32
`(x1, y1, x2, y2)` in input-image pixels, widths are `x2 - x1` (torchvision and detectron2,
no `+ 1`). Variable-length sets (ground truth, proposals, detections) are padded to a fixed
size and carry a boolean validity mask.

What each part matches (the tests check it against float64 NumPy transcriptions and, through
golden outputs, against torchvision itself):

- `box_area`, `box_iou`, `generalized_box_iou`: `torchvision.ops.box_area/box_iou/
  generalized_box_iou`, except that 0 / 0 (two zero-area boxes) gives IoU 0 where torchvision
  gives NaN (detectron2's `pairwise_iou` also gives 0), and a zero-area enclosing box adds no
  GIoU penalty.
- `BoxCoder`: torchvision's `det_utils.BoxCoder` = detectron2's `Box2BoxTransform`.
- `cell_anchors`, `grid_anchors`, `AnchorGenerator`: torchvision's `AnchorGenerator` by default
  (cell anchors rounded, aspect-ratio-major, no offset); `convention="detectron2"` gives
  `DefaultAnchorGenerator` (not rounded, size-major, `offset` 0.0 by default). Both lay anchors
  out position-major (row-major over the feature map), then the anchors of a cell.
- `Matcher`: torchvision's `det_utils.Matcher` (and detectron2's with thresholds
  `[low, high]`, labels `[0, -1, 1]`), with padded ground truth.
- `sample_balanced`: the distribution of torchvision's `BalancedPositiveNegativeSampler`
  (= detectron2's `subsample_labels`), with fixed-size outputs.
- `nms`, `batched_nms`: torchvision's `nms` / `batched_nms` (its CPU kernel: stable
  descending sort by score, suppress when IoU > threshold), with a fixed output size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kernels import divide

# detectron2 / torchvision's default clamp of dw, dh before exp: boxes at most 1000/16 times
# larger than their reference box.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _check_boxes(boxes, name: str) -> None:
  if boxes.ndim < 1 or boxes.shape[-1] != 4:
    raise ValueError(f"{name} must have shape (..., 4) holding (x1, y1, x2, y2); got shape "
                     f"{tuple(boxes.shape)}. Stack the four coordinates on the last axis.")


# ------------------------------------------------------------------------------ IoU

def box_area(boxes: jax.Array) -> jax.Array:
  """Areas `(x2 - x1) * (y2 - y1)`.

  Args:
    boxes: (..., 4) float (x1, y1, x2, y2) pixels.

  Returns:
    (...,) float, square pixels (negative for boxes with x2 < x1 xor y2 < y1, as torchvision).
  """
  _check_boxes(boxes, "boxes")
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _intersection_union(boxes1, boxes2):
  area1 = box_area(boxes1)
  area2 = box_area(boxes2)
  top_left = jnp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
  bottom_right = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
  wh = jnp.maximum(bottom_right - top_left, 0)
  intersection = wh[..., 0] * wh[..., 1]
  union = area1[:, None] + area2[None, :] - intersection
  return intersection, union


def _safe_ratio(numerator, denominator):
  # 0 where the denominator is 0, with finite gradients on both branches.
  nonzero = denominator != 0
  return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0)


def box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Pairwise intersection over union.

  Args:
    boxes1: (N, 4) float (x1, y1, x2, y2) pixels.
    boxes2: (M, 4) float, same format.

  Returns:
    (N, M) float in [0, 1]; 0 where the union is empty (two zero-area boxes; torchvision: NaN).
  """
  _check_boxes(boxes1, "boxes1")
  _check_boxes(boxes2, "boxes2")
  intersection, union = _intersection_union(boxes1, boxes2)
  return _safe_ratio(intersection, union)


def generalized_box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Pairwise generalized IoU (Rezatofighi et al. 2019): IoU - (C - U) / C, C the enclosing box.

  Args:
    boxes1: (N, 4) float (x1, y1, x2, y2) pixels.
    boxes2: (M, 4) float, same format.

  Returns:
    (N, M) float in [-1, 1]; the penalty term is 0 where the enclosing box has zero area
    (torchvision: NaN).
  """
  _check_boxes(boxes1, "boxes1")
  _check_boxes(boxes2, "boxes2")
  intersection, union = _intersection_union(boxes1, boxes2)
  iou = _safe_ratio(intersection, union)
  top_left = jnp.minimum(boxes1[:, None, :2], boxes2[None, :, :2])
  bottom_right = jnp.maximum(boxes1[:, None, 2:], boxes2[None, :, 2:])
  wh = jnp.maximum(bottom_right - top_left, 0)
  enclosing = wh[..., 0] * wh[..., 1]
  return iou - _safe_ratio(enclosing - union, enclosing)


def clip_boxes(boxes: jax.Array, height, width) -> jax.Array:
  """Clips (..., 4) boxes to [0, width] x [0, height] (torchvision's `clip_boxes_to_image`)."""
  _check_boxes(boxes, "boxes")
  x = jnp.clip(boxes[..., 0::2], 0, width)
  y = jnp.clip(boxes[..., 1::2], 0, height)
  return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


# ------------------------------------------------------------------------------ box coder

@dataclasses.dataclass(frozen=True)
class BoxCoder:
  """Box deltas (dx, dy, dw, dh) relative to reference boxes (R-CNN, Girshick et al. 2014, App. C).

  `encode` gives `(wx (gx - px) / pw, wy (gy - py) / ph, ww log(gw / pw), wh log(gh / ph))`
  with widths `x2 - x1` and centres `x1 + 0.5 w`; `decode` inverts it, clamping dw, dh at
  `clamp` before `exp`. Weights (10, 10, 5, 5) are the RoI heads' default, (1, 1, 1, 1)
  the RPN's. Padded entries must hold a box of positive size (zero widths divide by zero).

  Attributes:
    weights: (wx, wy, ww, wh).
    clamp: upper bound of dw, dh (after dividing by the weights) before exp (detectron2's
      `scale_clamp`, torchvision's `bbox_xform_clip`).
  """
  weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
  clamp: float = DEFAULT_SCALE_CLAMP

  def __post_init__(self):
    if len(self.weights) != 4 or any(w <= 0 for w in self.weights):
      raise ValueError(f"BoxCoder weights must be four positive numbers (wx, wy, ww, wh); got "
                       f"{self.weights}. Use (10, 10, 5, 5) for RoI heads, (1, 1, 1, 1) for an RPN.")

  def encode(self, boxes: jax.Array, reference_boxes: jax.Array) -> jax.Array:
    """Deltas that take `reference_boxes` (anchors, proposals) to `boxes` (matched ground truth).

    Args:
      boxes: (..., 4) float (x1, y1, x2, y2) pixels, the targets.
      reference_boxes: (..., 4), broadcastable against `boxes`.

    Returns:
      (..., 4) float32 deltas (dx, dy, dw, dh).
    """
    _check_boxes(boxes, "boxes")
    _check_boxes(reference_boxes, "reference_boxes")
    wx, wy, ww, wh = self.weights
    pw = reference_boxes[..., 2] - reference_boxes[..., 0]
    ph = reference_boxes[..., 3] - reference_boxes[..., 1]
    px = reference_boxes[..., 0] + 0.5 * pw
    py = reference_boxes[..., 1] + 0.5 * ph
    gw = boxes[..., 2] - boxes[..., 0]
    gh = boxes[..., 3] - boxes[..., 1]
    gx = boxes[..., 0] + 0.5 * gw
    gy = boxes[..., 1] + 0.5 * gh
    return jnp.stack([wx * (gx - px) / pw, wy * (gy - py) / ph,
                      ww * jnp.log(gw / pw), wh * jnp.log(gh / ph)], axis=-1)

  def decode(self, deltas: jax.Array, reference_boxes: jax.Array) -> jax.Array:
    """Boxes from deltas applied to reference boxes.

    Args:
      deltas: (..., 4) float (dx, dy, dw, dh). For class-specific regression pass
        (N, K, 4) deltas with (N, 1, 4) reference boxes.
      reference_boxes: (..., 4) float (x1, y1, x2, y2) pixels, broadcastable against `deltas`.

    Returns:
      (..., 4) float32 (x1, y1, x2, y2) pixels.
    """
    _check_boxes(deltas, "deltas")
    _check_boxes(reference_boxes, "reference_boxes")
    reference_boxes = reference_boxes.astype(deltas.dtype)
    wx, wy, ww, wh = self.weights
    widths = reference_boxes[..., 2] - reference_boxes[..., 0]
    heights = reference_boxes[..., 3] - reference_boxes[..., 1]
    ctr_x = reference_boxes[..., 0] + 0.5 * widths
    ctr_y = reference_boxes[..., 1] + 0.5 * heights
    # True divisions, as torchvision computes them (XLA would multiply by 1/w).
    dx = divide(deltas[..., 0], wx)
    dy = divide(deltas[..., 1], wy)
    dw = jnp.minimum(divide(deltas[..., 2], ww), self.clamp)
    dh = jnp.minimum(divide(deltas[..., 3], wh), self.clamp)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    half_w = 0.5 * (jnp.exp(dw) * widths)
    half_h = 0.5 * (jnp.exp(dh) * heights)
    return jnp.stack([pred_ctr_x - half_w, pred_ctr_y - half_h,
                      pred_ctr_x + half_w, pred_ctr_y + half_h], axis=-1)


# ------------------------------------------------------------------------------ anchors

_CONVENTIONS = ("torchvision", "detectron2")


def _check_convention(convention: str) -> None:
  if convention not in _CONVENTIONS:
    raise ValueError(f"Unknown anchor convention {convention!r}; use one of {_CONVENTIONS}.")


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float], *,
                 convention: str = "torchvision") -> np.ndarray:
  """The anchors of one feature-map cell, centred on (0, 0).

  Aspect ratio = height / width; an anchor of size s and ratio r has area s^2.

  Args:
    sizes: anchor sizes (sqrt of the area) in pixels.
    aspect_ratios: height / width ratios.
    convention: "torchvision": computed in float32, ordered ratio-major (all sizes of the
      first ratio, then the next ratio), rounded to whole pixels (round half to even), as
      `AnchorGenerator.generate_anchors`. "detectron2": computed in float64 and cast to
      float32, ordered size-major, not rounded, as `DefaultAnchorGenerator.generate_cell_anchors`.

  Returns:
    (len(sizes) * len(aspect_ratios), 4) float32 NumPy array (x1, y1, x2, y2) pixels.
  """
  _check_convention(convention)
  if not sizes or not aspect_ratios or min(sizes) <= 0 or min(aspect_ratios) <= 0:
    raise ValueError(f"Anchor sizes and aspect ratios must be non-empty and positive; got sizes="
                     f"{tuple(sizes)}, aspect_ratios={tuple(aspect_ratios)}.")
  if convention == "torchvision":
    scales = np.asarray(sizes, np.float32)
    h_ratios = np.sqrt(np.asarray(aspect_ratios, np.float32))
    w_ratios = np.float32(1) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)).astype(np.float32)
  anchors = []
  for size in sizes:
    for ratio in aspect_ratios:
      w = math.sqrt(size ** 2.0 / ratio)
      h = ratio * w
      anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
  return np.asarray(anchors, np.float64).astype(np.float32)


def grid_anchors(cell: np.ndarray, grid_size: tuple[int, int], stride: tuple[int, int], *,
                 offset: float = 0.0) -> np.ndarray:
  """Cell anchors shifted to every position of a feature map.

  Args:
    cell: (A, 4) float32 cell anchors (`cell_anchors`).
    grid_size: (height, width) of the feature map.
    stride: (stride_y, stride_x) in input pixels per feature-map cell.
    offset: shift of the anchor centres in strides (detectron2's `ANCHOR_GENERATOR.OFFSET`;
      torchvision has none, 0.0).

  Returns:
    (height * width * A, 4) float32 NumPy array: row-major positions, the A anchors of a
    position consecutive.
  """
  grid_h, grid_w = grid_size
  stride_y, stride_x = stride
  shifts_x = (np.arange(grid_w, dtype=np.float32) + np.float32(offset)) * np.float32(stride_x)
  shifts_y = (np.arange(grid_h, dtype=np.float32) + np.float32(offset)) * np.float32(stride_y)
  shift_y, shift_x = np.meshgrid(shifts_y, shifts_x, indexing="ij")
  shifts = np.stack([shift_x.ravel(), shift_y.ravel(), shift_x.ravel(), shift_y.ravel()], axis=1)
  return (shifts[:, None, :] + np.asarray(cell, np.float32)[None, :, :]).reshape(-1, 4)


@dataclasses.dataclass(frozen=True)
class AnchorGenerator:
  """Anchors for one or more feature maps (one per FPN level).

  Defaults are torchvision's `fasterrcnn_resnet50_fpn` ones: one size per level (32 ... 512),
  ratios (0.5, 1, 2), strides 4 ... 64 (P2-P6).

  Attributes:
    sizes: per level, the anchor sizes in pixels.
    aspect_ratios: per level, the height / width ratios (one tuple is used for every level).
    strides: per level, the stride in input pixels (square).
    convention: "torchvision" (default) or "detectron2"; see `cell_anchors`.
    offset: anchor-centre offset in strides; None: 0.0 (both libraries' default).
  """
  sizes: tuple[tuple[float, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
  aspect_ratios: tuple[tuple[float, ...], ...] = ((0.5, 1.0, 2.0),)
  strides: tuple[int, ...] = (4, 8, 16, 32, 64)
  convention: str = "torchvision"
  offset: float | None = None

  def __post_init__(self):
    _check_convention(self.convention)
    if len(self.aspect_ratios) not in (1, len(self.sizes)) or len(self.strides) != len(self.sizes):
      raise ValueError(
          f"AnchorGenerator needs one entry of sizes and strides per level and one aspect-ratio "
          f"tuple per level (or one for all); got {len(self.sizes)} sizes, {len(self.strides)} "
          f"strides, {len(self.aspect_ratios)} aspect-ratio tuples.")

  def _ratios(self, level):
    return self.aspect_ratios[0] if len(self.aspect_ratios) == 1 else self.aspect_ratios[level]

  def num_anchors_per_location(self) -> list[int]:
    """A per level: len(sizes) * len(aspect_ratios)."""
    return [len(s) * len(self._ratios(i)) for i, s in enumerate(self.sizes)]

  def __call__(self, grid_sizes: Sequence[tuple[int, int]]) -> list[jax.Array]:
    """Anchors of each level.

    Args:
      grid_sizes: per level, the feature map's (height, width) (static).

    Returns:
      per level, (H_l * W_l * A_l, 4) float32 (x1, y1, x2, y2) pixels; concatenate them for
      the whole image (torchvision's order).
    """
    if len(grid_sizes) != len(self.sizes):
      raise ValueError(f"Got {len(grid_sizes)} feature maps for an AnchorGenerator with "
                       f"{len(self.sizes)} levels; pass one (height, width) per level.")
    offset = 0.0 if self.offset is None else self.offset
    return [jnp.asarray(grid_anchors(cell_anchors(self.sizes[i], self._ratios(i),
                                                  convention=self.convention),
                                     tuple(grid_sizes[i]), (self.strides[i],) * 2, offset=offset))
            for i in range(len(self.sizes))]


# ------------------------------------------------------------------------------ matcher

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


class Matches(NamedTuple):
  """A matcher's output for N predictions (anchors or proposals).

  Attributes:
    matches: (N,) int32, torchvision's convention: the matched ground-truth index (>= 0),
      BELOW_LOW_THRESHOLD (-1, a negative) or BETWEEN_THRESHOLDS (-2, ignored; also invalid
      predictions).
    labels: (N,) int32, detectron2's convention: 1 positive, 0 negative, -1 ignored.
    gt_index: (N,) int32, the ground truth of highest quality for every prediction (0 when
      there is no valid ground truth): gather regression targets with it, use `labels` to mask.
  """
  matches: jax.Array
  labels: jax.Array
  gt_index: jax.Array


@dataclasses.dataclass(frozen=True)
class Matcher:
  """Assigns each prediction the ground truth it overlaps most (Faster R-CNN, Ren et al. 2015, 3.1.2).

  Quality >= high: matched (positive); low <= quality < high: ignored; quality < low:
  negative. With `allow_low_quality_matches`, every prediction whose quality with some ground
  truth equals that ground truth's highest quality (ties included, even when it is 0) is
  matched to its own best ground truth, as in torchvision and detectron2.

  Defaults: RPN (0.7, 0.3, True); Fast/Faster R-CNN heads (0.5, 0.5, False).
  Invalid (padding) ground truth is never matched; an image without valid ground truth gets
  only negatives. Invalid predictions get matches -2 and labels -1.
  """
  high_threshold: float = 0.7
  low_threshold: float = 0.3
  allow_low_quality_matches: bool = True

  def __post_init__(self):
    if self.low_threshold > self.high_threshold:
      raise ValueError(f"Matcher low_threshold ({self.low_threshold}) must be <= high_threshold "
                       f"({self.high_threshold}).")

  def __call__(self, quality: jax.Array, gt_valid: jax.Array | None = None,
               prediction_valid: jax.Array | None = None) -> Matches:
    """Matches N predictions to G ground-truth entries.

    Args:
      quality: (G, N) float, e.g. `box_iou(gt_boxes, anchors)` (values >= 0).
      gt_valid: (G,) bool, False for padding; None: all valid.
      prediction_valid: (N,) bool, False for padding; None: all valid.

    Returns:
      `Matches` with (N,) int32 arrays.
    """
    quality = jnp.asarray(quality)
    if quality.ndim != 2:
      raise ValueError(f"quality must be (G, N) ground truth x predictions; got shape "
                       f"{tuple(quality.shape)}.")
    num_gt, num_pred = quality.shape
    gt_valid = jnp.ones((num_gt,), bool) if gt_valid is None else jnp.asarray(gt_valid, bool)
    pred_valid = (jnp.ones((num_pred,), bool) if prediction_valid is None
                  else jnp.asarray(prediction_valid, bool))
    return _match(quality, gt_valid, pred_valid, self.high_threshold, self.low_threshold,
                  self.allow_low_quality_matches)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _match(quality, gt_valid, pred_valid, high_threshold, low_threshold, allow_low_quality_matches):
  num_gt, num_pred = quality.shape
  valid = gt_valid[:, None] & pred_valid[None, :]
  # Invalid pairs get a quality below every threshold and below every real IoU.
  quality = jnp.where(valid, quality, -1.0)
  if num_gt == 0:
    best = jnp.full((num_pred,), -1.0, quality.dtype)
    gt_index = jnp.zeros((num_pred,), jnp.int32)
  else:
    best = quality.max(axis=0)
    gt_index = jnp.argmax(quality, axis=0).astype(jnp.int32)  # first maximum, as torch.max
  matches = jnp.where(best >= high_threshold, gt_index,
                      jnp.where(best >= low_threshold, BETWEEN_THRESHOLDS, BELOW_LOW_THRESHOLD))
  # No valid ground truth at all: every valid prediction is a negative.
  matches = jnp.where(best < 0, BELOW_LOW_THRESHOLD, matches).astype(jnp.int32)
  if allow_low_quality_matches and num_gt > 0:
    highest_per_gt = quality.max(axis=1, keepdims=True)
    is_best = (quality == highest_per_gt) & valid
    matches = jnp.where(is_best.any(axis=0), gt_index, matches)
  matches = jnp.where(pred_valid, matches, BETWEEN_THRESHOLDS).astype(jnp.int32)
  labels = jnp.where(matches >= 0, 1, jnp.where(matches == BELOW_LOW_THRESHOLD, 0, -1))
  return Matches(matches, labels.astype(jnp.int32), gt_index)


# ------------------------------------------------------------------------------ sampler

class Sample(NamedTuple):
  """A fixed-size sample of predictions.

  Attributes:
    indices: (S,) int32 indices into the N predictions; positives first, then negatives,
      then padding (index 0).
    is_positive: (S,) bool.
    valid: (S,) bool, False for the padding slots.
  """
  indices: jax.Array
  is_positive: jax.Array
  valid: jax.Array


@functools.partial(jax.jit, static_argnames=("batch_size_per_image", "positive_fraction"))
def sample_balanced(key: jax.Array, labels: jax.Array, batch_size_per_image: int,
                    positive_fraction: float) -> Sample:
  """Random positives and negatives in a fixed proportion (Fast R-CNN, Girshick 2015, 2.3).

  Takes `min(#positives, int(batch_size_per_image * positive_fraction))` positives uniformly
  at random and fills the rest of the batch with as many negatives as there are (at most),
  uniformly at random: the distribution of torchvision's `BalancedPositiveNegativeSampler`.
  Reproducible from `key`; vmap over images with one key each.

  Args:
    key: a jax.random key.
    labels: (N,) int, 1 positive, 0 negative, -1 ignored (`Matches.labels`).
    batch_size_per_image: S, the number of slots (static).
    positive_fraction: the largest share of positives.

  Returns:
    `Sample` with (S,) arrays.
  """
  if not 0.0 <= positive_fraction <= 1.0 or batch_size_per_image <= 0:
    raise ValueError(f"sample_balanced needs batch_size_per_image > 0 and 0 <= positive_fraction "
                     f"<= 1; got {batch_size_per_image}, {positive_fraction}.")
  if labels.ndim != 1:
    raise ValueError(f"labels must be (N,); got shape {tuple(labels.shape)}. vmap over images.")
  n = labels.shape[0]
  size = batch_size_per_image
  max_positives = int(size * positive_fraction)
  positive = labels == 1
  negative = labels == 0
  num_pos = jnp.minimum(positive.sum(), max_positives)
  num_neg = jnp.minimum(negative.sum(), size - num_pos)
  # A uniformly random order of each set: the members sorted by i.i.d. uniform keys.
  noise = jax.random.uniform(key, (n,))
  k = min(size, n)
  _, pos_order = jax.lax.top_k(jnp.where(positive, noise, -1.0), min(max(max_positives, 1), n))
  _, neg_order = jax.lax.top_k(jnp.where(negative, noise, -1.0), k)
  slot = jnp.arange(size)
  pos_index = pos_order[jnp.clip(slot, 0, pos_order.shape[0] - 1)]
  neg_index = neg_order[jnp.clip(slot - num_pos, 0, k - 1)]
  is_positive = slot < num_pos
  valid = slot < num_pos + num_neg
  indices = jnp.where(is_positive, pos_index, jnp.where(valid, neg_index, 0))
  return Sample(indices.astype(jnp.int32), is_positive, valid)


# ------------------------------------------------------------------------------ NMS

class Kept(NamedTuple):
  """NMS output.

  Attributes:
    indices: (max_output,) int32 indices of the kept boxes, by decreasing score (equal scores:
      lower index first); padding slots hold 0.
    valid: (max_output,) bool.
  """
  indices: jax.Array
  valid: jax.Array


def _float32_threshold(threshold: float) -> np.float32:
  """t with `float32 x > t` exactly when `x > threshold` in double precision.

  torchvision compares its float32 IoU with the double threshold: an IoU that rounds to
  float32(0.3) = 0.30000001 is above 0.3 and suppresses.
  """
  t = np.float32(threshold)
  return np.nextafter(t, np.float32(-np.inf)) if float(t) > threshold else t


@functools.partial(jax.jit, static_argnames=("iou_threshold", "max_output", "tile_size"))
def batched_nms(boxes: jax.Array, scores: jax.Array, classes: jax.Array | None = None,
                valid: jax.Array | None = None, *, iou_threshold: float, max_output: int,
                tile_size: int = 1024) -> Kept:
  """Greedy non-maximum suppression within each class, fixed output size.

  torchvision's semantics: boxes visited by decreasing score (a stable sort: equal scores in
  index order, as its CPU and CUDA kernels sort), a box is dropped when its IoU with a kept
  box of the same class is > `iou_threshold`; the kept boxes come out by decreasing score.
  The float32 IoU is compared with the threshold in double precision, as torchvision's
  kernel does (an IoU that rounds to float32(0.3) suppresses at threshold 0.3).
  Classes are kept apart exactly (pairs of different classes never suppress each other)
  instead of torchvision's coordinate-offset trick, which can round IoUs of far-offset boxes.

  The sorted boxes go in tiles of `tile_size`: a tile's boxes are first suppressed by the
  boxes kept in earlier tiles (one (N, tile) IoU block), then resolved among themselves by a
  fixed-point iteration that ends when nothing changes. O(N^2) work, O(N * tile) memory,
  (number of tiles) x (suppression-chain length) sequential steps instead of N.

  Args:
    boxes: (N, 4) float (x1, y1, x2, y2) pixels.
    scores: (N,) float.
    classes: (N,) int class (or level, or image) of each box; None: one class (plain NMS).
    valid: (N,) bool, False for padding; None: all valid.
    iou_threshold: suppression threshold (strictly greater suppresses).
    max_output: the number of output slots (static); the highest-scoring kept boxes fill them.
    tile_size: boxes resolved together (static); results do not depend on it.

  Returns:
    `Kept` with (max_output,) arrays.
  """
  _check_boxes(boxes, "boxes")
  if boxes.ndim != 2 or scores.shape != boxes.shape[:1]:
    raise ValueError(f"batched_nms takes boxes (N, 4) and scores (N,); got {tuple(boxes.shape)} "
                     f"and {tuple(scores.shape)}. vmap over images.")
  boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
  n = boxes.shape[0]
  if max_output <= 0:
    raise ValueError(f"max_output must be positive; got {max_output}.")
  valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
  if n == 0:
    return Kept(jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool))
  # Invalid boxes go last; among the valid ones a stable descending sort by score.
  order = jnp.lexsort((jnp.arange(n), -scores.astype(jnp.float32), ~valid))
  sorted_boxes = boxes[order]
  sorted_valid = valid[order]
  sorted_classes = (jnp.zeros((n,), jnp.int32) if classes is None
                    else jnp.asarray(classes)[order])
  tile = max(1, min(tile_size, n))
  num_tiles = -(-n // tile)
  padded = num_tiles * tile
  pad = lambda x, value: jnp.concatenate([x, jnp.full((padded - n,) + x.shape[1:], value, x.dtype)])
  sorted_boxes, sorted_valid = pad(sorted_boxes, 0), pad(sorted_valid, False)
  sorted_classes = pad(sorted_classes, 0)
  threshold = _float32_threshold(iou_threshold)

  def overlaps(rows, row_classes, cols, col_classes):
    return (box_iou(rows, cols) > threshold) & (row_classes[:, None] == col_classes[None, :])

  def visit_tile(t, keep):
    start = t * tile
    boxes_t = jax.lax.dynamic_slice_in_dim(sorted_boxes, start, tile)
    classes_t = jax.lax.dynamic_slice_in_dim(sorted_classes, start, tile)
    valid_t = jax.lax.dynamic_slice_in_dim(sorted_valid, start, tile)
    # Suppressed by a box kept in an earlier tile (keep holds only earlier tiles so far). With
    # one tile there is none (and XLA would spend minutes constant-folding `x & False`).
    candidate = valid_t
    if num_tiles > 1:
      by_earlier = overlaps(sorted_boxes, sorted_classes, boxes_t, classes_t) & keep[:, None]
      candidate &= ~by_earlier.any(axis=0)
    # Within the tile the greedy result is the fixed point of
    # keep_j = candidate_j and no kept i < j overlaps j; iterating from any start fixes
    # one more leading entry per step, and stops as soon as nothing changes (chains of
    # suppression are short in practice, at most `tile` long).
    later = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]
    within = overlaps(boxes_t, classes_t, boxes_t, classes_t) & later

    def step(state):
      current, _ = state
      new = candidate & ~jnp.any(within & current[:, None], axis=0)
      return new, jnp.any(new != current)

    keep_t, _ = jax.lax.while_loop(lambda state: state[1], step, (candidate, True))
    return jax.lax.dynamic_update_slice_in_dim(keep, keep_t, start, axis=0)

  keep = jax.lax.fori_loop(0, num_tiles, visit_tile, jnp.zeros((padded,), bool))[:n]
  # The kept positions in sorted order: a stable sort puts kept ones first.
  rank = jnp.argsort(~keep, stable=True)
  count = keep.sum()
  slots = jnp.arange(max_output)
  take = rank[jnp.minimum(slots, n - 1)]
  out_valid = slots < jnp.minimum(count, n)
  indices = jnp.where(out_valid, order[take], 0)
  return Kept(indices.astype(jnp.int32), out_valid)


def nms(boxes: jax.Array, scores: jax.Array, valid: jax.Array | None = None, *,
        iou_threshold: float, max_output: int, tile_size: int = 1024) -> Kept:
  """Class-agnostic NMS: `batched_nms` with every box in one class (torchvision's `nms`)."""
  return batched_nms(boxes, scores, None, valid, iou_threshold=iou_threshold,
                     max_output=max_output, tile_size=tile_size)
