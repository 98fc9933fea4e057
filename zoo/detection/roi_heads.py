"""RoI heads, the second stage of Fast / Faster / Mask R-CNN (detectron2's `modeling/roi_heads/`).

Given proposals (B, P, 4) per image, padded with a validity mask:

- training: ground-truth boxes join the proposals and a fixed number of RoIs is matched and
  sampled at a fixed positive fraction, positives first (`sample_rois`); the box head's and
  the mask head's raw outputs are returned with the targets sampled for them, the losses
  are zoo.detection.losses';
- inference: every class's decoded box with its softmax score, thresholded, per-class NMS,
  a fixed number kept (`postprocess_detections`), and the mask head on those.

Pooling (`RoIPooler`): RoIAlign over FPN levels (detectron2's ROIPooler: sampling_ratio 0,
aligned, i.e. ROIAlignV2; torchvision's MultiScaleRoIAlign: sampling_ratio 2, not aligned), or
on one map RoI max pooling (Fast R-CNN), RoIAlign or SPPnet's spatial pyramid pooling.
Module names follow torchvision: box_head (fc6, fc7), box_predictor (cls_score, bbox_pred),
mask_head (mask_fcn1..4), mask_predictor (conv5_mask, mask_fcn_logits). The mask head runs on
the first batch_size_per_image * positive_fraction sampled slots (where the positives are) and
skips chunks of slots without a positive or a detection (zoo.layers.chunk_skip); on the CPU its
convolutions take zoo.layers.cpu_conv_gradient's gradient. `paste_masks` puts the M x M mask
probabilities into the image (evaluation and drawing).

Classes: index 0 is the background and 1..num_classes the dataset's labels 0..num_classes-1
shifted by one.
"""

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

import kernels
from zoo.detection import boxes as box_ops
from zoo.layers.chunk_skip import skip_inactive_chunks
from zoo.layers.cpu_conv_gradient import cpu_gradient_conv_general_dilated
from zoo.layers.upsample import UpConvolution

MASK_POOL = 14   # the mask head's RoIAlign size; its logits are 2x that
POOLINGS = ("roi_pool", "roi_align", "spp")


@dataclasses.dataclass(frozen=True)
class ROIHeadsConfig:
  """The RoI heads' sampling, pooling and inference hyper-parameters. Defaults are detectron2's
  (config/defaults.py, ROI_HEADS / ROI_BOX_HEAD / TEST), which torchvision's
  `fasterrcnn_resnet50_fpn` shares except for the pooler (sampling_ratio 2, aligned False).

  Attributes:
    batch_size_per_image: RoIs sampled per image in training (512).
    positive_fraction: at most this fraction of them positive (0.25).
    fg_iou_threshold: RoIs with IoU >= this with a ground-truth box are positive (0.5).
    bg_iou_threshold: RoIs with IoU < this with every box are background (0.5; Fast R-CNN's
      original sampled background from [0.1, 0.5)).
    score_threshold: inference keeps class scores above this (0.05).
    nms_threshold: IoU of the per-class NMS at inference (0.5).
    detections_per_image: D, detections kept per image (100).
    detection_candidates: at most this many (RoI, class) boxes enter the NMS (1000; static
      shapes need a cap, torchvision has none: the two differ only when more boxes pass the
      score threshold).
    sampling_ratio: RoIAlign's samples per bin side (0: adaptive, ceil(bin size)).
    aligned: RoIAlign's half-pixel shift (detectron2's ROIAlignV2).
  """
  batch_size_per_image: int = 512
  positive_fraction: float = 0.25
  fg_iou_threshold: float = 0.5
  bg_iou_threshold: float = 0.5
  score_threshold: float = 0.05
  nms_threshold: float = 0.5
  detections_per_image: int = 100
  detection_candidates: int = 1000
  sampling_ratio: int = 0
  aligned: bool = True


@dataclasses.dataclass(frozen=True)
class RoIPooler:
  """Pools each RoI from the feature maps (module doc).

  Attributes:
    kind: "roi_align" (one level or FPN levels), "roi_pool" (one level: Fast R-CNN's max
      pooling) or "spp" (one level: SPPnet's pyramid of max poolings, flattened).
    strides: per level, the stride of the map in input pixels (FPN: 4, 8, 16, 32; VGG-16's
      conv5_3: 16 / image_scale).
    sampling_ratio, aligned: RoIAlign's (ROIHeadsConfig).
    spp_levels: the pyramid's grids for "spp" (SPPnet: 1, 2, 3, 6).
  """
  kind: str = "roi_align"
  strides: tuple[float, ...] = (4, 8, 16, 32)
  sampling_ratio: int = 0
  aligned: bool = True
  spp_levels: tuple[int, ...] = (1, 2, 3, 6)

  def __post_init__(self):
    if self.kind not in POOLINGS:
      raise ValueError(f"RoI pooling must be one of {POOLINGS}, got {self.kind!r}.")
    if self.kind != "roi_align" and len(self.strides) != 1:
      raise ValueError(f"RoI pooling {self.kind!r} takes one feature map, got strides "
                       f"{self.strides} (FPN levels pool with 'roi_align').")
    levels = tuple(self.spp_levels)
    if self.kind == "spp" and (not levels or not all(isinstance(l, int) and l > 0 for l in levels)):
      raise ValueError(f"spp_levels must be positive ints, e.g. (1, 2, 3, 6) (SPPnet) or "
                       f"(1, 2, 4); got {self.spp_levels!r}.")

  def __call__(self, features: Sequence[jax.Array], rois, resolution: int):
    """features: per level (B, h, w, C); rois (B, K, 4) pixels -> (B, K, r, r, C), or (B, K, D)
    for "spp" (D = C x sum of l^2)."""
    b, k = rois.shape[:2]
    flat = rois.reshape(b * k, 4)
    index = jnp.repeat(jnp.arange(b, dtype=jnp.int32), k)
    if len(self.strides) > 1:
      pooled = kernels.multilevel_roi_align(
          list(features), flat, index, resolution, strides=self.strides,
          sampling_ratio=self.sampling_ratio, aligned=self.aligned)
    else:
      scale = 1 / self.strides[0]   # feature cells per input pixel
      if self.kind == "roi_pool":
        pooled = kernels.roi_pool(features[0], flat, index, resolution, spatial_scale=scale)
      elif self.kind == "roi_align":
        pooled = kernels.roi_align(features[0], flat, index, resolution, spatial_scale=scale,
                                   sampling_ratio=self.sampling_ratio, aligned=self.aligned)
      else:
        pooled = kernels.spatial_pyramid_pool(features[0], flat, index, tuple(self.spp_levels),
                                              spatial_scale=scale)
    return pooled.reshape((b, k) + pooled.shape[1:])


def sample_rois(key, proposals, proposals_valid, targets, *, batch_size_per_image: int,
                positive_fraction: float, fg_iou_threshold: float, bg_iou_threshold: float):
  """Proposals plus ground truth, matched and sampled for the RoI heads.

  Args:
    key: a jax.random key (split into one per image).
    proposals: (B, P, 4) pixels; proposals_valid: (B, P) bool.
    targets: {"boxes": (B, G, 4), "labels": (B, G) in [0, C), "objects_valid": (B, G)}.

  Returns:
    (rois (B, S, 4), valid (B, S), {"classes": (B, S) 0 = background else label + 1,
    "positive", "gt_index", "target_deltas" (B, S, 4) weights (10, 10, 5, 5)}),
    S = batch_size_per_image, positives first.
  """
  matcher = box_ops.Matcher(fg_iou_threshold, bg_iou_threshold, False)
  coder = box_ops.BoxCoder()
  keys = jax.random.split(key, proposals.shape[0])

  def per_image(key, proposals, valid, gt_boxes, gt_labels, gt_valid):
    candidates = jnp.concatenate([proposals, gt_boxes])
    candidates_valid = jnp.concatenate([valid, gt_valid])
    matches = matcher(box_ops.box_iou(gt_boxes, candidates), gt_valid, candidates_valid)
    sample = box_ops.sample_balanced(key, matches.labels, batch_size_per_image, positive_fraction)
    rois = candidates[sample.indices]
    gt_index = matches.gt_index[sample.indices]
    positive = sample.is_positive & sample.valid
    classes = jnp.where(positive, gt_labels[gt_index] + 1, 0)
    return rois, sample.valid, dict(classes=classes, positive=positive, gt_index=gt_index,
                                    target_deltas=coder.encode(gt_boxes[gt_index], rois))

  return jax.vmap(per_image)(keys, proposals, proposals_valid, targets["boxes"],
                             targets["labels"], targets["objects_valid"])


def postprocess_detections(rois, valid, class_logits, box_deltas, image_size, *,
                           score_threshold: float, nms_threshold: float,
                           detections_per_image: int, candidates: int):
  """One image's detections, torchvision's `RoIHeads.postprocess_detections`.

  Per RoI and foreground class a decoded, clipped box with its softmax score; candidates
  scoring <= score_threshold or narrower than 0.01 pixels dropped; the `candidates` best go
  through per-class NMS; `detections_per_image` kept. The candidate cap makes the shapes
  static; torchvision has none (it keeps every box above the threshold), so the two differ
  only when more candidates than the cap pass the threshold.

  Args:
    rois: (K, 4) pixels; valid: (K,) bool; class_logits: (K, C+1); box_deltas: (K, C+1, 4)
      (weights 10, 10, 5, 5); image_size: (H, W).

  Returns:
    {"boxes": (D, 4), "scores": (D,), "classes": (D,) in 1..C, "valid": (D,)}, D =
    detections_per_image, zeros where not valid.
  """
  classes = class_logits.shape[-1]
  scores = jax.nn.softmax(class_logits, axis=-1)[:, 1:]                        # (K, C)
  boxes = box_ops.BoxCoder().decode(box_deltas[:, 1:], rois[:, None, :])      # (K, C, 4)
  boxes = box_ops.clip_boxes(boxes, *image_size).reshape(-1, 4)
  labels = jnp.broadcast_to(jnp.arange(1, classes), scores.shape).reshape(-1)
  scores = scores.reshape(-1)
  size = boxes[:, 2:] - boxes[:, :2]
  keep = (jnp.repeat(valid, classes - 1) & (scores > score_threshold)
          & (size[:, 0] >= 1e-2) & (size[:, 1] >= 1e-2))
  k = min(candidates, scores.shape[0])
  top, index = jax.lax.top_k(jnp.where(keep, scores, -1.0), k)
  kept = box_ops.batched_nms(boxes[index], top, labels[index], top > -1.0,
                             iou_threshold=nms_threshold, max_output=detections_per_image)
  pick = index[kept.indices]
  return dict(boxes=jnp.where(kept.valid[:, None], boxes[pick], 0.0),
              scores=jnp.where(kept.valid, scores[pick], 0.0),
              classes=jnp.where(kept.valid, labels[pick], 0), valid=kept.valid)


def paste_masks(masks, boxes, image_size):
  """Mask probabilities (D, M, M) on their boxes (D, 4) -> (D, H, W) image-sized probabilities.

  Each image pixel centre (x + 0.5, y + 0.5) samples the box's M x M grid bilinearly, zero
  outside it (detectron2's `paste_masks_in_image` via grid_sample, align_corners=False).
  """
  m = masks.shape[-1]
  height, width = image_size

  def weights(start, end, size):   # (D, size, M) bilinear weights of each pixel on the grid
    extent = jnp.maximum(end - start, 1e-6)[:, None]
    u = (jnp.arange(size) + 0.5 - start[:, None]) / extent * m - 0.5
    return jnp.maximum(0.0, 1.0 - jnp.abs(u[:, :, None] - jnp.arange(m)[None, None, :]))

  wy = weights(boxes[:, 1], boxes[:, 3], height)
  wx = weights(boxes[:, 0], boxes[:, 2], width)
  return jnp.einsum("dym,dmn,dxn->dyx", wy, masks, wx)


class BoxHead(nn.Module):
  """fc6, fc7 (ReLU, dropout in training): pooled RoIs (B, K, ...) flattened -> (B, K, R).

  The flatten is row-major over (h, w, c): a torchvision / Caffe fc6 over NCHW-flattened
  features needs its rows permuted (zoo.weights.torchvision does).
  """
  representation_size: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pooled, *, train: bool):
    x = pooled.reshape(pooled.shape[:2] + (-1,))
    for name in ("fc6", "fc7"):
      x = nn.relu(nn.Dense(self.representation_size, dtype=self.dtype, name=name)(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return x


class BoxPredictor(nn.Module):
  """cls_score (C + 1 logits) and bbox_pred (class-specific deltas, weights 10, 10, 5, 5).

  Fast R-CNN's initialisation: N(0, 0.01) for classification, N(0, 0.001) for regression.
  """
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x (B, K, R) -> (class logits (B, K, C+1), deltas (B, K, C+1, 4)) float32."""
    classes = self.num_classes + 1
    logits = nn.Dense(classes, kernel_init=nn.initializers.normal(0.01), dtype=self.dtype,
                      name="cls_score")(x)
    deltas = nn.Dense(4 * classes, kernel_init=nn.initializers.normal(0.001), dtype=self.dtype,
                      name="bbox_pred")(x)
    return (logits.astype(jnp.float32),
            deltas.reshape(deltas.shape[:2] + (classes, 4)).astype(jnp.float32))


def _kaiming_fan_out():
  """torchvision's mask head init, kaiming_normal_(mode="fan_out", nonlinearity="relu")."""
  return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class MaskHead(nn.Module):
  """Four 3x3 convolutions + ReLU (mask_fcn1..4): (N, 14, 14, C) -> (N, 14, 14, width)."""
  width: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(1, 5):
      x = nn.relu(nn.Conv(self.width, (3, 3), padding=1, dtype=self.dtype,
                          conv_general_dilated=cpu_gradient_conv_general_dilated,
                          kernel_init=_kaiming_fan_out(), name=f"mask_fcn{i}")(x))
    return x


class MaskPredictor(nn.Module):
  """conv5_mask (2x2 stride-2 transposed convolution + ReLU) and mask_fcn_logits (1x1):
  (N, 14, 14, C) -> per-class logits (N, 28, 28, num_classes + 1) float32.

  conv5_mask is zoo.layers.UpConvolution (nn.ConvTranspose's parameters and outputs as a
  matmul + depth-to-space: XLA's CPU gradient of the transposed convolution was a naive loop,
  ~30 s for 256 RoIs of 14 x 14 x 256, commit 715bc97).
  """
  width: int
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(UpConvolution(self.width, dtype=self.dtype, kernel_init=_kaiming_fan_out(),
                              name="conv5_mask")(x))
    x = nn.Conv(self.num_classes + 1, (1, 1), dtype=self.dtype,
                conv_general_dilated=cpu_gradient_conv_general_dilated,
                kernel_init=_kaiming_fan_out(), name="mask_fcn_logits")(x)
    return x.astype(jnp.float32)


class ROIHeads(nn.Module):
  """The box head, and with `masks` the mask head (module doc).

  Attributes:
    num_classes: foreground classes C.
    config: ROIHeadsConfig.
    pooler: RoIPooler; the mask head pools 14 x 14 with it too (Mask R-CNN: "roi_align").
    pool_size: the box head's pooled resolution (7).
    representation_size: fc6 / fc7 width (torchvision FPN: 1024; VGG-16: 4096).
    dropout_rate: after fc6 and fc7 in training (Fast R-CNN: 0.5; FPN heads: 0).
    masks: a mask head (Mask R-CNN).
    mask_width: the mask head's channels (256).
    mask_chunk: slots the mask head skips together when none holds a positive (training) or
      a detection (inference); a speed knob, results do not depend on it.
    dtype: compute dtype.
  """
  num_classes: int
  config: ROIHeadsConfig
  pooler: RoIPooler
  pool_size: int = 7
  representation_size: int = 1024
  dropout_rate: float = 0.0
  masks: bool = False
  mask_width: int = 256
  mask_chunk: int = 16
  dtype: Any = jnp.float32

  def setup(self):
    self.box_head = BoxHead(self.representation_size, self.dropout_rate, dtype=self.dtype)
    self.box_predictor = BoxPredictor(self.num_classes, dtype=self.dtype)
    if self.masks:
      self.mask_head = MaskHead(self.mask_width, dtype=self.dtype)
      self.mask_predictor = MaskPredictor(self.mask_width, self.num_classes, dtype=self.dtype)

  @property
  def mask_rois(self) -> int:
    """Sampled slots the mask head sees in training (where the positives are)."""
    return int(self.config.batch_size_per_image * self.config.positive_fraction)

  def __call__(self, features: Sequence[jax.Array], proposals, proposals_valid, image_size, *,
               train: bool, targets: dict | None = None):
    """The second stage on a batch.

    Args:
      features: per pooled level (B, h, w, C).
      proposals: (B, P, 4) pixels; proposals_valid: (B, P) bool.
      image_size: the input's (H, W).
      train: sample RoIs against `targets` (needs a "sampling" rng; "dropout" with dropout).
      targets: in training {"boxes", "labels", "objects_valid", and with masks
        "instance_masks" (B, G, H, W) bool}.

    Returns:
      (outputs, rois): training outputs {"box": class_logits (B, S, C+1), deltas (B, S, 4) of
      the gt class, classes, positive, valid, gt_index, target_deltas; with masks "mask":
      logits (B, S_m, 28, 28) of the gt class, targets, valid}, rois the sampled (B, S, 4);
      inference outputs the detections {"boxes": (B, D, 4), "scores", "classes" (1..C),
      "valid", with masks "masks": (B, D, 28, 28) probabilities in each box, 0 where not
      valid}, rois the proposals.
    """
    c = self.config
    if train:
      rois, rois_valid, sampled = sample_rois(
          self.make_rng("sampling"), proposals, proposals_valid, targets,
          batch_size_per_image=c.batch_size_per_image, positive_fraction=c.positive_fraction,
          fg_iou_threshold=c.fg_iou_threshold, bg_iou_threshold=c.bg_iou_threshold)
    else:
      rois, rois_valid = proposals, proposals_valid
    pooled = self.pooler(features, rois, self.pool_size)
    class_logits, box_deltas = self.box_predictor(self.box_head(pooled, train=train))
    if train:
      gt_class_deltas = jnp.take_along_axis(
          box_deltas, sampled["classes"][:, :, None, None], axis=2)[:, :, 0]
      outputs = {"box": dict(class_logits=class_logits, valid=rois_valid, **sampled,
                             deltas=gt_class_deltas)}
      if self.masks:
        outputs["mask"] = self._mask_training(features, rois, sampled, targets)
      return outputs, rois

    detections = jax.vmap(lambda *a: postprocess_detections(
        *a, image_size, score_threshold=c.score_threshold, nms_threshold=c.nms_threshold,
        detections_per_image=c.detections_per_image, candidates=c.detection_candidates))(
            rois, rois_valid, class_logits, box_deltas)
    if self.masks:
      logits = self._mask_logits_where(features, detections["boxes"], detections["valid"])
      picked = jnp.take_along_axis(logits, detections["classes"][:, :, None, None, None], axis=-1)
      detections["masks"] = jnp.where(detections["valid"][:, :, None, None],
                                      jax.nn.sigmoid(picked[..., 0]), 0.0)
    return detections, rois

  def _mask_logits(self, features, rois):
    """Per-class mask logits (B, K, 28, 28, C+1) for rois (B, K, 4)."""
    x = self.pooler(features, rois, MASK_POOL)
    shape = x.shape
    x = self.mask_predictor(self.mask_head(x.reshape((-1,) + shape[2:])))
    return x.reshape(shape[:2] + x.shape[1:])

  def _mask_logits_where(self, features, rois, active):
    """`_mask_logits` on rois (B, K, 4), skipping chunks of slots without an active slot
    (active: (B, K) bool; zoo.layers.chunk_skip): logits 0 there."""
    shape = (2 * MASK_POOL, 2 * MASK_POOL, self.num_classes + 1)
    return skip_inactive_chunks(
        lambda module, part, features: module._mask_logits(features, part), self, rois, active,
        chunk=self.mask_chunk, operands=(features,),
        output=lambda b, k: jax.ShapeDtypeStruct((b, k) + shape, jnp.float32))

  def _mask_training(self, features, rois, sampled, targets):
    """Mask logits of the gt class and 28 x 28 targets for the first `mask_rois` sampled slots
    (the positives come first); targets are the matched gt mask RoIAligned onto the RoI
    (sampling_ratio 0, aligned) and thresholded at 0.5, as detectron2."""
    n = self.mask_rois
    rois, classes = rois[:, :n], sampled["classes"][:, :n]
    logits = self._mask_logits_where(features, rois, sampled["positive"][:, :n])
    logits = jnp.take_along_axis(logits, classes[:, :, None, None, None], axis=-1)[..., 0]
    gt_masks = targets["instance_masks"]
    b, g, height, width = gt_masks.shape
    mask_index = (jnp.arange(b)[:, None] * g + sampled["gt_index"][:, :n]).reshape(-1)
    size = logits.shape[-1]
    projected = kernels.roi_align(gt_masks.reshape(b * g, height, width, 1).astype(jnp.float32),
                                  rois.reshape(-1, 4), mask_index.astype(jnp.int32), size,
                                  sampling_ratio=0, aligned=True)
    return dict(logits=logits,
                targets=(projected.reshape(b, n, size, size) >= 0.5).astype(jnp.float32),
                valid=sampled["positive"][:, :n])
