"""RoIAlign (He et al. 2017, Mask R-CNN): bilinear sampling of features inside boxes.

The semantics are torchvision's C++/CUDA `roi_align` kernels (csrc/ops/cpu/roi_align_kernel.cpp),
channels-last. For box k with batch index b, output bin (ph, pw) averages grid_h x grid_w
bilinear samples at

    y = y_start + ph * bin_h + (iy + 0.5) * bin_h / grid_h      (x likewise)

where y_start = y1 * spatial_scale - 0.5 (aligned) or y1 * spatial_scale (not aligned),
bin_h = roi_h / out_h, roi_h = (y2 - y1) * spatial_scale (at least 1 when not aligned), and
grid_h = sampling_ratio, or ceil(roi_h / out_h) when sampling_ratio <= 0 (adaptive). A
sample outside [-1, H] x [-1, W] contributes 0; inside, its coordinates clamp to [0, H - 1]
x [0, W - 1]; the sum is divided by max(grid_h * grid_w, 1).

Both the sample grid and the validity rule are products of a y part and an x part, so a box's
output is a separable weighting of the map: out[k] = Wy[k] @ F[b] @ Wx[k]^T per channel, with

    Wy[k][ph, y] = 1/grid_h * sum_iy [y sample valid] * max(0, 1 - |clip(y_sample, 0, H-1) - y|)

The XLA version gathers the four bilinear taps of every sample (memory K x out_h x out_w x C
per sample); the Pallas versions walk the map tiles a box touches and contract each tile with
the Kronecker product of Wy and Wx on the matrix unit. Gradients flow to the features only;
every backward pass is deterministic.
"""

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import _common


class BoxGeometry(NamedTuple):
  """Per-box sampling geometry in feature-map cells; every field has shape (K,)."""
  batch: jax.Array       # int32 image index, clipped to [0, N - 1]
  y_start: jax.Array     # float32 first bin's top edge
  bin_h: jax.Array       # float32 bin height (negative for a reversed aligned box)
  grid_h: jax.Array      # int32 samples per bin along y (<= 0: no samples)
  x_start: jax.Array
  bin_w: jax.Array
  grid_w: jax.Array


def box_geometry(boxes, box_indices, num_images, output_size, spatial_scale, sampling_ratio,
                 aligned, active=None) -> BoxGeometry:
  """torchvision's per-box arithmetic, in float32. `active` (K,) bool: False gives no samples.

  spatial_scale: a float, or a (K,) float32 array (each box's own map's scale).
  """
  out_h, out_w = output_size
  boxes = lax.stop_gradient(boxes).astype(jnp.float32)
  offset = 0.5 if aligned else 0.0
  spatial_scale = jnp.asarray(spatial_scale, jnp.float32)   # a float, or (K,) one per box
  x1, y1, x2, y2 = (boxes[:, i] * spatial_scale - offset for i in range(4))
  roi_w, roi_h = x2 - x1, y2 - y1
  if not aligned:  # torchvision forces malformed RoIs to 1x1 in the legacy mode
    roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
  bin_h, bin_w = _common.divide(roi_h, out_h), _common.divide(roi_w, out_w)
  if sampling_ratio > 0:
    grid_h = jnp.full(boxes.shape[:1], sampling_ratio, jnp.int32)
    grid_w = grid_h
  else:
    grid_h = jnp.ceil(bin_h).astype(jnp.int32)
    grid_w = jnp.ceil(bin_w).astype(jnp.int32)
  if active is not None:
    grid_h = jnp.where(active, grid_h, 0)
    grid_w = jnp.where(active, grid_w, 0)
  batch = jnp.clip(box_indices.astype(jnp.int32), 0, num_images - 1)
  return BoxGeometry(batch, y1, bin_h, grid_h, x1, bin_w, grid_w)


def _sample_positions(start, bin_size, grid, index, n_out):
  """Sample coordinates (K, n_out) of sample number `index` (K,) in each bin, torchvision's order."""
  p = jnp.arange(n_out, dtype=jnp.float32)
  return (start[:, None] + p * bin_size[:, None]
          + (index.astype(jnp.float32) + 0.5)[:, None] * bin_size[:, None]
          / grid[:, None].astype(jnp.float32))


def _bilinear_taps(start, bin_size, grid, index, active, n_out, size):
  """Low/high cell indices (K, n_out) int32 and their weights for sample `index` (K,) of every bin.

  size: the map's extent on this axis, an int or (K,) int32 per box. Samples outside
  [-1, size] and boxes with active False get weight 0.
  """
  size = size[:, None] if jnp.ndim(size) else size
  s = _sample_positions(start, bin_size, grid, index, n_out)
  valid = active[:, None] & (s >= -1.0) & (s <= size)
  s = jnp.clip(s, 0.0, size - 1.0)
  low = jnp.floor(s).astype(jnp.int32)
  high = jnp.minimum(low + 1, size - 1)
  frac = s - low.astype(jnp.float32)
  return low, high, jnp.where(valid, 1.0 - frac, 0.0), jnp.where(valid, frac, 0.0)


class _FlatMaps(NamedTuple):
  """Where each box's map lies in the flattened maps (M, C)."""
  base: jax.Array          # (K,) int32 flat row of the box's map's cell (0, 0)
  height: jax.Array | int  # (K,) int32, or one int for all boxes
  width: jax.Array | int


def _single_map(geometry: BoxGeometry, shape) -> _FlatMaps:
  """The (N, H, W, C) map flattened to (N * H * W, C): box k's map is image batch[k]."""
  _, h, w, _ = shape
  return _FlatMaps(geometry.batch * (h * w), h, w)


def _sample_loop(geometry, maps: _FlatMaps, out_h, out_w, body, init):
  """Runs body(taps, carry) over sample number t < max_k grid_h[k] * grid_w[k].

  Sample t of box k is (iy, ix) = divmod(t, grid_w[k]): each box visits its own grid in
  torchvision's row-major order, and the loop runs as long as the box with the most samples
  needs (not the product of the largest grid_h and the largest grid_w).
  taps: list of four (flat_index (K, out_h, out_w), weight (K, out_h, out_w)) pairs into the
  flattened maps (M, C), weights already divided by the sample count.
  """
  g = geometry
  samples = jnp.where((g.grid_h > 0) & (g.grid_w > 0), g.grid_h * g.grid_w, 0)
  grid_w = jnp.maximum(g.grid_w, 1)
  count = jnp.maximum(g.grid_h * g.grid_w, 1).astype(jnp.float32)[:, None, None]

  def step(t, carry):
    active = t < samples
    iy, ix = t // grid_w, t % grid_w
    y_lo, y_hi, wy_lo, wy_hi = _bilinear_taps(g.y_start, g.bin_h, g.grid_h, iy, active, out_h,
                                              maps.height)
    x_lo, x_hi, wx_lo, wx_hi = _bilinear_taps(g.x_start, g.bin_w, g.grid_w, ix, active, out_w,
                                              maps.width)
    base = maps.base[:, None, None]
    width = maps.width[:, None, None] if jnp.ndim(maps.width) else maps.width
    taps = [(base + y[:, :, None] * width + x[:, None, :], (wy[:, :, None] * wx[:, None, :]) / count)
            for y, wy in ((y_lo, wy_lo), (y_hi, wy_hi)) for x, wx in ((x_lo, wx_lo), (x_hi, wx_hi))]
    return body(taps, carry)

  return lax.fori_loop(0, jnp.max(samples, initial=0), step, init)


def _xla_flat_forward(flat, geometry, maps, out_h, out_w):
  """(K, out_h, out_w, C) float32 from the flattened maps (M, C)."""
  def accumulate(taps, acc):
    for index, weight in taps:
      acc = acc + weight[..., None] * flat[index].astype(jnp.float32)
    return acc

  k, c = geometry.batch.shape[0], flat.shape[1]
  return _sample_loop(geometry, maps, out_h, out_w, accumulate,
                      jnp.zeros((k, out_h, out_w, c), jnp.float32))


def _xla_flat_backward(num_rows, geometry, maps, grad_out):
  """Gradient (M, C) float32 of the flattened maps: each sample's weights scatter grad_out back.

  A scatter-add; deterministic on CPU and TPU, and on GPU under XLA's deterministic-ops flag.
  """
  c = grad_out.shape[-1]
  grad_out = grad_out.astype(jnp.float32)

  def scatter(taps, grad):
    for index, weight in taps:
      grad = grad.at[index.reshape(-1)].add((weight[..., None] * grad_out).reshape(-1, c))
    return grad

  out_h, out_w = grad_out.shape[1:3]
  return _sample_loop(geometry, maps, out_h, out_w, scatter, jnp.zeros((num_rows, c), jnp.float32))


def _xla_forward(features, geometry, out_h, out_w):
  n, h, w, c = features.shape
  out = _xla_flat_forward(features.reshape(n * h * w, c), geometry,
                          _single_map(geometry, features.shape), out_h, out_w)
  return out.astype(features.dtype)


def _xla_backward(shape, dtype, geometry, grad_out):
  """Feature gradient (N, H, W, C)."""
  n, h, w, _ = shape
  grad = _xla_flat_backward(n * h * w, geometry, _single_map(geometry, shape), grad_out)
  return grad.reshape(shape).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Pallas (Mosaic TPU): per box, walk the map tiles its samples touch; out += A_tile @ F_tile with
# A_tile = kron(Wy, Wx) restricted to the tile, built from small per-axis weights with one-hot
# expansions on the matrix unit.


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile of the feature map a kernel step holds: rows, columns, channels (multiples of 8/128)."""
  rows: int = 16
  cols: int = 16
  channels: int = 128


def _round_up(value, multiple):
  return -(-value // multiple) * multiple


class _Plan(NamedTuple):
  """Static shapes of one Pallas RoIAlign call."""
  height: int          # true map size
  width: int
  rows: int            # tile
  cols: int
  channels: int
  padded_height: int   # map padded to whole tiles (the backward's gradient)
  padded_width: int
  out_h: int
  out_w: int
  out_h_pad: int       # out_h rounded up to 8 (sublanes)
  out_w_pad: int
  bins_pad: int        # out_h * out_w rounded up to 8


def _plan(shape, out_h, out_w, blocks: BlockSizes) -> _Plan:
  _, h, w, c = shape
  rows, cols = min(blocks.rows, _round_up(h, 8)), min(blocks.cols, _round_up(w, 8))
  channels = blocks.channels if c % blocks.channels == 0 else c
  return _Plan(h, w, rows, cols, channels, _round_up(h, rows), _round_up(w, cols), out_h, out_w,
               _round_up(out_h, 8), _round_up(out_w, 8), _round_up(out_h * out_w, 8))


def _tile_span(start, bin_size, n_out, grid, size, block):
  """First tile index and number of tiles (K,) int32 that a box's samples can touch on one axis."""
  end = start + bin_size * n_out
  low = jnp.floor(jnp.clip(jnp.minimum(start, end), 0.0, size - 1.0)).astype(jnp.int32)
  high = jnp.minimum(jnp.floor(jnp.clip(jnp.maximum(start, end), 0.0, size - 1.0)).astype(jnp.int32) + 1,
                     size - 1)
  first = low // block
  return first, jnp.where(grid > 0, high // block - first + 1, 0)


def _scalar_tables(geometry: BoxGeometry, plan: _Plan):
  """Per-box scalars for SMEM, flattened: ints (8K,) and floats (4K,) float32."""
  g = geometry
  ty0, nty = _tile_span(g.y_start, g.bin_h, plan.out_h, g.grid_h, plan.height, plan.rows)
  tx0, ntx = _tile_span(g.x_start, g.bin_w, plan.out_w, g.grid_w, plan.width, plan.cols)
  nty, ntx = jnp.where(ntx > 0, nty, 0), jnp.where(nty > 0, ntx, 0)
  ints = jnp.concatenate([g.batch, g.grid_h, g.grid_w, ty0, nty, tx0, ntx, jnp.zeros_like(ty0)])
  floats = jnp.concatenate([g.y_start, g.bin_h, g.x_start, g.bin_w])
  return ints.astype(jnp.int32), floats.astype(jnp.float32)


def _one_hot(rows, cols, row_of, col_of):
  """(rows, cols) float32 matrix with 1 where row_of(i) == col_of(j)."""
  i = lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
  j = lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
  return (row_of(i) == col_of(j)).astype(jnp.float32)


def _expansions(plan: _Plan):
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


def _box_params(ints, floats, k, num_boxes):
  """Box k's scalars from the SMEM/GMEM tables of `_scalar_tables`, by name."""
  names = ("batch", "grid_h", "grid_w", "ty0", "nty", "tx0", "ntx")
  params = {name: ints[i * num_boxes + k] for i, name in enumerate(names)}
  for i, name in enumerate(("y_start", "bin_h", "x_start", "bin_w")):
    params[name] = floats[i * num_boxes + k]
  return params


def _touches(box, ty, tx):
  """Whether map tile (ty, tx) is among the tiles the box's samples touch."""
  return ((ty >= box["ty0"]) & (ty < box["ty0"] + box["nty"])
          & (tx >= box["tx0"]) & (tx < box["tx0"] + box["ntx"]))


def _boxes_by_image(batch, num_images):
  """Box ids sorted by image (stable: a fixed order) and where each image's run starts:
  order (K,), image_start (N + 1,) int32. The backward kernels loop over one image's boxes."""
  order = jnp.argsort(batch, stable=True).astype(jnp.int32)
  image_start = jnp.searchsorted(batch[order], jnp.arange(num_images + 1), side="left")
  return order, image_start.astype(jnp.int32)


def _tpu_forward_kernel(ints, floats, e_p, e_q, e_y, e_x, features, out_ref, tile, acc, sem, *,
                        plan: _Plan, num_boxes: int):
  k, c = pl.program_id(0), pl.program_id(1)
  box = _box_params(ints, floats, k, num_boxes)
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


def _tpu_forward(features, geometry, plan: _Plan, interpret: bool):
  """(K, bins_pad, C) RoIAlign outputs, bins in row-major (ph, pw) order."""
  n, h, w, c = features.shape
  # A map smaller than one tile is padded once; padded cells get weight 0 (rows >= H).
  features = jnp.pad(features, ((0, 0), (0, max(plan.rows - h, 0)), (0, max(plan.cols - w, 0)), (0, 0)))
  num_boxes = geometry.batch.shape[0]
  ints, floats = _scalar_tables(geometry, plan)
  e_p, e_q, e_y, e_x = _expansions(plan)
  full = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)
  return pl.pallas_call(
      functools.partial(_tpu_forward_kernel, plan=plan, num_boxes=num_boxes),
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


def _tpu_backward_kernel(ints, floats, order, image_start, e_pt, e_qt, e_yt, e_xt, grad_out,
                         grad_ref, grad_tile, acc, sem, *, plan: _Plan, num_boxes: int):
  n, c, ty, tx = (pl.program_id(i) for i in range(4))
  y0, x0 = ty * plan.rows, tx * plan.cols
  acc[...] = jnp.zeros_like(acc)

  # The boxes of image n in a fixed order, each adding its share to this tile: a gather
  # formulation, so no two programs write the same tile and no atomics are needed.
  @pl.loop(image_start[n], image_start[n + 1])
  def _(j):
    k = order[j]
    box = _box_params(ints, floats, k, num_boxes)
    @pl.when(_touches(box, ty, tx))
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


def _tpu_backward(shape, dtype, geometry, grad_out, plan: _Plan, interpret: bool):
  """Feature gradient (N, H, W, C) from grad_out (K, bins_pad, C)."""
  n, h, w, c = shape
  num_boxes = geometry.batch.shape[0]
  ints, floats = _scalar_tables(geometry, plan)
  order, image_start = _boxes_by_image(geometry.batch, n)
  e_p, e_q, e_y, e_x = _expansions(plan)
  e_pt, e_qt, e_yt, e_xt = e_p.T, e_q.T, e_y.T, e_x.T
  full = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)
  tiles = (plan.padded_height // plan.rows, plan.padded_width // plan.cols)
  grad = pl.pallas_call(
      functools.partial(_tpu_backward_kernel, plan=plan, num_boxes=num_boxes),
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
# Dispatch, batching and differentiation.


_IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_gpu")


class _Static(NamedTuple):
  shape: tuple[int, int, int, int]   # features (N, H, W, C)
  dtype: jnp.dtype
  out_h: int
  out_w: int
  implementation: str                # one of _IMPLEMENTATIONS
  blocks: BlockSizes


def _gpu_plan(static: _Static) -> _Plan:
  from kernels import roi_align_mosaic_gpu
  bins = static.out_h * static.out_w
  return _plan(static.shape, static.out_h, static.out_w,
               roi_align_mosaic_gpu.gpu_block_sizes(static.blocks, bins))


def _unless_gpu_cannot(requested, implementation, shapes, dtype, out_h, out_w, blocks, op) -> str:
  """"xla" instead of an "auto"-chosen "pallas_gpu" the Mosaic GPU kernels cannot take (their
  limits: roi_align_mosaic_gpu.check_supported); ValueError for an explicit "pallas_gpu"."""
  if implementation != "pallas_gpu":
    return implementation
  from kernels import roi_align_mosaic_gpu
  for shape in shapes:
    plan = _gpu_plan(_Static(tuple(shape), jnp.dtype(dtype), out_h, out_w, implementation, blocks))
    reason = roi_align_mosaic_gpu.check_supported(plan, shape[-1], dtype)
    implementation = _common.unless_unsupported(requested, implementation, reason, op)
  return implementation


def _forward_unbatched(static: _Static, features, geometry):
  if static.implementation == "xla":
    return _xla_forward(features, geometry, static.out_h, static.out_w)
  plan = _plan(static.shape, static.out_h, static.out_w, static.blocks)
  if static.implementation == "pallas_tpu":
    out = _tpu_forward(features, geometry, plan, _common.interpret("pallas_tpu"))
  else:
    from kernels import roi_align_mosaic_gpu  # imports this module's helpers
    plan = _gpu_plan(static)
    out = roi_align_mosaic_gpu.forward(features, geometry, plan, _scalar_tables(geometry, plan),
                                       _common.interpret("pallas_gpu")).astype(features.dtype)
  m = static.out_h * static.out_w
  return out[:, :m].reshape(-1, static.out_h, static.out_w, static.shape[3])


def _backward_unbatched(static: _Static, geometry, grad_out):
  if static.implementation == "xla":
    return _xla_backward(static.shape, static.dtype, geometry, grad_out)
  plan = _plan(static.shape, static.out_h, static.out_w, static.blocks)
  k, _, _, c = grad_out.shape
  grad_out = grad_out.astype(static.dtype).reshape(k, -1, c)
  grad_out = jnp.pad(grad_out, ((0, 0), (0, plan.bins_pad - grad_out.shape[1]), (0, 0)))
  if static.implementation == "pallas_tpu":
    return _tpu_backward(static.shape, static.dtype, geometry, grad_out, plan,
                         _common.interpret("pallas_tpu"))
  from kernels import roi_align_mosaic_gpu
  plan = _gpu_plan(static)
  return roi_align_mosaic_gpu.backward(static.shape, static.dtype, geometry, grad_out, plan,
                                       _scalar_tables(geometry, plan), _common.interpret("pallas_gpu"))


def _fold_batch(axis_size, features_batched, geometry, geometry_batched, num_images):
  """Folds a vmapped batch into the image axis: geometry (B, K) -> (B*K,) with shifted batch.

  geometry_batched: a BoxGeometry of bools, which fields carry the mapped axis.
  """
  geometry = jax.tree.map(
      lambda a, batched: a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape),
      geometry, geometry_batched)
  if features_batched:
    shift = (jnp.arange(axis_size, dtype=jnp.int32) * num_images)[:, None]
    geometry = geometry._replace(batch=geometry.batch + shift)
  return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), geometry)


def _forward(static: _Static, features, geometry):
  """Forward that vmaps by folding the mapped axis into images and boxes (one kernel call)."""

  @jax.custom_batching.custom_vmap
  def run(features, geometry):
    return _forward_unbatched(static, features, geometry)

  @run.def_vmap
  def _(axis_size, in_batched, features, geometry):
    features_batched, geometry_batched = in_batched
    # Boxes only: one call with every box. Features too: the images of all maps, one call.
    features_b = features.reshape((-1,) + features.shape[2:]) if features_batched else features
    geometry = _fold_batch(axis_size, features_batched, geometry, geometry_batched, static.shape[0])
    inner = static._replace(shape=features_b.shape)
    out = _forward(inner, features_b, geometry)
    return out.reshape((axis_size, -1) + out.shape[1:]), True

  return run(features, geometry)


def _backward(static: _Static, geometry, grad_out):
  @jax.custom_batching.custom_vmap
  def run(geometry, grad_out):
    return _backward_unbatched(static, geometry, grad_out)

  @run.def_vmap
  def _(axis_size, in_batched, geometry, grad_out):
    geometry_batched, grad_batched = in_batched
    if not grad_batched:
      grad_out = jnp.broadcast_to(grad_out, (axis_size,) + grad_out.shape)
    n = static.shape[0]
    geometry = _fold_batch(axis_size, True, geometry, geometry_batched, n)
    inner = static._replace(shape=(axis_size * n,) + static.shape[1:])
    grad = _backward(inner, geometry, grad_out.reshape((-1,) + grad_out.shape[2:]))
    return grad.reshape((axis_size, n) + grad.shape[1:]), True

  return run(geometry, grad_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _roi_align(static: _Static, features, geometry):
  return _forward(static, features, geometry)


def _roi_align_fwd(static, features, geometry):
  return _forward(static, features, geometry), geometry


def _roi_align_bwd(static, geometry, grad_out):
  grad = _backward(static, geometry, grad_out)
  return grad, jax.tree.map(jnp.zeros_like, geometry)


_roi_align.defvjp(_roi_align_fwd, _roi_align_bwd)


def roi_align(features: jax.Array, boxes: jax.Array, box_indices: jax.Array,
              output_size: int | Sequence[int], *, spatial_scale: float = 1.0,
              sampling_ratio: int = 0, aligned: bool = True, implementation: str = "auto",
              block_sizes: BlockSizes = BlockSizes(), active: jax.Array | None = None) -> jax.Array:
  """RoIAlign, torchvision's kernels channels-last; defaults are detectron2's ROIAlignV2.

  Args:
    features: (N, H, W, C) float32 or bfloat16 feature maps.
    boxes: (K, 4) float (x1, y1, x2, y2) in input-image pixels.
    box_indices: (K,) int32 image of each box, in [0, N).
    output_size: out_h = out_w, or (out_h, out_w).
    spatial_scale: feature cells per input pixel (1 / stride).
    sampling_ratio: samples per bin along each axis; <= 0 means ceil(roi_size / output_size).
    aligned: shift boxes by -0.5 cell (pixel-centre model, ROIAlignV2); False is the
      Mask R-CNN paper's original, which also forces boxes to at least 1x1 cell.
    implementation: "auto", "xla", "pallas_gpu" (Mosaic GPU, Hopper and newer; outputs of at
      most 256 bins that fit its shared memory, roi_align_mosaic_gpu.check_supported: "auto"
      uses xla for the others, e.g. Mask R-CNN's 28 x 28 mask targets) or "pallas_tpu".
    block_sizes: the Pallas kernels' map tile.
    active: optional (K,) bool; inactive boxes pool nothing (output 0) and cost nothing in the
      Pallas kernels.

  Returns:
    (K, out_h, out_w, C) in the features' dtype, accumulated in float32. Differentiable with
    respect to `features` (deterministic backward); boxes get no gradient.
  """
  features, boxes, box_indices = jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(box_indices)
  _common.check_box_arguments(features, boxes, box_indices, "roi_align")
  out_h, out_w = _common.pair(output_size, "roi_align: output_size")
  if not isinstance(sampling_ratio, int):
    raise ValueError(f"roi_align: sampling_ratio must be an int (<= 0 for adaptive), got {sampling_ratio!r}.")
  requested = implementation
  implementation = _common.resolve_implementation(implementation, "roi_align", _IMPLEMENTATIONS)
  implementation = _unless_gpu_cannot(requested, implementation, [features.shape], features.dtype,
                                      out_h, out_w, block_sizes, "roi_align")
  geometry = box_geometry(boxes, box_indices, features.shape[0], (out_h, out_w), spatial_scale,
                          sampling_ratio, bool(aligned), active)
  static = _Static(tuple(features.shape), jnp.dtype(features.dtype), out_h, out_w, implementation,
                   block_sizes)
  return _roi_align(static, features, geometry)


def fpn_levels(boxes, min_level, max_level, canonical_box_size=224, canonical_level=4):
  """FPN level of each box (K,) int32, as detectron2's assign_boxes_to_levels.

  floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8)) clamped to
  [min_level, max_level], area = (x2 - x1) * (y2 - y1) in image pixels (Lin et al. 2017, eq. 1).
  """
  boxes = lax.stop_gradient(boxes).astype(jnp.float32)
  area = jnp.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 0.0)
  level = jnp.floor(canonical_level + jnp.log2(jnp.sqrt(area) / canonical_box_size + 1e-8))
  return jnp.clip(level, min_level, max_level).astype(jnp.int32)


def multilevel_roi_align(features_per_level: Sequence[jax.Array], boxes: jax.Array,
                         box_indices: jax.Array, output_size: int | Sequence[int], *,
                         strides: Sequence[int], canonical_box_size: float = 224,
                         canonical_level: int = 4, sampling_ratio: int = 0, aligned: bool = True,
                         implementation: str = "auto",
                         block_sizes: BlockSizes = BlockSizes()) -> jax.Array:
  """RoIAlign over an FPN: each box is pooled from the level its size selects (detectron2's ROIPooler).

  Args:
    features_per_level: one (N, H_l, W_l, C) map per level, finest first.
    boxes, box_indices, output_size, sampling_ratio, aligned, implementation: as `roi_align`.
    strides: the levels' strides in input pixels, powers of two increasing by 2x, e.g.
      (4, 8, 16, 32) for P2-P5; level l has stride 2**l.
    canonical_box_size, canonical_level: a box of this size (pixels) maps to this level.

  Returns:
    (K, out_h, out_w, C). Static shapes: the XLA version flattens the levels into one array
    and samples each box from its own level in one gather (and one scatter-add backward); the
    Pallas versions run every level over all K boxes with the boxes of other levels inactive,
    which they skip at no cost.
  """
  features_per_level = list(features_per_level)
  strides = tuple(strides)
  if not features_per_level or len(features_per_level) != len(strides):
    raise ValueError(f"multilevel_roi_align: got {len(features_per_level)} feature maps and "
                     f"{len(strides)} strides; pass one stride per level.")
  levels = [math.log2(s) if s > 0 else float("nan") for s in strides]
  if not all(l == int(l) for l in levels) or any(b - a != 1 for a, b in zip(levels, levels[1:])):
    raise ValueError(f"multilevel_roi_align: strides must be consecutive powers of two, finest "
                     f"first (e.g. (4, 8, 16, 32)), got {strides}.")
  channels = {f.shape[-1] if jnp.ndim(f) == 4 else None for f in features_per_level}
  if len(channels) != 1 or None in channels:
    raise ValueError("multilevel_roi_align: every level must be (N, H_l, W_l, C) with the same N "
                     f"and C, got shapes {[jnp.shape(f) for f in features_per_level]}.")
  min_level = int(levels[0])
  assigned = fpn_levels(boxes, min_level, int(levels[-1]), canonical_box_size, canonical_level)
  requested = implementation
  implementation = _common.resolve_implementation(implementation, "multilevel_roi_align",
                                                  _IMPLEMENTATIONS)
  implementation = _unless_gpu_cannot(
      requested, implementation, [f.shape for f in features_per_level],
      features_per_level[0].dtype, *_common.pair(output_size, "multilevel_roi_align: output_size"),
      block_sizes, "multilevel_roi_align")
  if implementation == "xla":
    return _xla_multilevel(features_per_level, boxes, box_indices, assigned - min_level,
                           output_size, strides, sampling_ratio, aligned)
  pooled = None
  for i, (features, stride) in enumerate(zip(features_per_level, strides)):
    out = roi_align(features, boxes, box_indices, output_size, spatial_scale=1.0 / stride,
                    sampling_ratio=sampling_ratio, aligned=aligned, implementation=implementation,
                    block_sizes=block_sizes, active=assigned == min_level + i)
    pooled = out if pooled is None else pooled + out
  return pooled


class _FlatStatic(NamedTuple):
  out_h: int
  out_w: int
  rows: int          # M, the flattened maps' rows
  dtype: jnp.dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flat_roi_align(static: _FlatStatic, flat, geometry, maps):
  return _xla_flat_forward(flat, geometry, maps, static.out_h, static.out_w).astype(static.dtype)


def _flat_roi_align_fwd(static, flat, geometry, maps):
  return _flat_roi_align(static, flat, geometry, maps), (geometry, maps)


def _flat_roi_align_bwd(static, residuals, grad_out):
  geometry, maps = residuals
  grad = _xla_flat_backward(static.rows, geometry, maps, grad_out).astype(static.dtype)
  return (grad,) + jax.tree.map(jnp.zeros_like, (geometry, maps))


_flat_roi_align.defvjp(_flat_roi_align_fwd, _flat_roi_align_bwd)


def _xla_multilevel(features_per_level, boxes, box_indices, level_index, output_size, strides,
                    sampling_ratio, aligned):
  """The XLA multi-level RoIAlign: every level's map flattened into one (M, C) array and one
  sample gather over all boxes, each box at its own level's offset, size and scale, so a box
  costs the same as in a single-level roi_align (not once per level). level_index: (K,) int32
  in [0, levels)."""
  features_per_level = [jnp.asarray(f) for f in features_per_level]
  boxes, box_indices = jnp.asarray(boxes), jnp.asarray(box_indices)
  for features in features_per_level:
    _common.check_box_arguments(features, boxes, box_indices, "multilevel_roi_align")
  out_h, out_w = _common.pair(output_size, "multilevel_roi_align: output_size")
  if not isinstance(sampling_ratio, int):
    raise ValueError(f"multilevel_roi_align: sampling_ratio must be an int (<= 0 for adaptive), "
                     f"got {sampling_ratio!r}.")
  n, c = features_per_level[0].shape[0], features_per_level[0].shape[3]
  if any(f.shape[0] != n for f in features_per_level):
    raise ValueError("multilevel_roi_align: every level must be (N, H_l, W_l, C) with the same N "
                     f"and C, got shapes {[f.shape for f in features_per_level]}.")
  dtype = jnp.result_type(*features_per_level)
  heights = [f.shape[1] for f in features_per_level]
  widths = [f.shape[2] for f in features_per_level]
  offsets = [0]
  for h, w in zip(heights, widths):
    offsets.append(offsets[-1] + n * h * w)
  per_box = lambda values, dtype: jnp.asarray(values, dtype)[level_index]
  geometry = box_geometry(boxes, box_indices, n, (out_h, out_w),
                          per_box([1.0 / s for s in strides], jnp.float32), sampling_ratio,
                          bool(aligned))
  height, width = per_box(heights, jnp.int32), per_box(widths, jnp.int32)
  maps = _FlatMaps(per_box(offsets[:-1], jnp.int32) + geometry.batch * height * width, height, width)
  flat = jnp.concatenate([f.astype(dtype).reshape(-1, c) for f in features_per_level])
  return _flat_roi_align(_FlatStatic(out_h, out_w, offsets[-1], jnp.dtype(dtype)), flat,
                         geometry, maps)
