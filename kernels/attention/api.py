"""Shifted-window multi-head self-attention (Liu et al. 2021, Swin Transformer): the API.

The semantics are microsoft/Swin-Transformer's `SwinTransformerBlock` + `WindowAttention`
(models/swin_transformer.py) from the output of the `qkv` Linear to the input of the `proj`
Linear, mapped back to token positions. For a (B, H, W, 3C) map of projected tokens and a
window of M x M tokens (N = M * M):

  1. shift > 0: roll the map by (-shift, -shift) over (H, W) (the cyclic shift);
  2. partition it into nW = (H / M) * (W / M) windows of N tokens (row-major in the window);
  3. per window and head h (channels [q | k | v], each C = heads * head_dim, heads
     contiguous): logits = (q * head_dim**-0.5) @ k^T + bias_h + mask, with
     bias_h[n, m] = table[relative_position_index[n, m], h] and
     relative_position_index[n, m] = (dy + M - 1) * (2M - 1) + (dx + M - 1), (dy, dx) = token n's
     window coordinates minus token m's; mask[n, m] = -100 when n and m lie in different
     regions of the rolled map (region ids from slicing each axis into [0, size - M),
     [size - M, size - shift), [size - shift, size)), 0 otherwise (no mask when shift = 0);
  4. softmax over m in float32, times v, heads concatenated;
  5. windows merged back (window_reverse) and the map rolled by (+shift, +shift).

Implementations, each a module imported only when chosen (the bias and mask arithmetic they
share is `kernels.attention.geometry`):
- `xla`: the readable specification (roll, partition, einsums; JAX autodiff for gradients).
- `pallas_tpu` (Mosaic TPU) and `pallas_mosaic_gpu` (Hopper and newer): nothing rolled or
  partitioned is written to HBM; the copies into the kernel's window buffers read the unrolled
  map at the shifted offsets. Backward kernels recompute the probabilities; the bias gradient is
  summed per image in a fixed order (no atomics). The bias is expanded once per call to
  (heads, N, N) here and its table gradient is the transpose of that one-hot expansion.
Under vmap the mapped axis is folded into the images (one kernel call).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels import common
from kernels.attention.geometry import WindowGeometry, relative_position_bias

def _backend(implementation: str):
  return common.backend("kernels.attention", implementation)


class _Static(NamedTuple):
  geometry: WindowGeometry
  implementation: str
  interpret: bool


def _broadcast(x, batched, axis_size):
  return x if batched else jnp.broadcast_to(x, (axis_size,) + x.shape)


def _fold(x):
  return x.reshape((-1,) + x.shape[2:])


def _forward(static: _Static, qkv, bias):
  """(B, H, W, C). Under vmap the mapped axis is folded into the images: still one call."""
  @jax.custom_batching.custom_vmap
  def run(qkv, bias):
    return _backend(static.implementation).forward(qkv, bias, static.geometry, static.interpret)

  @run.def_vmap
  def _(axis_size, in_batched, qkv, bias):
    qkv_batched, bias_batched = in_batched
    qkv = _broadcast(qkv, qkv_batched, axis_size)
    if bias_batched:   # a bias table per mapped element: one call each
      return lax.map(lambda args: _forward(static, *args), (qkv, bias)), True
    out = _forward(static, _fold(qkv), bias)
    return out.reshape((axis_size, -1) + out.shape[1:]), True

  return run(qkv, bias)


def _backward(static: _Static, qkv, bias, grad_out):
  """(dL/dqkv (B, H, W, 3C), dL/dbias per image (B, heads, N, N) float32)."""
  @jax.custom_batching.custom_vmap
  def run(qkv, bias, grad_out):
    return _backend(static.implementation).backward(qkv, bias, grad_out, static.geometry,
                                                    static.interpret)

  @run.def_vmap
  def _(axis_size, in_batched, qkv, bias, grad_out):
    qkv_batched, bias_batched, grad_batched = in_batched
    qkv = _broadcast(qkv, qkv_batched, axis_size)
    grad_out = _broadcast(grad_out, grad_batched, axis_size)
    if bias_batched:
      return lax.map(lambda args: _backward(static, *args), (qkv, bias, grad_out)), (True, True)
    grad_qkv, grad_bias = _backward(static, _fold(qkv), bias, _fold(grad_out))
    unfold = lambda x: x.reshape((axis_size, -1) + x.shape[1:])
    return (unfold(grad_qkv), unfold(grad_bias)), (True, True)

  return run(qkv, bias, grad_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pallas_window_attention(static: _Static, qkv, bias):
  return _forward(static, qkv, bias)


def _pallas_forward(static, qkv, bias):
  return _forward(static, qkv, bias), (qkv, bias)


def _pallas_backward(static, residuals, grad_out):
  grad_qkv, grad_bias = _backward(static, *residuals, grad_out)
  return grad_qkv, grad_bias.sum(axis=0)   # images in order: deterministic


_pallas_window_attention.defvjp(_pallas_forward, _pallas_backward)


def _check_arguments(qkv, table, num_heads, window_size, shift):
  op = "window_attention"
  for name, value in (("num_heads", num_heads), ("window_size", window_size)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"{op}: {name} must be a positive int, got {value!r}.")
  if not isinstance(shift, (int, np.integer)) or isinstance(shift, bool) or not 0 <= shift < window_size:
    raise ValueError(f"{op}: shift must be an int in [0, window_size) = [0, {window_size}), usually "
                     f"window_size // 2 for shifted windows and 0 for regular ones, got {shift!r}.")
  if jnp.ndim(qkv) != 4:
    raise ValueError(f"{op}: qkv must have rank 4, (B, H, W, 3 * C) channels-last, got shape "
                     f"{jnp.shape(qkv)}.")
  if not jnp.issubdtype(jnp.result_type(qkv), jnp.floating):
    raise ValueError(f"{op}: qkv must be floating point, got {jnp.result_type(qkv)}.")
  _, height, width, channels = jnp.shape(qkv)
  if channels == 0 or channels % (3 * num_heads):
    raise ValueError(f"{op}: qkv's last dimension ({channels}) must be 3 * num_heads * head_dim "
                     f"([q | k | v], heads contiguous) with num_heads={num_heads}.")
  if height % window_size or width % window_size:
    raise ValueError(f"{op}: the token map ({height} x {width}) must be a multiple of the window "
                     f"({window_size} x {window_size}); pad it (or clip the window to the "
                     "resolution, as Swin does) before calling.")
  expected = ((2 * window_size - 1) ** 2, num_heads)
  if tuple(jnp.shape(table)) != expected:
    raise ValueError(f"{op}: relative_position_bias_table must have shape ((2M-1)^2, num_heads) = "
                     f"{expected} for window_size={window_size}, got {tuple(jnp.shape(table))}.")
  if not jnp.issubdtype(jnp.result_type(table), jnp.floating):
    raise ValueError(f"{op}: relative_position_bias_table must be floating point, got "
                     f"{jnp.result_type(table)}.")


def window_attention(qkv: jax.Array, relative_position_bias_table: jax.Array, *, num_heads: int,
                     window_size: int, shift: int, implementation: str = "auto") -> jax.Array:
  """Swin's (shifted-)window multi-head self-attention, before the output projection.

  Args:
    qkv: (B, H, W, 3 * C) float32 or bfloat16, the token map after Swin's `qkv` Linear; channels
      [q | k | v], each C = num_heads * head_dim with heads contiguous (the official
      reshape(B_, N, 3, num_heads, head_dim)). H and W must be multiples of window_size.
    relative_position_bias_table: ((2M - 1)^2, num_heads) float, M = window_size, the official
      checkpoint's `relative_position_bias_table` (row (dy + M - 1) * (2M - 1) + dx + M - 1).
    num_heads: attention heads.
    window_size: M, the window side in tokens.
    shift: cyclic shift in tokens, 0 <= shift < M (0: regular windows; Swin uses M // 2).
    implementation: "auto", "xla", "pallas_tpu" (Mosaic TPU) or "pallas_gpu" (Mosaic GPU,
      Hopper and newer: head_dim a multiple of 16 and windows up to 8 x 8, see
      pallas_mosaic_gpu.check_supported; "auto" runs xla elsewhere); a Pallas one runs in
      interpret mode without its accelerator.

  Returns:
    (B, H, W, C) in qkv's dtype: softmax(q * head_dim**-0.5 @ k^T + bias + mask) @ v per window
    and head, heads concatenated, at the tokens' own positions (shift undone). Logits and
    softmax are float32. Differentiable with respect to qkv and the table (JAX autodiff for xla,
    a backward kernel for Pallas; deterministic in both).
  """
  qkv = jnp.asarray(qkv)
  relative_position_bias_table = jnp.asarray(relative_position_bias_table)
  _check_arguments(qkv, relative_position_bias_table, num_heads, window_size, shift)
  requested = implementation
  implementation = common.resolve_implementation(implementation, "window_attention")
  head_dim = qkv.shape[-1] // 3 // num_heads
  if implementation == "pallas_gpu":
    reason = _backend("pallas_gpu").check_supported(int(window_size), int(shift), head_dim, qkv.dtype)
    implementation = common.unless_unsupported(requested, implementation, reason,
                                               "window_attention")
  if implementation == "xla":
    return _backend("xla").window_attention(qkv, relative_position_bias_table,
                                            num_heads=int(num_heads), window_size=int(window_size),
                                            shift=int(shift))
  b, h, w, c3 = qkv.shape
  geometry = WindowGeometry(h, w, int(window_size), int(shift), int(num_heads), head_dim)
  bias = relative_position_bias(relative_position_bias_table, int(window_size))
  static = _Static(geometry, implementation, common.interpret(implementation))
  return _pallas_window_attention(static, qkv, bias)
