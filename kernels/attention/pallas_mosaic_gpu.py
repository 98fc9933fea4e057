"""Swin's shifted-window attention for Hopper GPUs in Pallas Mosaic GPU (see `api`, `pallas_tpu`).

Forward: one program (a warpgroup) per (image, band of M rolled rows, head); it walks the
band's windows. A window's q, k and v columns of the head arrive by TMA straight from the
unrolled (B, H, W, 3C) map, one copy per (window row, run of contiguous source columns) (two
runs where the window wraps around the map's right edge): the cyclic shift and the window
partition are the copies' source offsets. The copies land in a (64, head_dim) slot buffer,
slot t = row * group + column; `group` >= M keeps every copy's shared-memory start 128-byte
aligned, as TMA needs. Slots no token uses are zero and get a -inf bias as keys. Logits and
P @ V run on the tensor cores (wgmma), softmax in float32 in registers, the expanded bias and
the region mask (from the slots' coordinates and the band/window index) added in registers.

Backward: one program per (image, head) walks all bands and windows in order, recomputes P,
and writes dq, dk, dv back through the same copies; the bias gradient is summed in registers
over the image's windows in that fixed order (no atomics: deterministic) and written once.

wgmma multiplies 16-bit inputs (float32 would run as TF32, ~1e-3 off), so float32 operands are
split into three bfloat16 parts (x = hi + mid + lo) and the six leading products accumulate in
float32 (`parts`, `mma` in kernels/mosaic_gpu_common.py).

Limits (`check_supported`): head_dim a multiple of 16 (wgmma's K), M * group <= 64 slots (one
wgmma row block: windows up to 8 x 8), and with a shift, M - shift a multiple of the TMA slot
alignment (128 bytes / (head_dim * itemsize), 1 for float32 head_dim 32). Elsewhere "auto"
runs xla and an explicit "pallas_gpu" says why not.

Mosaic GPU lessons: a TMA load must move a multiple of 128 bytes (runs are read rounded up into
spare slots; TMA zero-fills past the map's edge), wgmma wants the same swizzle on both operands,
loads of untiled SMEM into the wgmma layout need `optimized=False`, and the GPU interpreter
cannot read `transpose_ref` views (interpret mode stores transposed copies instead).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import mosaic_gpu_common as mgpu
from kernels.attention.geometry import MASK_VALUE, WindowGeometry

_SLOTS = 64          # one wgmma row block
_TMA_ALIGN_BYTES = 128


class Slots(NamedTuple):
  group: int         # slots per window row
  alignment: int     # slots per 128 bytes

  def token_slots(self, window):
    """(N,) slot of each window token, row-major (r, c) -> r * group + c."""
    n = np.arange(window * window)
    return (n // window) * self.group + n % window


def slots(window: int, head_dim: int, dtype) -> Slots:
  alignment = max(1, _TMA_ALIGN_BYTES // (head_dim * jnp.dtype(dtype).itemsize))
  return Slots(-(-window // alignment) * alignment, alignment)


def check_supported(window: int, shift: int, head_dim: int, dtype) -> str | None:
  """None if the GPU kernel takes this configuration, else why not."""
  s = slots(window, head_dim, dtype)
  if head_dim % 16:
    return f"head_dim ({head_dim}) must be a multiple of 16 (wgmma's K)"
  if window * s.group > _SLOTS:
    return f"a {window} x {window} window needs {window * s.group} slots; at most {_SLOTS} fit"
  if shift and (window - shift) % s.alignment:
    return (f"window - shift ({window - shift}) must be a multiple of {s.alignment} so that the "
            "wrapped part of the last window starts 128-byte aligned")
  return None


def _transforms(dtype, minor):
  """Shared-memory tiling and swizzle of a wgmma operand whose minor dimension is `minor`."""
  swizzle = min(128, minor * jnp.dtype(dtype).itemsize)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _load(ref, interpret):
  """A whole shared-memory ref into registers as float32 (wgmma layout on hardware)."""
  # Untiled buffers have no conflict-free wgmma-layout transfer; accept the bank conflicts.
  value = ref[...] if interpret else plgpu.load(ref, (), layout=plgpu.Layout.WGMMA, optimized=False)
  return value.astype(jnp.float32)


class _Shape(NamedTuple):
  height: int
  width: int
  window: int
  shift: int
  num_heads: int
  head_dim: int
  slots: Slots

  @property
  def channels(self):
    return self.num_heads * self.head_dim


def _runs(s: _Shape, j, wrapped: bool):
  """(slot, source column, length) of window j's runs in each window row (static lengths)."""
  m = s.window
  if not wrapped:
    return [(0, j * m + s.shift, m)]
  first = m - s.shift   # columns W - M + shift .. W - 1, then 0 .. shift - 1
  return [(0, s.width - first, first), (first, 0, s.shift)]


def _copies(s: _Shape, image, band, j, wrapped):
  """(copy index, source row, slot, source column, length) for every run of window j."""
  out = []
  for r in range(s.window):
    row = lax.rem(band * s.window + r + s.shift, s.height)
    for e, (slot, column, length) in enumerate(_runs(s, j, wrapped)):
      out.append((r * 2 + e, row, r * s.slots.group + slot, column, length))
  return out


def _load_window(s: _Shape, sources, stages, barriers, image, band, j, wrapped, interpret):
  """TMA copies of window j's runs: sources are (GMEM ref, channel offset) pairs.

  A TMA load must move a multiple of 128 bytes (the warpgroup's threads share the barrier's
  byte count), so on hardware each run is read rounded up to whole slot alignments: the extra
  tokens (the next column's, or TMA's zero fill past the map's edge) land in slots no token
  uses, which are masked as keys and never stored. The interpreter reads the exact runs.
  """
  copies = _copies(s, image, band, j, wrapped)
  for index, row, slot, column, length in copies:
    if not interpret:
      length = -(-length // s.slots.alignment) * s.slots.alignment
      column = column + 0 * image   # traced: a run past the map's edge is TMA's to fill
    for (source, channel), stage in zip(sources, stages):
      plgpu.copy_gmem_to_smem(
          source.at[image, row, pl.ds(column, length), pl.ds(channel, s.head_dim)],
          stage.at[pl.ds(slot, length)], barriers.at[index])
  for index, *_ in copies:
    plgpu.barrier_wait(barriers.at[index])


def _store_window(s: _Shape, stages, destinations, image, band, j, wrapped):
  """TMA copies of the slot buffers back to their tokens: destinations are (ref, channel)."""
  plgpu.commit_smem()
  for _, row, slot, column, length in _copies(s, image, band, j, wrapped):
    for stage, (destination, channel) in zip(stages, destinations):
      plgpu.copy_smem_to_gmem(
          stage.at[pl.ds(slot, length)],
          destination.at[image, row, pl.ds(column, length), pl.ds(channel, s.head_dim)])
  plgpu.wait_smem_to_gmem(0)


def _region_mask(s: _Shape, band, j, interpret):
  """(64, 64) float32: -100 between slots of different regions of the rolled map."""
  def ids(dimension):
    t = mgpu.iota((_SLOTS, _SLOTS), dimension, interpret)
    rows = band * s.window + t // s.slots.group
    cols = j * s.window + t % s.slots.group

    def region(p, size):
      return (p >= size - s.window).astype(jnp.int32) + (p >= size - s.shift).astype(jnp.int32)

    return region(rows, s.height) * 3 + region(cols, s.width)

  return jnp.where(ids(0) != ids(1), MASK_VALUE, 0.0)


class _Operand(NamedTuple):
  """A wgmma operand in shared memory: bfloat16 parts, and in interpret mode also transposed
  parts (the GPU interpreter cannot read a transposed view; hardware uses transpose_ref)."""
  parts: list
  transposed_parts: list

  def store(self, values):
    for tile, part in zip(self.parts, mgpu.parts(values, len(self.parts))):
      tile[...] = part
    if self.transposed_parts:
      for tile, part in zip(self.transposed_parts, mgpu.parts(values.T, len(self.parts))):
        tile[...] = part

  @property
  def t(self):
    if self.transposed_parts:
      return self.transposed_parts
    return [plgpu.transpose_ref(ref, (1, 0)) for ref in self.parts]


def _operand_types(rows, cols, num_parts, interpret, head_dim):
  """wgmma needs one swizzle for both operands: every operand uses head_dim's."""
  bf16 = jnp.bfloat16
  transforms = _transforms(bf16, head_dim)
  types = [plgpu.SMEM((rows, cols), bf16, transforms=transforms)] * num_parts
  if interpret:
    types += [plgpu.SMEM((cols, rows), bf16, transforms=transforms)] * num_parts
  return types


def _operands(refs, count, num_parts, interpret):
  """`count` _Operands from the flat scratch list of `count` x _operand_types."""
  per = num_parts * (2 if interpret else 1)
  return [_Operand(list(refs[i * per:i * per + num_parts]), list(refs[i * per + num_parts:(i + 1) * per]))
          for i in range(count)], refs[count * per:]


def _matmul(acc_shape, lhs, rhs):
  """sum of the split products lhs_i @ rhs_j as a float32 register array."""
  def run(acc):
    mgpu.mma(acc, lhs, rhs)
    return acc[...]
  return pl.run_scoped(run, plgpu.ACC(acc_shape, jnp.float32))


def _probabilities(s: _Shape, q: _Operand, k: _Operand, bias, band, j, interpret):
  logits = _matmul((_SLOTS, _SLOTS), q.parts, k.t) + bias
  if s.shift:
    logits = logits + _region_mask(s, band, j, interpret)
  logits = logits - lax.broadcast_in_dim(logits.max(axis=1), logits.shape, [0])
  e = jnp.exp(logits)
  return e / lax.broadcast_in_dim(e.sum(axis=1), e.shape, [0])


def _scale(dtype, head_dim):
  return float(np.asarray(head_dim ** -0.5, jnp.dtype(dtype)))  # the reference scales in qkv's dtype


def _windows(s: _Shape, body):
  """body(j, wrapped) for the band's windows: the last one wraps when shifted."""
  last = s.width // s.window - 1
  if last:
    pl.loop(0, last)(lambda j: body(j, False))
  body(last, bool(s.shift))


def _prologue(stages, bias_ref, bias_s, bias_barrier, head, dtype, interpret):
  """Zeroes the slot buffers (slots no token uses stay zero) and loads the head's bias."""
  for stage in stages:
    stage[...] = jnp.zeros(stage.shape, dtype)
  plgpu.copy_gmem_to_smem(bias_ref.at[head], bias_s, bias_barrier)
  plgpu.barrier_wait(bias_barrier)
  return _load(bias_s, interpret)


def _forward(qkv, bias_slots, s: _Shape, interpret: bool):
  """(B, H, W, C) attention output; bias_slots (heads, 64, 64) float32 in slot space."""
  b, h, w, _ = qkv.shape
  dtype, d, c = qkv.dtype, s.head_dim, s.channels
  num_parts = 3 if dtype == jnp.float32 else 1
  scale = _scale(dtype, d)

  def kernel(qkv_ref, bias_ref, out_ref, *scratch):
    stages, scratch = scratch[:3], scratch[3:]
    (q, k, v, p), (bias_s, out_stage, barriers, bias_barrier) = _operands(
        scratch, 4, num_parts, interpret)
    image, band, head = lax.axis_index("image"), lax.axis_index("band"), lax.axis_index("head")
    bias = _prologue(stages, bias_ref, bias_s, bias_barrier, head, dtype, interpret)
    sources = [(qkv_ref, head * d), (qkv_ref, c + head * d), (qkv_ref, 2 * c + head * d)]

    def window(j, wrapped):
      _load_window(s, sources, stages, barriers, image, band, j, wrapped, interpret)
      q_value, k_value, v_value = (_load(stage, interpret) for stage in stages)
      q.store((q_value * scale).astype(dtype))
      k.store(k_value)
      v.store(v_value)
      plgpu.commit_smem()
      probabilities = _probabilities(s, q, k, bias, band, j, interpret)
      p.store(probabilities.astype(dtype))
      plgpu.commit_smem()
      out_stage[...] = _matmul((_SLOTS, d), p.parts, v.parts).astype(dtype)
      _store_window(s, [out_stage], [(out_ref, head * d)], image, band, j, wrapped)

    _windows(s, window)

  operands = (_operand_types(_SLOTS, d, num_parts, interpret, d) * 3
              + _operand_types(_SLOTS, _SLOTS, num_parts, interpret, d))
  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((b, h, w, c), dtype),
      grid=(b, h // s.window, s.num_heads),
      grid_names=("image", "band", "head"),
      scratch_types=([plgpu.SMEM((_SLOTS, d), dtype)] * 3 + operands + [
          plgpu.SMEM((_SLOTS, _SLOTS), jnp.float32), plgpu.SMEM((_SLOTS, d), dtype),
          plgpu.Barrier(num_arrivals=3, num_barriers=2 * s.window), plgpu.Barrier()]),
      interpret=mgpu.InterpretParams() if interpret else None,
  )(qkv, bias_slots)


def _backward(qkv, bias_slots, grad_out, s: _Shape, interpret: bool):
  """(dL/dqkv (B, H, W, 3C), dL/dbias per image in slot space (B, heads, 64, 64) float32)."""
  b, h, w, c3 = qkv.shape
  dtype, d, c = qkv.dtype, s.head_dim, s.channels
  num_parts = 3 if dtype == jnp.float32 else 1
  scale = _scale(dtype, d)

  def kernel(qkv_ref, grad_out_ref, bias_ref, grad_ref, grad_bias_ref, *scratch):
    stages, scratch = scratch[:4], scratch[4:]
    (q, k, v, g, p, ds), rest = _operands(scratch, 6, num_parts, interpret)
    bias_s, out_stages, barriers, bias_barrier = rest[0], rest[1:4], rest[4], rest[5]
    image, head = lax.axis_index("image"), lax.axis_index("head")
    bias = _prologue(stages, bias_ref, bias_s, bias_barrier, head, dtype, interpret)
    sources = [(qkv_ref, head * d), (qkv_ref, c + head * d), (qkv_ref, 2 * c + head * d),
               (grad_out_ref, head * d)]
    destinations = [(grad_ref, head * d), (grad_ref, c + head * d), (grad_ref, 2 * c + head * d)]

    def window(band, j, wrapped, grad_bias):
      _load_window(s, sources, stages, barriers, image, band, j, wrapped, interpret)
      q_value, k_value, v_value, g_value = (_load(stage, interpret) for stage in stages)
      q.store((q_value * scale).astype(dtype))
      k.store(k_value)
      v.store(v_value)
      g.store(g_value)
      plgpu.commit_smem()
      probabilities = _probabilities(s, q, k, bias, band, j, interpret)
      p.store(probabilities.astype(dtype))
      plgpu.commit_smem()
      dv = _matmul((_SLOTS, d), p.t, g.parts)                  # P^T dO
      dp = _matmul((_SLOTS, _SLOTS), g.parts, v.t)             # dO V^T
      row_sums = lax.broadcast_in_dim((dp * probabilities).sum(axis=1), dp.shape, [0])
      d_logits = probabilities * (dp - row_sums)               # softmax backward, float32
      ds.store(d_logits.astype(dtype))
      plgpu.commit_smem()
      dq = _matmul((_SLOTS, d), ds.parts, k.parts) * scale
      dk = _matmul((_SLOTS, d), ds.t, q.parts)
      for stage, value in zip(out_stages, (dq, dk, dv)):
        stage[...] = value.astype(dtype)
      _store_window(s, out_stages, destinations, image, band, j, wrapped)
      return grad_bias + d_logits

    last = s.width // s.window - 1

    def band_body(band, grad_bias):
      grad_bias = lax.fori_loop(0, last, lambda j, acc: window(band, j, False, acc), grad_bias)
      return window(band, last, bool(s.shift), grad_bias)

    # The image's windows in a fixed order: a deterministic bias gradient.
    grad_bias = lax.fori_loop(0, h // s.window, band_body, mgpu.zeros((_SLOTS, _SLOTS), interpret))
    bias_s[...] = grad_bias
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(bias_s, grad_bias_ref.at[image, head])
    plgpu.wait_smem_to_gmem(0)

  operands = (_operand_types(_SLOTS, d, num_parts, interpret, d) * 4
              + _operand_types(_SLOTS, _SLOTS, num_parts, interpret, d) * 2)
  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((b, h, w, c3), dtype),
                jax.ShapeDtypeStruct((b, s.num_heads, _SLOTS, _SLOTS), jnp.float32)),
      grid=(b, s.num_heads),
      grid_names=("image", "head"),
      scratch_types=([plgpu.SMEM((_SLOTS, d), dtype)] * 4 + operands + [
          plgpu.SMEM((_SLOTS, _SLOTS), jnp.float32)] + [plgpu.SMEM((_SLOTS, d), dtype)] * 3 + [
          plgpu.Barrier(num_arrivals=4, num_barriers=2 * s.window), plgpu.Barrier()]),
      interpret=mgpu.InterpretParams() if interpret else None,
  )(qkv, grad_out.astype(dtype), bias_slots)


def _layout(qkv, bias, g: WindowGeometry):
  """The kernel's shape, its (heads, 64, 64) bias in slot space and each token's slot."""
  token_slots_of = slots(g.window, g.head_dim, qkv.dtype)
  shape = _Shape(g.height, g.width, g.window, g.shift, g.num_heads, g.head_dim, token_slots_of)
  token_slots = jnp.asarray(token_slots_of.token_slots(g.window))
  bias_slots = jnp.full((g.num_heads, _SLOTS, _SLOTS), -jnp.inf, jnp.float32)  # keys no token uses
  bias_slots = bias_slots.at[:, :, token_slots].set(0.0)
  bias_slots = bias_slots.at[:, token_slots[:, None], token_slots[None, :]].set(bias)
  return shape, bias_slots, token_slots


def forward(qkv, bias, g: WindowGeometry, interpret: bool):
  """(B, H, W, C) attention output; bias (heads, N, N) float32 (relative position bias)."""
  shape, bias_slots, _ = _layout(qkv, bias, g)
  return _forward(qkv, bias_slots, shape, interpret)


def backward(qkv, bias, grad_out, g: WindowGeometry, interpret: bool):
  """(dL/dqkv (B, H, W, 3C), dL/dbias per image (B, heads, N, N) float32)."""
  shape, bias_slots, token_slots = _layout(qkv, bias, g)
  grad_qkv, grad_bias = _backward(qkv, bias_slots, grad_out, shape, interpret)
  return grad_qkv, grad_bias[:, :, token_slots[:, None], token_slots[None, :]]
