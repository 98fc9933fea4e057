"""FCN: Long, Shelhamer and Darrell, "Fully Convolutional Networks for Semantic Segmentation",
CVPR 2015 (arXiv:1411.4038; the PAMI 2016 version and the fcn.berkeleyvision.org release).

VGG-16 with fc6 (7x7) and fc7 (1x1) as convolutions (`zoo.backbones.VGG16`), a 1x1 "score"
layer per used feature map, Caffe Deconvolution layers initialised to bilinear upsampling,
and Caffe Crop layers that put every map back on the input's pixel grid:

  FCN-32s: score_fr -> upscore (64x64, stride 32) -> crop to the input.
  FCN-16s: score_fr -> upscore2 (4x4, stride 2) + score_pool4 -> upscore16 (32x32, stride 16).
  FCN-8s:  ... + score_pool3 after upscore_pool4 (4x4, stride 2) -> upscore8 (16x16, stride 8).

Skip fusion. The release has two FCN-8s recipes: "staged" (train 32s, then 16s from it, then
8s from that; the skips are unscaled) and "at-once" (voc-fcn8s-atonce: trained in one go,
pool4 scaled by 0.01 and pool3 by 0.0001 before scoring, to keep the skips from swamping the
early updates: PAMI Sec. 4.2). We train in one go, so `skip_scaling=True` (at-once) is the
default; False gives the staged nets' arithmetic (for importing their weights).

Upsampling. A Caffe Deconvolution is the gradient of a convolution: each input pixel i
scatters its kernel to outputs stride * i + t - pad (t the tap). With the bilinear kernel of
FCN's `surgery.upsample_filt` (a tent peaking at tap factor - 1/2) on the diagonal (class c to
class c), input cell i lands centred on output stride * i + stride - 1/2. `learn_upsampling`
makes the kernels parameters (the paper learns the intermediate 2x ones: Sec. 4.2); the
release freezes all of them (lr_mult 0), which is the default here: then they are constants,
not parameters, and no optimizer can move them. Flax's `ConvTranspose` computes the same
scatter only with `transpose_kernel=True` and a spatially flipped kernel; we state the
scatter directly as a dilated correlation with the flipped kernel (`caffe_deconvolution`).

Alignment. `pad100=True` is the release: conv1_1 padded by 100 (so every input size survives
fc6's unpadded 7x7), and the Crop layers' offsets from Caffe's coord_map: 19 (32s), 5 for
score_pool4 and 27 (16s), 5, 9 and 31 (8s). The default `pad100=False` pads every
convolution "same" (fc6 too): feature (i, j) of a stride-s map is then centred on input pixel
s i + (s - 1) / 2, and a deconvolution by f puts it on output f i + f - 1/2, i.e. output
o sits on the finer grid's cell o - f / 2: the crop offsets are f / 2 (16 for 32s; 1 for each
2x step and 8 / 4 for the last one), taken from the upsampled map. Either way the output is
(B, H, W, num_classes), aligned with the input pixel for pixel (tests/segmentation/test_fcn.py
checks both with impulses through an identity path).

    model = zoo.create("fcn_8s_vgg16", num_classes=21)
    logits, aux = model.apply(variables, images, train=False)   # (B, H, W, 21)
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from zoo.backbones.vgg import VGG16, VGG16_WIDTHS
from zoo.layers.conv import NORMS
from zoo.registry import register_model

VARIANTS = ("32s", "16s", "8s")
# fcn.berkeleyvision.org, voc-fcn*/net.py: the crop offsets coord_map gives with pad=100.
PAD100_OFFSETS = {"32s": {"score": 19}, "16s": {"score_pool4c": 5, "score": 27},
                  "8s": {"score_pool4c": 5, "score_pool3c": 9, "score": 31}}
# voc-fcn8s-atonce: the fixed Scale layers before score_pool4 / score_pool3.
ATONCE_SCALES = {"pool4": 0.01, "pool3": 0.0001}


def bilinear_upsampling_kernel(size: int) -> np.ndarray:
  """(size, size) float32 bilinear kernel: FCN surgery's `upsample_filt(size)`.

  factor = ceil(size / 2); centre factor - 1 (odd size) or factor - 1/2 (even);
  value (1 - |r - centre| / factor) (1 - |c - centre| / factor).
  """
  factor = (size + 1) // 2
  centre = factor - 1 if size % 2 == 1 else factor - 0.5
  tent = 1 - np.abs(np.arange(size) - centre) / factor
  return np.outer(tent, tent).astype(np.float32)


def caffe_deconvolution(x, kernel, stride: int, pad: int = 0):
  """Caffe's Deconvolution layer: the transpose (gradient) of a strided convolution.

  out[s i + a - pad, s j + b - pad, o] += sum_c x[i, j, c] kernel[a, b, c, o], computed as a
  correlation of x dilated by s and padded by k - 1 - pad with the spatially flipped kernel.

  Args:
    x: (B, h, w, C_in).
    kernel: (k, k, C_in, C_out) HWIO; Caffe's Deconvolution weight (C_in, C_out, k, k) is
      `weight.transpose(2, 3, 0, 1)`.
    stride: s; pad: Caffe's pad.

  Returns:
    (B, (h - 1) s + k - 2 pad, (w - 1) s + k - 2 pad, C_out).
  """
  k = kernel.shape[0]
  edge = k - 1 - pad
  if edge < 0:
    raise ValueError(f"Deconvolution pad {pad} must be < kernel size {k}.")
  return lax.conv_general_dilated(x, kernel[::-1, ::-1], (1, 1), ((edge, edge), (edge, edge)),
                                  lhs_dilation=(stride, stride),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def crop(x, offset: int, size: tuple[int, int]):
  """Caffe's Crop layer on axes 1, 2: x[:, offset:offset + h, offset:offset + w]."""
  h, w = size
  if offset < 0 or offset + h > x.shape[1] or offset + w > x.shape[2]:
    raise ValueError(f"Cannot crop {h}x{w} at offset {offset} from a {x.shape[1]}x{x.shape[2]} "
                     "map; the input is too small for this FCN (try pad100=True or a larger input).")
  return x[:, offset:offset + h, offset:offset + w]


class BilinearDeconvolution(nn.Module):
  """FCN's upscore layer: Caffe Deconvolution (kernel 2 factor, stride factor, no bias) from
  C to C channels, kernel `bilinear_upsampling_kernel(2 factor)` on the channel diagonal.

  Attributes:
    factor: the upsampling factor f (kernel 2f, stride f).
    learnable: a parameter `kernel` (2f, 2f, C, C) initialised to the diagonal bilinear
      kernel (the paper's learned intermediate upsampling), else a constant (the release).
  """
  factor: int
  learnable: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: (B, h, w, C) -> (B, (h + 1) f, (w + 1) f, C); input cell i peaks at output f i + f - 1/2."""
    channels = x.shape[-1]

    def init(rng=None, shape=None, dtype=jnp.float32):
      del rng, shape
      filt = bilinear_upsampling_kernel(2 * self.factor)
      return jnp.asarray(filt[:, :, None, None] * np.eye(channels, dtype=np.float32), dtype)

    kernel = (self.param("kernel", init, None, self.param_dtype) if self.learnable else init())
    return caffe_deconvolution(x.astype(self.dtype), kernel.astype(self.dtype), self.factor)


class FCN(nn.Module):
  """FCN-32s/16s/8s on VGG-16 (module doc).

  Attributes:
    num_classes: output channels (21 for PASCAL VOC).
    variant: "32s", "16s" or "8s".
    widths, fc_width: VGG-16's stage widths and fc6/fc7 width (4096); smaller ones train
      from scratch on a CPU.
    norm: "none" (VGG-16) or "batch" (BatchNorm in the conv stages).
    dropout_rate: after fc6 and fc7.
    pad100: the release's conv1_1 padding and crop offsets; False: "same" padding (module doc).
    learn_upsampling: the deconvolution kernels are parameters (True) or fixed bilinear.
    skip_scaling: the at-once net's 0.01 / 0.0001 scaling of pool4 / pool3 (True) or none.
    dtype: compute dtype (logits float32); param_dtype: parameter dtype.
  """
  num_classes: int
  variant: str = "8s"
  widths: tuple[int, ...] = VGG16_WIDTHS
  fc_width: int = 4096
  norm: str = "none"
  dropout_rate: float = 0.5
  pad100: bool = False
  learn_upsampling: bool = False
  skip_scaling: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"FCN variant must be one of {VARIANTS}, got {self.variant!r}.")
    if self.num_classes < 1:
      raise ValueError(f"FCN needs num_classes >= 1, got {self.num_classes}.")
    if self.norm not in NORMS:
      raise ValueError(f"FCN norm must be one of {NORMS}, got {self.norm!r}.")
    super().__post_init__()

  def _score(self, x, name):
    # The release initialises the score layers to zero (surgery / net.py's weight_filler default).
    return nn.Conv(self.num_classes, (1, 1), kernel_init=nn.initializers.zeros, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name)(x)

  def _upscore(self, x, factor, name):
    return BilinearDeconvolution(factor, self.learn_upsampling, self.dtype, self.param_dtype,
                                 name=name)(x)

  def _fuse(self, upsampled, skip, name):
    """upscore (stride s, from the coarser map) + score of `skip` (stride s), on skip's grid."""
    scale = ATONCE_SCALES[name] if self.skip_scaling else 1.0
    score = self._score(skip * scale, f"score_{name}")
    if self.pad100:
      score = crop(score, PAD100_OFFSETS[self.variant][f"score_{name}c"], upsampled.shape[1:3])
    else:
      upsampled = crop(upsampled, 1, score.shape[1:3])
    return upsampled + score

  @nn.compact
  def __call__(self, images, *, train: bool):
    """Per-pixel class scores.

    Args:
      images: (B, H, W, C) float; any H, W >= 1 with pad100, else any (the "same" layout
        pads to whole pooling cells).
      train: dropout after fc6/fc7 (needs a "dropout" rng) and BatchNorm statistics.

    Returns:
      logits: (B, H, W, num_classes) float32, aligned with the input pixel for pixel.
      aux: the VGG features (dict: "pool1".."pool5", "fc6", "fc7") and "score_fr", the
        stride-32 class scores.
    """
    if images.ndim != 4:
      raise ValueError(f"FCN takes images (B, H, W, C) (NHWC), got shape {images.shape}.")
    features = VGG16(self.widths, self.fc_width, fc6_kernel=7, pad100=self.pad100, norm=self.norm,
                     dropout_rate=self.dropout_rate, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="backbone")(images, train=train)
    score_fr = self._score(features["fc7"], "score_fr")
    x, factor = score_fr, 32
    if self.variant in ("16s", "8s"):
      x = self._fuse(self._upscore(x, 2, "upscore2"), features["pool4"], "pool4")
      factor = 16
    if self.variant == "8s":
      x = self._fuse(self._upscore(x, 2, "upscore_pool4"), features["pool3"], "pool3")
      factor = 8
    x = self._upscore(x, factor, f"upscore{factor if factor != 32 else ''}")
    offset = PAD100_OFFSETS[self.variant]["score"] if self.pad100 else factor // 2
    logits = crop(x, offset, images.shape[1:3])
    return logits.astype(jnp.float32), {**features, "score_fr": score_fr}


def _fcn(variant, num_classes, widths, fc_width, norm, dropout_rate, pad100, learn_upsampling,
         skip_scaling, dtype, param_dtype):
  return FCN(num_classes=num_classes, variant=variant, widths=tuple(widths), fc_width=fc_width,
             norm=norm, dropout_rate=dropout_rate, pad100=pad100, learn_upsampling=learn_upsampling,
             skip_scaling=skip_scaling, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype))


@register_model("fcn_32s_vgg16")
def fcn_32s_vgg16(num_classes: int = 21, widths: tuple[int, ...] = VGG16_WIDTHS, fc_width: int = 4096,
                 norm: str = "none", dropout_rate: float = 0.5, pad100: bool = False,
                 learn_upsampling: bool = False, skip_scaling: bool = True,
                 dtype: Any = "float32", param_dtype: Any = "float32") -> FCN:
  """FCN-32s: 134,357,829 parameters (VGG-16 convolutions and fc6/fc7 + 21-way score_fr)."""
  return _fcn("32s", num_classes, widths, fc_width, norm, dropout_rate, pad100, learn_upsampling,
              skip_scaling, dtype, param_dtype)


@register_model("fcn_16s_vgg16")
def fcn_16s_vgg16(num_classes: int = 21, widths: tuple[int, ...] = VGG16_WIDTHS, fc_width: int = 4096,
                 norm: str = "none", dropout_rate: float = 0.5, pad100: bool = False,
                 learn_upsampling: bool = False, skip_scaling: bool = True,
                 dtype: Any = "float32", param_dtype: Any = "float32") -> FCN:
  """FCN-16s: FCN-32s + score_pool4 (pool4 skip)."""
  return _fcn("16s", num_classes, widths, fc_width, norm, dropout_rate, pad100, learn_upsampling,
              skip_scaling, dtype, param_dtype)


@register_model("fcn_8s_vgg16")
def fcn_8s_vgg16(num_classes: int = 21, widths: tuple[int, ...] = VGG16_WIDTHS, fc_width: int = 4096,
                norm: str = "none", dropout_rate: float = 0.5, pad100: bool = False,
                learn_upsampling: bool = False, skip_scaling: bool = True,
                dtype: Any = "float32", param_dtype: Any = "float32") -> FCN:
  """FCN-8s: FCN-16s + score_pool3 (pool3 skip)."""
  return _fcn("8s", num_classes, widths, fc_width, norm, dropout_rate, pad100, learn_upsampling,
              skip_scaling, dtype, param_dtype)
