"""RoI max pooling for Hopper GPUs in Pallas Mosaic GPU.

One program per (box, channel block) walks the map tiles the box's bins cover, as the TPU
kernel in `kernels/roi_pool.py` does: TMA copies a tile's rows into shared memory, then every
bin scans its cells inside the tile in row-major order, one channel vector per cell, keeping
the running maximum and its flat index in shared memory. Across tiles an equal maximum keeps
the smaller flat index, so the result is torchvision's first maximum; the backward pass is
the XLA scatter-add at those indices (`kernels.roi_pool`).
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.roi_align import _boxes_by_image, _round_up
from kernels._mosaic_gpu import SMEM_BYTES, _InterpretParams

_LOWEST = float(jnp.finfo(jnp.float32).min)
_MAX_BINS = 256  # a TMA box has at most 256 rows
_BLOCK = 128     # channels per program: Mosaic GPU copies rows of at least 128 float32


def check_supported(plan, dtype) -> str | None:
  """Why the kernels cannot take a call with this plan (None: they can): at most 256 bins, and
  the (bins, 128) maxima, indices and gradients plus a map tile must fit in shared memory
  (found by lowering for CUDA: 10 x 10 bins on 16 x 16 tiles need 233,600 bytes)."""
  bins, cells = plan.out_h * plan.out_w, plan.rows * plan.cols
  if bins > _MAX_BINS:
    return f"{plan.out_h}x{plan.out_w} outputs are more than {_MAX_BINS} bins"
  # scratch of `forward` / `backward` below, with their 8-byte barriers
  forward = cells * _BLOCK * jnp.dtype(dtype).itemsize + 2 * bins * _BLOCK * 4 + 8 * plan.rows
  backward = cells * _BLOCK * 4 + 2 * bins * _BLOCK * 4 + 8
  if max(forward, backward) > SMEM_BYTES:
    return (f"{plan.out_h}x{plan.out_w} outputs on {plan.rows}x{plan.cols} tiles need "
            f"{max(forward, backward)} bytes of shared memory, more than {SMEM_BYTES}")
  return None


def _bin_in_tile(tables, box, r, out_h, out_w, y_own, x_own, plan):
  """Rows [y_lo, y_hi) and columns [x_lo, x_hi) of bin r of `box` inside the tile owned from
  (y_own, x_own); empty ranges have hi == lo."""
  h_start, h_end, w_start, w_end = tables
  ph, pw = r // out_w, r % out_w
  y_lo = jnp.maximum(h_start[box * out_h + ph], y_own)
  y_hi = jnp.minimum(h_end[box * out_h + ph], y_own + plan.rows)
  x_lo = jnp.maximum(w_start[box * out_w + pw], x_own)
  x_hi = jnp.minimum(w_end[box * out_w + pw], x_own + plan.cols)
  return y_lo, jnp.maximum(y_hi, y_lo), x_lo, jnp.maximum(x_hi, x_lo)


def forward(features, bounds, plan, tile_tables, interpret: bool):
  """Max (K, bins, C) float32 and flat index y * W + x (K, bins, C) int32 (-1: none).

  tile_tables: (spans, bin bound tables) from `kernels.roi_pool._tile_tables`.
  """
  spans, tables = tile_tables
  n, h, w, c = features.shape
  k, out_h = bounds.h_start.shape
  out_w = bounds.w_start.shape[1]
  bins = out_h * out_w
  padded_c, block = _round_up(c, _BLOCK), _BLOCK
  features = jnp.pad(features, ((0, 0), (0, max(plan.rows - h, 0)), (0, max(plan.cols - w, 0)),
                                (0, padded_c - c)))
  map_h, map_w = features.shape[1:3]
  def kernel(spans, *refs):
    tables, (source, best_out, index_out, tile, best, index, barriers) = refs[:4], refs[4:]
    box, cb = lax.axis_index("box"), lax.axis_index("channels")
    b, first_ty, num_ty, first_tx, num_tx = (spans[i * k + box] for i in range(5))

    @pl.loop(0, bins)
    def _(r):
      best[pl.ds(r, 1), :] = jnp.full((1, block), _LOWEST, jnp.float32)
      index[pl.ds(r, 1), :] = jnp.full((1, block), -1, jnp.int32)

    @pl.loop(0, num_ty * num_tx)
    def _(t):
      y_own = (first_ty + t // num_tx) * plan.rows
      x_own = (first_tx + t % num_tx) * plan.cols
      y0, x0 = jnp.minimum(y_own, map_h - plan.rows), jnp.minimum(x_own, map_w - plan.cols)
      for row in range(plan.rows):
        plgpu.copy_gmem_to_smem(source.at[b, y0 + row, pl.ds(x0, plan.cols), pl.ds(cb * block, block)],
                                tile.at[pl.ds(row * plan.cols, plan.cols)], barriers.at[row])
      for row in range(plan.rows):
        plgpu.barrier_wait(barriers.at[row])

      @pl.loop(0, bins)
      def _(r):
        y_lo, y_hi, x_lo, x_hi = _bin_in_tile(tables, box, r, out_h, out_w, y_own, x_own, plan)

        @pl.loop(y_lo, y_hi)
        def _(y):
          @pl.loop(x_lo, x_hi)
          def _(x):
            value = tile[pl.ds((y - y0) * plan.cols + (x - x0), 1), :].astype(jnp.float32)
            old, old_index = best[pl.ds(r, 1), :], index[pl.ds(r, 1), :]
            flat = y * w + x
            # torchvision: strict '>' in row-major order; an equal maximum from an earlier
            # tile keeps its smaller flat index.
            take = (value > old) | ((value == old) & (old_index >= 0) & (flat < old_index))
            best[pl.ds(r, 1), :] = jnp.where(take, value, old)
            index[pl.ds(r, 1), :] = jnp.where(take, flat, old_index)

    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(best, best_out.at[box, :, pl.ds(cb * block, block)])
    plgpu.copy_smem_to_gmem(index, index_out.at[box, :, pl.ds(cb * block, block)])
    plgpu.wait_smem_to_gmem(0)

  best, index = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((k, bins, padded_c), jnp.float32),
                jax.ShapeDtypeStruct((k, bins, padded_c), jnp.int32)),
      grid=(k, padded_c // block),
      grid_names=("box", "channels"),
      scratch_types=[plgpu.SMEM((plan.rows * plan.cols, block), features.dtype),
                     plgpu.SMEM((bins, block), jnp.float32),
                     plgpu.SMEM((bins, block), jnp.int32),
                     plgpu.Barrier(num_barriers=plan.rows)],
      interpret=_InterpretParams() if interpret else None,
  )(spans, *tables, features)
  return best[:, :, :c], index[:, :, :c]


def backward(shape, dtype, bounds, plan, tile_tables, in_image_index, grad_out, interpret: bool):
  """Feature gradient (N, H, W, C): each output's gradient added at its first maximum.

  in_image_index: (K, bins, C) int32 y * W + x of each output's maximum (-1: empty bin).
  grad_out: (K, bins, C). One program per (image, channel block, map tile) sums, in a fixed
  order, the gradients of the image's boxes whose maxima lie in the tile: deterministic,
  no atomics.
  """
  n, h, w, c = shape
  spans, tables = tile_tables
  k, bins = in_image_index.shape[:2]
  out_h, out_w = bounds.h_start.shape[1], bounds.w_start.shape[1]
  padded_c, block = _round_up(c, _BLOCK), _BLOCK
  pad = ((0, 0), (0, 0), (0, padded_c - c))
  in_image_index = jnp.pad(in_image_index, pad, constant_values=-1)
  grad_out = jnp.pad(grad_out.astype(jnp.float32), pad)
  order, image_start = _boxes_by_image(bounds.batch, n)
  tiles_y, tiles_x = plan.padded_height // plan.rows, plan.padded_width // plan.cols
  cells = plan.rows * plan.cols

  def kernel(spans, *refs):
    tables, refs = refs[:4], refs[4:]
    order, image_start, index_ref, grad_out_ref, grad_ref, acc, index, grad, barrier = refs
    image, cb = lax.axis_index("image"), lax.axis_index("channels")
    ty, tx = lax.axis_index("ty"), lax.axis_index("tx")
    y_own, x_own = ty * plan.rows, tx * plan.cols

    @pl.loop(0, cells)
    def _(cell):
      acc[pl.ds(cell, 1), :] = jnp.zeros((1, block), jnp.float32)

    @pl.loop(image_start[image], image_start[image + 1])
    def _(i):
      box = order[i]
      first_ty, num_ty, first_tx, num_tx = (spans[j * k + box] for j in range(1, 5))
      touches = ((ty >= first_ty) & (ty < first_ty + num_ty)
                 & (tx >= first_tx) & (tx < first_tx + num_tx))

      @pl.when(touches)
      def _():
        channels = pl.ds(cb * block, block)
        plgpu.copy_gmem_to_smem(index_ref.at[box, :, channels], index, barrier)
        plgpu.copy_gmem_to_smem(grad_out_ref.at[box, :, channels], grad, barrier)
        plgpu.barrier_wait(barrier)

        @pl.loop(0, bins)
        def _(r):
          y_lo, y_hi, x_lo, x_hi = _bin_in_tile(tables, box, r, out_h, out_w, y_own, x_own, plan)

          @pl.loop(y_lo, y_hi)
          def _(y):
            @pl.loop(x_lo, x_hi)
            def _(x):
              cell = pl.ds((y - y_own) * plan.cols + (x - x_own), 1)
              hit = index[pl.ds(r, 1), :] == y * w + x
              acc[cell, :] = acc[cell, :] + jnp.where(hit, grad[pl.ds(r, 1), :], 0.0)

    plgpu.commit_smem()
    for row in range(plan.rows):
      plgpu.copy_smem_to_gmem(acc.at[pl.ds(row * plan.cols, plan.cols)],
                              grad_ref.at[image, y_own + row, pl.ds(x_own, plan.cols),
                                          pl.ds(cb * block, block)])
    plgpu.wait_smem_to_gmem(0)

  grad = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((n, plan.padded_height, plan.padded_width, padded_c), jnp.float32),
      grid=(n, padded_c // block, tiles_y, tiles_x),
      grid_names=("image", "channels", "ty", "tx"),
      scratch_types=[plgpu.SMEM((cells, block), jnp.float32),
                     plgpu.SMEM((bins, block), jnp.int32),
                     plgpu.SMEM((bins, block), jnp.float32),
                     plgpu.Barrier(num_arrivals=2)],
      interpret=_InterpretParams() if interpret else None,
  )(spans, *tables, order, image_start, in_image_index, grad_out)
  return grad[:, :h, :w, :c].astype(dtype)
