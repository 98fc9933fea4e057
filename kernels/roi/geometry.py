"""What the RoI backends share: torchvision's per-box arithmetic and the Pallas kernels' tiling.

RoIAlign (`box_geometry`): for box k with batch index b, output bin (ph, pw) averages
grid_h x grid_w bilinear samples at

    y = y_start + ph * bin_h + (iy + 0.5) * bin_h / grid_h      (x likewise)

where y_start = y1 * spatial_scale - 0.5 (aligned) or y1 * spatial_scale (not aligned),
bin_h = roi_h / out_h, roi_h = (y2 - y1) * spatial_scale (at least 1 when not aligned), and
grid_h = sampling_ratio, or ceil(min(roi_h, cap_h) / out_h) when sampling_ratio <= 0 (adaptive;
W and cap_w along x), cap_h = max(ADAPTIVE_EXTENT * H, ADAPTIVE_MIN_CAP) cells. torchvision's
count has no cap, so a box with a huge or infinite coordinate asks for ~2^31 samples per bin and
its kernel never finishes; here a box taller than cap_h gets the samples of one exactly that tall,
so a box costs at most (cap_h / H) * (cap_w / W) times one just covering the map, and every box up
to cap_h x cap_w cells, inside the map or not, gets torchvision's count (the tests compare boxes
up to ~31 times a 2 x 3 map's size with torchvision's arithmetic).
A box with a non-finite coordinate or an image index outside [0, N) gets no samples (output 0);
`kernels.roi.api` rejects both with a ValueError before this when its inputs are concrete.

RoIPool (`bin_bounds`): box corners rounded to cells (half away from zero), the box at least
1x1 cell with an inclusive width (end - start + 1); bin (ph, pw) covers rows
[floor(ph * bin_h), ceil((ph + 1) * bin_h)) + start_h clipped to [0, H] (columns likewise).
Corners are clamped to [-2^24, 2^24] cells before rounding to int32 (no overflow; no effect on a
box within the map); a box with a non-finite coordinate or an index outside [0, N) gets empty
bins (output 0).

The Pallas kernels (TPU and Mosaic GPU) walk the map in tiles of `BlockSizes`; `tile_plan` fixes a
call's static shapes, `scalar_tables` / `tile_tables` the per-box scalars they read from SMEM.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kernels.common import divide, round_up

LOWEST = float(jnp.finfo(jnp.float32).min)  # torchvision's -FLT_MAX start value of a RoIPool bin
ADAPTIVE_EXTENT = 10     # RoIAlign's adaptive sample count sees a box as at most 10 map sizes
ADAPTIVE_MIN_CAP = 256   # or 256 cells across, whichever is larger


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile of the feature map a Pallas kernel step holds: rows, columns, channels (multiples of
  8/128). roi_align's GPU kernel uses 8 x 8 tiles for outputs of more than 64 bins."""
  rows: int = 16
  cols: int = 16
  channels: int = 128


# ---------------------------------------------------------------------------------------------
# RoIAlign


class BoxGeometry(NamedTuple):
  """Per-box sampling geometry in feature-map cells; every field has shape (K,)."""
  batch: jax.Array       # int32 image index, clipped to [0, N - 1]
  y_start: jax.Array     # float32 first bin's top edge
  bin_h: jax.Array       # float32 bin height (negative for a reversed aligned box)
  grid_h: jax.Array      # int32 samples per bin along y (<= 0: no samples)
  x_start: jax.Array
  bin_w: jax.Array
  grid_w: jax.Array


def valid_boxes(boxes, box_indices, num_images):
  """(K,) bool: the box's coordinates are finite and its image index is in [0, num_images)."""
  finite = jnp.all(jnp.isfinite(boxes), axis=1)
  return finite & (box_indices >= 0) & (box_indices < num_images)


def _adaptive_grid(roi_size, n_out, map_size):
  """(K,) int32 ceil(min(roi_size, cap) / n_out), cap = max(ADAPTIVE_EXTENT * map_size,
  ADAPTIVE_MIN_CAP); <= 0 for a reversed box (its size clipped at -cap: an int32 holds it)."""
  cap = jnp.maximum(jnp.asarray(map_size, jnp.float32) * ADAPTIVE_EXTENT, ADAPTIVE_MIN_CAP)
  extent = jnp.clip(roi_size, -cap, cap)
  return jnp.ceil(divide(extent, n_out)).astype(jnp.int32)


def box_geometry(boxes, box_indices, num_images, output_size, map_size, spatial_scale,
                 sampling_ratio, aligned, active=None) -> BoxGeometry:
  """torchvision's per-box arithmetic, in float32. `active` (K,) bool: False gives no samples.

  map_size: (H, W) of the map each box samples, ints or (K,) int32 arrays; the adaptive grid
    counts a box as at most cap_h x cap_w cells (module docstring). Boxes with a non-finite
    coordinate or an index outside [0, num_images) get no samples and all-zero coordinates.
  spatial_scale: a float, or a (K,) float32 array (each box's own map's scale).
  """
  out_h, out_w = output_size
  height, width = map_size
  boxes = lax.stop_gradient(boxes).astype(jnp.float32)
  offset = 0.5 if aligned else 0.0
  spatial_scale = jnp.asarray(spatial_scale, jnp.float32)   # a float, or (K,) one per box
  scaled = boxes * jnp.reshape(spatial_scale, (-1, 1))
  valid = valid_boxes(scaled, box_indices, num_images)
  scaled = jnp.where(valid[:, None], scaled, 0.0)
  x1, y1, x2, y2 = (scaled[:, i] - offset for i in range(4))
  roi_w, roi_h = x2 - x1, y2 - y1
  if not aligned:  # torchvision forces malformed RoIs to 1x1 in the legacy mode
    roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
  bin_h, bin_w = divide(roi_h, out_h), divide(roi_w, out_w)
  if sampling_ratio > 0:
    grid_h = jnp.full(boxes.shape[:1], sampling_ratio, jnp.int32)
    grid_w = grid_h
  else:  # bounded in float32 before the cast: a huge box's count would not fit an int32
    grid_h = _adaptive_grid(roi_h, out_h, height)
    grid_w = _adaptive_grid(roi_w, out_w, width)
  if active is not None:
    valid = valid & active
  grid_h = jnp.where(valid, grid_h, 0)
  grid_w = jnp.where(valid, grid_w, 0)
  batch = jnp.clip(box_indices.astype(jnp.int32), 0, num_images - 1)
  return BoxGeometry(batch, y1, bin_h, grid_h, x1, bin_w, grid_w)


class FlatMaps(NamedTuple):
  """Where each box's map lies in maps flattened to (M, C) (the XLA version's sample gather)."""
  base: jax.Array          # (K,) int32 flat row of the box's map's cell (0, 0)
  height: jax.Array | int  # (K,) int32, or one int for all boxes
  width: jax.Array | int


def single_map(geometry: BoxGeometry, shape) -> FlatMaps:
  """The (N, H, W, C) map flattened to (N * H * W, C): box k's map is image batch[k]."""
  _, h, w, _ = shape
  return FlatMaps(geometry.batch * (h * w), h, w)


# ---------------------------------------------------------------------------------------------
# RoIPool


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
  scaled = lax.stop_gradient(boxes).astype(jnp.float32) * jnp.float32(spatial_scale)
  valid = valid_boxes(scaled, box_indices, shape[0])
  corners = _round_half_away(jnp.clip(jnp.where(valid[:, None], scaled, 0.0), -2.0**24, 2.0**24))
  corners = corners.astype(jnp.int32)
  x1, y1, x2, y2 = (corners[:, i] for i in range(4))

  def axis(start, end, n_out, size):
    bin_size = divide(jnp.maximum(end - start + 1, 1).astype(jnp.float32), n_out)
    p = jnp.arange(n_out, dtype=jnp.float32)
    lo = jnp.floor(p * bin_size[:, None]).astype(jnp.int32) + start[:, None]
    hi = jnp.ceil((p + 1) * bin_size[:, None]).astype(jnp.int32) + start[:, None]
    return jnp.clip(lo, 0, size), jnp.clip(hi, 0, size)

  h_start, h_end = axis(y1, y2, out_h, height)
  w_start, w_end = axis(x1, x2, out_w, width)
  h_end = jnp.where(valid[:, None], h_end, h_start)  # invalid boxes: empty bins
  w_end = jnp.where(valid[:, None], w_end, w_start)
  batch = jnp.clip(box_indices.astype(jnp.int32), 0, shape[0] - 1)
  return BinBounds(batch, h_start, h_end, w_start, w_end)


def empty_bins(bounds: BinBounds) -> jax.Array:
  """(K, out_h, out_w, 1) bool: bins that cover no cell (their output is 0)."""
  return ((bounds.h_end <= bounds.h_start)[:, :, None]
          | (bounds.w_end <= bounds.w_start)[:, None, :])[..., None]


# ---------------------------------------------------------------------------------------------
# The Pallas kernels' tiling


class Plan(NamedTuple):
  """Static shapes of one Pallas RoI call."""
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


def tile_plan(shape, out_h, out_w, blocks: BlockSizes) -> Plan:
  """The Plan of features of `shape` (N, H, W, C) pooled to out_h x out_w bins."""
  _, h, w, c = shape
  rows, cols = min(blocks.rows, round_up(h, 8)), min(blocks.cols, round_up(w, 8))
  channels = blocks.channels if c % blocks.channels == 0 else c
  return Plan(h, w, rows, cols, channels, round_up(h, rows), round_up(w, cols), out_h, out_w,
              round_up(out_h, 8), round_up(out_w, 8), round_up(out_h * out_w, 8))


def _tile_span(start, bin_size, n_out, grid, size, block):
  """First tile index and number of tiles (K,) int32 that a box's samples can touch on one axis."""
  end = start + bin_size * n_out
  low = jnp.floor(jnp.clip(jnp.minimum(start, end), 0.0, size - 1.0)).astype(jnp.int32)
  high = jnp.minimum(jnp.floor(jnp.clip(jnp.maximum(start, end), 0.0, size - 1.0)).astype(jnp.int32) + 1,
                     size - 1)
  first = low // block
  return first, jnp.where(grid > 0, high // block - first + 1, 0)


def scalar_tables(geometry: BoxGeometry, plan: Plan):
  """RoIAlign's per-box scalars for SMEM, flattened: ints (8K,) and floats (4K,) float32."""
  g = geometry
  ty0, nty = _tile_span(g.y_start, g.bin_h, plan.out_h, g.grid_h, plan.height, plan.rows)
  tx0, ntx = _tile_span(g.x_start, g.bin_w, plan.out_w, g.grid_w, plan.width, plan.cols)
  nty, ntx = jnp.where(ntx > 0, nty, 0), jnp.where(nty > 0, ntx, 0)
  ints = jnp.concatenate([g.batch, g.grid_h, g.grid_w, ty0, nty, tx0, ntx, jnp.zeros_like(ty0)])
  floats = jnp.concatenate([g.y_start, g.bin_h, g.x_start, g.bin_w])
  return ints.astype(jnp.int32), floats.astype(jnp.float32)


def box_params(ints, floats, k, num_boxes):
  """Box k's scalars from the SMEM/GMEM tables of `scalar_tables`, by name."""
  names = ("batch", "grid_h", "grid_w", "ty0", "nty", "tx0", "ntx")
  params = {name: ints[i * num_boxes + k] for i, name in enumerate(names)}
  for i, name in enumerate(("y_start", "bin_h", "x_start", "bin_w")):
    params[name] = floats[i * num_boxes + k]
  return params


def touches(box, ty, tx):
  """Whether map tile (ty, tx) is among the tiles the box's samples touch."""
  return ((ty >= box["ty0"]) & (ty < box["ty0"] + box["nty"])
          & (tx >= box["tx0"]) & (tx < box["tx0"] + box["ntx"]))


def tile_tables(bounds: BinBounds, plan: Plan):
  """RoIPool's scalars for the kernels: spans (5K,) = image, first tile row, tile rows, first
  tile column, tile columns of each box; and the flattened bin bounds h_start, h_end
  (K*out_h,), w_start, w_end (K*out_w,), int32."""
  nonempty = jnp.any(bounds.h_end > bounds.h_start, axis=1) & jnp.any(bounds.w_end > bounds.w_start, axis=1)

  def span(start, end, block):
    first = jnp.min(start, axis=1) // block
    return first, jnp.where(nonempty, (jnp.max(end, axis=1) - 1) // block - first + 1, 0)

  ty0, nty = span(bounds.h_start, bounds.h_end, plan.rows)
  tx0, ntx = span(bounds.w_start, bounds.w_end, plan.cols)
  spans = jnp.concatenate([bounds.batch, ty0, nty, tx0, ntx]).astype(jnp.int32)
  tables = [a.reshape(-1).astype(jnp.int32) for a in (bounds.h_start, bounds.h_end, bounds.w_start, bounds.w_end)]
  return spans, tables


def boxes_by_image(batch, num_images):
  """Box ids sorted by image (stable: a fixed order) and where each image's run starts:
  order (K,), image_start (N + 1,) int32. The backward kernels loop over one image's boxes."""
  order = jnp.argsort(batch, stable=True).astype(jnp.int32)
  image_start = jnp.searchsorted(batch[order], jnp.arange(num_images + 1), side="left")
  return order, image_start.astype(jnp.int32)
