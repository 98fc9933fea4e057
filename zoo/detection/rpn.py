"""Region proposal network (Ren et al. 2015), the first stage of a two-stage detector.

detectron2's `modeling/proposal_generator/rpn.py` as one jit-able stage with static shapes:
per feature level a shared 3x3 conv + ReLU and two 1x1 convolutions (objectness, box deltas
for A anchors per position: `RPNHead`, torchvision's names conv / cls_logits / bbox_pred);
proposals are torchvision's `filter_proposals` (`select_proposals`): per level the top-k
objectness, decoded, clipped, small boxes dropped, per-level NMS, the post-NMS top-k per image,
padded with a validity mask; in training a fixed number of anchors is matched and sampled
(`rpn_targets`) and returned with their logits and deltas for the loss (zoo.detection.losses).
"""

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.detection import boxes as box_ops


@dataclasses.dataclass(frozen=True)
class RPNConfig:
  """The RPN's hyper-parameters. Defaults are torchvision's `fasterrcnn_resnet50_fpn`; detectron2's
  Base-RCNN-FPN.yaml agrees but for post_nms_topk_train (1000 there).

  Attributes:
    anchor_sizes: per feature level, the anchor sizes (sqrt of the area) in input pixels; one
      size per FPN level ((32,), (64,), (128,), (256,), (512,)), or one level with several sizes
      (VGG-16's conv5_3: ((128, 256, 512),)). detectron2: ANCHOR_GENERATOR.SIZES.
    aspect_ratios: height / width of the anchors, the same on every level (0.5, 1, 2).
    pre_nms_topk_train, pre_nms_topk_test: per level, the highest-objectness anchors decoded
      before NMS (2000 / 1000; torchvision rpn_pre_nms_top_n_*, detectron2 RPN.PRE_NMS_TOPK_*).
    post_nms_topk_train, post_nms_topk_test: proposals kept per image after NMS (2000 / 1000;
      torchvision rpn_post_nms_top_n_*, detectron2 RPN.POST_NMS_TOPK_*).
    nms_threshold: IoU of the per-level NMS (0.7).
    batch_size_per_image: anchors sampled per image for the loss (256).
    positive_fraction: at most this fraction of them positive (0.5).
    fg_iou_threshold: anchors with IoU >= this with a ground-truth box are positive (0.7), and
      each box's best anchors too (allow_low_quality_matches).
    bg_iou_threshold: anchors with IoU < this with every box are negative (0.3).
  """
  anchor_sizes: tuple[tuple[float, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
  aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
  pre_nms_topk_train: int = 2000
  post_nms_topk_train: int = 2000
  pre_nms_topk_test: int = 1000
  post_nms_topk_test: int = 1000
  nms_threshold: float = 0.7
  batch_size_per_image: int = 256
  positive_fraction: float = 0.5
  fg_iou_threshold: float = 0.7
  bg_iou_threshold: float = 0.3


def anchors(grid_sizes, anchor_sizes, aspect_ratios, strides, image_scale: float = 1.0):
  """The anchors of each level in input pixels: per level (h * w * A, 4), A = sizes x ratios.

  torchvision's anchors (position-major, then the anchors of a cell) for the image the backbone
  sees, the input resized by image_scale (sizes x image_scale, the levels' strides in that
  image), divided by image_scale: stride / s input pixels, sizes as given.

  Args:
    grid_sizes: per level (h, w) of the feature map.
    anchor_sizes: per level, sizes in input pixels.
    aspect_ratios: height / width ratios.
    strides: per level, the stride in the resized image's pixels.
    image_scale: s, the backbone's input size over the input's.
  """
  s = image_scale
  generator = box_ops.AnchorGenerator(
      sizes=tuple(tuple(size * s for size in level) for level in anchor_sizes),
      aspect_ratios=(tuple(aspect_ratios),), strides=tuple(strides))
  return [a / s for a in generator([tuple(g) for g in grid_sizes])]


class RPNHead(nn.Module):
  """3x3 conv + ReLU, then objectness (A) and box deltas (4A) per position, shared by levels.

  The conv keeps the input's width (torchvision's RPNHead(in_channels, A)).
  """
  num_anchors: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array]):
    """levels: per level (B, h, w, C) -> (per level (B, h w A) logits, per level (B, h w A, 4))."""
    init = nn.initializers.normal(0.01)
    conv = nn.Conv(levels[0].shape[-1], (3, 3), padding=1, kernel_init=init, dtype=self.dtype,
                   name="conv")
    logits = nn.Conv(self.num_anchors, (1, 1), kernel_init=init, dtype=self.dtype,
                     name="cls_logits")
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


def select_proposals(logits, deltas, anchors, image_size, *, pre_nms_topk: int,
                     post_nms_topk: int, nms_threshold: float, min_size: float = 1e-3):
  """One image's RPN proposals, torchvision's `RegionProposalNetwork.filter_proposals`.

  Per level the `pre_nms_topk` highest objectness logits, decoded with weights (1, 1, 1, 1),
  clipped to the image, boxes narrower than `min_size` dropped, NMS per level at
  `nms_threshold`, the `post_nms_topk` highest scores kept.

  Args:
    logits: per level (A_l,) objectness logits.
    deltas: per level (A_l, 4).
    anchors: per level (A_l, 4) pixels.
    image_size: (H, W).

  Returns:
    (boxes (post_nms_topk, 4), scores (post_nms_topk,) probabilities, valid (post_nms_topk,)).
  """
  coder = box_ops.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
  all_boxes, all_scores, all_levels = [], [], []
  for level, (lg, dl, an) in enumerate(zip(logits, deltas, anchors)):
    k = min(pre_nms_topk, lg.shape[0])
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
                             max_output=post_nms_topk)
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


class RegionProposalNetwork(nn.Module):
  """The RPN over one or more feature levels (module doc); its head is `head` (torchvision's
  rpn.head).

  Attributes:
    config: RPNConfig.
    strides: per level, the stride in pixels of the image the backbone sees.
    image_scale: that image's size over the input's (Fast R-CNN's rescaling; 1: the input).
    dtype: compute dtype of the head.
  """
  config: RPNConfig
  strides: tuple[float, ...]
  image_scale: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], image_size, *, train: bool,
               targets: dict | None = None):
    """Proposals for a batch.

    Args:
      features: per level (B, h, w, C).
      image_size: the input's (H, W) in pixels.
      train: sample anchors against `targets` (needs a "sampling" rng).
      targets: in training {"boxes": (B, G, 4) pixels, "objects_valid": (B, G) bool}.

    Returns:
      (proposals (B, P, 4) pixels without gradient, valid (B, P) bool, rpn) with P the post-NMS
      top-k and rpn `rpn_targets`' dict in training, None in inference.
    """
    c = self.config
    if len(c.anchor_sizes) != len(features):
      raise ValueError(f"RPN: anchor_sizes has {len(c.anchor_sizes)} levels for {len(features)} "
                       f"feature levels; give one tuple of sizes per level, e.g. "
                       f"{tuple((32 * 2**i,) for i in range(len(features)))}.")
    level_anchors = anchors([f.shape[1:3] for f in features], c.anchor_sizes, c.aspect_ratios,
                            self.strides, self.image_scale)
    num_anchors = len(c.anchor_sizes[0]) * len(c.aspect_ratios)
    logits, deltas = RPNHead(num_anchors, dtype=self.dtype, name="head")(features)
    pre, post = ((c.pre_nms_topk_train, c.post_nms_topk_train) if train else
                 (c.pre_nms_topk_test, c.post_nms_topk_test))
    proposals, _, valid = jax.vmap(
        lambda lg, dl: select_proposals(lg, dl, level_anchors, image_size, pre_nms_topk=pre,
                                        post_nms_topk=post, nms_threshold=c.nms_threshold)
    )([jax.lax.stop_gradient(l) for l in logits], [jax.lax.stop_gradient(d) for d in deltas])
    rpn = None
    if train:
      rpn = rpn_targets(self.make_rng("sampling"), jnp.concatenate(logits, 1),
                        jnp.concatenate(deltas, 1), jnp.concatenate(level_anchors, 0), targets,
                        fg_iou_threshold=c.fg_iou_threshold, bg_iou_threshold=c.bg_iou_threshold,
                        batch_size_per_image=c.batch_size_per_image,
                        positive_fraction=c.positive_fraction)
    return jax.lax.stop_gradient(proposals), valid, rpn
