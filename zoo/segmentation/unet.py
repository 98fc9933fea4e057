"""U-Net: Ronneberger, Fischer and Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015 (arXiv:1505.04597).

A contracting path of `depth` stages (two 3x3 convolutions + ReLU, width * 2**level channels,
then 2x2 max-pooling), a bottleneck, and an expanding path that upsamples by two
("up-convolution" halving the channels), concatenates the centre-cropped contracting-path
features of the same level, and applies two 3x3 convolutions; a 1x1 convolution maps to the
class logits. The paper uses unpadded ("VALID") convolutions, so a 572x572 tile yields a
388x388 segmentation of its centre; "SAME" padding keeps the input size.

    model = zoo.create("unet", num_classes=11, padding="SAME", width=16, depth=3)
    variables = model.init(rng, images, train=False)
    logits, aux = model.apply(variables, images, train=False)
"""

import itertools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from zoo.layers.conv import NORMS, ConvNormAct
from zoo.layers.crop import center_crop
from zoo.layers.pool import max_pool_2x2
from zoo.layers.upsample import UpConvolution, upsample_bilinear_2x
from zoo.registry import register_model

PADDINGS = ("VALID", "SAME")
UPSAMPLINGS = ("transpose", "bilinear")


class DoubleConv(nn.Module):
  """Two 3x3 ConvNormAct layers of the same width: one U-Net stage (paper Fig. 1, blue arrows)."""
  features: int
  padding: str
  norm: str
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    """x: (B, H, W, C) -> (B, H', W', features); H' = H - 4 for VALID, H for SAME."""
    for name in ("conv1", "conv2"):
      x = ConvNormAct(self.features, (3, 3), padding=self.padding, norm=self.norm,
                      dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x, train=train)
    return x


class UNet(nn.Module):
  """The U-Net of Ronneberger et al. 2015 and its common variants.

  Attributes:
    num_classes: output channels of the final 1x1 convolution.
    in_channels: channels C of the input images.
    width: channels of the first stage; stage `level` has width * 2**level.
    depth: number of 2x2 max-pool downsamplings (the paper: 4, widths 64..1024).
    padding: "VALID" (the paper: unpadded convolutions, centre-cropped skip connections,
      output smaller than the input; see `output_size`) or "SAME" (output = input size).
    norm: "none" (the paper) or "batch" (BatchNorm after every 3x3 convolution).
    upsample: "transpose" (the paper's 2x2 up-convolution halving the channels) or
      "bilinear" (bilinear x2 then a 1x1 convolution halving the channels).
    dtype: compute dtype (e.g. bfloat16 on accelerators); the logits are float32.
    param_dtype: parameter dtype.
  """
  num_classes: int
  in_channels: int = 3
  width: int = 64
  depth: int = 4
  padding: str = "VALID"
  norm: str = "none"
  upsample: str = "transpose"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    for field, value, choices in (("padding", self.padding, PADDINGS), ("norm", self.norm, NORMS),
                                  ("upsample", self.upsample, UPSAMPLINGS)):
      if value not in choices:
        raise ValueError(f"U-Net {field} must be one of {choices}, got {value!r}.")
    if self.depth < 1 or self.width < 1 or self.num_classes < 1 or self.in_channels < 1:
      raise ValueError(f"U-Net needs depth, width, num_classes and in_channels >= 1; got "
                       f"{self.depth}, {self.width}, {self.num_classes}, {self.in_channels}.")
    super().__post_init__()

  def output_size(self, input_size: int) -> int | None:
    """Output height (or width) for an input height (or width); None if it does not work.

    VALID: each 3x3 convolution removes 2 pixels, each pooling halves and needs an even size
    (paper Sec. 2: "all 2x2 max-pooling operations are applied to a layer with an even x-
    and y-size"), each upsampling doubles; every intermediate size must stay positive.
    SAME: the size must be a multiple of 2**depth, so that upsampling restores each level.
    """
    if self.padding == "SAME":
      return input_size if input_size > 0 and input_size % 2**self.depth == 0 else None
    size = input_size
    for _ in range(self.depth):
      size -= 4
      if size < 2 or size % 2:
        return None
      size //= 2
    size -= 4
    if size < 1:
      return None
    for _ in range(self.depth):
      size = 2 * size - 4
      if size < 1:
        return None
    return size

  def valid_input_sizes(self, low: int = 1, high: int = 1024) -> list[int]:
    """The input sizes in [low, high] that `output_size` accepts."""
    return [size for size in range(max(low, 1), high + 1) if self.output_size(size)]

  def check_input_shape(self, shape: tuple[int, ...]):
    """Raises ValueError naming the problem unless `shape` is (B, H, W, in_channels) with H, W
    sizes the architecture can take. Static shapes only, so it works under jit."""
    if len(shape) != 4:
      raise ValueError(f"U-Net takes images of shape (B, H, W, {self.in_channels}) (NHWC), got "
                       f"shape {tuple(shape)} of rank {len(shape)}.")
    if shape[3] != self.in_channels:
      raise ValueError(f"U-Net was built for in_channels={self.in_channels}, got images of shape "
                       f"{tuple(shape)} with {shape[3]} channels (NHWC: channels last).")
    height, width = shape[1:3]
    problems = []
    for name, size in (("height", height), ("width", width)):
      if self.output_size(size) is None and not (name == "width" and width == height):
        problems.append((name, size, self._nearest_working_sizes(size)))
    if not problems:
      return
    rule = ("every 2x2 max-pooling needs an even input and every size must stay positive"
            if self.padding == "VALID" else f"sizes must be multiples of 2**depth = {2**self.depth}")
    if height == width:
      near = [f"working sizes near it are {' and '.join(map(str, problems[0][2]))}"]
    else:
      near = [f"{name} {size} does not work (nearest working: {' and '.join(map(str, sizes))})"
              for name, size, sizes in problems]
    raise ValueError(f"U-Net ({self.padding}, depth {self.depth}) cannot take {height}x{width} "
                     f"inputs: {'; '.join(near)} ({rule}).")

  def _nearest_working_sizes(self, size: int) -> list[int]:
    below = next((s for s in range(size - 1, 0, -1) if self.output_size(s)), None)
    above = next(s for s in itertools.count(max(size + 1, 1)) if self.output_size(s))
    return [s for s in (below, above) if s is not None]

  @nn.compact
  def __call__(self, images, *, train: bool):
    """Per-pixel class logits.

    Args:
      images: (B, H, W, in_channels) float; H and W sizes `output_size` accepts.
      train: batch statistics (and their update, with `mutable=["batch_stats"]`) when
        norm="batch"; otherwise no effect.

    Returns:
      logits: (B, H', W', num_classes) float32, H' = output_size(H) (= H for SAME; for VALID
        the centre H' x H' of the input, e.g. 388 for 572 at depth 4).
      aux: dict of features in `dtype`: "encoder", a list over levels 0..depth-1 of the
        contracting path's (B, H_l, W_l, width * 2**l) before pooling; "bottleneck",
        (B, h, w, width * 2**depth); "decoder", a list from the deepest level up of the
        expanding path's (B, H'_l, W'_l, width * 2**l).
    """
    self.check_input_shape(images.shape)
    stage = lambda features, name: DoubleConv(features, self.padding, self.norm, self.dtype,
                                              self.param_dtype, name=name)
    x = images.astype(self.dtype)
    encoder = []
    for level in range(self.depth):
      x = stage(self.width * 2**level, f"encoder_{level}")(x, train=train)
      encoder.append(x)
      x = max_pool_2x2(x)
    x = stage(self.width * 2**self.depth, "bottleneck")(x, train=train)
    bottleneck = x
    decoder = []
    for level in reversed(range(self.depth)):
      features = self.width * 2**level
      if self.upsample == "transpose":
        x = UpConvolution(features, self.dtype, self.param_dtype, name=f"up_{level}")(x)
      else:
        x = nn.Conv(features, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                    name=f"up_{level}")(upsample_bilinear_2x(x))
      x = jnp.concatenate([center_crop(encoder[level], x.shape[1:3]), x], axis=-1)
      x = stage(features, f"decoder_{level}")(x, train=train)
      decoder.append(x)
    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                     name="head")(x)
    return logits.astype(jnp.float32), {"encoder": encoder, "bottleneck": bottleneck,
                                        "decoder": decoder}


@register_model("unet")
def unet(num_classes: int = 2, in_channels: int = 3, width: int = 64, depth: int = 4,
         padding: str = "VALID", norm: str = "none", upsample: str = "transpose",
         dtype: Any = "float32", param_dtype: Any = "float32") -> UNet:
  """Ronneberger et al.'s U-Net by default: 2 classes, widths 64..1024, VALID, no norm,
  up-convolutions; 31,031,810 parameters for RGB input, 31,030,658 for the paper's grayscale
  (in_channels=1). Every field of `UNet` can be overridden."""
  return UNet(num_classes=num_classes, in_channels=in_channels, width=width,
              depth=depth, padding=padding, norm=norm, upsample=upsample,
              dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype))
