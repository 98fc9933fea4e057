"""VGG-16 (Simonyan and Zisserman 2015, configuration D) as a fully convolutional backbone.

Thirteen 3x3 convolutions in five stages (widths 64, 128, 256, 512, 512), each stage ending
in a max-pooling, then the classifier's fully connected layers as convolutions ("fc6" 7x7
and "fc7" 1x1, 4096 wide: Long et al. 2015, Sec. 3.1 "convolutionalization"), and optionally
"fc8", the 1000-way ImageNet classifier as a 1x1 convolution. With `num_classes=1000` and a
224x224 input it is the ImageNet VGG-16: 138,357,544 parameters, fc6's 7x7x512x4096 kernel
holding exactly the weights of the Linear(25088, 4096) layer.

Two layouts, both in Caffe's arithmetic (pooling rounds the output size up, and a window
may not start in the bottom/right padding: Caffe's `PoolingLayer::Reshape`):

- FCN (the default): 2x2 stride-2 max-pooling, features at strides 2..32. `pad100=True`
  pads conv1_1 by 100 as the FCN release does (voc-fcn*/net.py), so that any input size
  survives fc6's unpadded 7x7; otherwise every convolution is "same" padded (fc6 too).
- DeepLab-LargeFOV (`dilated=True`, Chen et al. 2015, the released
  `DeepLab-LargeFOV/train.prototxt`): 3x3 max-pooling, stride 2 pad 1 in pool1..3 and stride 1
  pad 1 in pool4/pool5, conv5 dilated by 2, a 3x3 stride-1 average pool "pool5a", and fc6 a
  3x3 convolution dilated by 12 (1024 wide in their release: `fc_width`): output stride 8.

Parameter names are the Caffe layer names (`conv1_1` ... `conv5_3`, `fc6`, `fc7`, `fc8`),
each a flax Conv with `kernel` (kh, kw, C_in, C_out) HWIO and `bias`, so Caffe or
torchvision weights load by transposing OIHW to HWIO (torchvision's `classifier.0` is fc6
after reshaping (4096, 25088) to (4096, 512, 7, 7)).

    vgg = VGG16()
    features = vgg.apply(variables, images, train=False)
    features["pool4"]  # (B, ceil(H / 16), ceil(W / 16), 512)

Fast and Faster R-CNN (zoo.detection) read "conv5_3", the last convolution before pool5
(stride 16), from `VGG16(fc_width=None)`; `frozen_stages` fixes the first stages as
py-faster-rcnn does.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from zoo.layers.conv import NORMS, ConvNormAct

# Convolutions per stage (configuration D).
STAGE_DEPTHS = (2, 2, 3, 3, 3)
VGG16_WIDTHS = (64, 128, 256, 512, 512)


def caffe_pool_size(size: int, kernel: int, stride: int, pad: int) -> int:
  """Caffe's pooled size: ceil((size + 2 pad - kernel) / stride) + 1, minus one if the last
  window would start in the padding (`PoolingLayer::Reshape`)."""
  out = -(-(size + 2 * pad - kernel) // stride) + 1
  if pad and (out - 1) * stride >= size + pad:
    out -= 1
  return out


def caffe_pool(x, kind: str, kernel: int, stride: int, pad: int = 0):
  """Caffe's MAX or AVE pooling of (B, H, W, C) over kernel x kernel windows.

  Output (B, h, w, C) with h = caffe_pool_size(H, ...). MAX ignores the padding; AVE
  divides by the window's extent clipped to the padded input (Caffe counts padding in the
  divisor; windows sticking past the padding, at the ceil-rounded end, count less).
  """
  sizes = [caffe_pool_size(n, kernel, stride, pad) for n in x.shape[1:3]]
  # Padding after: whatever the last window needs past the input (can exceed `pad`).
  after = [max((n_out - 1) * stride + kernel - n - pad, 0) for n, n_out in zip(x.shape[1:3], sizes)]
  padding = ((0, 0), (pad, after[0]), (pad, after[1]), (0, 0))
  window, strides = (1, kernel, kernel, 1), (1, stride, stride, 1)
  if kind == "max":
    y = lax.reduce_window(x, -jnp.inf, lax.max, window, strides, padding)
  elif kind == "avg":
    y = lax.reduce_window(x, 0.0, lax.add, window, strides, padding)
    counts = []
    for n, n_out in zip(x.shape[1:3], sizes):
      start = jnp.arange(n_out) * stride - pad
      counts.append(jnp.minimum(start + kernel, n + pad) - start)
    y = y / (counts[0][:, None] * counts[1][None, :])[None, :, :, None].astype(y.dtype)
  else:
    raise ValueError(f"Pooling kind must be 'max' or 'avg', got {kind!r}.")
  return y[:, :sizes[0], :sizes[1]]


class VGG16(nn.Module):
  """VGG-16's convolutional stages and its fully connected layers as convolutions.

  Attributes:
    widths: channels of the five stages (VGG-16: 64, 128, 256, 512, 512).
    fc_width: channels of fc6 and fc7 (4096 for VGG-16 and FCN, 1024 for DeepLab-LargeFOV);
      None leaves them out (features up to pool5 only).
    fc6_kernel: fc6's kernel size (7 FCN, 3 DeepLab-LargeFOV).
    fc6_dilation: fc6's dilation (12 for DeepLab-LargeFOV).
    num_classes: None, or the width of "fc8", a 1x1 convolution after fc7 (1000: ImageNet).
    pad100: FCN's conv1_1 padding of 100 (then fc6 is unpadded, as in FCN); False: every
      convolution, fc6 included, is "same" padded.
    dilated: DeepLab-LargeFOV's layout (module doc): output stride 8.
    norm: "none" (VGG-16), "batch" (BatchNorm after every convolution of the stages, to
      train from scratch quickly; fc6/fc7 have none) or "frozen" (that BatchNorm with its
      stored statistics, in training too).
    dropout_rate: dropout after fc6 and fc7 in training (0.5 in VGG, FCN and DeepLab).
    frozen_stages: stages (0-5) whose parameters get no gradient and whose BatchNorm, if any,
      keeps its running statistics (py-faster-rcnn fixes conv1 and conv2 of an ImageNet
      VGG-16 for Fast / Faster R-CNN: 2).
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  widths: tuple[int, ...] = VGG16_WIDTHS
  fc_width: int | None = 4096
  fc6_kernel: int = 7
  fc6_dilation: int = 1
  num_classes: int | None = None
  pad100: bool = False
  dilated: bool = False
  norm: str = "none"
  dropout_rate: float = 0.5
  frozen_stages: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if len(self.widths) != 5 or min(self.widths) < 1:
      raise ValueError(f"VGG16 widths must be 5 positive stage widths, got {self.widths!r}.")
    if self.norm not in NORMS:
      raise ValueError(f"VGG16 norm must be one of {NORMS}, got {self.norm!r}.")
    if self.pad100 and self.dilated:
      raise ValueError("VGG16: pad100 (FCN) and dilated (DeepLab-LargeFOV) exclude each other; "
                       "pick one layout.")
    if self.num_classes is not None and self.fc_width is None:
      raise ValueError("VGG16: num_classes (fc8) needs fc6/fc7; set fc_width.")
    if not 0 <= self.frozen_stages <= 5:
      raise ValueError(f"VGG16 frozen_stages must be in 0..5, got {self.frozen_stages!r}.")
    super().__post_init__()

  @property
  def strides(self) -> dict[str, int]:
    """Each output's stride in input pixels. Feature (i, j) of a stride-s map is centred on
    input pixel (s i + (s - 1) / 2, ...) with 2x2 pooling (FCN, pad100 False; with pad100 shifted
    by the 100-pixel padding, see zoo.segmentation.fcn), on (s i, s j) with DeepLab's 3x3 pooling."""
    strides = {f"pool{i}": min(2**i, 8) if self.dilated else 2**i for i in range(1, 6)}
    strides.update(conv5_3=strides["pool4"], pool5a=8, fc6=strides["pool5"], fc7=strides["pool5"],
                   fc8=strides["pool5"])
    return strides

  @nn.compact
  def __call__(self, images, *, train: bool):
    """Features of the stages.

    Args:
      images: (B, H, W, C) float.
      train: dropout after fc6/fc7 (needs a "dropout" rng) and batch statistics (norm="batch").

    Returns:
      dict of (B, h, w, channels) maps in `dtype`: "pool1".."pool5" (stage widths), "conv5_3"
      (before pool5: Fast / Faster R-CNN's feature map, stride 16; 8 with dilated), with
      fc_width: "fc6", "fc7" (after ReLU and dropout), with num_classes: "fc8" (raw scores);
      with dilated: "pool5a" too. Sizes follow Caffe (`caffe_pool_size`): ceil(H / 2**i) for
      pool i without pad100; see `strides`.
    """
    if images.ndim != 4:
      raise ValueError(f"VGG16 takes images (B, H, W, C) (NHWC), got shape {images.shape}.")
    # Caffe's layers: kernel and bias in the layer itself (conv_name=None), ReLU after.
    conv = lambda width, name, **kw: ConvNormAct(
        width, norm=kw.pop("norm", self.norm), conv_name=None, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name, **kw)
    x = images.astype(self.dtype)
    features = {}
    for stage, (depth, width) in enumerate(zip(STAGE_DEPTHS, self.widths), start=1):
      for index in range(1, depth + 1):
        padding = 100 if (self.pad100 and stage == index == 1) else "SAME"
        dilation = 2 if (self.dilated and stage == 5) else 1
        x = conv(width, f"conv{stage}_{index}", padding=padding, dilation=dilation)(
            x, train=train and stage > self.frozen_stages)
      if stage == self.frozen_stages:
        x = lax.stop_gradient(x)
      if stage == 5:
        features["conv5_3"] = x
      if self.dilated:
        x = caffe_pool(x, "max", 3, 2 if stage <= 3 else 1, 1)
      else:
        x = caffe_pool(x, "max", 2, 2)
      features[f"pool{stage}"] = x
    if self.dilated:
      x = features["pool5a"] = caffe_pool(x, "avg", 3, 1, 1)
    if self.fc_width is None:
      return features
    fc6_padding = "VALID" if self.pad100 else "SAME"
    for name, kernel_size, dilation, padding in (("fc6", self.fc6_kernel, self.fc6_dilation, fc6_padding),
                                                 ("fc7", 1, 1, "SAME")):
      x = conv(self.fc_width, name, kernel_size=kernel_size, dilation=dilation, padding=padding,
               norm="none")(x, train=train)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      features[name] = x
    if self.num_classes is not None:
      features["fc8"] = conv(self.num_classes, "fc8", kernel_size=1, activation=None,
                             norm="none")(x, train=train)
    return features

