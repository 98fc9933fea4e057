"""Convolution, optional normalisation, optional activation: the one conv-norm-act block.

`ConvNormAct` is the unit that U-Net, VGG, ResNet and DeepLab's ASPP repeat. Its parameters
are a `flax.linen.Conv`'s (`kernel` (kh, kw, C_in, C_out) HWIO, `bias` (C_out,) only without
a norm) and a `flax.linen.BatchNorm`'s (`scale`, `bias`; batch statistics `mean`, `var`), so
public checkpoints map onto it by transposing OIHW to HWIO only. Where they sit is chosen to
match each release's names:

    default           block/conv/{kernel,bias}, block/norm/{scale,bias}   (U-Net)
    norm_name="bn"    block/conv/kernel, block/bn/{scale,bias}            (DeepLab's ASPP)
    conv_name=None    block/{kernel,bias}, block/norm/...                 (Caffe's VGG layers)
    conv_name="conv1", norm_name="bn1" and nn.share_scope(parent, block)
                      parent/conv1/kernel, parent/bn1/...                 (torchvision's ResNet)

On XLA:CPU the convolution itself is already the fastest formulation we measured
(YNNPACK convolution; im2col or nine shifted matmuls were 3-5x slower, forward and
weight-gradient alike: see experiments/bench_train.py), so it stays `lax.conv`.
"""

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

# The norm kinds (glossary word `norm`): none; BatchNorm with batch statistics in training;
# BatchNorm that always uses its stored statistics (detectron2's FrozenBatchNorm2d role).
NORMS = ("none", "batch", "frozen")


def he_normal():
  """Ronneberger et al. 2015, Sec. 3: Gaussian weights with std sqrt(2 / N), N = fan-in."""
  return nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _pair(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


class ConvNormAct(nn.Module):
  """k x k convolution, optional batch norm, optional activation.

  Attributes:
    features: output channels C_out.
    kernel_size: k or (kh, kw).
    stride: the convolution's stride (both axes).
    dilation: the kernel's dilation (both axes; atrous convolution).
    padding: "SAME" (output ceil(H / stride); symmetric for odd kernels at stride 1),
      "VALID" (none), or an int p: p pixels on every side (Caffe's and PyTorch's `pad`).
    norm: "none" (the convolution has a bias), "batch" (no bias; BatchNorm with PyTorch's
      defaults: momentum 0.1 there = 0.9 here, epsilon 1e-5; batch statistics in training)
      or "frozen" (the same BatchNorm using its stored statistics in training too).
    activation: elementwise function applied last (ReLU by default); None for none.
    kernel_init: the kernel's initialiser (He et al.'s fan-in normal by default).
    norm_scale_init: the norm's scale initialiser (ones; zeros for torchvision's
      zero_init_residual).
    conv_name: the convolution's name; None puts its kernel and bias in this block itself.
    norm_name: the norm's name.
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  features: int
  kernel_size: int | tuple[int, int] = (3, 3)
  stride: int = 1
  dilation: int = 1
  padding: str | int = "SAME"
  norm: str = "none"
  activation: Callable[[Any], Any] | None = nn.relu
  kernel_init: Callable[..., Any] = he_normal()
  norm_scale_init: Callable[..., Any] = nn.initializers.ones
  conv_name: str | None = "conv"
  norm_name: str = "norm"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.norm not in NORMS:
      raise ValueError(f"ConvNormAct norm must be one of {NORMS}, got {self.norm!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool):
    """x: (B, H, W, C_in) -> (B, H', W', features) in `dtype`; `train` selects batch
    statistics (and their update, with `mutable=["batch_stats"]`) for norm="batch"."""
    conv = nn.Conv(self.features, _pair(self.kernel_size), strides=self.stride,
                   padding=self.padding, kernel_dilation=self.dilation,
                   use_bias=self.norm == "none", kernel_init=self.kernel_init, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=self.conv_name)
    if self.conv_name is None:
      nn.share_scope(self, conv)
    x = conv(x)
    if self.norm != "none":
      x = nn.BatchNorm(use_running_average=self.norm == "frozen" or not train, momentum=0.9,
                       epsilon=1e-5, scale_init=self.norm_scale_init, dtype=self.dtype,
                       param_dtype=self.param_dtype, name=self.norm_name)(x)
    return x if self.activation is None else self.activation(x)
