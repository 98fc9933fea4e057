"""Faster R-CNN (Ren et al. 2015) and Mask R-CNN (He et al. 2017): backbone, region proposal
network, RoI heads, as one jit-able function with static shapes.

Training is a single XLA program, proposals and sampling included: the RPN's anchors are
matched and a fixed number sampled, proposals are the post-NMS top-k per image (padded, with a
validity mask), ground-truth boxes join them, the RoI heads sample a fixed number of RoIs at a
fixed positive fraction, and the mask head runs on the first `batch_size_per_image *
positive_fraction` slots, where the sampler puts the positives. The model returns raw outputs
together with the targets it sampled; the losses are `zoo.detection.losses`'.

Registered variants:

- `faster_rcnn_r50_fpn`, `mask_rcnn_r50_fpn`: torchvision's `fasterrcnn_resnet50_fpn` /
  `maskrcnn_resnet50_fpn` (ResNet-50 + FPN, `zoo.backbones.ResNetFPN`; the RPN on P2..P6, the
  RoI heads pooling P2..P5). Parameter names nest as torchvision's state dicts:
  backbone/{body, fpn}, rpn/head, roi_heads/{box_head, box_predictor, mask_head,
  mask_predictor} (zoo.weights.torchvision converts them). Training rules are detectron2's
  defaults (RoIAlign with sampling_ratio 0 and aligned=True, L1 box losses, mask targets
  thresholded at 0.5). Image sides must be multiples of 32.
- `faster_rcnn_vgg16`: the RPN on VGG-16's conv5_3 (one level, 9 anchors at stride 16:
  sizes 128, 256, 512 x ratios 0.5, 1, 2), then Fast R-CNN's head (zoo.detection.fast_rcnn,
  whose `image_scale`, `pooling` and dropout it shares).

Images are (B, H, W, 3) float in [0, 1], normalised inside the model with ImageNet's mean and
std as torchvision does. Classes: the model's class index 0 is background and 1..num_classes
the dataset's labels 0..num_classes-1 shifted by one.

Hyper-parameters: each stage's are one argument of the registered function, a dict of the
fields to change: `rpn` (zoo.detection.rpn.RPNConfig) and `roi_heads`
(zoo.detection.roi_heads.ROIHeadsConfig), so a config says `config.model.rpn =
dict(post_nms_topk_test=64)` and the command line `--config.model.rpn.post_nms_topk_test=64`.
The others use the glossary's words (WORKSPACE.md): `blocks` (the ResNet's bottlenecks per
layer: RESNET_BLOCKS["resnet101"] makes an R101-FPN), `width`, `widths`, `fpn_width`,
`mask_width`, `norm`, `dtype` (a dtype name, "float32" or "bfloat16").
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from zoo.backbones.fpn import FPN_LEVELS, FPN_STRIDES, ResNetFPN
from zoo.backbones.resnet import RESNET_BLOCKS
from zoo.backbones.vgg import VGG16, VGG16_WIDTHS
from zoo.detection import fast_rcnn
from zoo.detection.hyperparameters import override
from zoo.detection.roi_heads import ROIHeads, ROIHeadsConfig, RoIPooler
from zoo.detection.rpn import RegionProposalNetwork, RPNConfig
from zoo.registry import register_model


class FasterRCNN(nn.Module):
  """Faster R-CNN, and Mask R-CNN with `masks=True` (module doc).

  `__call__(images, *, train, targets=None)`: images (B, H, W, 3) in [0, 1]; in training,
  targets {"boxes": (B, G, 4) pixels, "labels": (B, G) int in [0, num_classes),
  "objects_valid": (B, G) bool, and with masks "instance_masks": (B, G, H, W) bool}.
  Returns (outputs, aux): training outputs hold each stage's raw predictions and the targets
  sampled for them ("rpn", "box", with masks "mask"; see `zoo.detection.losses`); inference
  outputs are the detections {"boxes": (B, D, 4), "scores", "classes" (1..num_classes),
  "valid", and with masks "masks": (B, D, 28, 28) probabilities in each box, 0 where not
  valid}, D = roi_heads.detections_per_image. aux: the RPN's {"proposals", "proposals_valid"},
  in training also the sampled "rois".

  Attributes:
    num_classes: foreground classes.
    backbone: a module mapping normalised images to named feature maps, with `strides`
      (ResNetFPN, VGG16(fc_width=None)); its parameters are `backbone/...`.
    rpn_levels, roi_levels: the backbone outputs the RPN and the RoI heads read.
    rpn: RPNConfig; roi_heads: ROIHeadsConfig; pooler: the RoI heads' RoIPooler.
    pool_size, representation_size, dropout_rate, masks, mask_width, mask_chunk: ROIHeads'.
    image_scale: the backbone's input size over the image's (Fast R-CNN's rescaling).
    size_divisibility: image sides must be multiples of it (32 with an FPN).
    dtype: compute dtype.
  """
  num_classes: int
  backbone: nn.Module
  rpn_levels: tuple[str, ...]
  roi_levels: tuple[str, ...]
  rpn: RPNConfig
  roi_heads: ROIHeadsConfig
  pooler: RoIPooler
  pool_size: int = 7
  representation_size: int = 1024
  dropout_rate: float = 0.0
  masks: bool = False
  mask_width: int = 256
  mask_chunk: int = 16
  image_scale: float = 1.0
  size_divisibility: int = 1
  dtype: Any = jnp.float32

  def __post_init__(self):
    fast_rcnn.check_image_scale(self.image_scale)
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train: bool, targets: dict | None = None):
    needed = fast_rcnn.TARGETS + (("instance_masks",) if self.masks else ())
    name = "Mask R-CNN" if self.masks else "Faster R-CNN"
    fast_rcnn.check_inputs(name, images, targets, train, needed, self.size_divisibility)
    image_size = images.shape[1:3]
    features = self.backbone(fast_rcnn.preprocess(images, self.image_scale), train=train)
    strides = self.backbone.strides
    proposals, proposals_valid, rpn = RegionProposalNetwork(
        self.rpn, tuple(strides[name] for name in self.rpn_levels), self.image_scale,
        dtype=self.dtype, name="rpn")([features[name] for name in self.rpn_levels], image_size,
                                      train=train, targets=targets)
    heads = ROIHeads(self.num_classes, self.roi_heads, self.pooler, self.pool_size,
                     self.representation_size, self.dropout_rate, self.masks,
                     self.mask_width, self.mask_chunk, dtype=self.dtype, name="roi_heads")
    outputs, rois = heads([features[name] for name in self.roi_levels], proposals,
                          proposals_valid, image_size, train=train, targets=targets)
    aux = {"proposals": proposals, "proposals_valid": proposals_valid}
    if train:
      outputs["rpn"] = rpn
      aux["rois"] = rois
    return outputs, aux


# torchvision's COCO detectors have 91 outputs: background + category ids 1..90. Our
# num_classes counts the foreground only.
COCO_NUM_CLASSES = 90


def _resnet_fpn_rcnn(*, masks: bool, num_classes: int, blocks: Sequence[int], width: int, norm: str,
                     frozen_stages: int, fpn_width: int, representation_size: int, rpn, roi_heads,
                     mask_width: int = 256, mask_chunk: int = 16, dtype: str) -> FasterRCNN:
  roi_heads = override(ROIHeadsConfig(), roi_heads, "roi_heads")
  backbone = ResNetFPN(blocks=tuple(blocks), width=width, norm=norm, frozen_stages=frozen_stages,
                       fpn_width=fpn_width, dtype=jnp.dtype(dtype))
  return FasterRCNN(
      num_classes=num_classes, backbone=backbone, rpn_levels=FPN_LEVELS, roi_levels=FPN_LEVELS[:4],
      rpn=override(RPNConfig(), rpn, "rpn"), roi_heads=roi_heads,
      pooler=RoIPooler("roi_align", FPN_STRIDES[:4], roi_heads.sampling_ratio, roi_heads.aligned),
      representation_size=representation_size, masks=masks, mask_width=mask_width,
      mask_chunk=mask_chunk, size_divisibility=32, dtype=jnp.dtype(dtype))


@register_model("faster_rcnn_r50_fpn")
def faster_rcnn_r50_fpn(*, num_classes: int = COCO_NUM_CLASSES,
                        blocks: Sequence[int] = RESNET_BLOCKS["resnet50"],
                        width: int = 64, norm: str = "frozen", frozen_stages: int = 1,
                        fpn_width: int = 256, representation_size: int = 1024,
                        rpn: dict | RPNConfig | None = None,
                        roi_heads: dict | ROIHeadsConfig | None = None,
                        dtype: str = "float32") -> FasterRCNN:
  """Faster R-CNN, ResNet-50 + FPN, torchvision's `fasterrcnn_resnet50_fpn` defaults.
  `rpn`, `roi_heads`: dicts of RPNConfig / ROIHeadsConfig fields to change (module doc)."""
  return _resnet_fpn_rcnn(masks=False, num_classes=num_classes, blocks=blocks, width=width,
                          norm=norm, frozen_stages=frozen_stages, fpn_width=fpn_width,
                          representation_size=representation_size, rpn=rpn, roi_heads=roi_heads,
                          dtype=dtype)


@register_model("mask_rcnn_r50_fpn")
def mask_rcnn_r50_fpn(*, num_classes: int = COCO_NUM_CLASSES,
                      blocks: Sequence[int] = RESNET_BLOCKS["resnet50"],
                      width: int = 64, norm: str = "frozen", frozen_stages: int = 1,
                      fpn_width: int = 256, representation_size: int = 1024,
                      mask_width: int = 256, mask_chunk: int = 16,
                      rpn: dict | RPNConfig | None = None,
                      roi_heads: dict | ROIHeadsConfig | None = None,
                      dtype: str = "float32") -> FasterRCNN:
  """Mask R-CNN, ResNet-50 + FPN, torchvision's `maskrcnn_resnet50_fpn` defaults. `mask_chunk`:
  slots the mask head skips together when none holds a positive / detection (a speed knob).
  `rpn`, `roi_heads`: dicts of RPNConfig / ROIHeadsConfig fields to change (module doc)."""
  return _resnet_fpn_rcnn(masks=True, num_classes=num_classes, blocks=blocks, width=width,
                          norm=norm, frozen_stages=frozen_stages, fpn_width=fpn_width,
                          representation_size=representation_size, rpn=rpn, roi_heads=roi_heads,
                          mask_width=mask_width, mask_chunk=mask_chunk, dtype=dtype)


# Faster R-CNN's VGG-16 RPN: 3 sizes x 3 ratios at every conv5_3 position (Ren et al., 3.1.1).
VGG16_RPN = RPNConfig(anchor_sizes=((128, 256, 512),))


@register_model("faster_rcnn_vgg16")
def faster_rcnn_vgg16(*, num_classes: int = 20, widths: Sequence[int] = VGG16_WIDTHS,
                      norm: str = "none", frozen_stages: int = 0, image_scale: float = 1.0,
                      pooling: str = "roi_pool", pool_size: int = 7,
                      spp_levels: Sequence[int] = (1, 2, 3, 6), representation_size: int = 4096,
                      dropout_rate: float = 0.5, rpn: dict | RPNConfig | None = None,
                      roi_heads: dict | ROIHeadsConfig | None = None,
                      dtype: str = "float32") -> FasterRCNN:
  """Faster R-CNN, VGG-16, single-level RPN (9 anchors at stride 16), RoI pooling 7x7; 20
  classes (PASCAL VOC) by default. `rpn`, `roi_heads`: dicts of RPNConfig / ROIHeadsConfig
  fields to change (module doc); rpn.anchor_sizes has one level, e.g. ((16, 32, 64),)."""
  roi_heads = override(ROIHeadsConfig(), roi_heads, "roi_heads")
  backbone = VGG16(tuple(widths), fc_width=None, norm=norm, frozen_stages=frozen_stages,
                   dtype=jnp.dtype(dtype))
  return FasterRCNN(
      num_classes=num_classes, backbone=backbone, rpn_levels=("conv5_3",),
      roi_levels=("conv5_3",), rpn=override(VGG16_RPN, rpn, "rpn"), roi_heads=roi_heads,
      pooler=fast_rcnn.conv5_pooler(pooling, spp_levels, roi_heads, image_scale),
      pool_size=pool_size, representation_size=representation_size, dropout_rate=dropout_rate,
      image_scale=image_scale, dtype=jnp.dtype(dtype))
