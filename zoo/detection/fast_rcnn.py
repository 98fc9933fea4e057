"""Fast R-CNN (Girshick 2015) with an SPPnet (He et al. 2014) head option, and Faster R-CNN
(Ren et al. 2015) on VGG-16, as one jit-able function with static shapes.

The network is VGG-16's thirteen convolutions up to conv5_3 (stride 16, no pool5), a pooling of
each region of interest from that map, and the classifier's two fully connected layers fc6 and
fc7 (ReLU, dropout 0.5 in training) feeding two sibling layers: `cls_score` (C + 1 logits,
class 0 = background) and `bbox_pred` (4 (C + 1) class-specific deltas, encoded with weights
(10, 10, 5, 5): Fast R-CNN's normalisation of the targets by std (0.1, 0.1, 0.2, 0.2) is the
same thing). The pooling (`pooling`):

- "roi_pool": Fast R-CNN's RoI max pooling, 7 x 7 bins at spatial scale 1/16 (`kernels.roi_pool`);
- "roi_align": Mask R-CNN's RoIAlign instead (detectron2's ROIAlignV2: sampling_ratio 0, aligned);
- "spp": SPPnet's spatial pyramid pooling of the region (`kernels.spatial_pyramid_pool`),
  levels `spp_levels` (SPPnet's detection network: 1, 2, 3, 6, i.e. 50 bins), concatenated.

Where the regions come from:

- `fast_rcnn_vgg16`: external proposals. A dataset with a proposal file (Selective Search's
  .mat for VOC, detectron2's .pkl, this repo's .npz: zoo.data.proposal_files, joined to the
  data with `--config.data.proposals=FILE`) passes `targets["proposals"]` (B, P, 4) pixels
  and "proposals_valid" (B, P) bool, from the pipeline's `proposals` feature. The embedded digit canvases have none, so without that key the model generates
  them in the graph from the ground truth with `zoo.detection.proposals.jittered_proposals`
  (k jittered copies of each object + random boxes, keyed by the example's `id`, the same in
  every epoch and in evaluation, as a precomputed file would be). Those proposals come from the
  ground truth, in evaluation too: the AP measured with them rates the head (classification
  and box refinement of given regions), not a whole detector. The detection task passes the
  targets in training and evaluation (`Detection(proposals="generated")`; with a proposal file
  joined to the data, `Detection(proposals="data")` passes the batch's "proposals").
- `faster_rcnn_vgg16`: a region proposal network on conv5_3: 3x3 conv (512) + ReLU, then
  objectness and deltas for 9 anchors per position (sizes 128, 256, 512 x ratios 0.5, 1, 2 at
  stride 16; `anchor_sizes` scales them down for small images), proposals selected as
  torchvision's `filter_proposals` (zoo.detection.rcnn.select_proposals).

Training follows torchvision / detectron2: ground-truth boxes join the proposals, each image
samples `box_batch_size_per_image` RoIs with at most 25% positives (IoU >= 0.5; negatives IoU <
0.5; Fast R-CNN's original took negatives from [0.1, 0.5) and 64 RoIs per image), and the model
returns the raw outputs with the targets it sampled in `zoo.detection.rcnn`'s "box" (and "rpn")
format, so `zoo.detection.task` computes the losses. Inference decodes every class's box,
drops scores <= 0.05 and runs per-class NMS (`zoo.detection.rcnn.postprocess_detections`).

Images are (B, H, W, 3) float in [0, 1], normalised with ImageNet's mean and std as torchvision
does; any size. Fast R-CNN resizes each image so its shorter side is 600 pixels before the
network (its "scales"); `image_scale` s does that inside the model: the backbone sees the image
bilinearly resized by s, the feature map is ceil(s H / 16) x ceil(s W / 16) (Caffe's pooling
rounding), and boxes stay in input pixels (pooled at spatial scale s / 16, anchors at stride
16 / s), so proposals, targets and detections are all in the input's pixels.
Parameter names are VGG-16's Caffe layer names (conv1_1 ... conv5_3, fc6, fc7) plus cls_score,
bbox_pred and rpn_head; fc6's input is the pooled (h, w, c) block flattened row-major (channels
last), so a converted Caffe / torchvision fc6 needs its (c, h, w) rows permuted.
"""

import dataclasses
import inspect
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

import kernels
from zoo.backbones.vgg import VGG16, VGG16_WIDTHS
from zoo.detection import boxes as box_ops
from zoo.detection import proposals as proposals_lib
from zoo.detection.rcnn import (IMAGENET_MEAN, IMAGENET_STD, RPNHead, postprocess_detections,
                                rpn_targets, sample_rois, select_proposals)
from zoo.registry import register_model

STRIDE = 16   # conv5_3's stride in input pixels
POOLINGS = ("roi_pool", "roi_align", "spp")


def rpn_anchors(grid_size, sizes, aspect_ratios, image_scale: float = 1.0):
  """The RPN's anchors on conv5_3 in input pixels: (h * w * A, 4), A = len(sizes) * len(ratios).

  torchvision's anchors for the resized image (sizes x image_scale, stride 16), divided by
  image_scale: stride 16 / s input pixels, sizes as given.
  """
  s = image_scale
  generator = box_ops.AnchorGenerator(sizes=(tuple(a * s for a in sizes),),
                                      aspect_ratios=(tuple(aspect_ratios),), strides=(STRIDE,))
  return generator([tuple(grid_size)])[0] / s


class FastRCNN(nn.Module):
  """Fast R-CNN on VGG-16 (external proposals), or Faster R-CNN with `rpn=True` (module doc).

  `__call__(images, *, train, targets=None)`: images (B, H, W, 3) in [0, 1]. targets: in
  training {"boxes": (B, G, 4) pixels, "labels": (B, G) int in [0, num_classes),
  "objects_valid": (B, G) bool}; without an RPN also the proposals' source, in evaluation too:
  "proposals" (B, P, 4) pixels (+ optional "proposals_valid" (B, P) bool), or "id" (B,) int32
  with "boxes" and "objects_valid" to generate them. Returns (outputs, aux): training outputs
  {"box": sampled RoIs' class_logits (B, S, C+1), deltas (B, S, 4) of the gt class, classes,
  positive, valid, gt_index, target_deltas} (and "rpn" with an RPN), S =
  box_batch_size_per_image; inference outputs the detections {"boxes": (B, D, 4), "scores",
  "classes" (1..num_classes), "valid"}, D = detections_per_image. aux: {"proposals" (B, P, 4),
  "proposals_valid" (B, P)}, in training also the sampled "rois" (B, S, 4).
  """
  num_classes: int
  widths: Sequence[int] = VGG16_WIDTHS
  norm: str = "none"
  frozen_stages: int = 0
  pooling: str = "roi_pool"
  pool_size: int = 7
  spp_levels: Sequence[int] = (1, 2, 3, 6)
  roi_sampling_ratio: int = 0
  roi_aligned: bool = True
  representation_size: int = 4096
  dropout_rate: float = 0.5
  image_scale: float = 1.0
  # external proposals (rpn=False): the embedded data's generator (zoo.detection.proposals)
  num_proposals: int = 2000
  proposal_copies: int = 16
  proposal_translate: float = 0.15
  proposal_scale: float = 0.25
  proposal_min_size: float = 4.0
  proposal_seed: int = 0
  # region proposal network (rpn=True): torchvision's defaults
  rpn: bool = False
  anchor_sizes: Sequence[float] = (128, 256, 512)
  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
  rpn_channels: int = 512
  rpn_pre_nms_top_n_train: int = 2000
  rpn_post_nms_top_n_train: int = 2000
  rpn_pre_nms_top_n_test: int = 1000
  rpn_post_nms_top_n_test: int = 1000
  rpn_nms_threshold: float = 0.7
  rpn_batch_size_per_image: int = 256
  rpn_positive_fraction: float = 0.5
  rpn_fg_iou_threshold: float = 0.7
  rpn_bg_iou_threshold: float = 0.3
  # RoI sampling and inference
  box_batch_size_per_image: int = 512
  box_positive_fraction: float = 0.25
  box_fg_iou_threshold: float = 0.5
  box_bg_iou_threshold: float = 0.5
  box_score_threshold: float = 0.05
  box_nms_threshold: float = 0.5
  detections_per_image: int = 100
  detection_candidates: int = 1000
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.pooling not in POOLINGS:
      raise ValueError(f"FastRCNN pooling must be one of {POOLINGS}, got {self.pooling!r}.")
    levels = tuple(self.spp_levels)
    if self.pooling == "spp" and (not levels or not all(isinstance(l, int) and l > 0 for l in levels)):
      raise ValueError(f"FastRCNN spp_levels must be positive ints, e.g. (1, 2, 3, 6) (SPPnet) "
                       f"or (1, 2, 4); got {self.spp_levels!r}.")
    if not self.image_scale > 0:
      raise ValueError(f"FastRCNN image_scale must be > 0 (1: the input as it is), got "
                       f"{self.image_scale!r}.")
    if len(self.widths) != 5:
      raise ValueError(f"FastRCNN widths must be VGG-16's 5 stage widths, got {self.widths!r}.")
    super().__post_init__()

  def _check(self, images, targets, train):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"FastRCNN takes images (B, H, W, 3), got shape {images.shape}.")
    needed = ("boxes", "labels", "objects_valid") if train else ()
    # `init` from images alone (the trainer's) pools one whole-image box: the shapes are the same.
    initializing = self.is_initializing() and not train and targets is None
    if not self.rpn and not initializing and not (targets is not None and "proposals" in targets):
      needed += ("boxes", "objects_valid", "id")
    missing = [k for k in dict.fromkeys(needed) if targets is None or k not in targets]
    if missing:
      source = ("" if self.rpn else
                " Without an RPN it needs proposals: targets['proposals'] (B, P, 4) pixels, or "
                "'boxes', 'objects_valid' and 'id' to generate the embedded data's "
                "(zoo.detection.proposals); Detection(proposals='data' or 'generated') passes them.")
      raise ValueError(f"FastRCNN ({'training' if train else 'inference'}) needs targets "
                       f"{tuple(dict.fromkeys(needed))}; missing {missing}.{source}")

  @nn.compact
  def __call__(self, images, *, train: bool, targets: dict | None = None):
    self._check(images, targets, train)
    b, height, width, _ = images.shape
    x = (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    if self.image_scale != 1:
      size = (round(height * self.image_scale), round(width * self.image_scale))
      x = jax.image.resize(x, (b,) + size + (3,), "bilinear")
    features = VGG16(tuple(self.widths), fc_width=None, norm=self.norm,
                     frozen_stages=self.frozen_stages, dtype=self.dtype, name="body")(
                         x, train=train)["conv5_3"]

    outputs = {}
    if self.rpn:
      proposals, proposals_valid = self._rpn(features, (height, width), train, targets, outputs)
    else:
      proposals, proposals_valid = self._external_proposals(targets, (height, width))

    if train:
      rois, rois_valid, sampled = sample_rois(
          self.make_rng("sampling"), proposals, proposals_valid, targets,
          batch_size_per_image=self.box_batch_size_per_image,
          positive_fraction=self.box_positive_fraction,
          fg_iou_threshold=self.box_fg_iou_threshold, bg_iou_threshold=self.box_bg_iou_threshold)
    else:
      rois, rois_valid = proposals, proposals_valid

    class_logits, box_deltas = self._box_head(features, rois, train)
    aux = {"proposals": proposals, "proposals_valid": proposals_valid}
    if train:
      aux["rois"] = rois
      outputs["box"] = dict(class_logits=class_logits, valid=rois_valid, **sampled,
                            deltas=jnp.take_along_axis(
                                box_deltas, sampled["classes"][:, :, None, None], axis=2)[:, :, 0])
      return outputs, aux
    detections = jax.vmap(lambda *a: postprocess_detections(
        *a, (height, width), score_threshold=self.box_score_threshold,
        nms_threshold=self.box_nms_threshold, detections_per_image=self.detections_per_image,
        candidates=self.detection_candidates))(rois, rois_valid, class_logits, box_deltas)
    return detections, aux

  def _external_proposals(self, targets, image_size):
    """(B, P, 4) proposals and (B, P) validity: the batch's, or generated (module doc)."""
    if targets is None:   # init from images alone
      return jnp.asarray([[[0.0, 0.0, image_size[1], image_size[0]]]]), jnp.ones((1, 1), bool)
    if "proposals" in targets:
      proposals = jnp.asarray(targets["proposals"], jnp.float32)
      if proposals.ndim != 3 or proposals.shape[-1] != 4:
        raise ValueError(f"FastRCNN: targets['proposals'] must be (B, P, 4) (x1, y1, x2, y2) "
                         f"pixels, got shape {proposals.shape}.")
      valid = targets.get("proposals_valid", jnp.ones(proposals.shape[:2], bool))
      return jax.lax.stop_gradient(proposals), valid

    def per_image(example_id, gt_boxes, gt_valid):
      key = proposals_lib.example_key(self.proposal_seed, example_id)
      return proposals_lib.jittered_proposals(
          key, gt_boxes, gt_valid, image_size, num_proposals=self.num_proposals,
          copies=self.proposal_copies, translate=self.proposal_translate,
          scale=self.proposal_scale, min_size=self.proposal_min_size)

    proposals = jax.vmap(per_image)(targets["id"], targets["boxes"], targets["objects_valid"])
    return jax.lax.stop_gradient(proposals), jnp.ones(proposals.shape[:2], bool)

  def _rpn(self, features, image_size, train, targets, outputs):
    """Single-level RPN on conv5_3: proposals (B, P, 4), valid (B, P); outputs["rpn"] in training."""
    anchors = [rpn_anchors(tuple(features.shape[1:3]), self.anchor_sizes, self.aspect_ratios,
                           self.image_scale)]
    num_anchors = len(self.anchor_sizes) * len(self.aspect_ratios)
    logits, deltas = RPNHead(num_anchors, self.rpn_channels, dtype=self.dtype,
                             name="rpn_head")([features])
    pre, post = ((self.rpn_pre_nms_top_n_train, self.rpn_post_nms_top_n_train) if train else
                 (self.rpn_pre_nms_top_n_test, self.rpn_post_nms_top_n_test))
    proposals, _, valid = jax.vmap(
        lambda lg, dl: select_proposals([lg], [dl], anchors, image_size, pre_nms_top_n=pre,
                                        post_nms_top_n=post, nms_threshold=self.rpn_nms_threshold)
    )(jax.lax.stop_gradient(logits[0]), jax.lax.stop_gradient(deltas[0]))
    if train:
      outputs["rpn"] = rpn_targets(
          self.make_rng("sampling"), logits[0], deltas[0], anchors[0], targets,
          fg_iou_threshold=self.rpn_fg_iou_threshold, bg_iou_threshold=self.rpn_bg_iou_threshold,
          batch_size_per_image=self.rpn_batch_size_per_image,
          positive_fraction=self.rpn_positive_fraction)
    return jax.lax.stop_gradient(proposals), valid

  def _pool(self, features, rois):
    """rois (B, K, 4) pixels -> (B, K, D) pooled and flattened (D = 7 * 7 * C for RoI pooling)."""
    b, k = rois.shape[:2]
    flat = rois.reshape(b * k, 4)
    index = jnp.repeat(jnp.arange(b, dtype=jnp.int32), k)
    scale = self.image_scale / STRIDE   # feature cells per input pixel
    if self.pooling == "roi_pool":
      pooled = kernels.roi_pool(features, flat, index, self.pool_size, spatial_scale=scale)
    elif self.pooling == "roi_align":
      pooled = kernels.roi_align(features, flat, index, self.pool_size, spatial_scale=scale,
                                 sampling_ratio=self.roi_sampling_ratio, aligned=self.roi_aligned)
    else:
      pooled = kernels.spatial_pyramid_pool(features, flat, index, tuple(self.spp_levels),
                                            spatial_scale=scale)
    return pooled.reshape(b, k, -1)

  def _box_head(self, features, rois, train):
    """(class logits (B, K, C+1), class-specific deltas (B, K, C+1, 4)) for rois (B, K, 4)."""
    x = self._pool(features, rois)
    for name in ("fc6", "fc7"):
      x = nn.relu(nn.Dense(self.representation_size, dtype=self.dtype, name=name)(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    classes = self.num_classes + 1
    # Fast R-CNN's initialisation: N(0, 0.01) for classification, N(0, 0.001) for regression.
    logits = nn.Dense(classes, kernel_init=nn.initializers.normal(0.01), dtype=self.dtype,
                      name="cls_score")(x)
    deltas = nn.Dense(4 * classes, kernel_init=nn.initializers.normal(0.001), dtype=self.dtype,
                      name="bbox_pred")(x)
    return (logits.astype(jnp.float32),
            deltas.reshape(deltas.shape[:2] + (classes, 4)).astype(jnp.float32))


_RPN_FIELDS = {f.name for f in dataclasses.fields(FastRCNN)
               if f.name.startswith("rpn_") or f.name in ("anchor_sizes", "aspect_ratios")}
_PROPOSAL_FIELDS = {f.name for f in dataclasses.fields(FastRCNN) if f.name.startswith("proposal_")
                    } | {"num_proposals"}


def _register(name: str, rpn: bool, doc: str, **defaults):
  """Registers FastRCNN under `name`; its hyper-parameters are the fields this variant uses."""
  defaults = {"num_classes": 20, **defaults}
  excluded = {"rpn", "parent", "name"} | (_PROPOSAL_FIELDS if rpn else _RPN_FIELDS)
  fields = [f for f in dataclasses.fields(FastRCNN) if f.name not in excluded]

  def create(**hyperparameters) -> FastRCNN:
    return FastRCNN(rpn=rpn, **{**defaults, **hyperparameters})

  create.__signature__ = inspect.Signature([
      inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                        default=defaults.get(f.name, f.default)) for f in fields])
  create.__name__, create.__doc__ = name, doc
  register_model(name)(create)


_register("fast_rcnn_vgg16", False,
          "Fast R-CNN, VGG-16, external proposals, RoI pooling 7x7 (pooling='roi_align' or 'spp' "
          "for RoIAlign or an SPPnet head); 20 classes (PASCAL VOC) by default.")
_register("faster_rcnn_vgg16", True,
          "Faster R-CNN, VGG-16, single-level RPN (9 anchors at stride 16), RoI pooling 7x7; 20 "
          "classes (PASCAL VOC) by default.")
