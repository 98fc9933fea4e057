"""ResNet-50/101 (He et al. 2016) with bottleneck blocks, in torchvision's layout and names.

torchvision's ResNet "v1.5": the stride of a downsampling bottleneck sits in its 3x3
convolution (conv2), not in the first 1x1 as in the original Caffe release. Names follow
torchvision's state dict, so its weights import by transposing OIHW kernels to HWIO:

    conv1, bn1                                   stem: 7x7/2 convolution, BN, ReLU, 3x3/2 max-pool
    layer{1..4}/{block}/conv1 bn1 conv2 bn2 conv3 bn3 [downsample/0 (1x1 conv), downsample/1 (BN)]
    fc                                           optional classifier (num_classes)

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

RESNET_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}
NORMS = ("batch", "frozen")
EXPANSION = 4


def _kaiming_fan_out():
  # torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu").
  return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _batch_norm(fixed: bool, train: bool, name: str, zero_scale: bool = False, **kw):
  """BatchNorm with PyTorch's defaults (momentum 0.1 = 0.9 here, epsilon 1e-5), parameters
  `scale`/`bias` and statistics `mean`/`var` (torchvision's weight/bias/running_*); the
  statistics are used, not updated, when `fixed` (frozen BN) or when not training."""
  return nn.BatchNorm(use_running_average=fixed or not train, momentum=0.9, epsilon=1e-5,
                      scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
                      name=name, **kw)


def _conv(x, features, kernel_size, *, stride=1, dilation=1, name, module, param_dtype, dtype):
  """A bias-free convolution with torchvision's padding dilation * (k - 1) // 2."""
  pad = dilation * (kernel_size - 1) // 2
  kernel = module.param(name, _kaiming_fan_out(), (kernel_size, kernel_size, x.shape[-1], features),
                        param_dtype)
  return lax.conv_general_dilated(x, kernel.astype(dtype), (stride, stride), ((pad, pad), (pad, pad)),
                                  rhs_dilation=(dilation, dilation),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv(nn.Module):
  """torchvision's nn.Conv2d(bias=False): parameter `kernel` (k, k, C_in, features) HWIO."""
  features: int
  kernel_size: int
  stride: int = 1
  dilation: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _conv(x.astype(self.dtype), self.features, self.kernel_size, stride=self.stride,
                 dilation=self.dilation, name="kernel", module=self, param_dtype=self.param_dtype,
                 dtype=self.dtype)


class Downsample(nn.Module):
  """torchvision's `downsample` Sequential: "0" a strided 1x1 convolution, "1" its BatchNorm."""
  features: int
  stride: int
  fixed_norm: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = Conv(self.features, 1, self.stride, dtype=self.dtype, param_dtype=self.param_dtype, name="0")(x)
    return _batch_norm(self.fixed_norm, train, "1", dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Bottleneck(nn.Module):
  """1x1 (width) -> 3x3 (width, stride, dilation) -> 1x1 (4 width), each with BN; the shortcut
  is the identity or `downsample`; ReLU after the sum. torchvision's Bottleneck (v1.5).

  Attributes:
    width: the 3x3 convolution's channels (64, 128, 256, 512 in ResNet-50's layers).
    stride: of conv2 and the shortcut.
    dilation: of conv2 (padding = dilation).
    downsample: whether the shortcut is a projection.
    fixed_norm: BN statistics fixed in training too.
    zero_init_residual: bn3's scale starts at 0 (torchvision's option; off by default).
  """
  width: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  fixed_norm: bool = False
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    """x: (B, H, W, C) -> (B, H / stride, W / stride, 4 width)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name, zero=False: _batch_norm(self.fixed_norm, train, name, zero, **kw)
    y = nn.relu(norm("bn1")(Conv(self.width, 1, name="conv1", **kw)(x)))
    y = Conv(self.width, 3, self.stride, self.dilation, name="conv2", **kw)(y)
    y = nn.relu(norm("bn2")(y))
    y = Conv(self.width * EXPANSION, 1, name="conv3", **kw)(y)
    y = norm("bn3", self.zero_init_residual)(y)
    shortcut = x
    if self.downsample:
      shortcut = Downsample(self.width * EXPANSION, self.stride, self.fixed_norm, name="downsample",
                            **kw)(x, train=train)
    return nn.relu(y + shortcut)


class Layer(nn.Module):
  """torchvision's `layer{k}`: `len(blocks)` bottlenecks named "0", "1", ...

  Attributes:
    width: bottleneck width; blocks: number of bottlenecks; stride: of the first block
    (1 when dilated); dilation: of blocks 1..; first_dilation: of block 0's 3x3;
    downsample: whether block 0 projects its shortcut.
  """
  width: int
  blocks: int
  stride: int
  dilation: int
  first_dilation: int
  downsample: bool
  fixed_norm: bool
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    for index in range(self.blocks):
      first = index == 0
      x = Bottleneck(self.width, self.stride if first else 1,
                     self.first_dilation if first else self.dilation, first and self.downsample,
                     self.fixed_norm, self.zero_init_residual, self.dtype, self.param_dtype,
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
    frozen = lambda stage: self.norm == "frozen" or stage <= self.frozen_stages
    x = Conv(self.width, 7, 2, name="conv1", **kw)(images.astype(self.dtype))
    x = nn.relu(_batch_norm(frozen(0), train, "bn1", **kw)(x))
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
      x = Layer(width, blocks, stride, dilation, previous_dilation, downsample, frozen(stage),
                self.zero_init_residual, name=f"layer{stage}", **kw)(x, train=train)
      if stage == self.frozen_stages:
        x = jax.lax.stop_gradient(x)
      channels = width * EXPANSION
      features[f"C{stage + 1}"] = x
    if self.num_classes is not None:
      pooled = x.astype(jnp.float32).mean(axis=(1, 2))
      features["logits"] = nn.Dense(self.num_classes, param_dtype=self.param_dtype, name="fc")(pooled)
    return features
