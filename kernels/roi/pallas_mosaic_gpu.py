"""The Pallas Mosaic GPU RoI kernels (Hopper and newer): the TPU kernels' tiling on the tensor
cores, with TMA copies and no atomics.

RoIAlign, forward: one program per (box, channel block); for every map tile the box's samples
touch, TMA copies the tile's rows into shared memory while the warpgroup computes the tile's
weight matrix A (bins x tile cells, the Kronecker product of the per-axis RoIAlign weights) in
registers; then acc += A @ tile on the tensor cores (wgmma). Backward, one program per (image,
channel block, tile): the image's boxes in a fixed order add A^T @ grad_out to the tile, so no
two programs write the same memory and there are no atomics: the result is deterministic.
wgmma multiplies 16-bit inputs (float32 inputs would run as TF32, ~1e-3 off torchvision's
float32 results): bfloat16 features use one bfloat16 product; float32 features and weights are
split into three bfloat16 parts and the six leading products accumulate in float32
(`mosaic_gpu_common.parts` / `mma`), within float32 tolerance of torchvision's float32 kernel.

RoIPool, forward: one program per (box, channel block) walks the map tiles the box's bins
cover: TMA copies a tile's rows into shared memory, then every bin scans its cells inside the
tile in row-major order, one channel vector per cell, keeping the running maximum and its flat
index in shared memory. Across tiles an equal maximum keeps the smaller flat index, so the
result is torchvision's first maximum. Backward, one program per (image, channel block, tile)
sums the gradients of the image's boxes whose maxima lie in the tile, in a fixed order.

Limits (`roi_align_check_supported`, `roi_pool_check_supported`; "auto" uses xla outside them,
an explicit "pallas_gpu" gets a ValueError naming the reason): the float32 accumulator lives in
registers (RoIAlign: at most 256 bins) and a TMA box has at most 256 rows (RoIPool); the scratch
must fit Hopper's shared memory, `mosaic_gpu_common.SMEM_BYTES` (Mask R-CNN's 28 x 28 mask
targets needed 557,120 bytes). RoIPool pads channels to 128: Mosaic rejected 64-channel rows
(every C <= 64 failed to lower). All three were found by exporting whole Mask / Fast / Faster
R-CNN training steps for CUDA (tests/detection), not by the kernel-level tests.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.common import round_up
from kernels import mosaic_gpu_common as mgpu
from kernels.roi.geometry import (LOWEST, BinBounds, BoxGeometry, Plan, box_params, boxes_by_image,
                                  scalar_tables, tile_tables, touches)

# ---------------------------------------------------------------------------------------------
# RoIAlign

_BINS_BLOCK = 64          # wgmma's M granularity
_CELLS_CHUNK = 64         # weights are computed this many tile cells at a time
_ALIGN_MAX_BINS = 256     # the float32 accumulator (bins x channel block) lives in registers


def _axis_weight(start, bin_size, grid, bin_index, cell, owned_from, size, n_out, interpret):
  """RoIAlign weight of bin `bin_index` on map row/column `cell`, elementwise over 2-D arrays.

  1/grid * sum over the bin's samples of the sample's bilinear weight on the cell (0 for
  samples outside [-1, size], cells outside [owned_from, size) and padding bins >= n_out).
  """
  bin_f = bin_index.astype(jnp.float32)
  cell_f = cell.astype(jnp.float32)
  grid_f = grid.astype(jnp.float32)

  def add_sample(i, weights):
    s = start + bin_f * bin_size + (i.astype(jnp.float32) + 0.5) * bin_size / grid_f
    valid = (s >= -1.0) & (s <= size)
    s = jnp.minimum(jnp.maximum(s, 0.0), size - 1.0)
    return weights + jnp.where(valid, jnp.maximum(1.0 - jnp.abs(s - cell_f), 0.0), 0.0)

  weights = lax.fori_loop(0, grid, add_sample, mgpu.zeros(bin_index.shape, interpret))
  keep = (cell >= owned_from) & (cell < size) & (bin_index < n_out)
  return jnp.where(keep, weights, 0.0) / jnp.maximum(grid_f, 1.0)


def _weights(box, plan, y0, y_own, x0, x_own, transposed, interpret, first_cell):
  """Weights of tile cells [first_cell, +64): (bins, 64), or (64, bins) if transposed, float32."""
  bins = round_up(plan.out_h * plan.out_w, _BINS_BLOCK)
  shape = (_CELLS_CHUNK, bins) if transposed else (bins, _CELLS_CHUNK)
  r = mgpu.iota(shape, 1 if transposed else 0, interpret)     # bin, row-major (ph, pw)
  j = first_cell + mgpu.iota(shape, 0 if transposed else 1, interpret)  # tile cell, row-major (y, x)
  ph, pw = r // plan.out_w, r % plan.out_w
  ph = jnp.where(r < plan.out_h * plan.out_w, ph, plan.out_h)  # padding bins: no weight
  wy = _axis_weight(box["y_start"], box["bin_h"], box["grid_h"], ph, y0 + j // plan.cols, y_own,
                    plan.height, plan.out_h, interpret)
  wx = _axis_weight(box["x_start"], box["bin_w"], box["grid_w"], pw, x0 + j % plan.cols, x_own,
                    plan.width, plan.out_w, interpret)
  return wy * wx


def _store_weights(weight_tiles, box, plan, y0, y_own, x0, x_own, transposed, interpret):
  """Computes the tile's weights 64 cells at a time (bounding registers) into bfloat16 parts."""
  cells = plan.rows * plan.cols
  for start in range(0, cells, _CELLS_CHUNK):
    a = _weights(box, plan, y0, y_own, x0, x_own, transposed, interpret, start)
    chunk = pl.ds(start, _CELLS_CHUNK)
    for tile, part in zip(weight_tiles, mgpu.parts(a, len(weight_tiles))):
      if transposed:
        tile[chunk, :] = part
      else:
        tile[:, chunk] = part
  plgpu.commit_smem()


def roi_align_block_sizes(blocks, bins):
  """Tile for the GPU kernels: shared memory holds 3 weight parts of bins x cells."""
  if bins > _BINS_BLOCK:
    return dataclasses.replace(blocks, rows=8, cols=8)
  return blocks


def roi_align_check_supported(plan, channels: int, dtype) -> str | None:
  """Why the kernels cannot take a call with this plan (None: they can). Found by lowering for
  CUDA: 28 x 28 outputs (Mask R-CNN's mask targets) need 557,120 bytes of shared memory."""
  bins = round_up(plan.out_h * plan.out_w, _BINS_BLOCK)
  if bins > _ALIGN_MAX_BINS:
    return (f"{plan.out_h}x{plan.out_w} outputs are more than {_ALIGN_MAX_BINS} bins (its float32 "
            f"accumulator lives in registers)")
  cells = plan.rows * plan.cols
  num_parts = 3 if jnp.dtype(dtype) == jnp.float32 else 1
  block = _channel_block(round_up(channels, 64), bins, num_parts)
  # scratch of `roi_align_forward` / `roi_align_backward` below: tiles and weights (bfloat16
  # parts), the float32 output staging, 8-byte barriers
  forward = num_parts * 2 * (cells * block + bins * cells) + bins * block * 4 + 8 * plan.rows
  backward = num_parts * 2 * (bins * 64 + cells * bins) + cells * 64 * 4 + 8
  if max(forward, backward) > mgpu.SMEM_BYTES:
    return (f"{plan.out_h}x{plan.out_w} outputs on {plan.rows}x{plan.cols} tiles need "
            f"{max(forward, backward)} bytes of shared memory, more than {mgpu.SMEM_BYTES}")
  return None


def _channel_block(channels, bins, num_parts):
  # The float32 accumulator lives in registers (bins x block <= 64 x 128 per warpgroup) and
  # shared memory holds num_parts feature tiles.
  return 128 if bins <= 64 and num_parts == 1 and channels % 128 == 0 else 64


def roi_align_forward(features, geometry: BoxGeometry, plan: Plan, interpret: bool):
  """(K, bins, C) float32 RoIAlign outputs, bins row-major (ph, pw), padded to 64."""
  n, h, w, c = features.shape
  num_boxes = geometry.batch.shape[0]
  bins = round_up(plan.out_h * plan.out_w, _BINS_BLOCK)
  cells = plan.rows * plan.cols
  padded_c = round_up(c, 64)
  # TMA reads the map through its shared-memory tiling (8 columns x 128 bytes), so the width
  # is padded to a multiple of 8 (tile starts then are multiples of 8 too) and the channels to
  # a multiple of 64; maps smaller than one tile are padded to one tile. Padding gets weight 0.
  features = jnp.pad(features, ((0, 0), (0, max(plan.rows - h, 0)),
                                (0, max(plan.cols, round_up(w, 8)) - w), (0, padded_c - c)))
  map_h, map_w = features.shape[1:3]
  num_parts = 3 if features.dtype == jnp.float32 else 1
  operands = mgpu.parts(features, num_parts)
  block = _channel_block(padded_c, bins, num_parts)
  ints, floats = scalar_tables(geometry, plan)

  def kernel(ints, floats, *refs):
    feature_parts, (out, *scratch) = refs[:len(operands)], refs[len(operands):]
    tiles, weight_tiles, out_smem, barriers = (scratch[:len(operands)], scratch[len(operands):-2],
                                               scratch[-2], scratch[-1])
    k, cb = lax.axis_index("box"), lax.axis_index("channels")
    box = box_params(ints, floats, k, num_boxes)

    def accumulate(acc_ref):
      @pl.loop(0, box["nty"] * box["ntx"])
      def _(t):
        ty, tx = box["ty0"] + t // box["ntx"], box["tx0"] + t % box["ntx"]
        y_own, x_own = ty * plan.rows, tx * plan.cols
        y0 = jnp.minimum(y_own, map_h - plan.rows)
        x0 = jnp.minimum(x_own, map_w - plan.cols)
        # One TMA copy per tile row and part, a barrier per row; they land while A is computed.
        for part, (source, tile) in enumerate(zip(feature_parts, tiles)):
          for r in range(plan.rows):
            plgpu.copy_gmem_to_smem(
                source.at[box["batch"], y0 + r, pl.ds(x0, plan.cols), pl.ds(cb * block, block)],
                tile.at[pl.ds(r * plan.cols, plan.cols)], barriers.at[r])
        _store_weights(weight_tiles, box, plan, y0, y_own, x0, x_own, False, interpret)
        for r in range(plan.rows):
          plgpu.barrier_wait(barriers.at[r])
        mgpu.mma(acc_ref, weight_tiles, tiles)

      out_smem[...] = acc_ref[...]

    pl.run_scoped(accumulate, plgpu.ACC((bins, block), jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out.at[k, :, pl.ds(cb * block, block)])
    plgpu.wait_smem_to_gmem(0)

  bf16 = jnp.bfloat16
  out = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((num_boxes, bins, padded_c), jnp.float32),
      grid=(num_boxes, padded_c // block),
      grid_names=("box", "channels"),
      scratch_types=(
          [plgpu.SMEM((cells, block), bf16, transforms=mgpu.smem_transforms(bf16)) for _ in operands]
          + [plgpu.SMEM((bins, cells), bf16, transforms=mgpu.smem_transforms(bf16)) for _ in operands]
          + [plgpu.SMEM((bins, block), jnp.float32), plgpu.Barrier(num_arrivals=len(operands), num_barriers=plan.rows)]),
      interpret=mgpu.InterpretParams() if interpret else None,
  )(ints, floats, *operands)
  return out[:, :, :c]


def roi_align_backward(shape, dtype, geometry: BoxGeometry, grad_out, plan: Plan, interpret: bool):
  """Feature gradient (N, H, W, C) from grad_out (K, bins_pad, C)."""
  n, h, w, c = shape
  num_boxes = geometry.batch.shape[0]
  bins = round_up(plan.out_h * plan.out_w, _BINS_BLOCK)
  cells = plan.rows * plan.cols
  padded_c = round_up(c, 64)
  block = 64  # the accumulator is cells x block float32 in registers
  grad_out = jnp.pad(grad_out, ((0, 0), (0, bins - grad_out.shape[1]), (0, padded_c - c)))
  num_parts = 3 if dtype == jnp.float32 else 1
  operands = mgpu.parts(grad_out, num_parts)
  ints, floats = scalar_tables(geometry, plan)
  order, image_start = boxes_by_image(geometry.batch, n)
  tiles_y, tiles_x = plan.padded_height // plan.rows, plan.padded_width // plan.cols

  def kernel(ints, floats, order, image_start, *refs):
    grad_parts, (grad_ref, *scratch) = refs[:len(operands)], refs[len(operands):]
    grad_tiles, weight_tiles, out_smem, barrier = (scratch[:len(operands)], scratch[len(operands):-2],
                                                   scratch[-2], scratch[-1])
    image, cb = lax.axis_index("image"), lax.axis_index("channels")
    ty, tx = lax.axis_index("ty"), lax.axis_index("tx")
    y0, x0 = ty * plan.rows, tx * plan.cols

    def accumulate(acc_ref):
      @pl.loop(image_start[image], image_start[image + 1])
      def _(i):
        k = order[i]
        box = box_params(ints, floats, k, num_boxes)
        @pl.when(touches(box, ty, tx))
        def _():
          for source, tile in zip(grad_parts, grad_tiles):
            plgpu.copy_gmem_to_smem(source.at[k, :, pl.ds(cb * block, block)], tile, barrier)
            plgpu.barrier_wait(barrier)
          _store_weights(weight_tiles, box, plan, y0, y0, x0, x0, True, interpret)
          mgpu.mma(acc_ref, weight_tiles, grad_tiles)

      out_smem[...] = acc_ref[...]

    pl.run_scoped(accumulate, plgpu.ACC((cells, block), jnp.float32))
    plgpu.commit_smem()
    for r in range(plan.rows):
      plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(r * plan.cols, plan.cols)],
                              grad_ref.at[image, y0 + r, pl.ds(x0, plan.cols), pl.ds(cb * block, block)])
    plgpu.wait_smem_to_gmem(0)

  bf16 = jnp.bfloat16
  grad = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((n, plan.padded_height, plan.padded_width, padded_c), jnp.float32),
      grid=(n, padded_c // block, tiles_y, tiles_x),
      grid_names=("image", "channels", "ty", "tx"),
      scratch_types=(
          [plgpu.SMEM((bins, block), bf16, transforms=mgpu.smem_transforms(bf16)) for _ in operands]
          + [plgpu.SMEM((cells, bins), bf16, transforms=mgpu.smem_transforms(bf16)) for _ in operands]
          + [plgpu.SMEM((cells, block), jnp.float32), plgpu.Barrier()]),
      interpret=mgpu.InterpretParams() if interpret else None,
  )(ints, floats, order, image_start, *operands)
  return grad[:, :h, :w, :c].astype(dtype)


# ---------------------------------------------------------------------------------------------
# RoIPool

_POOL_MAX_BINS = 256  # a TMA box has at most 256 rows
_POOL_BLOCK = 128     # channels per program: Mosaic GPU copies rows of at least 128 float32


def roi_pool_check_supported(plan, dtype) -> str | None:
  """Why the kernels cannot take a call with this plan (None: they can): at most 256 bins, and
  the (bins, 128) maxima, indices and gradients plus a map tile must fit in shared memory
  (found by lowering for CUDA: 10 x 10 bins on 16 x 16 tiles need 233,600 bytes)."""
  bins, cells = plan.out_h * plan.out_w, plan.rows * plan.cols
  if bins > _POOL_MAX_BINS:
    return f"{plan.out_h}x{plan.out_w} outputs are more than {_POOL_MAX_BINS} bins"
  # scratch of `roi_pool_forward` / `roi_pool_backward` below, with their 8-byte barriers
  forward = cells * _POOL_BLOCK * jnp.dtype(dtype).itemsize + 2 * bins * _POOL_BLOCK * 4 + 8 * plan.rows
  backward = cells * _POOL_BLOCK * 4 + 2 * bins * _POOL_BLOCK * 4 + 8
  if max(forward, backward) > mgpu.SMEM_BYTES:
    return (f"{plan.out_h}x{plan.out_w} outputs on {plan.rows}x{plan.cols} tiles need "
            f"{max(forward, backward)} bytes of shared memory, more than {mgpu.SMEM_BYTES}")
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


def roi_pool_forward(features, bounds: BinBounds, plan: Plan, interpret: bool):
  """Max (K, bins, C) float32 and flat index y * W + x (K, bins, C) int32 (-1: none)."""
  spans, tables = tile_tables(bounds, plan)
  n, h, w, c = features.shape
  k, out_h = bounds.h_start.shape
  out_w = bounds.w_start.shape[1]
  bins = out_h * out_w
  padded_c, block = round_up(c, _POOL_BLOCK), _POOL_BLOCK
  features = jnp.pad(features, ((0, 0), (0, max(plan.rows - h, 0)), (0, max(plan.cols - w, 0)),
                                (0, padded_c - c)))
  map_h, map_w = features.shape[1:3]
  def kernel(spans, *refs):
    tables, (source, best_out, index_out, tile, best, index, barriers) = refs[:4], refs[4:]
    box, cb = lax.axis_index("box"), lax.axis_index("channels")
    b, first_ty, num_ty, first_tx, num_tx = (spans[i * k + box] for i in range(5))

    @pl.loop(0, bins)
    def _(r):
      best[pl.ds(r, 1), :] = jnp.full((1, block), LOWEST, jnp.float32)
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
      interpret=mgpu.InterpretParams() if interpret else None,
  )(spans, *tables, features)
  return best[:, :, :c], index[:, :, :c]


def roi_pool_backward(shape, dtype, bounds: BinBounds, plan: Plan, in_image_index, grad_out,
                      interpret: bool):
  """Feature gradient (N, H, W, C): each output's gradient added at its first maximum.

  in_image_index: (K, bins, C) int32 y * W + x of each output's maximum (-1: empty bin).
  grad_out: (K, bins, C). One program per (image, channel block, map tile) sums, in a fixed
  order, the gradients of the image's boxes whose maxima lie in the tile: deterministic,
  no atomics.
  """
  n, h, w, c = shape
  spans, tables = tile_tables(bounds, plan)
  k, bins = in_image_index.shape[:2]
  out_h, out_w = bounds.h_start.shape[1], bounds.w_start.shape[1]
  padded_c, block = round_up(c, _POOL_BLOCK), _POOL_BLOCK
  pad = ((0, 0), (0, 0), (0, padded_c - c))
  in_image_index = jnp.pad(in_image_index, pad, constant_values=-1)
  grad_out = jnp.pad(grad_out.astype(jnp.float32), pad)
  order, image_start = boxes_by_image(bounds.batch, n)
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
      maxima_may_lie_here = ((ty >= first_ty) & (ty < first_ty + num_ty)
                             & (tx >= first_tx) & (tx < first_tx + num_tx))

      @pl.when(maxima_may_lie_here)
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
      interpret=mgpu.InterpretParams() if interpret else None,
  )(spans, *tables, order, image_start, in_image_index, grad_out)
  return grad[:, :h, :w, :c].astype(dtype)
