"""Fast R-CNN (Girshick 2015) with an SPPnet (He et al. 2014) head option: VGG-16 on external
proposals, as one jit-able function with static shapes (`fast_rcnn_vgg16`).

The network is VGG-16's thirteen convolutions up to conv5_3 (stride 16, no pool5:
`zoo.backbones.VGG16(fc_width=None)`, named `backbone`), a pooling of each region of interest
from that map, and the RoI heads (zoo.detection.roi_heads): fc6 and fc7 (ReLU, dropout 0.5 in
training) feeding `cls_score` (C + 1 logits, class 0 = background) and `bbox_pred` (4 (C + 1)
class-specific deltas, encoded with weights (10, 10, 5, 5): Fast R-CNN's normalisation of the
targets by std (0.1, 0.1, 0.2, 0.2) is the same thing). The pooling (`pooling`):

- "roi_pool": Fast R-CNN's RoI max pooling, 7 x 7 bins at spatial scale 1/16 (`kernels.roi_pool`);
- "roi_align": Mask R-CNN's RoIAlign instead (roi_heads' sampling_ratio and aligned: detectron2's
  ROIAlignV2 by default);
- "spp": SPPnet's spatial pyramid pooling of the region (`kernels.spatial_pyramid_pool`),
  levels `spp_levels` (SPPnet's detection network: 1, 2, 3, 6, i.e. 50 bins), concatenated.

The regions come from outside the network, as keyword arguments `proposals` (B, P, 4) pixels
and `proposals_valid` (B, P) bool, in training and in evaluation: a proposal file joined to the
data (Selective Search's .mat for VOC, detectron2's .pkl, this repo's .npz:
zoo.data.proposal_files, `--config.data.proposals=FILE`) or, on the embedded digit canvases,
which have none, the stand-ins zoo.data.standin_proposals generates from the ground truth (the
AP measured with those rates the head, not a whole detector). Faster R-CNN on the same
backbone, with a region proposal network, is `faster_rcnn_vgg16` (zoo.detection.two_stage).

Training follows torchvision / detectron2: ground-truth boxes join the proposals, each image
samples roi_heads.batch_size_per_image RoIs with at most 25% positives (IoU >= 0.5; negatives
IoU < 0.5; Fast R-CNN's original took negatives from [0.1, 0.5) and 64 RoIs per image), and the
model returns the raw outputs with the targets it sampled ("box"), so `zoo.detection.losses`
computes the losses. Inference decodes every class's box, drops scores <= 0.05 and runs
per-class NMS (`zoo.detection.roi_heads.postprocess_detections`).

Images are (B, H, W, 3) float in [0, 1], normalised with ImageNet's mean and std as torchvision
does; any size. Fast R-CNN resizes each image so its shorter side is 600 pixels before the
network (its "scales"); `image_scale` s does that inside the model: the backbone sees the image
bilinearly resized by s, the feature map is ceil(s H / 16) x ceil(s W / 16) (Caffe's pooling
rounding), and boxes stay in input pixels (pooled at spatial scale s / 16, anchors at stride
16 / s), so proposals, targets and detections are all in the input's pixels.
Parameter names: backbone/conv1_1 ... conv5_3 (VGG-16's Caffe names), roi_heads/box_head/{fc6,
fc7}, roi_heads/box_predictor/{cls_score, bbox_pred}; fc6's input is the pooled (h, w, c) block
flattened row-major (channels last), so a converted Caffe / torchvision fc6 needs its (c, h, w)
rows permuted.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.backbones.vgg import VGG16, VGG16_WIDTHS
from zoo.detection.hyperparameters import override
from zoo.detection.roi_heads import ROIHeads, ROIHeadsConfig, RoIPooler
from zoo.registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STRIDE = 16   # conv5_3's stride in the backbone's input pixels
TARGETS = ("boxes", "labels", "objects_valid")


def preprocess(images, image_scale: float = 1.0):
  """images (B, H, W, 3) in [0, 1] -> ImageNet-normalised, bilinearly resized by image_scale."""
  x = (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  if image_scale != 1:
    b, height, width, _ = images.shape
    size = (round(height * image_scale), round(width * image_scale))
    x = jax.image.resize(x, (b,) + size + (3,), "bilinear")
  return x


def check_inputs(model: str, images, targets, train: bool, needed: Sequence[str] = TARGETS,
                 size_divisibility: int = 1):
  """ValueErrors for images that are not (B, H, W, 3) (sides multiples of size_divisibility)
  and, in training, targets without the `needed` keys."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{model} takes images (B, H, W, 3), got shape {images.shape}.")
  h, w = images.shape[1:3]
  m = size_divisibility
  if h % m or w % m:
    raise ValueError(f"{model} takes image sides that are multiples of {m} (its coarsest "
                     f"backbone stride), got {h}x{w}; pad the images (torchvision pads to a "
                     f"multiple of 32), e.g. to {-(-h // m) * m}x{-(-w // m) * m}.")
  if train:
    missing = [k for k in needed if targets is None or k not in targets]
    if missing:
      raise ValueError(f"{model} training needs targets {tuple(needed)}; missing {missing}. "
                       "The detection task passes them (task.model_inputs).")


def check_image_scale(image_scale: float):
  if not image_scale > 0:
    raise ValueError(f"image_scale must be > 0 (1: the input as it is), got {image_scale!r}.")


def conv5_pooler(pooling: str, spp_levels: Sequence[int], roi_heads: ROIHeadsConfig,
                 image_scale: float) -> RoIPooler:
  """The RoI pooling of VGG-16's conv5_3 (stride 16 / image_scale input pixels)."""
  check_image_scale(image_scale)
  return RoIPooler(pooling, (STRIDE / image_scale,), roi_heads.sampling_ratio, roi_heads.aligned,
                   tuple(spp_levels))


class FastRCNN(nn.Module):
  """Fast R-CNN on VGG-16's conv5_3 with external proposals (module doc).

  `__call__(images, proposals, proposals_valid, *, train, targets=None)`: images (B, H, W, 3)
  in [0, 1]; proposals (B, P, 4) (x1, y1, x2, y2) pixels; proposals_valid (B, P) bool; in
  training targets {"boxes": (B, G, 4) pixels, "labels": (B, G) int in [0, num_classes),
  "objects_valid": (B, G) bool}. Returns (outputs, aux): training outputs {"box": sampled
  RoIs' class_logits (B, S, C+1), deltas (B, S, 4) of the gt class, classes, positive, valid,
  gt_index, target_deltas}, S = roi_heads.batch_size_per_image; inference outputs the
  detections {"boxes": (B, D, 4), "scores", "classes" (1..num_classes), "valid"}, D =
  roi_heads.detections_per_image. aux: {"proposals", "proposals_valid"}, in training also the
  sampled "rois" (B, S, 4).
  """
  num_classes: int
  roi_heads: ROIHeadsConfig
  pooler: RoIPooler
  widths: Sequence[int] = VGG16_WIDTHS
  norm: str = "none"
  frozen_stages: int = 0
  pool_size: int = 7
  representation_size: int = 4096
  dropout_rate: float = 0.5
  image_scale: float = 1.0
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_image_scale(self.image_scale)
    super().__post_init__()

  @nn.compact
  def __call__(self, images, proposals, proposals_valid, *, train: bool,
               targets: dict | None = None):
    check_inputs("FastRCNN", images, targets, train)
    proposals = jnp.asarray(proposals, jnp.float32)
    if (proposals.ndim != 3 or proposals.shape[-1] != 4
        or proposals_valid.shape != proposals.shape[:2]):
      raise ValueError(f"FastRCNN: proposals must be (B, P, 4) (x1, y1, x2, y2) pixels and "
                       f"proposals_valid (B, P) bool; got shapes {proposals.shape} and "
                       f"{proposals_valid.shape}.")
    proposals = jax.lax.stop_gradient(proposals)
    x = preprocess(images, self.image_scale)
    features = VGG16(tuple(self.widths), fc_width=None, norm=self.norm,
                     frozen_stages=self.frozen_stages, dtype=self.dtype, name="backbone")(
                         x, train=train)["conv5_3"]
    heads = ROIHeads(self.num_classes, self.roi_heads, self.pooler, self.pool_size,
                     self.representation_size, self.dropout_rate, dtype=self.dtype,
                     name="roi_heads")
    outputs, rois = heads([features], proposals, proposals_valid, images.shape[1:3], train=train,
                          targets=targets)
    aux = {"proposals": proposals, "proposals_valid": proposals_valid}
    if train:
      aux["rois"] = rois
    return outputs, aux


@register_model("fast_rcnn_vgg16")
def fast_rcnn_vgg16(*, num_classes: int = 20, widths: Sequence[int] = VGG16_WIDTHS,
                    norm: str = "none", frozen_stages: int = 0, image_scale: float = 1.0,
                    pooling: str = "roi_pool", pool_size: int = 7,
                    spp_levels: Sequence[int] = (1, 2, 3, 6), representation_size: int = 4096,
                    dropout_rate: float = 0.5, roi_heads: dict | ROIHeadsConfig | None = None,
                    dtype: str = "float32") -> FastRCNN:
  """Fast R-CNN, VGG-16, external proposals, RoI pooling 7x7 (pooling="roi_align" or "spp" for
  RoIAlign or an SPPnet head); 20 classes (PASCAL VOC) by default. `roi_heads`: a dict of
  ROIHeadsConfig fields to change (`--config.model.roi_heads.<field>=...`)."""
  roi_heads = override(ROIHeadsConfig(), roi_heads, "roi_heads")
  return FastRCNN(num_classes=num_classes, roi_heads=roi_heads,
                  pooler=conv5_pooler(pooling, spp_levels, roi_heads, image_scale),
                  widths=tuple(widths), norm=norm, frozen_stages=frozen_stages,
                  pool_size=pool_size, representation_size=representation_size,
                  dropout_rate=dropout_rate, image_scale=image_scale, dtype=jnp.dtype(dtype))
