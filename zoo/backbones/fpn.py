"""Feature pyramid network (Lin et al. 2017) and the ResNet + FPN backbone of the R-CNNs.

`FPN` turns a ResNet's C2..C5 into P2..P6, `out_channels` each, as torchvision's
`FeaturePyramidNetwork` with `LastLevelMaxPool` (detectron2's `FPN` with `LastLevelMaxPool`
computes the same maps): lateral 1x1 convolutions (`inner_blocks_i`), top-down nearest
upsampling and sums, 3x3 output convolutions (`layer_blocks_i`), P6 = P5 subsampled by 2.

`ResNetFPN` is torchvision's `BackboneWithFPN`: the ResNet `body` and the `fpn`, so the
parameters of a detector that names it `backbone` are `backbone/body/...` and
`backbone/fpn/...`, torchvision's `backbone.body.*` and `backbone.fpn.*`.

    backbone = ResNetFPN()
    pyramid = backbone.apply(variables, normalized_images, train=False)
    pyramid["P2"]   # (B, H / 4, W / 4, 256)
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from zoo.backbones.resnet import RESNET_BLOCKS, ResNet

FPN_LEVELS = ("P2", "P3", "P4", "P5", "P6")
FPN_STRIDES = (4, 8, 16, 32, 64)


def _uniform_a1():
  """kaiming_uniform_(a=1), torchvision's FPN init: U(-sqrt(3 / fan_in), sqrt(3 / fan_in))."""
  return nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def nearest_resize(x, size):
  """torchvision's F.interpolate(mode="nearest", size=size) on (B, h, w, C):
  src = floor(dst * in / out)."""
  rows = (np.arange(size[0]) * x.shape[1]) // size[0]
  cols = (np.arange(size[1]) * x.shape[2]) // size[1]
  return x[:, rows][:, :, cols]


class FPN(nn.Module):
  """Feature pyramid: {"C2".."C5": (B, H / s, W / s, C_s)} -> {"P2".."P6": (B, ., ., out_channels)}.

  Lateral 1x1 convolutions (inner_blocks_i), top-down nearest upsampling and sums, 3x3 output
  convolutions (layer_blocks_i); P6 is P5 subsampled by 2 (torchvision's LastLevelMaxPool,
  a 1x1 max-pool with stride 2).
  """
  out_channels: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: dict) -> dict:
    conv = lambda kernel, name: nn.Conv(self.out_channels, (kernel, kernel), padding=kernel // 2,
                                        kernel_init=_uniform_a1(), dtype=self.dtype, name=name)
    names = ("C2", "C3", "C4", "C5")
    laterals = [conv(1, f"inner_blocks_{i}")(features[n]) for i, n in enumerate(names)]
    top = laterals[-1]
    outputs = [conv(3, "layer_blocks_3")(top)]
    for i in (2, 1, 0):
      top = laterals[i] + nearest_resize(top, laterals[i].shape[1:3])
      outputs.insert(0, conv(3, f"layer_blocks_{i}")(top))
    outputs.append(outputs[-1][:, ::2, ::2])
    return dict(zip(FPN_LEVELS, outputs))


class ResNetFPN(nn.Module):
  """ResNet (`body`) + FPN (`fpn`): normalised images (B, H, W, 3) -> {"P2".."P6"}.

  H and W must be multiples of 32 (the coarsest body stride) for the top-down sums to line up
  as torchvision's (which pads its batches to a multiple of 32); the detectors check it.

  Attributes:
    blocks: the body's bottlenecks per layer (RESNET_BLOCKS: ResNet-50 (3, 4, 6, 3), ResNet-101
      (3, 4, 23, 3)).
    width: the stem's width (64 for the standard ResNets).
    norm: the body's norm ("frozen": torchvision's pretrained detectors; "batch").
    frozen_stages: body stages without gradients (torchvision's trainable_layers=3: 1).
    fpn_width: the channels of every pyramid level (256).
    dtype: compute dtype.
  """
  blocks: tuple[int, ...] = RESNET_BLOCKS["resnet50"]
  width: int = 64
  norm: str = "frozen"
  frozen_stages: int = 1
  fpn_width: int = 256
  dtype: Any = jnp.float32

  @property
  def strides(self) -> dict[str, int]:
    """Each level's stride in input pixels: P2 4 ... P6 64."""
    return dict(zip(FPN_LEVELS, FPN_STRIDES))

  @nn.compact
  def __call__(self, images, *, train: bool) -> dict:
    body = ResNet(blocks=tuple(self.blocks), width=self.width, norm=self.norm,
                  frozen_stages=self.frozen_stages, dtype=self.dtype, name="body")
    return FPN(self.fpn_width, dtype=self.dtype, name="fpn")(body(images, train=train))
