"""Convolution, optional normalisation, activation: the unit that VGG-style stacks repeat.

`ConvNormAct` keeps `flax.linen.Conv`'s parameters (`conv/kernel` (kh, kw, C_in, C_out) HWIO,
`conv/bias` (C_out,)) so public checkpoints map onto it by transposing OIHW to HWIO only.
On XLA:CPU the convolution itself is already the fastest formulation we measured
(YNNPACK convolution; im2col or nine shifted matmuls were 3-5x slower, forward and
weight-gradient alike: see experiments/bench_train.py), so it stays `lax.conv`.
"""

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

NORMS = ("none", "batch")


def he_normal():
  """Ronneberger et al. 2015, Sec. 3: Gaussian weights with std sqrt(2 / N), N = fan-in."""
  return nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class ConvNormAct(nn.Module):
  """k x k convolution (stride 1), optional batch norm, then an activation.

  Attributes:
    features: output channels C_out.
    kernel_size: (kh, kw).
    padding: "SAME" (output H x W) or "VALID" (output (H - kh + 1) x (W - kw + 1)).
    norm: "none" (the convolution has a bias) or "batch" (no bias; BatchNorm with
      PyTorch's defaults: momentum 0.1 there = 0.9 here, epsilon 1e-5).
    activation: elementwise function applied last (ReLU by default).
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  padding: str = "SAME"
  norm: str = "none"
  activation: Callable[[Any], Any] = nn.relu
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    """x: (B, H, W, C_in) -> (B, H', W', features) in `dtype`."""
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}.")
    x = nn.Conv(self.features, self.kernel_size, padding=self.padding,
                use_bias=self.norm == "none", kernel_init=he_normal(), dtype=self.dtype,
                param_dtype=self.param_dtype, name="conv")(x)
    if self.norm == "batch":
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
    return self.activation(x)
