"""Convolution, optional normalisation, optional activation: the one conv-norm-act block.

`ConvNormAct` is the unit that U-Net, VGG, ResNet and DeepLab's ASPP repeat. Its parameters
are a `flax.linen.Conv`'s (`kernel` (kh, kw, C_in, C_out) HWIO, `bias` (C_out,) only without
a norm) and a `flax.linen.BatchNorm`'s (`scale`, `bias`; batch statistics `mean`, `var`), so
public checkpoints map onto it by transposing OIHW to HWIO only. Where they sit is chosen to
match each release's names:

    default           block/conv/{kernel,bias}, block/norm/{scale,bias}   (U-Net)
    norm_name="bn"    block/conv/kernel, block/bn/{scale,bias}            (DeepLab's ASPP)
    conv_name=None    block/{kernel,bias}, block/norm/...                 (Caffe's VGG layers)
    conv_norm_act(parent, ..., conv_name="conv1", norm_name="bn1")
                      parent/conv1/kernel, parent/bn1/...                 (torchvision's ResNet)

On XLA:CPU the convolution itself is already the fastest formulation we measured
(YNNPACK convolution; im2col or nine shifted matmuls were 3-5x slower, forward and
weight-gradient alike: see experiments/bench_train.py), so it stays `lax.conv`.
"""

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

# The norm kinds (glossary word `norm`): none; BatchNorm with batch statistics in training;
# BatchNorm that always uses its stored statistics (detectron2's FrozenBatchNorm2d role).
NORMS = ("none", "batch", "frozen")


def he_normal():
  """Ronneberger et al. 2015, Sec. 3: Gaussian weights with std sqrt(2 / N), N = fan-in."""
  return nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _pair(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


def conv_norm_act(module: nn.Module, x, *, train: bool, features: int,
                  kernel_size: int | tuple[int, int] = (3, 3), stride: int = 1, dilation: int = 1,
                  padding: str | int = "SAME", norm: str = "none",
                  activation: Callable[[Any], Any] | None = nn.relu,
                  kernel_init: Callable[..., Any] = he_normal(),
                  norm_scale_init: Callable[..., Any] = nn.initializers.ones,
                  conv_name: str | None = "conv", norm_name: str = "norm",
                  dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
  """The block's computation inside `module`'s compact method: a child nn.Conv `conv_name`
  (None: `kernel` and `bias` are `module`'s own parameters), a child nn.BatchNorm `norm_name`,
  then `activation`. `ConvNormAct` calls it on itself; torchvision's ResNet calls it on a
  Bottleneck, whose conv1 and bn1 sit side by side. Arguments as ConvNormAct's attributes.

  x: (B, H, W, C_in) -> (B, H', W', features) in `dtype`.
  """
  if norm not in NORMS:
    raise ValueError(f"ConvNormAct norm must be one of {NORMS}, got {norm!r}.")
  kernel_size, use_bias = _pair(kernel_size), norm == "none"
  if conv_name is None:  # nn.Conv's parameters and arithmetic, held by `module` itself
    kernel = module.param("kernel", kernel_init, (*kernel_size, x.shape[-1], features), param_dtype)
    if isinstance(padding, int):
      padding = ((padding, padding), (padding, padding))
    x = lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), (stride, stride), padding,
                                 rhs_dilation=(dilation, dilation),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if use_bias:
      x = x + module.param("bias", nn.initializers.zeros, (features,), param_dtype).astype(dtype)
  else:
    x = nn.Conv(features, kernel_size, strides=stride, padding=padding, kernel_dilation=dilation,
                use_bias=use_bias, kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype,
                name=conv_name)(x)
  if norm != "none":
    x = nn.BatchNorm(use_running_average=norm == "frozen" or not train, momentum=0.9,
                     epsilon=1e-5, scale_init=norm_scale_init, dtype=dtype,
                     param_dtype=param_dtype, name=norm_name)(x)
  return x if activation is None else activation(x)


class ConvNormAct(nn.Module):
  """k x k convolution, optional batch norm, optional activation (`conv_norm_act` on itself).

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

  @nn.compact
  def __call__(self, x, *, train: bool):
    """x: (B, H, W, C_in) -> (B, H', W', features) in `dtype`; `train` selects batch
    statistics (and their update, with `mutable=["batch_stats"]`) for norm="batch"."""
    return conv_norm_act(
        self, x, train=train, features=self.features, kernel_size=self.kernel_size,
        stride=self.stride, dilation=self.dilation, padding=self.padding, norm=self.norm,
        activation=self.activation, kernel_init=self.kernel_init,
        norm_scale_init=self.norm_scale_init, conv_name=self.conv_name,
        norm_name=self.norm_name, dtype=self.dtype, param_dtype=self.param_dtype)
