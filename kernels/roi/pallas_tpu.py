"""The Pallas (Mosaic TPU) RoI kernels.

RoIAlign, forward: one program per (box, channel block) walks the map tiles the box's samples
touch (DMA into VMEM) and adds A_tile @ F_tile on the MXU, A_tile = kron(Wy, Wx) restricted to
the tile: RoIAlign's weights are separable (sample grid and validity rule are products of a y
and an x part), so the per-axis weights (`_axis_weights`) are expanded into the Kronecker
product with one-hot matrices (`_expansions`) on the matrix unit. Backward: one program per
(image, channel block, feature tile) adds A_tile^T @ grad_out over the image's boxes in a fixed
order, so no two programs write the same memory: deterministic, no atomics.

RoIPool, forward: per box and tile, a bin's maximum is separable (over its columns, then its
rows); the first maximum in row-major order wins ties across tiles through the smaller flat
index. Its backward is the XLA scatter-add (deterministic on TPU).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.roi.geometry import (LOWEST, BinBounds, BoxGeometry, Plan, box_params, boxes_by_image,
                                  scalar_tables, tile_tables, touches)


# ---------------------------------------------------------------------------------------------
# RoIAlign


def _one_hot(rows, cols, row_of, col_of):
  """(rows, cols) float32 matrix with 1 where row_of(i) == col_of(j)."""
  i = lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
  j = lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
  return (row_of(i) == col_of(j)).astype(jnp.float32)


def _expansions(plan: Plan):
  """One-hot matrices that lay per-axis weights out as the Kronecker product (built by XLA).

  e_p (bins_pad, out_h_pad): bin r -> its row ph; e_q (bins_pad, out_w_pad): r -> pw;
  e_y (rows, rows*cols): tile cell j -> its row; e_x (cols, rows*cols): j -> its column.
  """
  m, ow, cols = plan.out_h * plan.out_w, plan.out_w, plan.cols
  e_p = _one_hot(plan.bins_pad, plan.out_h_pad, lambda r: jnp.where(r < m, r // ow, -1), lambda p: p)
  e_q = _one_hot(plan.bins_pad, plan.out_w_pad, lambda r: jnp.where(r < m, r % ow, -1), lambda q: q)
  e_y = _one_hot(plan.rows, plan.rows * cols, lambda y: y, lambda j: j // cols)
  e_x = _one_hot(cols, plan.rows * cols, lambda x: x, lambda j: j % cols)
  return e_p, e_q, e_y, e_x


def _axis_weights(start, bin_size, grid, n_out, first, owned_from, block, size, transposed):
  """Per-axis RoIAlign weights of one tile: (n_out, block), or (block, n_out) if transposed.

  Entry [p, r] is 1/grid * sum over samples i of bin p of the bilinear weight that sample puts
  on map row first + r (0 for invalid samples, for rows beyond the map, and for rows before
  `owned_from`, which belong to the previous tile).
  """
  shape, p_axis = ((block, n_out), 1) if transposed else ((n_out, block), 0)
  p = lax.broadcasted_iota(jnp.int32, shape, p_axis).astype(jnp.float32)
  row = first + lax.broadcasted_iota(jnp.int32, shape, 1 - p_axis)
  row_f = row.astype(jnp.float32)
  grid_f = grid.astype(jnp.float32)

  def add_sample(i, weights):
    s = start + p * bin_size + (i.astype(jnp.float32) + 0.5) * bin_size / grid_f
    valid = (s >= -1.0) & (s <= size)
    s = jnp.clip(s, 0.0, size - 1.0)
    return weights + jnp.where(valid, jnp.maximum(1.0 - jnp.abs(s - row_f), 0.0), 0.0)

  weights = lax.fori_loop(0, grid, add_sample, jnp.zeros(shape, jnp.float32))
  keep = (row >= owned_from) & (row < size)
  return jnp.where(keep, weights, 0.0) / jnp.maximum(grid_f, 1.0)


_HIGHEST = lax.Precision.HIGHEST


def _dot(a, b):
  return jnp.dot(a, b, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _roi_align_forward_kernel(ints, floats, e_p, e_q, e_y, e_x, features, out_ref, tile, acc,
                              sem, *, plan: Plan, num_boxes: int):
  k, c = pl.program_id(0), pl.program_id(1)
  box = box_params(ints, floats, k, num_boxes)
  acc[...] = jnp.zeros_like(acc)

  @pl.loop(0, box["nty"] * box["ntx"])
  def _(t):
    ty, tx = box["ty0"] + t // box["ntx"], box["tx0"] + t % box["ntx"]
    # A tile at the map's end starts earlier so the copy stays inside the map; the rows and
    # columns it shares with the previous tile get weight 0 (owned_from).
    y_own, x_own = ty * plan.rows, tx * plan.cols
    y0 = jnp.minimum(y_own, features.shape[1] - plan.rows)
    x0 = jnp.minimum(x_own, features.shape[2] - plan.cols)
    copy = pltpu.make_async_copy(
        features.at[box["batch"], pl.ds(y0, plan.rows), pl.ds(x0, plan.cols),
                    pl.ds(c * plan.channels, plan.channels)], tile, sem)
    copy.start()
    wy = _axis_weights(box["y_start"], box["bin_h"], box["grid_h"], plan.out_h_pad, y0, y_own,
                       plan.rows, plan.height, transposed=False)
    wx = _axis_weights(box["x_start"], box["bin_w"], box["grid_w"], plan.out_w_pad, x0, x_own,
                       plan.cols, plan.width, transposed=False)
    a = _dot(_dot(e_p[...], wy), e_y[...]) * _dot(_dot(e_q[...], wx), e_x[...])
    copy.wait()
    values = tile[...].reshape(plan.rows * plan.cols, plan.channels)
    if values.dtype == jnp.float32:
      acc[...] += _dot(a, values)
    else:  # bfloat16 features: bfloat16 weights on the matrix unit, float32 accumulation
      acc[...] += jnp.dot(a.astype(values.dtype), values, preferred_element_type=jnp.float32)

  out_ref[...] = acc[...].astype(out_ref.dtype)


def roi_align_forward(features, geometry: BoxGeometry, plan: Plan, interpret: bool):
  """(K, bins_pad, C) RoIAlign outputs, bins in row-major (ph, pw) order."""
  n, h, w, c = features.shape
  # A map smaller than one tile is padded once; padded cells get weight 0 (rows >= H).
  features = jnp.pad(features, ((0, 0), (0, max(plan.rows - h, 0)), (0, max(plan.cols - w, 0)), (0, 0)))
  num_boxes = geometry.batch.shape[0]
  ints, floats = scalar_tables(geometry, plan)
  e_p, e_q, e_y, e_x = _expansions(plan)
  full = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)
  return pl.pallas_call(
      functools.partial(_roi_align_forward_kernel, plan=plan, num_boxes=num_boxes),
      out_shape=jax.ShapeDtypeStruct((num_boxes, plan.bins_pad, c), features.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(num_boxes, c // plan.channels),
          in_specs=[full(e_p), full(e_q), full(e_y), full(e_x), pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=pl.BlockSpec((None, plan.bins_pad, plan.channels), lambda k, c, *_: (k, 0, c)),
          scratch_shapes=[pltpu.VMEM((plan.rows, plan.cols, plan.channels), features.dtype),
                          pltpu.VMEM((plan.bins_pad, plan.channels), jnp.float32),
                          pltpu.SemaphoreType.DMA(())]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=pltpu.InterpretParams() if interpret else False,
  )(ints, floats, e_p, e_q, e_y, e_x, features)


def _roi_align_backward_kernel(ints, floats, order, image_start, e_pt, e_qt, e_yt, e_xt,
                               grad_out, grad_ref, grad_tile, acc, sem, *, plan: Plan,
                               num_boxes: int):
  n, c, ty, tx = (pl.program_id(i) for i in range(4))
  y0, x0 = ty * plan.rows, tx * plan.cols
  acc[...] = jnp.zeros_like(acc)

  # The boxes of image n in a fixed order, each adding its share to this tile: a gather
  # formulation, so no two programs write the same tile and no atomics are needed.
  @pl.loop(image_start[n], image_start[n + 1])
  def _(j):
    k = order[j]
    box = box_params(ints, floats, k, num_boxes)
    @pl.when(touches(box, ty, tx))
    def _():
      copy = pltpu.make_async_copy(
          grad_out.at[k, :, pl.ds(c * plan.channels, plan.channels)], grad_tile, sem)
      copy.start()
      wy = _axis_weights(box["y_start"], box["bin_h"], box["grid_h"], plan.out_h_pad, y0, y0,
                         plan.rows, plan.height, transposed=True)
      wx = _axis_weights(box["x_start"], box["bin_w"], box["grid_w"], plan.out_w_pad, x0, x0,
                         plan.cols, plan.width, transposed=True)
      a_t = _dot(_dot(e_yt[...], wy), e_pt[...]) * _dot(_dot(e_xt[...], wx), e_qt[...])
      copy.wait()
      g = grad_tile[...]
      if g.dtype == jnp.float32:
        acc[...] += _dot(a_t, g)
      else:
        acc[...] += jnp.dot(a_t.astype(g.dtype), g, preferred_element_type=jnp.float32)

  grad_ref[...] = acc[...].reshape(plan.rows, plan.cols, plan.channels).astype(grad_ref.dtype)


def roi_align_backward(shape, dtype, geometry: BoxGeometry, grad_out, plan: Plan, interpret: bool):
  """Feature gradient (N, H, W, C) from grad_out (K, bins_pad, C)."""
  n, h, w, c = shape
  num_boxes = geometry.batch.shape[0]
  ints, floats = scalar_tables(geometry, plan)
  order, image_start = boxes_by_image(geometry.batch, n)
  e_p, e_q, e_y, e_x = _expansions(plan)
  e_pt, e_qt, e_yt, e_xt = e_p.T, e_q.T, e_y.T, e_x.T
  full = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)
  tiles = (plan.padded_height // plan.rows, plan.padded_width // plan.cols)
  grad = pl.pallas_call(
      functools.partial(_roi_align_backward_kernel, plan=plan, num_boxes=num_boxes),
      out_shape=jax.ShapeDtypeStruct((n, plan.padded_height, plan.padded_width, c), dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(n, c // plan.channels) + tiles,
          in_specs=[full(e_pt), full(e_qt), full(e_yt), full(e_xt), pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=pl.BlockSpec((None, plan.rows, plan.cols, plan.channels),
                                 lambda n, c, ty, tx, *_: (n, ty, tx, c)),
          scratch_shapes=[pltpu.VMEM((plan.bins_pad, plan.channels), grad_out.dtype),
                          pltpu.VMEM((plan.rows * plan.cols, plan.channels), jnp.float32),
                          pltpu.SemaphoreType.DMA(())]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "parallel")),
      interpret=pltpu.InterpretParams() if interpret else False,
  )(ints, floats, order, image_start, e_pt, e_qt, e_yt, e_xt, grad_out)
  return grad[:, :h, :w]


# ---------------------------------------------------------------------------------------------
# RoIPool


def _roi_pool_forward_kernel(spans, h_start, h_end, w_start, w_end, features, best_ref,
                             argmax_ref, tile, best, argmax, sem, *, plan: Plan, num_boxes: int):
  k, c = pl.program_id(0), pl.program_id(1)
  b, ty0, nty, tx0, ntx = (spans[i * num_boxes + k] for i in range(5))
  out_h, out_w = plan.out_h, plan.out_w
  best[...] = jnp.full(best.shape, LOWEST, jnp.float32)
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


def roi_pool_forward(features, bounds: BinBounds, plan: Plan, interpret: bool):
  """Max (K, bins_pad, C) float32 and flat index y * W + x (K, bins_pad, C) int32 (-1: none)."""
  n, h, w, c = features.shape
  k = bounds.h_start.shape[0]
  features = jnp.pad(features, ((0, 0), (0, max(plan.rows - h, 0)), (0, max(plan.cols - w, 0)), (0, 0)))
  spans, tables = tile_tables(bounds, plan)
  out_spec = pl.BlockSpec((None, plan.bins_pad, plan.channels), lambda k, c, *_: (k, 0, c))
  best, argmax = pl.pallas_call(
      functools.partial(_roi_pool_forward_kernel, plan=plan, num_boxes=k),
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


