"""Window attention in Pallas (Mosaic TPU).

One program per (image, band of M rolled rows). The band's tokens are DMA'd straight from the
unrolled (B, H, W, 3C) map into a (windows, N, 3C) VMEM buffer, one copy per (row, window) run
of contiguous source columns (two where a window wraps around the map's edge): the cyclic shift
and the partition live in the copies' source offsets, and nothing rolled or partitioned is ever
written to HBM; the output returns the same way. Per window and head, the logits are computed on
the MXU in float32, the expanded (heads, N, N) bias and the region mask (from the tokens'
coordinates and the band/window index) added, softmax in float32. The backward kernel
recomputes the probabilities and writes dqkv the same way; the bias gradient is accumulated per
image over its bands in order (an "arbitrary" grid axis) and summed over images by the caller:
deterministic, no atomics.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.attention.geometry import MASK_VALUE, WindowGeometry


def _column_segments(g: WindowGeometry):
  """Static (window j, offset in the window row, source column, length) copies of one row."""
  segments = []
  for j in range(g.windows_per_band):
    start = j * g.window + g.shift        # rolled column j*M is source column j*M + shift
    length = min(g.window, g.width - start)
    segments.append((j, 0, start, length))
    if length < g.window:                 # the last window wraps to the map's first columns
      segments.append((j, length, 0, g.window - length))
  return segments


def _band_copies(hbm, buffer, image, band, g: WindowGeometry, sem, *, to_hbm: bool):
  """DMA descriptors between the band's tokens in hbm (B, H, W, D) and buffer (windows, N, D)."""
  copies = []
  for r in range(g.window):
    row = lax.rem(band * g.window + r + g.shift, g.height)
    for j, offset, column, length in _column_segments(g):
      source = hbm.at[image, row, pl.ds(column, length)]
      slot = buffer.at[j, pl.ds(r * g.window + offset, length)]
      copies.append(pltpu.make_async_copy(slot, source, sem) if to_hbm else
                    pltpu.make_async_copy(source, slot, sem))
  return copies


def _copy_all(copies):
  for copy in copies:
    copy.start()
  for copy in copies:
    copy.wait()


def _token_coordinates(window: int):
  """(N, 2) and (2, N) int32: each window token's (row, column) inside the window."""
  n = np.arange(window * window)
  rc = np.stack([n // window, n % window]).astype(np.int32)
  return jnp.asarray(rc.T), jnp.asarray(rc)


def _region_mask_in_kernel(rc_q, rc_k, band, window_index, g: WindowGeometry):
  """(N, N) float32 MASK_VALUE between tokens of different regions, from region ids."""
  def region(position, size):
    return ((position >= size - g.window).astype(jnp.int32) +
            (position >= size - g.shift).astype(jnp.int32))

  def ids(rows, cols):
    return (region(band * g.window + rows, g.height) * 3 +
            region(window_index * g.window + cols, g.width))

  query = ids(rc_q[:, 0:1], rc_q[:, 1:2])    # (N, 1)
  key = ids(rc_k[0:1, :], rc_k[1:2, :])      # (1, N)
  return jnp.where(query != key, MASK_VALUE, 0.0).astype(jnp.float32)


def _mm(a, b, contract):
  """a @ b (contract=((1,), (0,))) or a @ b^T (((1,), (1,))) etc., float32 accumulation."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


_NT = ((1,), (1,))   # a @ b^T
_NN = ((1,), (0,))   # a @ b
_TN = ((0,), (0,))   # a^T @ b


def _head_probabilities(buffer, bias, mask, j, h, g: WindowGeometry):
  """q (scaled, in qkv's dtype), k, v (N, head_dim) and softmax probabilities (N, N) float32."""
  c, d = g.num_heads * g.head_dim, g.head_dim
  q = buffer[j, :, pl.ds(h * d, d)]
  q = q * jnp.asarray(d ** -0.5, q.dtype)
  k = buffer[j, :, pl.ds(c + h * d, d)]
  v = buffer[j, :, pl.ds(2 * c + h * d, d)]
  logits = _mm(q, k, _NT) + bias[h]
  if mask is not None:
    logits = logits + mask
  logits = logits - jnp.max(logits, axis=1, keepdims=True)
  e = jnp.exp(logits)
  return q, k, v, e / jnp.sum(e, axis=1, keepdims=True)


def _forward_kernel(rc_q, rc_k, bias, qkv, out, buffer, out_buffer, sem, *, g: WindowGeometry):
  image, band = pl.program_id(0), pl.program_id(1)
  _copy_all(_band_copies(qkv, buffer, image, band, g, sem, to_hbm=False))

  @pl.loop(0, g.windows_per_band)
  def _(j):
    mask = _region_mask_in_kernel(rc_q[...], rc_k[...], band, j, g) if g.shift else None
    for h in range(g.num_heads):
      _, _, v, p = _head_probabilities(buffer, bias, mask, j, h, g)
      o = _mm(p.astype(v.dtype), v, _NN)
      out_buffer[j, :, pl.ds(h * g.head_dim, g.head_dim)] = o.astype(out_buffer.dtype)

  _copy_all(_band_copies(out, out_buffer, image, band, g, sem, to_hbm=True))


def _backward_kernel(rc_q, rc_k, bias, qkv, grad_out, grad_qkv, grad_bias, buffer, g_buffer,
                     grad_buffer, sem, *, g: WindowGeometry):
  image, band = pl.program_id(0), pl.program_id(1)
  _copy_all(_band_copies(qkv, buffer, image, band, g, sem, to_hbm=False) +
            _band_copies(grad_out, g_buffer, image, band, g, sem, to_hbm=False))

  @pl.when(band == 0)
  def _():
    grad_bias[...] = jnp.zeros_like(grad_bias)

  c, d = g.num_heads * g.head_dim, g.head_dim

  @pl.loop(0, g.windows_per_band)
  def _(j):
    mask = _region_mask_in_kernel(rc_q[...], rc_k[...], band, j, g) if g.shift else None
    for h in range(g.num_heads):
      q, k, v, p = _head_probabilities(buffer, bias, mask, j, h, g)
      do = g_buffer[j, :, pl.ds(h * d, d)]
      dv = _mm(p.astype(do.dtype), do, _TN)                     # p^T @ do
      dp = _mm(do, v, _NT)                                       # do @ v^T
      ds = p * (dp - jnp.sum(dp * p, axis=1, keepdims=True))     # softmax backward, float32
      grad_bias[h] += ds                                         # bands in order: deterministic
      dq = _mm(ds.astype(k.dtype), k, _NN) * d ** -0.5
      dk = _mm(ds.astype(q.dtype), q, _TN)
      dtype = grad_buffer.dtype
      grad_buffer[j, :, pl.ds(h * d, d)] = dq.astype(dtype)
      grad_buffer[j, :, pl.ds(c + h * d, d)] = dk.astype(dtype)
      grad_buffer[j, :, pl.ds(2 * c + h * d, d)] = dv.astype(dtype)

  _copy_all(_band_copies(grad_qkv, grad_buffer, image, band, g, sem, to_hbm=True))


def _call(kernel, bias, hbm_inputs, out_shape, out_specs, scratch, g: WindowGeometry, semantics,
          interpret):
  rc_q, rc_k = _token_coordinates(g.window)
  full = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)
  return pl.pallas_call(
      functools.partial(kernel, g=g),
      out_shape=out_shape,
      grid=(hbm_inputs[0].shape[0], g.bands),
      in_specs=[full(rc_q), full(rc_k), full(bias)] + [pl.BlockSpec(memory_space=pl.ANY)] * len(hbm_inputs),
      out_specs=out_specs,
      scratch_shapes=scratch + [pltpu.SemaphoreType.DMA(())],
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
      interpret=pltpu.InterpretParams() if interpret else False,
  )(rc_q, rc_k, bias, *hbm_inputs)


def forward(qkv, bias, g: WindowGeometry, interpret: bool):
  """(B, H, W, C) attention output; bias (heads, N, N) float32 (relative position bias)."""
  b, h, w, c3 = qkv.shape
  c = c3 // 3
  return _call(
      _forward_kernel, bias, [qkv],
      out_shape=jax.ShapeDtypeStruct((b, h, w, c), qkv.dtype),
      out_specs=pl.BlockSpec(memory_space=pl.ANY),
      scratch=[pltpu.VMEM((g.windows_per_band, g.tokens, c3), qkv.dtype),
               pltpu.VMEM((g.windows_per_band, g.tokens, c), qkv.dtype)],
      g=g, semantics=("parallel", "parallel"), interpret=interpret)


def backward(qkv, bias, grad_out, g: WindowGeometry, interpret: bool):
  """(dL/dqkv (B, H, W, 3C), dL/dbias per image (B, heads, N, N) float32)."""
  b, h, w, c3 = qkv.shape
  n = g.tokens
  grad_qkv, grad_bias = _call(
      _backward_kernel, bias, [qkv, grad_out.astype(qkv.dtype)],
      out_shape=(jax.ShapeDtypeStruct(qkv.shape, qkv.dtype),
                 jax.ShapeDtypeStruct((b, g.num_heads, n, n), jnp.float32)),
      out_specs=(pl.BlockSpec(memory_space=pl.ANY),
                 pl.BlockSpec((None, g.num_heads, n, n), lambda i, j: (i, 0, 0, 0))),
      scratch=[pltpu.VMEM((g.windows_per_band, n, c3), qkv.dtype),
               pltpu.VMEM((g.windows_per_band, n, c3 // 3), qkv.dtype),
               pltpu.VMEM((g.windows_per_band, n, c3), qkv.dtype)],
      g=g, semantics=("parallel", "arbitrary"), interpret=interpret)
  return grad_qkv, grad_bias
