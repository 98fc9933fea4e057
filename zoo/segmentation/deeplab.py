"""DeepLab: atrous (dilated) backbones, atrous spatial pyramid pooling, bilinear upsampling of
the logits, and optionally the fully connected CRF (post-processing or trained as a layer).

- v1 LargeFOV (Chen et al., "Semantic Image Segmentation with Deep Convolutional Nets and
  Fully Connected CRFs", ICLR 2015): VGG-16 with pool4/pool5 at stride 1, conv5 dilated by 2,
  fc6 a 3x3 convolution dilated by 12 (1024 wide), fc7 1x1, fc8 the classifier; stride 8
  (`zoo.backbones.VGG16(dilated=True)`).
- v2 (Chen et al., "DeepLab: ... Atrous Convolution, and Fully Connected CRFs", TPAMI 2017):
  ResNet at output stride 8, ASPP as four parallel 3x3 classifiers dilated by 6, 12, 18, 24,
  their scores summed (the released ResNet-101 ASPP-L).
- v3 head (Chen et al., "Rethinking Atrous Convolution", arXiv:1706.05587, Sec. 3.3, and
  torchvision's DeepLabHead): ASPP of a 1x1 convolution, three 3x3 convolutions dilated by
  6, 12, 18 (doubled at output stride 8) and image pooling (global average, 1x1, broadcast
  back), each 256 wide with BatchNorm and ReLU, concatenated, projected by 1x1 (256, BN, ReLU,
  dropout 0.5 in training), then a 3x3 convolution (256, BN, ReLU) and the 1x1 classifier.

Upsampling. A feature (i, j) of a stride-s map of these backbones is centred on input pixel
(s i, s j) (every stride-2 step is an odd kernel padded by half), so output pixel p reads
feature coordinate p / s, linearly interpolated and clamped past the last feature
(`upsample_logits`). For inputs of size s (h - 1) + 1 (DeepLab's 321 and 513 crops) that is
exactly align_corners=True (Caffe's Interp layer, PyTorch's `align_corners=True`); for other
sizes it keeps the geometric alignment where align_corners=True would stretch the map.

CRF (`crf`): None; "postprocess" runs the fixed-weight CRF (DeepLab v2's weights by default)
on the upsampled logits at evaluation only (train=False), as DeepLab does; "trainable" is the
CRF-as-RNN layer (`zoo.segmentation.crf.DenseCRF`) in training and evaluation, learning its
kernel weights and compatibility matrix end to end. With a CRF the model outputs log Q
(log-probabilities, which are valid logits: see crf.py).

    model = zoo.create("deeplab_v3_r50", num_classes=21, output_stride=16)
    logits, aux = model.apply(variables, images, train=False)   # (B, H, W, 21)
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from zoo.backbones.resnet import RESNET_BLOCKS, ResNet
from zoo.backbones.vgg import VGG16, VGG16_WIDTHS
from zoo.layers.conv import ConvNormAct
from zoo.registry import register_model
from zoo.segmentation.crf import DenseCRF

BACKBONES = ("vgg16", "resnet")
HEADS = ("largefov", "aspp_v2", "aspp_v3")
CRF_MODES = (None, "postprocess", "trainable")


def interpolation_matrix(size: int, stride: int, num_features: int) -> np.ndarray:
  """(size, num_features) float32 linear-interpolation weights: row p reads feature
  coordinate p / stride, clamped to [0, num_features - 1]."""
  coordinate = np.clip(np.arange(size) / stride, 0, num_features - 1)
  low = np.minimum(np.floor(coordinate).astype(int), max(num_features - 2, 0))
  frac = coordinate - low
  matrix = np.zeros((size, num_features), np.float32)
  matrix[np.arange(size), low] += 1 - frac
  if num_features > 1:
    matrix[np.arange(size), low + 1] += frac
  return matrix


def upsample_logits(x, stride: int, size: tuple[int, int]):
  """Bilinear upsampling of a stride-`stride` map to `size`, feature (i, j) on pixel (s i, s j).

  Args:
    x: (B, h, w, C).
    stride: s, the map's stride in output pixels.
    size: (H, W) of the output.

  Returns:
    (B, H, W, C) float32; equals align_corners=True resizing when H = s (h - 1) + 1.
  """
  rows = jnp.asarray(interpolation_matrix(size[0], stride, x.shape[1]))
  cols = jnp.asarray(interpolation_matrix(size[1], stride, x.shape[2]))
  return jnp.einsum("Hh,bhwc,Ww->bHWc", rows, x.astype(jnp.float32), cols)


class ASPPv2(nn.Module):
  """DeepLab v2's ASPP: sum over rates r of a 3x3 classifier dilated by r (with bias).
  Initialised N(0, 0.01^2) as the release."""
  num_classes: int
  rates: tuple[int, ...] = (6, 12, 18, 24)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    return sum(nn.Conv(self.num_classes, (3, 3), kernel_dilation=rate, padding="SAME",
                       kernel_init=nn.initializers.normal(0.01), dtype=self.dtype,
                       param_dtype=self.param_dtype, name=f"branch{i}")(x)
               for i, rate in enumerate(self.rates))


class ASPPv3(nn.Module):
  """DeepLab v3's ASPP with image pooling, then its head (module doc); torchvision's layout."""
  num_classes: int
  rates: tuple[int, ...] = (6, 12, 18)
  width: int = 256
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _conv_bn_relu(self, kernel_size, name, dilation=1):
    # Bias-free, "same" padded, BatchNorm `bn`, ReLU; flax's default (LeCun normal) init.
    return ConvNormAct(self.width, kernel_size, dilation=dilation, norm="batch",
                       kernel_init=nn.initializers.lecun_normal(), norm_name="bn",
                       dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x, *, train: bool):
    branches = [self._conv_bn_relu(1, "branch0")(x, train=train)]
    for i, rate in enumerate(self.rates, start=1):
      branches.append(self._conv_bn_relu(3, f"branch{i}", rate)(x, train=train))
    pooled = x.mean(axis=(1, 2), keepdims=True)
    pooled = self._conv_bn_relu(1, "image_pooling")(pooled, train=train)
    branches.append(jnp.broadcast_to(pooled, branches[0].shape))
    y = self._conv_bn_relu(1, "project")(jnp.concatenate(branches, -1), train=train)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = self._conv_bn_relu(3, "head")(y, train=train)
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                   name="classifier")(y)


class DeepLab(nn.Module):
  """DeepLab v1 LargeFOV, v2 and v3 (module doc).

  Attributes:
    num_classes: output classes.
    backbone: "vgg16" (with head "largefov") or "resnet" (heads "aspp_v2", "aspp_v3").
    head: "largefov", "aspp_v2" or "aspp_v3".
    output_stride: 8 or 16 (ResNet); LargeFOV is 8.
    widths, fc_width: VGG-16's stage widths and fc6/fc7 width (LargeFOV: 1024).
    blocks, width: the ResNet's bottlenecks per layer and stem width.
    norm: VGG: "none" or "batch"; ResNet: "batch" or "frozen" (DeepLab v2 froze its BN).
    aspp_rates: the dilation rates at output stride 16 for v3 (doubled at 8), as given for v2.
    aspp_width: v3's ASPP channels.
    dropout_rate: after fc6/fc7 (LargeFOV) or the ASPP projection (v3).
    crf: None, "postprocess" or "trainable" (module doc); crf_* the DenseCRF settings.
    dtype: compute dtype (logits float32); param_dtype: parameter dtype.
  """
  num_classes: int
  backbone: str = "resnet"
  head: str = "aspp_v3"
  output_stride: int = 16
  widths: tuple[int, ...] = VGG16_WIDTHS
  fc_width: int = 1024
  blocks: tuple[int, ...] = RESNET_BLOCKS["resnet50"]
  width: int = 64
  norm: str = "batch"
  aspp_rates: tuple[int, ...] = (6, 12, 18)
  aspp_width: int = 256
  dropout_rate: float = 0.5
  crf: str | None = None
  crf_iterations: int = 10
  crf_pos_w: float = 3.0
  crf_pos_xy_std: float = 1.0
  crf_bi_w: float = 4.0
  crf_bi_xy_std: float = 67.0
  crf_bi_rgb_std: float = 3.0
  crf_image_scale: float = 255.0
  crf_implementation: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.backbone not in BACKBONES:
      raise ValueError(f"DeepLab backbone must be one of {BACKBONES}, got {self.backbone!r}.")
    if self.head not in HEADS:
      raise ValueError(f"DeepLab head must be one of {HEADS}, got {self.head!r}.")
    if (self.backbone == "vgg16") != (self.head == "largefov"):
      raise ValueError(f"DeepLab head {self.head!r} does not fit backbone {self.backbone!r}: "
                       "LargeFOV is the VGG-16 head, the ASPP heads sit on a ResNet.")
    if self.output_stride not in (8, 16) or (self.backbone == "vgg16" and self.output_stride != 8):
      raise ValueError(f"DeepLab output_stride must be 8 or 16 (8 for LargeFOV), got "
                       f"{self.output_stride!r}.")
    if self.crf not in CRF_MODES:
      raise ValueError(f"DeepLab crf must be one of {CRF_MODES}, got {self.crf!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train: bool):
    """Per-pixel class scores.

    Args:
      images: (B, H, W, C) float; with a CRF, colours in [0, 1] (times crf_image_scale = the
        CRF's colour units).
      train: dropout (needs a "dropout" rng) and BatchNorm statistics.

    Returns:
      logits: (B, H, W, num_classes) float32: the upsampled scores, or log Q after the CRF
        (crf="trainable", or "postprocess" with train=False).
      aux: the backbone's features, "scores" (B, h, w, num_classes) at the output stride and
        "unary" (B, H, W, num_classes), the upsampled scores before any CRF.
    """
    if images.ndim != 4:
      raise ValueError(f"DeepLab takes images (B, H, W, C) (NHWC), got shape {images.shape}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.backbone == "vgg16":
      features = VGG16(self.widths, self.fc_width, fc6_kernel=3, fc6_dilation=12,
                       num_classes=self.num_classes, dilated=True, norm=self.norm,
                       dropout_rate=self.dropout_rate, name="backbone", **kw)(images, train=train)
      scores = features["fc8"]
    else:
      features = ResNet(self.blocks, self.width, self.output_stride, self.norm,
                        name="backbone", **kw)(images, train=train)
      if self.head == "aspp_v2":
        scores = ASPPv2(self.num_classes, tuple(self.aspp_rates), name="aspp", **kw)(
            features["C5"], train=train)
      else:
        rates = tuple(r * 16 // self.output_stride for r in self.aspp_rates)
        scores = ASPPv3(self.num_classes, rates, self.aspp_width, self.dropout_rate, name="aspp",
                        **kw)(features["C5"], train=train)
    unary = upsample_logits(scores, self.output_stride, images.shape[1:3])
    logits = unary
    if self.crf == "trainable" or (self.crf == "postprocess" and not train):
      logits = DenseCRF(self.crf_iterations, self.crf_pos_w, self.crf_pos_xy_std, self.crf_bi_w,
                        self.crf_bi_xy_std, self.crf_bi_rgb_std, trainable=self.crf == "trainable",
                        image_scale=self.crf_image_scale, implementation=self.crf_implementation,
                        name="crf")(unary, images)
    return logits, {**features, "scores": scores.astype(jnp.float32), "unary": unary}


def _crf_fields(crf, crf_iterations, crf_pos_w, crf_pos_xy_std, crf_bi_w, crf_bi_xy_std,
                crf_bi_rgb_std, crf_image_scale, crf_implementation):
  return dict(crf=crf, crf_iterations=crf_iterations, crf_pos_w=crf_pos_w,
              crf_pos_xy_std=crf_pos_xy_std, crf_bi_w=crf_bi_w, crf_bi_xy_std=crf_bi_xy_std,
              crf_bi_rgb_std=crf_bi_rgb_std, crf_image_scale=crf_image_scale,
              crf_implementation=crf_implementation)


@register_model("deeplab_largefov_vgg16")
def deeplab_largefov_vgg16(
    num_classes: int = 21, widths: tuple[int, ...] = VGG16_WIDTHS, fc_width: int = 1024,
    norm: str = "none", dropout_rate: float = 0.5, crf: str | None = None, crf_iterations: int = 10,
    crf_pos_w: float = 3.0, crf_pos_xy_std: float = 3.0, crf_bi_w: float = 5.0,
    crf_bi_xy_std: float = 50.0, crf_bi_rgb_std: float = 3.0, crf_image_scale: float = 255.0,
    crf_implementation: str = "auto", dtype: Any = "float32", param_dtype: Any = "float32") -> DeepLab:
  """DeepLab v1 LargeFOV (VGG-16, output stride 8); CRF defaults: the v1 paper's VOC values
  (w1 5, sigma_alpha 50, sigma_beta 3, w2 3, sigma_gamma 3)."""
  return DeepLab(num_classes=num_classes, backbone="vgg16", head="largefov", output_stride=8,
                 widths=tuple(widths), fc_width=fc_width, norm=norm, dropout_rate=dropout_rate,
                 **_crf_fields(crf, crf_iterations, crf_pos_w, crf_pos_xy_std, crf_bi_w,
                               crf_bi_xy_std, crf_bi_rgb_std, crf_image_scale, crf_implementation),
                 dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype))


@register_model("deeplab_v2_r50")
def deeplab_v2_r50(
    num_classes: int = 21, output_stride: int = 8, blocks: tuple[int, ...] = (3, 4, 6, 3),
    width: int = 64, norm: str = "batch", aspp_rates: tuple[int, ...] = (6, 12, 18, 24),
    crf: str | None = None, crf_iterations: int = 10, crf_pos_w: float = 3.0,
    crf_pos_xy_std: float = 1.0, crf_bi_w: float = 4.0, crf_bi_xy_std: float = 67.0,
    crf_bi_rgb_std: float = 3.0, crf_image_scale: float = 255.0, crf_implementation: str = "auto",
    dtype: Any = "float32", param_dtype: Any = "float32") -> DeepLab:
  """DeepLab v2 (ResNet-50, ASPP of four dilated classifiers, output stride 8); CRF defaults:
  DeepLab v2's (w1 4, sigma_alpha 67, sigma_beta 3, w2 3, sigma_gamma 1)."""
  return DeepLab(num_classes=num_classes, backbone="resnet", head="aspp_v2",
                 output_stride=output_stride, blocks=tuple(blocks), width=width, norm=norm,
                 aspp_rates=tuple(aspp_rates),
                 **_crf_fields(crf, crf_iterations, crf_pos_w, crf_pos_xy_std, crf_bi_w,
                               crf_bi_xy_std, crf_bi_rgb_std, crf_image_scale, crf_implementation),
                 dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype))


@register_model("deeplab_v3_r50")
def deeplab_v3_r50(
    num_classes: int = 21, output_stride: int = 16, blocks: tuple[int, ...] = (3, 4, 6, 3),
    width: int = 64, norm: str = "batch", aspp_rates: tuple[int, ...] = (6, 12, 18),
    aspp_width: int = 256, dropout_rate: float = 0.5, crf: str | None = None,
    crf_iterations: int = 10, crf_pos_w: float = 3.0, crf_pos_xy_std: float = 1.0,
    crf_bi_w: float = 4.0, crf_bi_xy_std: float = 67.0, crf_bi_rgb_std: float = 3.0,
    crf_image_scale: float = 255.0, crf_implementation: str = "auto", dtype: Any = "float32",
    param_dtype: Any = "float32") -> DeepLab:
  """DeepLab v3 (ResNet-50, ASPP with image pooling, output stride 16 or 8)."""
  return DeepLab(num_classes=num_classes, backbone="resnet", head="aspp_v3",
                 output_stride=output_stride, blocks=tuple(blocks), width=width, norm=norm,
                 aspp_rates=tuple(aspp_rates), aspp_width=aspp_width, dropout_rate=dropout_rate,
                 **_crf_fields(crf, crf_iterations, crf_pos_w, crf_pos_xy_std, crf_bi_w,
                               crf_bi_xy_std, crf_bi_rgb_std, crf_image_scale, crf_implementation),
                 dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype))
