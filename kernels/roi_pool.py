"""RoI max pooling (Girshick 2015, Fast R-CNN) and SPPnet's spatial pyramid pooling (He et al. 2014).

The semantics are torchvision's `roi_pool` kernels (csrc/ops/cpu/roi_pool_kernel.cpp),
channels-last: box corners are rounded to cells (half away from zero), the box is at least
1x1 cell and its width is inclusive (end - start + 1); bin (ph, pw) covers rows
[floor(ph * bin_h), ceil((ph + 1) * bin_h)) + start_h clipped to [0, H] (columns likewise);
an empty bin gives 0; otherwise the maximum, found in row-major order with a strict '>', so
the gradient goes to the first maximum.
"""

from collections.abc import Sequence
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import _common
from kernels.roi_align import BlockSizes, _plan, _Plan

_LOWEST = float(jnp.finfo(jnp.float32).min)  # torchvision's -FLT_MAX start value


class BinBounds(NamedTuple):
  """Per-box bin boundaries in cells, int32: rows [h_start, h_end) (K, out_h), columns (K, out_w)."""
  batch: jax.Array
  h_start: jax.Array
  h_end: jax.Array
  w_start: jax.Array
  w_end: jax.Array


def _round_half_away(x):
  return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def bin_bounds(boxes, box_indices, shape, output_size, spatial_scale) -> BinBounds:
  """torchvision's roi_pool bin arithmetic (float32 box sizes, int cells)."""
  _, height, width, _ = shape
  out_h, out_w = output_size
  corners = _round_half_away(lax.stop_gradient(boxes).astype(jnp.float32) * jnp.float32(spatial_scale))
  corners = corners.astype(jnp.int32)
  x1, y1, x2, y2 = (corners[:, i] for i in range(4))

  def axis(start, end, n_out, size):
    bin_size = _common.divide(jnp.maximum(end - start + 1, 1).astype(jnp.float32), n_out)
    p = jnp.arange(n_out, dtype=jnp.float32)
    lo = jnp.floor(p * bin_size[:, None]).astype(jnp.int32) + start[:, None]
    hi = jnp.ceil((p + 1) * bin_size[:, None]).astype(jnp.int32) + start[:, None]
    return jnp.clip(lo, 0, size), jnp.clip(hi, 0, size)

  h_start, h_end = axis(y1, y2, out_h, height)
  w_start, w_end = axis(x1, x2, out_w, width)
  batch = jnp.clip(box_indices.astype(jnp.int32), 0, shape[0] - 1)
  return BinBounds(batch, h_start, h_end, w_start, w_end)


def _xla_forward(features, bounds: BinBounds):
  """Max (K, out_h, out_w, C) float32 and its flat index into (N*H*W) (-1: none), first maximum."""
  n, h, w, c = features.shape
  flat = features.reshape(n * h * w, c)
  b = bounds
  k, out_h = b.h_start.shape
  out_w = b.w_start.shape[1]
  max_h = jnp.maximum(jnp.max(b.h_end - b.h_start, initial=0), 0)
  max_w = jnp.maximum(jnp.max(b.w_end - b.w_start, initial=0), 0)
  empty = ((b.h_end <= b.h_start)[:, :, None] | (b.w_end <= b.w_start)[:, None, :])[..., None]

  def step(t, carry):
    best, where_best = carry
    y = b.h_start + t // jnp.maximum(max_w, 1)  # row-major over each bin: rows outer
    x = b.w_start + t % jnp.maximum(max_w, 1)
    inside = (y < b.h_end)[:, :, None] & (x < b.w_end)[:, None, :]
    index = (b.batch[:, None, None] * h + jnp.minimum(y, h - 1)[:, :, None]) * w + jnp.minimum(x, w - 1)[:, None, :]
    value = flat[index].astype(jnp.float32)
    better = inside[..., None] & (value > best)
    return jnp.where(better, value, best), jnp.where(better, index[..., None], where_best)

  init = (jnp.full((k, out_h, out_w, c), _LOWEST, jnp.float32),
          jnp.full((k, out_h, out_w, c), -1, jnp.int32))
  best, where_best = lax.fori_loop(0, max_h * max_w, step, init)
  return jnp.where(empty, 0.0, best), jnp.where(empty, -1, where_best)


def _xla_backward(shape, dtype, argmax, grad_out):
  """Feature gradient: each output's gradient added at its first maximum (a scatter-add)."""
  n, h, w, c = shape
  channel = jnp.broadcast_to(jnp.arange(c), argmax.shape)
  target = jnp.where(argmax >= 0, argmax, n * h * w)  # -1 (empty bin) goes to a dropped row
  grad = jnp.zeros((n * h * w + 1, c), jnp.float32)
  grad = grad.at[target.reshape(-1), channel.reshape(-1)].add(grad_out.astype(jnp.float32).reshape(-1))
  return grad[:-1].reshape(shape).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Pallas (Mosaic TPU): per box, walk the map tiles its bins cover; in each tile a bin's maximum
# is separable (the maximum over its columns, then over its rows), and the first maximum in
# row-major order wins ties across tiles through the smaller flat index.


def _tpu_forward_kernel(spans, h_start, h_end, w_start, w_end, features, best_ref, argmax_ref,
                        tile, best, argmax, sem, *, plan: _Plan, num_boxes: int):
  k, c = pl.program_id(0), pl.program_id(1)
  b, ty0, nty, tx0, ntx = (spans[i * num_boxes + k] for i in range(5))
  out_h, out_w = plan.out_h, plan.out_w
  best[...] = jnp.full(best.shape, _LOWEST, jnp.float32)
  argmax[...] = jnp.full(argmax.shape, -1, jnp.int32)
  big = jnp.int32(2**30)

  @pl.loop(0, nty * ntx)
  def _(t):
    y0 = jnp.minimum((ty0 + t // ntx) * plan.rows, features.shape[1] - plan.rows)
    x0 = jnp.minimum((tx0 + t % ntx) * plan.cols, features.shape[2] - plan.cols)
    copy = pltpu.make_async_copy(
        features.at[b, pl.ds(y0, plan.rows), pl.ds(x0, plan.cols),
                    pl.ds(c * plan.channels, plan.channels)], tile, sem)
    copy.start()
    copy.wait()
    values = tile[...].astype(jnp.float32)
    shape3 = (plan.rows, plan.cols, plan.channels)
    col = x0 + lax.broadcasted_iota(jnp.int32, shape3, 1)
    row = y0 + lax.broadcasted_iota(jnp.int32, (plan.rows, plan.channels), 0)
    for q in range(out_w):
      in_cols = (col >= w_start[k * out_w + q]) & (col < w_end[k * out_w + q])
      masked = jnp.where(in_cols, values, -jnp.inf)
      col_max = jnp.max(masked, axis=1)                                    # (rows, C)
      first_col = jnp.min(jnp.where(in_cols & (masked == col_max[:, None, :]), col, big), axis=1)
      for p in range(out_h):
        in_rows = (row >= h_start[k * out_h + p]) & (row < h_end[k * out_h + p])
        masked_rows = jnp.where(in_rows, col_max, -jnp.inf)
        tile_max = jnp.max(masked_rows, axis=0, keepdims=True)              # (1, C)
        at_max = in_rows & (masked_rows == tile_max)
        first_row = jnp.min(jnp.where(at_max, row, big), axis=0, keepdims=True)
        first = jnp.min(jnp.where(at_max & (row == first_row), first_row * plan.width + first_col, big),
                        axis=0, keepdims=True)                              # y * W + x
        r = p * out_w + q
        old, old_index = best[pl.ds(r, 1), :], argmax[pl.ds(r, 1), :]
        # torchvision: strict '>' over a row-major scan from -FLT_MAX; across tiles, equal
        # maxima keep the one earlier in that scan, i.e. the smaller flat index.
        take = (tile_max > old) | ((tile_max == old) & (old_index >= 0) & (first < old_index))
        best[pl.ds(r, 1), :] = jnp.where(take, tile_max, old)
        argmax[pl.ds(r, 1), :] = jnp.where(take, first, old_index)

  best_ref[...] = best[...]
  argmax_ref[...] = argmax[...]


def _tile_tables(bounds: BinBounds, plan: _Plan):
  """Scalars for the kernels: spans (5K,) = image, first tile row, tile rows, first tile column,
  tile columns of each box; and the flattened bin bounds h_start, h_end (K*out_h,), w_start,
  w_end (K*out_w,), int32."""
  nonempty = jnp.any(bounds.h_end > bounds.h_start, axis=1) & jnp.any(bounds.w_end > bounds.w_start, axis=1)

  def span(start, end, block):
    first = jnp.min(start, axis=1) // block
    return first, jnp.where(nonempty, (jnp.max(end, axis=1) - 1) // block - first + 1, 0)

  ty0, nty = span(bounds.h_start, bounds.h_end, plan.rows)
  tx0, ntx = span(bounds.w_start, bounds.w_end, plan.cols)
  spans = jnp.concatenate([bounds.batch, ty0, nty, tx0, ntx]).astype(jnp.int32)
  tables = [a.reshape(-1).astype(jnp.int32) for a in (bounds.h_start, bounds.h_end, bounds.w_start, bounds.w_end)]
  return spans, tables


def _tpu_forward(features, bounds: BinBounds, plan: _Plan, interpret: bool):
  """Max (K, bins_pad, C) float32 and flat index y * W + x (K, bins_pad, C) int32 (-1: none)."""
  n, h, w, c = features.shape
  k = bounds.h_start.shape[0]
  features = jnp.pad(features, ((0, 0), (0, max(plan.rows - h, 0)), (0, max(plan.cols - w, 0)), (0, 0)))
  spans, tables = _tile_tables(bounds, plan)
  out_spec = pl.BlockSpec((None, plan.bins_pad, plan.channels), lambda k, c, *_: (k, 0, c))
  best, argmax = pl.pallas_call(
      functools.partial(_tpu_forward_kernel, plan=plan, num_boxes=k),
      out_shape=(jax.ShapeDtypeStruct((k, plan.bins_pad, c), jnp.float32),
                 jax.ShapeDtypeStruct((k, plan.bins_pad, c), jnp.int32)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(k, c // plan.channels),
          in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=(out_spec, out_spec),
          scratch_shapes=[pltpu.VMEM((plan.rows, plan.cols, plan.channels), features.dtype),
                          pltpu.VMEM((plan.bins_pad, plan.channels), jnp.float32),
                          pltpu.VMEM((plan.bins_pad, plan.channels), jnp.int32),
                          pltpu.SemaphoreType.DMA(())]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=pltpu.InterpretParams() if interpret else False,
  )(spans, *tables, features)
  return best, argmax


def _from_kernel(best, index, bounds: BinBounds, shape):
  """Kernel outputs (K, >= bins, C) with in-image indices -> _xla_forward's (values, flat index)."""
  _, h, w, c = shape
  k, out_h = bounds.h_start.shape
  out_w = bounds.w_start.shape[1]
  best = best[:, :out_h * out_w].reshape(k, out_h, out_w, c)
  index = index[:, :out_h * out_w].reshape(k, out_h, out_w, c)
  empty = ((bounds.h_end <= bounds.h_start)[:, :, None] | (bounds.w_end <= bounds.w_start)[:, None, :])[..., None]
  flat = jnp.where(index >= 0, bounds.batch[:, None, None, None] * (h * w) + index, -1)
  return jnp.where(empty, 0.0, best), jnp.where(empty, -1, flat)


def _forward(static, features, bounds):
  shape, dtype, implementation, blocks = static
  if implementation == "xla":
    return _xla_forward(features, bounds)
  plan = _plan(features.shape, bounds.h_start.shape[1], bounds.w_start.shape[1], blocks)
  if implementation == "pallas_tpu":
    best, index = _tpu_forward(features, bounds, plan, _common.interpret("pallas_tpu"))
  else:
    from kernels import roi_pool_mosaic_gpu
    best, index = roi_pool_mosaic_gpu.forward(features, bounds, plan, _tile_tables(bounds, plan),
                                              _common.interpret("pallas_gpu"))
  return _from_kernel(best, index, bounds, features.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _roi_pool(static, features, bounds):
  return _forward(static, features, bounds)[0].astype(features.dtype)


def _roi_pool_fwd(static, features, bounds):
  best, argmax = _forward(static, features, bounds)
  return best.astype(features.dtype), (argmax, bounds)


def _roi_pool_bwd(static, residuals, grad_out):
  argmax, bounds = residuals
  shape, dtype, implementation, blocks = static
  if implementation == "pallas_gpu":  # XLA's GPU scatter-add would use atomics
    from kernels import roi_pool_mosaic_gpu
    k, out_h, out_w, c = grad_out.shape
    plan = _plan(shape, out_h, out_w, blocks)
    in_image = jnp.where(argmax >= 0, argmax - bounds.batch[:, None, None, None] * (shape[1] * shape[2]), -1)
    grad = roi_pool_mosaic_gpu.backward(
        shape, dtype, bounds, plan, _tile_tables(bounds, plan), in_image.reshape(k, -1, c),
        grad_out.reshape(k, -1, c), _common.interpret("pallas_gpu"))
  else:
    grad = _xla_backward(shape, dtype, argmax, grad_out)
  return grad, jax.tree.map(jnp.zeros_like, bounds)


_roi_pool.defvjp(_roi_pool_fwd, _roi_pool_bwd)


def roi_pool(features: jax.Array, boxes: jax.Array, box_indices: jax.Array,
             output_size: int | Sequence[int], *, spatial_scale: float = 1.0,
             implementation: str = "auto", block_sizes: BlockSizes = BlockSizes()) -> jax.Array:
  """RoI max pooling, torchvision's kernels channels-last.

  Args:
    features: (N, H, W, C) float32 or bfloat16.
    boxes: (K, 4) float (x1, y1, x2, y2) in input-image pixels.
    box_indices: (K,) int32 image of each box.
    output_size: out_h = out_w, or (out_h, out_w).
    spatial_scale: feature cells per input pixel (1 / stride).
    implementation: "auto", "xla" (a loop over the cells of the largest bin, memory
      K x out_h x out_w x C), "pallas_gpu" (Mosaic GPU, Hopper and newer; up to 98 bins (9 x 9) with
      the default tile, roi_pool_mosaic_gpu.check_supported: "auto" uses xla beyond) or
      "pallas_tpu".
    block_sizes: the Pallas kernel's map tile.

  Returns:
    (K, out_h, out_w, C) in the features' dtype. The gradient goes to each bin's first
    maximum: a scatter-add for "xla" and "pallas_tpu" (deterministic on CPU and TPU, and
    on GPU under XLA's deterministic-ops flag), a gather kernel without atomics for
    "pallas_gpu".
  """
  features, boxes, box_indices = jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(box_indices)
  _common.check_box_arguments(features, boxes, box_indices, "roi_pool")
  out_h, out_w = _common.pair(output_size, "roi_pool: output_size")
  requested = implementation
  implementation = _common.resolve_implementation(implementation, "roi_pool", ("xla", "pallas_tpu", "pallas_gpu"))
  if implementation == "pallas_gpu":
    from kernels import roi_pool_mosaic_gpu
    reason = roi_pool_mosaic_gpu.check_supported(
        _plan(features.shape, out_h, out_w, block_sizes), features.dtype)
    implementation = _common.unless_unsupported(requested, implementation, reason, "roi_pool")
  bounds = bin_bounds(boxes, box_indices, features.shape, (out_h, out_w), spatial_scale)
  static = (tuple(features.shape), jnp.dtype(features.dtype), implementation, block_sizes)
  return _roi_pool(static, features, bounds)


def spatial_pyramid_pool(features: jax.Array, boxes: jax.Array, box_indices: jax.Array,
                         levels: Sequence[int] = (1, 2, 4), *, spatial_scale: float = 1.0,
                         implementation: str = "auto") -> jax.Array:
  """SPPnet pooling (He et al. 2014, section 2.3): max pooling of each box at several grids.

  Fast R-CNN's RoI pooling is the one-level case; here each level is `roi_pool` with an
  l x l output, flattened and concatenated, so every box gives a fixed-length vector.

  Returns:
    (K, sum(l * l for l in levels) * C): for each level in order, the (l, l, C) bins
    flattened row-major (bin row, bin column, channel).
  """
  levels = tuple(levels)
  if not levels or not all(isinstance(l, int) and l > 0 for l in levels):
    raise ValueError(f"spatial_pyramid_pool: levels must be a non-empty sequence of positive ints, "
                     f"got {levels!r}.")
  pooled = [roi_pool(features, boxes, box_indices, (l, l), spatial_scale=spatial_scale,
                     implementation=implementation) for l in levels]
  return jnp.concatenate([p.reshape(p.shape[0], -1) for p in pooled], axis=1)
