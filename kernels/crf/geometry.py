"""What the dense-CRF backends share: the bilateral features, and the Pallas kernels' pixel
order, tiles and skip test.

The bilateral filter is an unnormalised attention over scaled features
f = (row / bi_xy_std, col / bi_xy_std, I / bi_rgb_std) (D = 2 + C). The Pallas kernels put the
pixels in Z-order through feature space (`z_order`), so that consecutive pixels are close in
position and colour, and cut them into query tiles of `query` pixels; a key tile is `key_tiles`
consecutive query tiles. Key tiles whose feature bounding box is farther than
sqrt(SKIP_DISTANCE2) from the query tile's are skipped (`active_tile_pairs`: every kernel value
there is < SKIP_EPSILON).
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kernels.common import round_up

# A key tile is skipped when every kernel value between it and the query tile is below this;
# the bilateral message of a pixel then errs by at most SKIP_EPSILON * (number of skipped
# pixels) per label in absolute value (Q <= 1), e.g. <= 1.9e-7 for a 500 x 375 image.
SKIP_EPSILON = 1e-12
SKIP_DISTANCE2 = 2.0 * math.log(1.0 / SKIP_EPSILON)   # exp(-d^2 / 2) < eps  <=>  d^2 > this


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """The TPU kernel's tiles of the Z-ordered pixels: `query` pixels per query tile (a multiple of
  128), key tiles of `key_tiles` consecutive query tiles. (The GPU kernel's are 64 and 1.)"""
  query: int = 128
  key_tiles: int = 4


def bilateral_features(image, bi_xy_std, bi_rgb_std):
  """(B, H, W, 2 + C) float32 scaled features (row / bi_xy_std, col / bi_xy_std, I / bi_rgb_std)."""
  b, h, w, _ = image.shape
  rows = jnp.broadcast_to(jnp.arange(h, dtype=jnp.float32)[:, None], (h, w)) / bi_xy_std
  cols = jnp.broadcast_to(jnp.arange(w, dtype=jnp.float32)[None, :], (h, w)) / bi_xy_std
  position = jnp.broadcast_to(jnp.stack([rows, cols], axis=-1), (b, h, w, 2))
  colour = lax.stop_gradient(image).astype(jnp.float32) / bi_rgb_std
  return jnp.concatenate([position, colour], axis=-1)


class TilePlan(NamedTuple):
  """The Pallas kernels' tiles of the Z-ordered pixels of one call."""
  query: int            # pixels per query tile
  key: int              # pixels per key tile
  pixels: int           # N padded to whole key tiles
  query_tiles: int      # per image
  key_tiles: int        # per image
  features: int         # D
  lanes: int            # D + 2 rounded up to 8 (the TPU kernel's augmented features)


def tile_plan(blocks: BlockSizes, n: int, d: int) -> TilePlan:
  """Tiles of `blocks` over n pixels with d features each."""
  key = blocks.query * blocks.key_tiles
  pixels = round_up(n, key)
  return TilePlan(blocks.query, key, pixels, pixels // blocks.query, pixels // key, d,
                  round_up(d + 2, 8))


def z_order(features, bits_total=30):
  """(B, N) int32 pixel order along a Morton (Z-order) curve through feature space.

  Each scaled feature is quantised into 2^(bits_total // D) cells of at least one kernel
  standard deviation over its range in the image, and the cell indices' bits are interleaved.
  Consecutive pixels in this order are close in position and colour, so a tile of them has a
  small bounding box: fewer key tiles survive the skip test and the re-centred distances lose
  less to cancellation (the error bound in `pallas_tpu`).
  """
  _, _, d = features.shape
  bits = max(1, min(10, bits_total // d))
  lo = jnp.min(features, axis=1, keepdims=True)
  cell = jnp.maximum((jnp.max(features, axis=1, keepdims=True) - lo) / (2 ** bits - 1), 1.0)
  cells = jnp.clip(jnp.floor((features - lo) / cell), 0, 2 ** bits - 1).astype(jnp.uint32)
  code = jnp.zeros(features.shape[:2], jnp.uint32)
  for bit in range(bits):
    for k in range(d):
      code = code | (((cells[..., k] >> bit) & 1) << (bit * d + k))
  return jnp.argsort(code, axis=1, stable=True).astype(jnp.int32)


class Layout(NamedTuple):
  """The Pallas kernels' pixels: Z-ordered, padded to whole key tiles (prepared once per call)."""
  order: jax.Array      # (B, N) int32 pixel at each sorted position
  rank: jax.Array       # (B, N) int32 sorted position of each pixel (the inverse permutation)
  features: jax.Array   # (B, P, D) float32 sorted, padded with copies of the last pixel


def prepare(features, plan: TilePlan) -> Layout:
  """The Layout of features (B, N, D), computed once per call, outside the iterations."""
  b, n, d = features.shape
  order = z_order(features)
  rank = jnp.argsort(order, axis=1).astype(jnp.int32)
  ordered = jnp.take_along_axis(features, order[..., None], axis=1)
  # Edge padding keeps the last tile's bounding box tight; padded pixels carry Q = 0.
  ordered = jnp.pad(ordered, ((0, 0), (0, plan.pixels - n), (0, 0)), mode="edge")
  return Layout(order, rank, ordered)


def tile_boxes(features, size):
  """Per-tile feature bounding boxes (B, tiles, 2, D): [lo, hi], for tiles of `size` pixels."""
  b, n, d = features.shape
  tiles = features.reshape(b, n // size, size, d)
  return jnp.stack([tiles.min(axis=2), tiles.max(axis=2)], axis=2)


def active_tile_pairs(query_boxes, key_boxes):
  """(B, query tiles, key tiles) bool: whether some kernel value may reach SKIP_EPSILON.

  The smallest distance between two boxes: per feature, the gap between the intervals.
  """
  q_lo, q_hi = query_boxes[:, :, None, 0], query_boxes[:, :, None, 1]
  k_lo, k_hi = key_boxes[:, None, :, 0], key_boxes[:, None, :, 1]
  gap = jnp.maximum(jnp.maximum(k_lo - q_hi, q_lo - k_hi), 0.0)
  return jnp.sum(gap * gap, axis=-1) <= SKIP_DISTANCE2


def ordered(layout: Layout, q, pixels):
  """q (B, N, L) in the layout's pixel order, zero-padded to `pixels`."""
  q = jnp.take_along_axis(q, layout.order[..., None], axis=1)
  return jnp.pad(q, ((0, 0), (0, pixels - q.shape[1]), (0, 0)))


def unordered(layout: Layout, out):
  """(B, P, L) in the layout's order -> (B, N, L) in row-major pixel order."""
  return jnp.take_along_axis(out, layout.rank[..., None], axis=1)
