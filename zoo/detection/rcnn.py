"""Faster R-CNN (Ren et al. 2015) and Mask R-CNN (He et al. 2017) on a ResNet + FPN (Lin et al.
2017), as one jit-able function with static shapes.

Training is a single XLA program, proposals and sampling included: the RPN's anchors are
matched and a fixed number sampled, proposals are the post-NMS top-k per image (padded, with a
validity mask), ground-truth boxes join them, the RoI heads sample a fixed number of RoIs at a
fixed positive fraction, and the mask head runs on the first `box_batch_size_per_image *
box_positive_fraction` slots, where the sampler puts the positives (chunks of slots without
one are skipped). The model returns raw
outputs together with the targets it sampled; the losses are `zoo.detection.task`'s.

The layout follows torchvision's `fasterrcnn_resnet50_fpn` / `maskrcnn_resnet50_fpn` (module
names: backbone/body, backbone/fpn, rpn/head, roi_heads/box_head (fc6, fc7),
roi_heads/box_predictor (cls_score, bbox_pred), roi_heads/mask_head (mask_fcn1..4),
roi_heads/mask_predictor (conv5_mask, mask_fcn_logits)); the training rules are detectron2's
defaults (RoIAlign with sampling_ratio 0 and aligned=True, L1 box losses, mask targets
thresholded at 0.5). Images are (B, H, W, 3) float in [0, 1], normalised inside the model with
ImageNet's mean and std as torchvision does; H and W must be multiples of 32.

Classes: the model's class index 0 is background and 1..num_classes the dataset's labels
0..num_classes-1 shifted by one.
"""

import dataclasses
import inspect
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import kernels
from zoo.backbones.fpn import FPN
from zoo.backbones.resnet import RESNET_BLOCKS, ResNet
from zoo.detection import boxes as box_ops
from zoo.layers import UpConvolution
from zoo.registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FPN_STRIDES = (4, 8, 16, 32, 64)   # P2..P6
_MASK_POOL = 14                     # the mask head's RoIAlign size; its logits are 2x that


@jax.custom_vjp
def _same_conv(x, kernel):
  """Stride-1 "same" convolution, NHWC x HWIO (odd kernel), whose gradient is a convolution
  (input) and matmuls (kernel): XLA's CPU convolution gradients are a slow naive loop inside
  a conditional (about 80x), where the mask head runs (`RCNN._mask_head_where`)."""
  return _same_conv_forward(x, kernel)


def _same_conv_forward(x, kernel):
  kh, kw = kernel.shape[:2]
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _same_conv_fwd(x, kernel):
  return _same_conv_forward(x, kernel), (x, kernel)


def _same_conv_bwd(residuals, grad):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  # d/dx: the same convolution of the gradient with the kernel flipped and transposed.
  grad_x = _same_conv_forward(grad, jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2)))
  # d/dkernel[dy, dx]: the input shifted by (dy, dx) against the gradient, one matmul each.
  padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  h, w = x.shape[1:3]
  g = grad.reshape(-1, grad.shape[-1])
  grad_kernel = jnp.stack([
      jnp.stack([jnp.dot(padded[:, dy:dy + h, dx:dx + w].reshape(-1, x.shape[-1]).T, g)
                 for dx in range(kw)])
      for dy in range(kh)])
  return grad_x.astype(x.dtype), grad_kernel.astype(kernel.dtype)


_same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)


def _mask_conv(inputs, kernel, strides, padding, *, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, precision=None):
  """nn.Conv's `conv_general_dilated` for the mask head's stride-1 "same" convolutions."""
  kh, kw = kernel.shape[:2]
  same = [(kh // 2, kh // 2), (kw // 2, kw // 2)]
  if isinstance(padding, str):
    padding = same if padding == "SAME" else padding
  if (tuple(strides) != (1, 1) or [tuple(p) for p in padding] != same or kh % 2 == 0
      or kw % 2 == 0 or feature_group_count != 1 or any(d not in (None, 1, (1, 1))
                                                           for d in (lhs_dilation, rhs_dilation))):
    raise ValueError("the mask head's convolutions are stride-1 'same' convolutions with odd "
                     f"kernels; got kernel {kernel.shape}, strides {strides}, padding {padding}.")
  del dimension_numbers, precision   # flax's NHWC / HWIO and default precision, as nn.Conv
  # The hand-written gradient is for XLA:CPU; GPUs and TPUs keep the convolution's own.
  return jax.lax.platform_dependent(inputs, kernel, cpu=_same_conv, default=_same_conv_forward)


class RPNHead(nn.Module):
  """3x3 conv + ReLU, then objectness (A) and box deltas (4A) per position, shared by levels."""
  num_anchors: int
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array]):
    init = nn.initializers.normal(0.01)
    conv = nn.Conv(self.channels, (3, 3), padding=1, kernel_init=init, dtype=self.dtype, name="conv")
    logits = nn.Conv(self.num_anchors, (1, 1), kernel_init=init, dtype=self.dtype, name="cls_logits")
    deltas = nn.Conv(4 * self.num_anchors, (1, 1), kernel_init=init, dtype=self.dtype,
                     name="bbox_pred")
    out_logits, out_deltas = [], []
    for x in levels:
      t = nn.relu(conv(x))
      b, h, w, _ = t.shape
      # torchvision's order: position-major (row-major), then the anchors of a cell
      out_logits.append(logits(t).reshape(b, h * w * self.num_anchors).astype(jnp.float32))
      out_deltas.append(deltas(t).reshape(b, h * w * self.num_anchors, 4).astype(jnp.float32))
    return out_logits, out_deltas


def select_proposals(logits, deltas, anchors, image_size, *, pre_nms_top_n: int,
                     post_nms_top_n: int, nms_threshold: float, min_size: float = 1e-3):
  """One image's RPN proposals, torchvision's `RegionProposalNetwork.filter_proposals`.

  Per level the `pre_nms_top_n` highest objectness logits, decoded with weights (1, 1, 1, 1),
  clipped to the image, boxes narrower than `min_size` dropped, NMS per level at
  `nms_threshold`, the `post_nms_top_n` highest scores kept.

  Args:
    logits: per level (A_l,) objectness logits.
    deltas: per level (A_l, 4).
    anchors: per level (A_l, 4) pixels.
    image_size: (H, W).

  Returns:
    (boxes (post_nms_top_n, 4), scores (post_nms_top_n,) probabilities, valid (post_nms_top_n,)).
  """
  coder = box_ops.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
  all_boxes, all_scores, all_levels = [], [], []
  for level, (lg, dl, an) in enumerate(zip(logits, deltas, anchors)):
    k = min(pre_nms_top_n, lg.shape[0])
    top, index = jax.lax.top_k(lg, k)
    all_boxes.append(box_ops.clip_boxes(coder.decode(dl[index], an[index]), *image_size))
    all_scores.append(jax.nn.sigmoid(top))
    all_levels.append(jnp.full((k,), level, jnp.int32))
  proposals = jnp.concatenate(all_boxes)
  scores = jnp.concatenate(all_scores)
  levels = jnp.concatenate(all_levels)
  size = proposals[:, 2:] - proposals[:, :2]
  valid = (size[:, 0] >= min_size) & (size[:, 1] >= min_size)
  kept = box_ops.batched_nms(proposals, scores, levels, valid, iou_threshold=nms_threshold,
                             max_output=post_nms_top_n)
  return proposals[kept.indices], jnp.where(kept.valid, scores[kept.indices], 0.0), kept.valid


def rpn_targets(key, logits, deltas, anchors, targets, *, fg_iou_threshold: float,
                bg_iou_threshold: float, batch_size_per_image: int, positive_fraction: float):
  """Sampled anchors' logits and deltas with their labels and target deltas (the RPN's loss inputs).

  Args:
    key: a jax.random key (split into one per image).
    logits: (B, A) objectness logits; deltas: (B, A, 4); anchors: (A, 4) pixels.
    targets: {"boxes": (B, G, 4), "objects_valid": (B, G)}.

  Returns:
    dict of (B, S) arrays, S = batch_size_per_image: logits, labels (float 0/1), deltas and
    target_deltas (B, S, 4) (weights 1, 1, 1, 1), positive, valid.
  """
  matcher = box_ops.Matcher(fg_iou_threshold, bg_iou_threshold, True)
  coder = box_ops.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
  keys = jax.random.split(key, logits.shape[0])

  def per_image(key, logits, deltas, gt_boxes, gt_valid):
    matches = matcher(box_ops.box_iou(gt_boxes, anchors), gt_valid)
    sample = box_ops.sample_balanced(key, matches.labels, batch_size_per_image, positive_fraction)
    matched = gt_boxes[matches.gt_index[sample.indices]]
    return dict(logits=logits[sample.indices], labels=sample.is_positive.astype(jnp.float32),
                deltas=deltas[sample.indices],
                target_deltas=coder.encode(matched, anchors[sample.indices]),
                positive=sample.is_positive & sample.valid, valid=sample.valid)

  return jax.vmap(per_image)(keys, logits, deltas, targets["boxes"], targets["objects_valid"])


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
    u = (jnp.arange(size) + 0.5 - start[:, None]) / jnp.maximum(end - start, 1e-6)[:, None] * m - 0.5
    return jnp.maximum(0.0, 1.0 - jnp.abs(u[:, :, None] - jnp.arange(m)[None, None, :]))

  wy = weights(boxes[:, 1], boxes[:, 3], height)
  wx = weights(boxes[:, 0], boxes[:, 2], width)
  return jnp.einsum("dym,dmn,dxn->dyx", wy, masks, wx)


class RCNN(nn.Module):
  """Faster R-CNN, and Mask R-CNN with `masks=True`, on ResNet + FPN (module doc).

  `__call__(images, *, train, targets=None)`: images (B, H, W, 3) in [0, 1]; in training,
  targets {"boxes": (B, G, 4) pixels, "labels": (B, G) int in [0, num_classes),
  "objects_valid": (B, G) bool, and with masks "instance_masks": (B, G, H, W) bool}.
  Returns (outputs, aux): training outputs hold each head's raw predictions and the targets
  sampled for them (see `zoo.detection.task`); inference outputs are the detections
  {"boxes": (B, D, 4), "scores", "classes" (1..num_classes), "valid", and with masks
  "masks": (B, D, M, M) probabilities in each box, 0 where not valid}, D =
  detections_per_image. `mask_chunk`: slots the mask head skips together when none of them
  holds a positive (training) or a detection (inference); a speed knob, results do not
  depend on it.
  """
  num_classes: int
  depth: str = "resnet50"
  width: int = 64
  norm: str = "frozen"
  frozen_stages: int = 1
  fpn_channels: int = 256
  anchor_sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,))
  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
  rpn_pre_nms_top_n_train: int = 2000
  rpn_post_nms_top_n_train: int = 2000
  rpn_pre_nms_top_n_test: int = 1000
  rpn_post_nms_top_n_test: int = 1000
  rpn_nms_threshold: float = 0.7
  rpn_batch_size_per_image: int = 256
  rpn_positive_fraction: float = 0.5
  rpn_fg_iou_threshold: float = 0.7
  rpn_bg_iou_threshold: float = 0.3
  box_batch_size_per_image: int = 512
  box_positive_fraction: float = 0.25
  box_fg_iou_threshold: float = 0.5
  box_bg_iou_threshold: float = 0.5
  representation_size: int = 1024
  box_score_threshold: float = 0.05
  box_nms_threshold: float = 0.5
  detections_per_image: int = 100
  detection_candidates: int = 1000
  roi_sampling_ratio: int = 0
  roi_aligned: bool = True
  masks: bool = False
  mask_channels: int = 256
  mask_chunk: int = 16
  dtype: Any = jnp.float32

  @property
  def mask_rois(self) -> int:
    return int(self.box_batch_size_per_image * self.box_positive_fraction)

  def _check(self, images, targets, train):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"R-CNN takes images (B, H, W, 3), got shape {images.shape}.")
    h, w = images.shape[1:3]
    if h % 32 or w % 32:
      raise ValueError(f"R-CNN with FPN takes image sides that are multiples of 32 (its coarsest "
                       f"backbone stride), got {h}x{w}; pad the images (torchvision pads to a "
                       f"multiple of 32), e.g. to {-(-h // 32) * 32}x{-(-w // 32) * 32}.")
    if train:
      needed = ("boxes", "labels", "objects_valid") + (("instance_masks",) if self.masks else ())
      missing = [k for k in needed if targets is None or k not in targets]
      if missing:
        raise ValueError(f"R-CNN training needs targets {needed}; missing {missing}. The "
                         "detection task passes them (task.model_targets).")

  @nn.compact
  def __call__(self, images, *, train: bool, targets: dict | None = None):
    self._check(images, targets, train)
    b, height, width, _ = images.shape
    x = (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    body = ResNet(blocks=RESNET_BLOCKS[self.depth], width=self.width, norm=self.norm,
                  frozen_stages=self.frozen_stages, dtype=self.dtype, name="body")
    pyramid = FPN(self.fpn_channels, dtype=self.dtype, name="fpn")(body(x, train=train))
    levels = [pyramid[f"P{i}"] for i in range(2, 7)]

    generator = box_ops.AnchorGenerator(sizes=tuple(tuple(s) for s in self.anchor_sizes),
                                        aspect_ratios=(tuple(self.aspect_ratios),),
                                        strides=_FPN_STRIDES)
    anchors = generator([tuple(p.shape[1:3]) for p in levels])
    num_anchors = generator.num_anchors_per_location()[0]
    rpn_logits, rpn_deltas = RPNHead(num_anchors, self.fpn_channels, dtype=self.dtype,
                                     name="rpn_head")(levels)

    pre, post = ((self.rpn_pre_nms_top_n_train, self.rpn_post_nms_top_n_train) if train else
                 (self.rpn_pre_nms_top_n_test, self.rpn_post_nms_top_n_test))
    proposals, _, proposals_valid = jax.vmap(
        lambda lg, dl: select_proposals(lg, dl, anchors, (height, width), pre_nms_top_n=pre,
                                        post_nms_top_n=post, nms_threshold=self.rpn_nms_threshold)
    )([jax.lax.stop_gradient(l) for l in rpn_logits], [jax.lax.stop_gradient(d) for d in rpn_deltas])
    proposals = jax.lax.stop_gradient(proposals)

    features = levels[:4]   # RoI heads pool from P2..P5
    outputs = {}
    if train:
      outputs["rpn"] = self._rpn_targets(jnp.concatenate(rpn_logits, 1),
                                         jnp.concatenate(rpn_deltas, 1),
                                         jnp.concatenate(anchors, 0), targets)
      rois, rois_valid, sampled = self._sample_rois(proposals, proposals_valid, targets)
    else:
      rois, rois_valid = proposals, proposals_valid

    class_logits, box_deltas = self._box_head(features, rois)
    if train:
      outputs["box"] = dict(class_logits=class_logits, valid=rois_valid, **sampled,
                            deltas=jnp.take_along_axis(
                                box_deltas, sampled["classes"][:, :, None, None], axis=2)[:, :, 0])
      if self.masks:
        outputs["mask"] = self._mask_training(features, rois, sampled, targets)
      return outputs, {}

    detections = jax.vmap(lambda *a: self._detect(*a, (height, width)))(
        rois, rois_valid, class_logits, box_deltas)
    if self.masks:
      logits = self._mask_head_where(features, detections["boxes"], detections["valid"])
      picked = jnp.take_along_axis(logits, detections["classes"][:, :, None, None, None], axis=-1)
      detections["masks"] = jnp.where(detections["valid"][:, :, None, None],
                                      jax.nn.sigmoid(picked[..., 0]), 0.0)
    return detections, {}

  # -------------------------------------------------------------------------------- RPN

  def _rpn_targets(self, logits, deltas, anchors, targets):
    return rpn_targets(self.make_rng("sampling"), logits, deltas, anchors, targets,
                       fg_iou_threshold=self.rpn_fg_iou_threshold,
                       bg_iou_threshold=self.rpn_bg_iou_threshold,
                       batch_size_per_image=self.rpn_batch_size_per_image,
                       positive_fraction=self.rpn_positive_fraction)

  # -------------------------------------------------------------------------------- RoI heads

  def _sample_rois(self, proposals, proposals_valid, targets):
    return sample_rois(self.make_rng("sampling"), proposals, proposals_valid, targets,
                       batch_size_per_image=self.box_batch_size_per_image,
                       positive_fraction=self.box_positive_fraction,
                       fg_iou_threshold=self.box_fg_iou_threshold,
                       bg_iou_threshold=self.box_bg_iou_threshold)

  def _pool(self, features, rois, size):
    b, k = rois.shape[:2]
    pooled = kernels.multilevel_roi_align(
        features, rois.reshape(b * k, 4), jnp.repeat(jnp.arange(b, dtype=jnp.int32), k), size,
        strides=_FPN_STRIDES[:4], sampling_ratio=self.roi_sampling_ratio, aligned=self.roi_aligned)
    return pooled.reshape((b, k) + pooled.shape[1:])

  def _box_head(self, features, rois):
    """(class logits (B, K, C+1), class-specific deltas (B, K, C+1, 4)) for rois (B, K, 4)."""
    x = self._pool(features, rois, 7)
    x = x.reshape(x.shape[:2] + (-1,))
    x = nn.relu(nn.Dense(self.representation_size, dtype=self.dtype, name="fc6")(x))
    x = nn.relu(nn.Dense(self.representation_size, dtype=self.dtype, name="fc7")(x))
    classes = self.num_classes + 1
    logits = nn.Dense(classes, kernel_init=nn.initializers.normal(0.01), dtype=self.dtype,
                      name="cls_score")(x)
    deltas = nn.Dense(4 * classes, kernel_init=nn.initializers.normal(0.001), dtype=self.dtype,
                      name="bbox_pred")(x)
    return logits.astype(jnp.float32), deltas.reshape(deltas.shape[:2] + (classes, 4)).astype(jnp.float32)

  def _detect(self, rois, valid, class_logits, box_deltas, image_size):
    return postprocess_detections(
        rois, valid, class_logits, box_deltas, image_size, score_threshold=self.box_score_threshold,
        nms_threshold=self.box_nms_threshold, detections_per_image=self.detections_per_image,
        candidates=self.detection_candidates)

  # -------------------------------------------------------------------------------- masks

  def _mask_head(self, features, rois):
    """Per-class mask logits (B, K, 28, 28, C+1) for rois (B, K, 4)."""
    x = self._pool(features, rois, _MASK_POOL)
    shape = x.shape
    x = x.reshape((-1,) + shape[2:])
    for i in range(1, 5):
      x = nn.relu(nn.Conv(self.mask_channels, (3, 3), padding=1, dtype=self.dtype,
                          conv_general_dilated=_mask_conv,
                          kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                          name=f"mask_fcn{i}")(x))
    # nn.ConvTranspose(2x2, stride 2) as matmul + depth-to-space: XLA's CPU gradient of the
    # transposed convolution is a naive loop (~30 s for 256 RoIs of 14 x 14 x 256).
    x = nn.relu(UpConvolution(self.mask_channels, dtype=self.dtype, name="conv5_mask",
                              kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))(x))
    x = nn.Conv(self.num_classes + 1, (1, 1), dtype=self.dtype, conv_general_dilated=_mask_conv,
                kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                name="mask_fcn_logits")(x)
    return x.reshape(shape[:2] + x.shape[1:]).astype(jnp.float32)

  def _mask_head_where(self, features, rois, active):
    """`_mask_head` on rois (B, K, 4) in chunks of `mask_chunk` slots; a chunk where no image
    has an active slot (active: (B, K) bool) is skipped and gets logits 0.

    The sampler puts the positives first and NMS the valid detections, so the head's cost
    follows the number of positives (training) or detections (inference), as torchvision's
    (which runs it on those only), within static shapes. Exact: the active slots' logits are
    unchanged; only unused slots' differ.
    """
    if self.is_initializing():
      return self._mask_head(features, rois)
    k, chunk = rois.shape[1], max(1, min(self.mask_chunk, rois.shape[1]))
    logits = []
    for start in range(0, k, chunk):
      part = rois[:, start:start + chunk]
      skip_shape = part.shape[:2] + (2 * _MASK_POOL, 2 * _MASK_POOL, self.num_classes + 1)
      logits.append(nn.cond(jnp.any(active[:, start:start + chunk]),
                            lambda module, f, r: module._mask_head(f, r),
                            lambda module, f, r: jnp.zeros(skip_shape, jnp.float32),
                            self, features, part))
    return jnp.concatenate(logits, axis=1)

  def _mask_training(self, features, rois, sampled, targets):
    """Mask logits of the gt class and 28 x 28 targets for the first `mask_rois` sampled slots
    (the positives come first); targets are the matched gt mask RoIAligned onto the RoI
    (sampling_ratio 0, aligned) and thresholded at 0.5, as detectron2."""
    n = self.mask_rois
    rois, classes = rois[:, :n], sampled["classes"][:, :n]
    logits = self._mask_head_where(features, rois, sampled["positive"][:, :n])
    logits = jnp.take_along_axis(logits, classes[:, :, None, None, None], axis=-1)[..., 0]
    gt_masks = targets["instance_masks"]
    b, g, height, width = gt_masks.shape
    mask_index = (jnp.arange(b)[:, None] * g + sampled["gt_index"][:, :n]).reshape(-1)
    size = logits.shape[-1]
    projected = kernels.roi_align(gt_masks.reshape(b * g, height, width, 1).astype(jnp.float32),
                                  rois.reshape(-1, 4), mask_index.astype(jnp.int32), size,
                                  sampling_ratio=0, aligned=True)
    return dict(logits=logits, targets=(projected.reshape(b, n, size, size) >= 0.5).astype(jnp.float32),
                valid=sampled["positive"][:, :n])


# torchvision's COCO detectors have 91 outputs: background + category ids 1..90. Our
# num_classes counts the foreground only.
_COCO_NUM_CLASSES = 90


def _register(name: str, masks: bool, doc: str):
  """Registers RCNN under `name`: its hyper-parameters are RCNN's fields (num_classes 90)."""
  def create(**hyperparameters) -> RCNN:
    return RCNN(masks=masks, **{"num_classes": _COCO_NUM_CLASSES, **hyperparameters})

  fields = [f for f in dataclasses.fields(RCNN) if f.name not in ("masks", "parent", "name")]
  create.__signature__ = inspect.Signature([
      inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                        default=_COCO_NUM_CLASSES if f.name == "num_classes" else f.default)
      for f in fields])
  create.__name__, create.__doc__ = name, doc
  register_model(name)(create)


_register("faster_rcnn_r50_fpn", False,
          "Faster R-CNN, ResNet-50 + FPN, torchvision's `fasterrcnn_resnet50_fpn` defaults.")
_register("mask_rcnn_r50_fpn", True,
          "Mask R-CNN, ResNet-50 + FPN, torchvision's `maskrcnn_resnet50_fpn` defaults.")
