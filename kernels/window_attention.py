"""Shifted-window multi-head self-attention (Liu et al. 2021, Swin Transformer): XLA and Pallas.

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

The mask is computed from region ids of token positions, never stored as an (nW, N, N)
argument. The bias is gathered with two small one-hot (M, M, 2M - 1) factors, one per axis,
instead of a gather through the (N, N) index: its table gradient is then a matrix product,
deterministic on every backend (a gather's gradient is a scatter-add, which uses atomics on
GPU). `relative_position_index` gives the official index for checkpoints and tests.

Implementations:
- `xla`: the readable specification (roll, partition, einsums; JAX autodiff for gradients).
- `pallas_tpu` (Mosaic TPU): one program per (image, band of M rolled rows). The band's tokens
  are DMA'd straight from the unrolled (B, H, W, 3C) map into a (windows, N, 3C) VMEM buffer,
  one copy per (row, window) run of contiguous source columns (two where a window wraps around
  the map's edge): the cyclic shift and the partition live in the copies' source offsets, and
  nothing rolled or partitioned is ever written to HBM; the output returns the same way. Per
  window and head, the logits are computed on the MXU in float32, the expanded (heads, N, N)
  bias and the region mask (from the tokens' coordinates and the band/window index) added,
  softmax in float32. The backward kernel recomputes the probabilities and writes dqkv the same
  way; the bias gradient is accumulated per image over its bands in order (an "arbitrary" grid
  axis) and summed over images in XLA: deterministic, no atomics. The table gradient is the
  transpose of the one-hot expansion (a matrix product).
Under vmap the mapped axis is folded into the images (one kernel call).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import _common
from kernels import window_attention_mosaic_gpu as _mgpu

_IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_gpu")

MASK_VALUE = -100.0  # the official attention mask between tokens of different regions


def relative_position_index(window_size: int) -> np.ndarray:
  """(N, N) int64 index into the ((2M-1)^2, heads) bias table, N = M * M, as the official code.

  Entry [n, m] is (dy + M - 1) * (2M - 1) + (dx + M - 1) with (dy, dx) the window coordinates
  of token n minus those of token m (tokens row-major in the window).
  """
  m = window_size
  coords = np.stack(np.meshgrid(np.arange(m), np.arange(m), indexing="ij")).reshape(2, -1)
  relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (m - 1)
  return relative[:, :, 0] * (2 * m - 1) + relative[:, :, 1]


def _relative_position_bias(table, window_size):
  """(heads, N, N) float32 bias: table[relative_position_index[n, m], h], via one-hot factors."""
  m = window_size
  offsets = np.arange(m)[:, None] - np.arange(m)[None, :] + (m - 1)        # (M, M) in [0, 2M-2]
  one_hot = jnp.asarray(offsets[:, :, None] == np.arange(2 * m - 1), jnp.float32)  # (M, M, 2M-1)
  table = table.astype(jnp.float32).reshape(2 * m - 1, 2 * m - 1, -1)      # (dy, dx, heads)
  # bias[h, (i, j), (k, l)] = table[i - k + M - 1, j - l + M - 1, h]; HIGHEST keeps the table
  # values exact (no bfloat16 / TF32 rounding of the one-hot products).
  bias = jnp.einsum("ika,jlb,abh->hijkl", one_hot, one_hot, table,
                    precision=lax.Precision.HIGHEST)
  return bias.reshape(-1, m * m, m * m)


def _region_mask(height, width, window_size, shift):
  """(H/M, W/M, N, N) float32: MASK_VALUE between tokens of different regions of the rolled map."""
  m = window_size

  def region(size):  # 0, 1, 2 along one axis of the rolled map
    position = jnp.arange(size)
    return (position >= size - m).astype(jnp.int32) + (position >= size - shift).astype(jnp.int32)

  ids = region(height)[:, None] * 3 + region(width)[None, :]                     # (H, W)
  ids = ids.reshape(height // m, m, width // m, m).transpose(0, 2, 1, 3)
  ids = ids.reshape(height // m, width // m, m * m)
  return jnp.where(ids[..., :, None] != ids[..., None, :], MASK_VALUE, 0.0).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("num_heads", "window_size", "shift"))
def _xla_window_attention(qkv, table, *, num_heads, window_size, shift):
  b, h, w, c3 = qkv.shape
  m, c = window_size, c3 // 3
  head_dim = c // num_heads
  dtype = qkv.dtype
  if shift:
    qkv = jnp.roll(qkv, (-shift, -shift), axis=(1, 2))
  # (B, H, W, 3C) -> (3, B, H/M, W/M, heads, N, head_dim)
  windows = qkv.reshape(b, h // m, m, w // m, m, 3, num_heads, head_dim)
  windows = windows.transpose(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, b, h // m, w // m, num_heads,
                                                                 m * m, head_dim)
  q, k, v = windows[0], windows[1], windows[2]
  q = q * jnp.asarray(head_dim ** -0.5, dtype)
  logits = jnp.einsum("bxyhnd,bxyhmd->bxyhnm", q, k, preferred_element_type=jnp.float32)
  logits = logits + _relative_position_bias(table, m)
  if shift:
    logits = logits + _region_mask(h, w, m, shift)[None, :, :, None]
  probabilities = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bxyhnm,bxyhmd->bxynhd", probabilities.astype(dtype), v,
                   preferred_element_type=jnp.float32).astype(dtype)
  # (B, H/M, W/M, M, M, heads, head_dim) -> (B, H, W, C), heads concatenated
  out = out.reshape(b, h // m, w // m, m, m, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
  if shift:
    out = jnp.roll(out, (shift, shift), axis=(1, 2))
  return out


# ---------------------------------------------------------------------------------------------
# Pallas: one program per (image, band of M rolled rows). The band's tokens are copied straight
# from the unrolled map into a (windows, N, 3C) buffer, one copy per (row, window) segment of
# contiguous source columns (two where a window wraps around the map's edge): the cyclic shift
# and the window partition are the copies' source offsets, nothing is rolled or partitioned in
# HBM. The output goes back the same way. Per window and head: logits in float32 on the matrix
# unit, the expanded bias and the region mask (from token coordinates) added, softmax, times v.


class _Geometry(NamedTuple):
  height: int
  width: int
  window: int       # M
  shift: int
  num_heads: int
  head_dim: int

  @property
  def tokens(self):  # N, tokens per window
    return self.window * self.window

  @property
  def windows_per_band(self):
    return self.width // self.window

  @property
  def bands(self):
    return self.height // self.window


def _column_segments(g: _Geometry):
  """Static (window j, offset in the window row, source column, length) copies of one row."""
  segments = []
  for j in range(g.windows_per_band):
    start = j * g.window + g.shift        # rolled column j*M is source column j*M + shift
    length = min(g.window, g.width - start)
    segments.append((j, 0, start, length))
    if length < g.window:                 # the last window wraps to the map's first columns
      segments.append((j, length, 0, g.window - length))
  return segments


def _band_copies(hbm, buffer, image, band, g: _Geometry, sem, *, to_hbm: bool):
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


def _region_mask_in_kernel(rc_q, rc_k, band, window_index, g: _Geometry):
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


def _head_probabilities(buffer, bias, mask, j, h, g: _Geometry):
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


def _tpu_forward_kernel(rc_q, rc_k, bias, qkv, out, buffer, out_buffer, sem, *, g: _Geometry):
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


def _tpu_backward_kernel(rc_q, rc_k, bias, qkv, grad_out, grad_qkv, grad_bias, buffer, g_buffer,
                         grad_buffer, sem, *, g: _Geometry):
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


def _tpu_call(kernel, bias, hbm_inputs, out_shape, out_specs, scratch, g: _Geometry, semantics,
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


def _tpu_forward(qkv, bias, g: _Geometry, interpret: bool):
  b, h, w, c3 = qkv.shape
  c = c3 // 3
  return _tpu_call(
      _tpu_forward_kernel, bias, [qkv],
      out_shape=jax.ShapeDtypeStruct((b, h, w, c), qkv.dtype),
      out_specs=pl.BlockSpec(memory_space=pl.ANY),
      scratch=[pltpu.VMEM((g.windows_per_band, g.tokens, c3), qkv.dtype),
               pltpu.VMEM((g.windows_per_band, g.tokens, c), qkv.dtype)],
      g=g, semantics=("parallel", "parallel"), interpret=interpret)


def _tpu_backward(qkv, bias, grad_out, g: _Geometry, interpret: bool):
  """(dL/dqkv (B, H, W, 3C), dL/dbias per image (B, heads, N, N) float32)."""
  b, h, w, c3 = qkv.shape
  n = g.tokens
  grad_qkv, grad_bias = _tpu_call(
      _tpu_backward_kernel, bias, [qkv, grad_out.astype(qkv.dtype)],
      out_shape=(jax.ShapeDtypeStruct(qkv.shape, qkv.dtype),
                 jax.ShapeDtypeStruct((b, g.num_heads, n, n), jnp.float32)),
      out_specs=(pl.BlockSpec(memory_space=pl.ANY),
                 pl.BlockSpec((None, g.num_heads, n, n), lambda i, j: (i, 0, 0, 0))),
      scratch=[pltpu.VMEM((g.windows_per_band, n, c3), qkv.dtype),
               pltpu.VMEM((g.windows_per_band, n, c3 // 3), qkv.dtype),
               pltpu.VMEM((g.windows_per_band, n, c3), qkv.dtype)],
      g=g, semantics=("parallel", "arbitrary"), interpret=interpret)
  return grad_qkv, grad_bias


def _gpu_layout(qkv, bias, g: _Geometry):
  """The GPU kernel's shape, its (heads, 64, 64) bias in slot space and each token's slot."""
  slots = _mgpu.slots(g.window, g.head_dim, qkv.dtype)
  shape = _mgpu._Shape(g.height, g.width, g.window, g.shift, g.num_heads, g.head_dim, slots)
  token_slots = jnp.asarray(slots.token_slots(g.window))
  size = _mgpu._SLOTS
  bias_slots = jnp.full((g.num_heads, size, size), -jnp.inf, jnp.float32)  # keys no token uses
  bias_slots = bias_slots.at[:, :, token_slots].set(0.0)
  bias_slots = bias_slots.at[:, token_slots[:, None], token_slots[None, :]].set(bias)
  return shape, bias_slots, token_slots


def _gpu_forward(qkv, bias, g: _Geometry, interpret: bool):
  shape, bias_slots, _ = _gpu_layout(qkv, bias, g)
  return _mgpu.forward(qkv, bias_slots, shape, interpret)


def _gpu_backward(qkv, bias, grad_out, g: _Geometry, interpret: bool):
  shape, bias_slots, token_slots = _gpu_layout(qkv, bias, g)
  grad_qkv, grad_bias = _mgpu.backward(qkv, bias_slots, grad_out, shape, interpret)
  return grad_qkv, grad_bias[:, :, token_slots[:, None], token_slots[None, :]]


_PALLAS = {"pallas_tpu": (_tpu_forward, _tpu_backward),
           "pallas_gpu": (_gpu_forward, _gpu_backward)}


class _Static(NamedTuple):
  geometry: _Geometry
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
    forward, _ = _PALLAS[static.implementation]
    return forward(qkv, bias, static.geometry, static.interpret)

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
    _, backward = _PALLAS[static.implementation]
    return backward(qkv, bias, grad_out, static.geometry, static.interpret)

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
    implementation: "auto", "xla" or "pallas_tpu" (interpret mode without a TPU).

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
  implementation = _common.resolve_implementation(implementation, "window_attention",
                                                  _IMPLEMENTATIONS)
  head_dim = qkv.shape[-1] // 3 // num_heads
  if implementation == "pallas_gpu":
    reason = _mgpu.check_supported(int(window_size), int(shift), head_dim, qkv.dtype)
    implementation = _common.unless_unsupported(requested, implementation, reason,
                                                "window_attention")
  if implementation == "xla":
    return _xla_window_attention(qkv, relative_position_bias_table, num_heads=int(num_heads),
                                 window_size=int(window_size), shift=int(shift))
  b, h, w, c3 = qkv.shape
  geometry = _Geometry(h, w, int(window_size), int(shift), int(num_heads), head_dim)
  bias = _relative_position_bias(relative_position_bias_table, int(window_size))
  static = _Static(geometry, implementation, _common.interpret(implementation))
  return _pallas_window_attention(static, qkv, bias)
