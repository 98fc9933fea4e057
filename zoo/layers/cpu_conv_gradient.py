"""Stride-1 "same" convolutions with a gradient that XLA:CPU computes quickly.

Inside a conditional (`nn.cond` / `lax.cond`, where Mask R-CNN's mask head runs: see
`zoo.layers.chunk_skip`), XLA:CPU lowers a convolution's gradients to a naive loop, about 80x
slower than outside one (measured when the mask head's chunk skipping came in, commit 550f2b6;
BENCHMARKS.md "Faster / Mask R-CNN": with both, the Mask R-CNN quick training step,
`python -m experiments.bench_detection --quick --models=mask_rcnn_r50_fpn` on a 2-core CPU,
takes 2767 ms per image, torchvision 2728-5265 ms in the same runs). `same_convolution` has
the same forward pass and a hand-written gradient: for the input, the same convolution of the
cotangent with the kernel flipped and transposed; for the kernel, one matmul per tap of the
shifted input against the cotangent. `cpu_gradient_conv_general_dilated` plugs it into
`nn.Conv(conv_general_dilated=...)` on the CPU only (`jax.lax.platform_dependent`): GPUs and
TPUs keep XLA's own gradient.

    conv = nn.Conv(256, (3, 3), padding=1, conv_general_dilated=cpu_gradient_conv_general_dilated)
"""

import jax
import jax.numpy as jnp


def same_convolution_reference(x, kernel):
  """Stride-1 "same" convolution: x (B, H, W, C_in) NHWC, kernel (kh, kw, C_in, C_out) HWIO with
  odd kh, kw -> (B, H, W, C_out); XLA's convolution, and so XLA's gradient."""
  kh, kw = kernel.shape[:2]
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def same_convolution(x, kernel):
  """`same_convolution_reference` with the hand-written gradient of the module doc."""
  return same_convolution_reference(x, kernel)


def _forward(x, kernel):
  return same_convolution_reference(x, kernel), (x, kernel)


def _backward(residuals, grad):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  # d/dx: the same convolution of the gradient with the kernel flipped and transposed.
  grad_x = same_convolution_reference(grad, jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2)))
  # d/dkernel[dy, dx]: the input shifted by (dy, dx) against the gradient, one matmul each.
  padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  h, w = x.shape[1:3]
  g = grad.reshape(-1, grad.shape[-1])
  grad_kernel = jnp.stack([
      jnp.stack([jnp.dot(padded[:, dy:dy + h, dx:dx + w].reshape(-1, x.shape[-1]).T, g)
                 for dx in range(kw)])
      for dy in range(kh)])
  return grad_x.astype(x.dtype), grad_kernel.astype(kernel.dtype)


same_convolution.defvjp(_forward, _backward)


def cpu_gradient_conv_general_dilated(inputs, kernel, strides, padding, *, lhs_dilation=None,
                                      rhs_dilation=None, dimension_numbers=None,
                                      feature_group_count=1, precision=None):
  """`nn.Conv`'s `conv_general_dilated` for stride-1 "same" convolutions with odd kernels:
  `same_convolution` on the CPU, XLA's convolution elsewhere (module doc).

  Raises:
    ValueError for any other convolution (strides, padding, dilation, groups).
  """
  kh, kw = kernel.shape[:2]
  same = [(kh // 2, kh // 2), (kw // 2, kw // 2)]
  if isinstance(padding, str):
    padding = same if padding == "SAME" else padding
  if (tuple(strides) != (1, 1) or [tuple(p) for p in padding] != same or kh % 2 == 0
      or kw % 2 == 0 or feature_group_count != 1 or any(d not in (None, 1, (1, 1))
                                                           for d in (lhs_dilation, rhs_dilation))):
    raise ValueError("cpu_gradient_conv_general_dilated takes stride-1 'same' convolutions with "
                     f"odd kernels; got kernel {kernel.shape}, strides {strides}, padding "
                     f"{padding}.")
  del dimension_numbers, precision   # flax's NHWC / HWIO and default precision, as nn.Conv
  return jax.lax.platform_dependent(inputs, kernel, cpu=same_convolution,
                                    default=same_convolution_reference)
