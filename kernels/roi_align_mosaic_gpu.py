"""RoIAlign for Hopper GPUs in Pallas Mosaic GPU: the same tile x Kronecker-weight formulation
as the TPU kernel in `kernels/roi_align.py`, on the tensor cores (wgmma).

Forward, one program per (box, channel block): for every map tile the box's samples touch,
TMA copies the tile's rows into shared memory while the warpgroup computes the tile's weight
matrix A (bins x tile cells, the Kronecker product of the per-axis RoIAlign weights) in
registers; then acc += A @ tile on the tensor cores. Backward, one program per (image,
channel block, tile): the image's boxes in a fixed order add A^T @ grad_out to the tile, so no
two programs write the same memory and there are no atomics: the result is deterministic.

wgmma multiplies 16-bit inputs (float32 inputs would run as TF32, which misses torchvision's
float32 results by ~1e-3). bfloat16 features use one bfloat16 product; float32 features and
weights are split into bfloat16 high and low parts, x = hi + lo, and four products
(hi.hi + hi.lo + lo.hi + lo.lo) accumulate in float32: relative error ~2^-17, within float32
tolerance of torchvision's float32 kernel.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels._mosaic_gpu import (SMEM_BYTES, _InterpretParams, _iota, _mma, _parts,
                                 _smem_transforms, _zeros)
from kernels.roi_align import _box_params, _boxes_by_image, _round_up, _touches

_BINS_BLOCK = 64          # wgmma's M granularity
_CELLS_CHUNK = 64         # weights are computed this many tile cells at a time
_MAX_BINS = 256           # the float32 accumulator (bins x channel block) lives in registers


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

  weights = lax.fori_loop(0, grid, add_sample, _zeros(bin_index.shape, interpret))
  keep = (cell >= owned_from) & (cell < size) & (bin_index < n_out)
  return jnp.where(keep, weights, 0.0) / jnp.maximum(grid_f, 1.0)


def _weights(box, plan, y0, y_own, x0, x_own, transposed, interpret, first_cell):
  """Weights of tile cells [first_cell, +64): (bins, 64), or (64, bins) if transposed, float32."""
  bins = _round_up(plan.out_h * plan.out_w, _BINS_BLOCK)
  shape = (_CELLS_CHUNK, bins) if transposed else (bins, _CELLS_CHUNK)
  r = _iota(shape, 1 if transposed else 0, interpret)     # bin, row-major (ph, pw)
  j = first_cell + _iota(shape, 0 if transposed else 1, interpret)  # tile cell, row-major (y, x)
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
    for tile, part in zip(weight_tiles, _parts(a, len(weight_tiles))):
      if transposed:
        tile[chunk, :] = part
      else:
        tile[:, chunk] = part
  plgpu.commit_smem()


def gpu_block_sizes(blocks, bins):
  """Tile for the GPU kernels: shared memory holds 3 weight parts of bins x cells."""
  if bins > _BINS_BLOCK:
    return dataclasses.replace(blocks, rows=8, cols=8)
  return blocks


def check_supported(plan, channels: int, dtype) -> str | None:
  """Why the kernels cannot take a call with this plan (None: they can). Found by lowering for
  CUDA: 28 x 28 outputs (Mask R-CNN's mask targets) need 557,120 bytes of shared memory."""
  bins = _round_up(plan.out_h * plan.out_w, _BINS_BLOCK)
  if bins > _MAX_BINS:
    return (f"{plan.out_h}x{plan.out_w} outputs are more than {_MAX_BINS} bins (its float32 "
            f"accumulator lives in registers)")
  cells = plan.rows * plan.cols
  num_parts = 3 if jnp.dtype(dtype) == jnp.float32 else 1
  block = _channel_block(_round_up(channels, 64), bins, num_parts)
  # scratch of `forward` / `backward` below: tiles and weights (bfloat16 parts), the float32
  # output staging, 8-byte barriers
  forward = num_parts * 2 * (cells * block + bins * cells) + bins * block * 4 + 8 * plan.rows
  backward = num_parts * 2 * (bins * 64 + cells * bins) + cells * 64 * 4 + 8
  if max(forward, backward) > SMEM_BYTES:
    return (f"{plan.out_h}x{plan.out_w} outputs on {plan.rows}x{plan.cols} tiles need "
            f"{max(forward, backward)} bytes of shared memory, more than {SMEM_BYTES}")
  return None


def _channel_block(channels, bins, num_parts):
  # The float32 accumulator lives in registers (bins x block <= 64 x 128 per warpgroup) and
  # shared memory holds num_parts feature tiles.
  return 128 if bins <= 64 and num_parts == 1 and channels % 128 == 0 else 64


def forward(features, geometry, plan, scalar_tables, interpret: bool):
  """(K, bins, C) float32 RoIAlign outputs, bins row-major (ph, pw), padded to 64."""
  n, h, w, c = features.shape
  num_boxes = geometry.batch.shape[0]
  bins = _round_up(plan.out_h * plan.out_w, _BINS_BLOCK)
  cells = plan.rows * plan.cols
  padded_c = _round_up(c, 64)
  # TMA reads the map through its shared-memory tiling (8 columns x 128 bytes), so the width
  # is padded to a multiple of 8 (tile starts then are multiples of 8 too) and the channels to
  # a multiple of 64; maps smaller than one tile are padded to one tile. Padding gets weight 0.
  features = jnp.pad(features, ((0, 0), (0, max(plan.rows - h, 0)),
                                (0, max(plan.cols, _round_up(w, 8)) - w), (0, padded_c - c)))
  map_h, map_w = features.shape[1:3]
  num_parts = 3 if features.dtype == jnp.float32 else 1
  parts = _parts(features, num_parts)
  block = _channel_block(padded_c, bins, num_parts)
  ints, floats = scalar_tables

  def kernel(ints, floats, *refs):
    feature_parts, (out, *scratch) = refs[:len(parts)], refs[len(parts):]
    tiles, weight_tiles, out_smem, barriers = (scratch[:len(parts)], scratch[len(parts):-2],
                                               scratch[-2], scratch[-1])
    k, cb = lax.axis_index("box"), lax.axis_index("channels")
    box = _box_params(ints, floats, k, num_boxes)

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
        _mma(acc_ref, weight_tiles, tiles)

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
          [plgpu.SMEM((cells, block), bf16, transforms=_smem_transforms(bf16)) for _ in parts]
          + [plgpu.SMEM((bins, cells), bf16, transforms=_smem_transforms(bf16)) for _ in parts]
          + [plgpu.SMEM((bins, block), jnp.float32), plgpu.Barrier(num_arrivals=len(parts), num_barriers=plan.rows)]),
      interpret=_InterpretParams() if interpret else None,
  )(ints, floats, *parts)
  return out[:, :, :c]


def backward(shape, dtype, geometry, grad_out, plan, scalar_tables, interpret: bool):
  """Feature gradient (N, H, W, C) from grad_out (K, bins_pad, C)."""
  n, h, w, c = shape
  num_boxes = geometry.batch.shape[0]
  bins = _round_up(plan.out_h * plan.out_w, _BINS_BLOCK)
  cells = plan.rows * plan.cols
  padded_c = _round_up(c, 64)
  block = 64  # the accumulator is cells x block float32 in registers
  grad_out = jnp.pad(grad_out, ((0, 0), (0, bins - grad_out.shape[1]), (0, padded_c - c)))
  num_parts = 3 if dtype == jnp.float32 else 1
  parts = _parts(grad_out, num_parts)
  ints, floats = scalar_tables
  order, image_start = _boxes_by_image(geometry.batch, n)
  tiles_y, tiles_x = plan.padded_height // plan.rows, plan.padded_width // plan.cols

  def kernel(ints, floats, order, image_start, *refs):
    grad_parts, (grad_ref, *scratch) = refs[:len(parts)], refs[len(parts):]
    grad_tiles, weight_tiles, out_smem, barrier = (scratch[:len(parts)], scratch[len(parts):-2],
                                                   scratch[-2], scratch[-1])
    image, cb = lax.axis_index("image"), lax.axis_index("channels")
    ty, tx = lax.axis_index("ty"), lax.axis_index("tx")
    y0, x0 = ty * plan.rows, tx * plan.cols

    def accumulate(acc_ref):
      @pl.loop(image_start[image], image_start[image + 1])
      def _(i):
        k = order[i]
        box = _box_params(ints, floats, k, num_boxes)
        @pl.when(_touches(box, ty, tx))
        def _():
          for source, tile in zip(grad_parts, grad_tiles):
            plgpu.copy_gmem_to_smem(source.at[k, :, pl.ds(cb * block, block)], tile, barrier)
            plgpu.barrier_wait(barrier)
          _store_weights(weight_tiles, box, plan, y0, y0, x0, x0, True, interpret)
          _mma(acc_ref, weight_tiles, grad_tiles)

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
          [plgpu.SMEM((bins, block), bf16, transforms=_smem_transforms(bf16)) for _ in parts]
          + [plgpu.SMEM((cells, bins), bf16, transforms=_smem_transforms(bf16)) for _ in parts]
          + [plgpu.SMEM((cells, block), jnp.float32), plgpu.Barrier()]),
      interpret=_InterpretParams() if interpret else None,
  )(ints, floats, order, image_start, *parts)
  return grad[:, :h, :w, :c].astype(dtype)
