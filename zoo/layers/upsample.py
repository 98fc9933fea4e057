"""Upsampling by two: the U-Net "up-convolution" and bilinear interpolation.

`UpConvolution` computes exactly what `flax.linen.ConvTranspose(features, (2, 2),
strides=(2, 2), padding="VALID")` computes, from the same parameters, but as one matmul
followed by depth-to-space. With stride equal to the kernel size the output windows do not
overlap, so each input pixel writes its own 2x2 output block; XLA:CPU lowers the transposed
convolution's backward pass to dilated convolutions that took 40-60 ms per layer at
batch 32 on 2 cores, where the matmul form takes a few (experiments/bench_train.py).
"""

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax
from flax.linen import dtypes


class UpConvolution(nn.Module):
  """2x2 stride-2 transposed convolution (Ronneberger et al. 2015, Fig. 1 "up-conv 2x2").

  Parameters, as `nn.ConvTranspose`: `kernel` (2, 2, C_in, features) HWIO and `bias`
  (features,). Output pixel (2i + a, 2j + b) is x[i, j] @ kernel[1 - a, 1 - b] + bias: Flax's
  transposed convolution (transpose_kernel=False) reads the kernel flipped, so a PyTorch
  ConvTranspose2d weight W (C_in, C_out, 2, 2) maps to kernel = W.transpose(2, 3, 0, 1)[::-1, ::-1].

  Attributes:
    features: output channels (the paper halves the channel count).
    dtype: compute dtype; param_dtype: parameter dtype.
    kernel_init: the kernel's initializer; default normal(sqrt(2 / C_in)) (He et al. for
      one input pixel per output pixel). Mask R-CNN's conv5_mask passes torchvision's
      kaiming_normal_(fan_out), i.e. variance_scaling(2.0, "fan_out", "normal").
  """
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = None

  @nn.compact
  def __call__(self, x):
    """x: (B, H, W, C_in) -> (B, 2H, 2W, features) in `dtype`."""
    batch, height, width, channels = x.shape
    # Each output pixel sees C_in inputs (one input pixel), hence std sqrt(2 / C_in).
    kernel_init = self.kernel_init or nn.initializers.normal(math.sqrt(2.0 / channels))
    kernel = self.param("kernel", kernel_init, (2, 2, channels, self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    x, kernel, bias = dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    # (C_in, a, b, C_out) with the kernel flipped, as a (C_in, 4 C_out) matrix.
    matrix = jnp.transpose(kernel[::-1, ::-1], (2, 0, 1, 3)).reshape(channels, 4 * self.features)
    y = (x.reshape(-1, channels) @ matrix).reshape(batch, height, width, 2, 2, self.features)
    y = jnp.transpose(y, (0, 1, 3, 2, 4, 5)).reshape(batch, 2 * height, 2 * width, self.features)
    return y + bias


def upsample_bilinear_2x(x):
  """Bilinear upsampling by 2 with half-pixel centres and clamped edges.

  Equals `jax.image.resize(x, (B, 2H, 2W, C), "bilinear")` and PyTorch's
  `F.interpolate(scale_factor=2, mode="bilinear", align_corners=False)`, written as two
  separable 0.75/0.25 stencils so XLA fuses it into elementwise work (resize builds dense
  (H, 2H) interpolation matrices).

  Args:
    x: (B, H, W, C) float.

  Returns:
    (B, 2H, 2W, C), same dtype.
  """
  return _upsample_axis_2x(_upsample_axis_2x(x, 1), 2)


def _upsample_axis_2x(x, axis):
  n = x.shape[axis]
  edge_first = lax.slice_in_dim(x, 0, 1, axis=axis)
  edge_last = lax.slice_in_dim(x, n - 1, n, axis=axis)
  previous = jnp.concatenate([edge_first, lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis)
  following = jnp.concatenate([lax.slice_in_dim(x, 1, n, axis=axis), edge_last], axis)
  even = 0.75 * x + 0.25 * previous  # output 2i sits at input coordinate i - 1/4
  odd = 0.75 * x + 0.25 * following  # output 2i + 1 at i + 1/4
  y = jnp.stack([even, odd], axis=axis + 1)
  return y.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1:])
