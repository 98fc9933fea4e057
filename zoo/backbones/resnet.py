"""ResNet-50/101 (He et al. 2016) with bottleneck blocks, in torchvision's layout and names.

torchvision's ResNet "v1.5": the stride of a downsampling bottleneck sits in its 3x3
convolution (conv2), not in the first 1x1 as in the original Caffe release. Names follow
torchvision's state dict, so its weights import by transposing OIHW kernels to HWIO:

    conv1, bn1                                   stem: 7x7/2 convolution, BN, ReLU, 3x3/2 max-pool
    layer{1..4}/{block}/conv1 bn1 conv2 bn2 conv3 bn3 [downsample/0 (1x1 conv), downsample/1 (BN)]
    fc                                           optional classifier (num_classes)

Each convolution with its BatchNorm is `zoo.layers.conv_norm_act` (`ConvNormAct` for the
downsample), whose children keep these names.

`output_stride` 8 or 16 replaces the stride of layer3/layer4 by dilation as torchvision's
`replace_stride_with_dilation` does (DeepLab, Chen et al. 2017): the first block of a dilated
layer keeps the previous dilation in its 3x3 convolution, the later ones use the new one.

`norm="frozen"` is detectron2's FrozenBatchNorm2d role: BatchNorm with its stored statistics
in training too (the affine `scale`/`bias` stay parameters). `frozen_stages` k stops the
gradient after the stem (k = 0) or after layer k (k >= 1; mmdetection's convention), and
those stages use their stored statistics; an optimizer with weight decay still decays them,
so mask them out of it if they must stay exactly fixed.

Features (i, j) of a stride-s output are centred on input pixel (s i, s j): every stride-2
step is an odd kernel padded by half its size.

    resnet = ResNet(blocks=(3, 4, 6, 3))          # ResNet-50
    features = resnet.apply(variables, images, train=False)
    features["C5"]  # (B, ceil(H / 32), ceil(W / 32), 2048)
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from zoo.layers.conv import ConvNormAct, conv_norm_act

RESNET_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}
NORMS = ("batch", "frozen")
EXPANSION = 4


def _kaiming_fan_out():
  # torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu").
  return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv_bn(module: nn.Module, x, features: int, kernel_size: int, *, train: bool,
             stride: int = 1, dilation: int = 1, index: str = "1", norm: str, activation=nn.relu,
             zero_scale: bool = False, dtype: Any, param_dtype: Any):
  """torchvision's bias-free `conv{index}` (padding dilation * (k - 1) // 2) and its
  BatchNorm `bn{index}` (norm "batch" or "frozen"), then `activation`: children of `module`,
  side by side as torchvision names them (call it inside module's compact method)."""
  return conv_norm_act(module, x, train=train, features=features, kernel_size=kernel_size,
                       stride=stride, dilation=dilation, padding=dilation * (kernel_size - 1) // 2,
                       norm=norm, activation=activation, kernel_init=_kaiming_fan_out(),
                       norm_scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
                       conv_name=f"conv{index}", norm_name=f"bn{index}", dtype=dtype,
                       param_dtype=param_dtype)


class Bottleneck(nn.Module):
  """1x1 (width) -> 3x3 (width, stride, dilation) -> 1x1 (4 width), each with BN; the shortcut
  is the identity or `downsample` (torchvision's Sequential: "0" a strided 1x1 convolution,
  "1" its BN); ReLU after the sum. torchvision's Bottleneck (v1.5).

  Attributes:
    width: the 3x3 convolution's channels (64, 128, 256, 512 in ResNet-50's layers).
    stride: of conv2 and the shortcut.
    dilation: of conv2 (padding = dilation).
    downsample: whether the shortcut is a projection.
    norm: "batch" or "frozen" (statistics fixed in training too).
    zero_init_residual: bn3's scale starts at 0 (torchvision's option; off by default).
  """
  width: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  norm: str = "batch"
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    """x: (B, H, W, C) -> (B, H / stride, W / stride, 4 width)."""
    kw = dict(norm=self.norm, dtype=self.dtype, param_dtype=self.param_dtype)
    y = _conv_bn(self, x, self.width, 1, train=train, index="1", **kw)
    y = _conv_bn(self, y, self.width, 3, train=train, stride=self.stride, dilation=self.dilation,
                 index="2", **kw)
    y = _conv_bn(self, y, self.width * EXPANSION, 1, train=train, index="3", activation=None,
                 zero_scale=self.zero_init_residual, **kw)
    shortcut = x
    if self.downsample:
      shortcut = ConvNormAct(self.width * EXPANSION, 1, stride=self.stride, padding=0,
                             activation=None, kernel_init=_kaiming_fan_out(), conv_name="0",
                             norm_name="1", name="downsample", **kw)(x, train=train)
    return nn.relu(y + shortcut)


class Layer(nn.Module):
  """torchvision's `layer{k}`: `len(blocks)` bottlenecks named "0", "1", ...

  Attributes:
    width: bottleneck width; blocks: number of bottlenecks; stride: of the first block
    (1 when dilated); dilation: of blocks 1..; first_dilation: of block 0's 3x3;
    downsample: whether block 0 projects its shortcut; norm: "batch" or "frozen".
  """
  width: int
  blocks: int
  stride: int
  dilation: int
  first_dilation: int
  downsample: bool
  norm: str
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    for index in range(self.blocks):
      first = index == 0
      x = Bottleneck(self.width, self.stride if first else 1,
                     self.first_dilation if first else self.dilation, first and self.downsample,
                     self.norm, self.zero_init_residual, self.dtype, self.param_dtype,
                     name=str(index))(x, train=train)
    return x


class ResNet(nn.Module):
  """ResNet with bottleneck blocks (torchvision's layout), returning C2..C5.

  Attributes:
    blocks: bottlenecks per layer: (3, 4, 6, 3) ResNet-50, (3, 4, 23, 3) ResNet-101.
    width: the stem's channels and layer1's bottleneck width (64); layer k has width 2**(k-1)
      times it and outputs 4 times that.
    output_stride: 32 (plain), 16 (layer4 dilated by 2) or 8 (layer3 by 2, layer4 by 4).
    norm: "batch" or "frozen" (statistics fixed in training too; module doc).
    frozen_stages: -1 none; 0 the stem; k >= 1 the stem and layer1..layer k (module doc).
    num_classes: None (features only) or the width of `fc` after global average pooling
      (1000: ImageNet; ResNet-50 then has torchvision's 25,557,032 parameters).
    zero_init_residual: torchvision's option (each block's bn3 scale starts at 0).
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  blocks: tuple[int, ...] = RESNET_BLOCKS["resnet50"]
  width: int = 64
  output_stride: int = 32
  norm: str = "batch"
  frozen_stages: int = -1
  num_classes: int | None = None
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if len(self.blocks) != 4 or min(self.blocks) < 1:
      raise ValueError(f"ResNet blocks must be 4 positive counts (ResNet-50: (3, 4, 6, 3)), got "
                       f"{self.blocks!r}.")
    if self.output_stride not in (8, 16, 32):
      raise ValueError(f"ResNet output_stride must be 8, 16 or 32, got {self.output_stride!r}.")
    if self.norm not in NORMS:
      raise ValueError(f"ResNet norm must be one of {NORMS}, got {self.norm!r}.")
    if not -1 <= self.frozen_stages <= 4:
      raise ValueError(f"ResNet frozen_stages must be in -1..4 (-1: none, 0: stem, k: stem and "
                       f"layer1..k), got {self.frozen_stages!r}.")
    if self.width < 1:
      raise ValueError(f"ResNet width must be positive, got {self.width!r}.")
    super().__post_init__()

  @property
  def strides(self) -> dict[str, int]:
    """Each feature's stride in input pixels."""
    return {"stem": 4, "C2": 4, "C3": 8, "C4": min(16, self.output_stride),
            "C5": self.output_stride}

  @nn.compact
  def __call__(self, images, *, train: bool):
    """Features of the stages.

    Args:
      images: (B, H, W, C) float.
      train: batch statistics (with `mutable=["batch_stats"]`) in the stages that are not
        frozen (norm="batch").

    Returns:
      dict of maps in `dtype`: "stem" (B, ceil(H/4), ceil(W/4), width) after the max-pool,
      "C2".."C5" the outputs of layer1..layer4 ((B, ., ., 4 width 2**(k-2)) at `strides`), and
      with num_classes "logits" (B, num_classes) float32.
    """
    if images.ndim != 4:
      raise ValueError(f"ResNet takes images (B, H, W, C) (NHWC), got shape {images.shape}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda stage: "frozen" if self.norm == "frozen" or stage <= self.frozen_stages else "batch"
    x = _conv_bn(self, images, self.width, 7, train=train, stride=2, norm=norm(0), **kw)
    x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                          ((0, 0), (1, 1), (1, 1), (0, 0)))
    if self.frozen_stages == 0:
      x = jax.lax.stop_gradient(x)
    features = {"stem": x}
    dilation, channels = 1, self.width
    for stage, blocks in enumerate(self.blocks, start=1):
      width = self.width * 2**(stage - 1)
      stride = 1 if stage == 1 else 2
      previous_dilation = dilation
      if stage >= 2 and 2**(stage + 1) > self.output_stride:  # This layer's stride -> dilation.
        dilation, stride = dilation * stride, 1
      downsample = stride != 1 or channels != width * EXPANSION
      x = Layer(width, blocks, stride, dilation, previous_dilation, downsample, norm(stage),
                self.zero_init_residual, name=f"layer{stage}", **kw)(x, train=train)
      if stage == self.frozen_stages:
        x = jax.lax.stop_gradient(x)
      channels = width * EXPANSION
      features[f"C{stage + 1}"] = x
    if self.num_classes is not None:
      pooled = x.astype(jnp.float32).mean(axis=(1, 2))
      features["logits"] = nn.Dense(self.num_classes, param_dtype=self.param_dtype, name="fc")(pooled)
    return features
