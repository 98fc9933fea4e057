"""Exact dense-CRF mean-field inference (Krähenbühl and Koltun 2011), as DeepLab and CRF-as-RNN use it.

For logits U (B, H, W, L) and an image I (B, H, W, C), with N = H * W pixels p_i = (row, col):

    Q0 = softmax(U)
    repeat `iterations` times:
      m_bi[i]  = sum_{j != i} exp(-|p_i - p_j|^2 / (2 bi_xy_std^2) - |I_i - I_j|^2 / (2 bi_rgb_std^2)) Q[j]
      m_pos[i] = sum_{j != i} exp(-|p_i - p_j|^2 / (2 pos_xy_std^2)) Q[j]
      Q = softmax(U - (bi_w m_bi + pos_w m_pos) mu^T)        mu: (L, L), Potts 1 - I by default

Exact: every pair (i, j), no permutohedral lattice and no window.

The spatial (`pos`) filter is separable, exp(-dy^2 / 2s^2) exp(-dx^2 / 2s^2): two matrix products
with (H, H) and (W, W) Gaussians, O(N (H + W) L) work. The bilateral filter is an unnormalised
attention over scaled features f = (row / bi_xy_std, col / bi_xy_std, I / bi_rgb_std) (D = 2 + C):
m_bi = K Q - Q with K[i, j] = exp(-|f_i - f_j|^2 / 2). It is the only O(N^2) part:

- `xla` maps over chunks of query pixels, so memory is O(B N chunk), never N x N; it computes
  |f_i - f_j|^2 as a sum of squared differences (no cancellation: each kernel value has a
  relative error of a few float32 ulps times (1 + |f_i - f_j|^2 / 2)) and drops j == i exactly.
- `pallas_tpu` sorts the pixels along a Z-order curve through feature space and tiles them (so
  that a tile is compact in position and colour), computes
  |f_i - f_j|^2 = |a|^2 + |b|^2 - 2 a.b on the matrix unit with features re-centred on the query
  tile's centre (a = f_i - c, b = f_j - c) and skips key tiles whose feature bounding box is
  farther than sqrt(SKIP_DISTANCE2) from the query tile's (every kernel value < SKIP_EPSILON);
  out += exp(-d^2 / 2) @ Q_tile. Error bounds: see the "Pallas" section below.
- `pallas_gpu` (kernels/dense_crf_mosaic_gpu.py, Hopper and newer) is the same algorithm on the
  tensor cores (wgmma) with 64-pixel tiles and float32 operands as three bfloat16 parts.

K is symmetric and m_bi = (K - I) Q is linear in Q, so the filter's custom VJP applies the same
filter to the cotangent (its backward costs one forward filter). Gradients flow to the logits, to
`pos_w`, `bi_w` and `compatibility` (through JAX autodiff of the mean-field loop, which keeps
each iteration's Q); the image and the standard deviations get none.
"""

import dataclasses
import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import _common

_OP = "dense_crf"
_HIGHEST = lax.Precision.HIGHEST

# A key tile is skipped when every kernel value between it and the query tile is below this;
# the bilateral message of a pixel then errs by at most SKIP_EPSILON * (number of skipped
# pixels) per label in absolute value (Q <= 1), e.g. <= 1.9e-7 for a 500 x 375 image.
SKIP_EPSILON = 1e-12
SKIP_DISTANCE2 = 2.0 * math.log(1.0 / SKIP_EPSILON)   # exp(-d^2 / 2) < eps  <=>  d^2 > this

# The xla filter's working set: one (B, chunk, N) float32 kernel block of at most this many
# elements: 64 MiB on accelerators (parallelism), 512 KiB on a CPU, where a block that stays in
# the L2 cache between the exponentials and the product ran 2-3x faster (96x128 image, L = 21).
_XLA_BLOCK_ELEMENTS = 1 << 24
_XLA_BLOCK_ELEMENTS_CPU = 1 << 17


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """The TPU kernel's tiles of the Z-ordered pixels: `query` pixels per query tile (a multiple of
  128), key tiles of `key_tiles` consecutive query tiles. (The GPU kernel's are 64 and 1.)"""
  query: int = 128
  key_tiles: int = 4


class _Static(NamedTuple):
  """Hashable configuration of one call (the custom VJP's non-differentiable argument)."""
  implementation: str
  height: int
  width: int
  blocks: BlockSizes


# ---------------------------------------------------------------------------------------------
# Features and the separable spatial filter.


def bilateral_features(image, bi_xy_std, bi_rgb_std):
  """(B, H, W, 2 + C) float32 scaled features (row / bi_xy_std, col / bi_xy_std, I / bi_rgb_std)."""
  b, h, w, _ = image.shape
  rows = jnp.broadcast_to(jnp.arange(h, dtype=jnp.float32)[:, None], (h, w)) / bi_xy_std
  cols = jnp.broadcast_to(jnp.arange(w, dtype=jnp.float32)[None, :], (h, w)) / bi_xy_std
  position = jnp.broadcast_to(jnp.stack([rows, cols], axis=-1), (b, h, w, 2))
  colour = lax.stop_gradient(image).astype(jnp.float32) / bi_rgb_std
  return jnp.concatenate([position, colour], axis=-1)


def _gaussian_matrix(size, std):
  """(size, size) float32 exp(-(i - j)^2 / (2 std^2))."""
  d = jnp.arange(size, dtype=jnp.float32)
  return jnp.exp(-0.5 * jnp.square((d[:, None] - d[None, :]) / std))


def spatial_filter(q, pos_xy_std):
  """m_pos (B, H, W, L): sum over j != i of exp(-|p_i - p_j|^2 / (2 pos_xy_std^2)) q[j].

  Separable: G_rows @ q @ G_cols^T per label and image, minus the j == i term (value 1).
  """
  _, h, w, _ = q.shape
  g_rows, g_cols = _gaussian_matrix(h, pos_xy_std), _gaussian_matrix(w, pos_xy_std)
  out = jnp.einsum("ik,bkwl->biwl", g_rows, q, precision=_HIGHEST)
  out = jnp.einsum("jk,bikl->bijl", g_cols, out, precision=_HIGHEST)
  return out - q


# ---------------------------------------------------------------------------------------------
# xla: the bilateral filter over chunks of query pixels.


def _xla_chunk(n, batch):
  budget = _XLA_BLOCK_ELEMENTS_CPU if _common._local_platform() == "cpu" else _XLA_BLOCK_ELEMENTS
  chunk = budget // max(n * batch, 1)
  return max(8, min(_round_up(n, 8), chunk // 8 * 8))


def _round_up(value, multiple):
  return -(-value // multiple) * multiple


def _xla_bilateral(features, q):
  """(B, N, L) float32: sum over j != i of exp(-|f_i - f_j|^2 / 2) q[j], for features (B, N, D)."""
  b, n, d = features.shape
  chunk = _xla_chunk(n, b)
  padded = _round_up(n, chunk)
  queries = jnp.pad(features, ((0, 0), (0, padded - n), (0, 0)))
  queries = queries.reshape(b, padded // chunk, chunk, d).transpose(1, 0, 2, 3)
  key_index = jnp.arange(n, dtype=jnp.int32)

  def one_chunk(args):
    start, f_query = args                                 # (), (B, chunk, D)
    distance2 = sum(jnp.square(f_query[:, :, None, k] - features[:, None, :, k]) for k in range(d))
    kernel = jnp.exp(-0.5 * distance2)                    # (B, chunk, N)
    query_index = start + jnp.arange(chunk, dtype=jnp.int32)
    kernel = jnp.where(query_index[:, None] == key_index[None, :], 0.0, kernel)   # j != i
    return jnp.einsum("bcn,bnl->bcl", kernel, q, precision=_HIGHEST)

  starts = jnp.arange(0, padded, chunk, dtype=jnp.int32)
  out = lax.map(one_chunk, (starts, queries))             # (chunks, B, chunk, L)
  return out.transpose(1, 0, 2, 3).reshape(b, padded, -1)[:, :n]


# ---------------------------------------------------------------------------------------------
# Pallas (Mosaic TPU): the bilateral filter as tiled unnormalised attention.
#
# Pixels are put in Z-order through feature space (`z_order`), so that consecutive pixels are
# close in position and colour, and cut into query tiles of `query` pixels; a key tile is
# `key_tiles` consecutive query tiles. For a query tile with feature centre c (the middle of its
# bounding box), the augmented vectors
#     q_aug = [a, |a|^2, 1, 0...],  k_aug = [-2 b, 1, |b|^2, 0...],   a = f_i - c, b = f_j - c
# give q_aug . k_aug = |f_i - f_j|^2 in one (TQ, 8) @ (8, TK) product on the matrix unit.
# Error bound: in float32 (HIGHEST precision: float32-accurate bfloat16 passes) the expansion
# loses |delta d^2| <= (D + 2) 2^-24 (|a| + |b|)^2 to cancellation. Re-centring on the query tile
# makes |a| <= r, the tile's feature radius (half its bounding-box diagonal), and for every pair
# that is not negligible (d^2 <= SKIP_DISTANCE2 = 55.3) |b| <= r + 7.4, so each kernel value
# exp(-d^2 / 2) has a relative error <= (D + 2) 2^-25 (2 r + 7.4)^2: for RGB (D = 5) about
# 1.6e-4 at r = 10 (a tile spanning 20 colour stds) and 6.6e-3 at r = 85 (a black/white edge in
# a tile, colour std 3 units). Z-order keeps most tiles' r small. Key tiles whose bounding box is
# farther than sqrt(SKIP_DISTANCE2) from the query tile's are skipped (every kernel value there is
# < SKIP_EPSILON).


class _TilePlan(NamedTuple):
  query: int            # pixels per query tile
  key: int              # pixels per key tile
  pixels: int           # N padded to whole key tiles
  query_tiles: int      # per image
  key_tiles: int        # per image
  features: int         # D
  lanes: int            # D + 2 rounded up to 8 (the TPU kernel's augmented features)


def _tile_plan(static: _Static, n: int, d: int) -> _TilePlan:
  if static.implementation == "pallas_gpu":
    from kernels import dense_crf_mosaic_gpu as gpu
    blocks, multiple = BlockSizes(gpu.TILE, 1), gpu.TILE
  else:
    blocks, multiple = static.blocks, 128
  if blocks.query <= 0 or blocks.query % multiple or blocks.key_tiles <= 0:
    raise ValueError(f"{_OP}: block_sizes must have query a positive multiple of {multiple} "
                     f"pixels and key_tiles >= 1, got {blocks}.")
  key = blocks.query * blocks.key_tiles
  pixels = _round_up(n, key)
  return _TilePlan(blocks.query, key, pixels, pixels // blocks.query, pixels // key, d,
                   _round_up(d + 2, 8))


def z_order(features, bits_total=30):
  """(B, N) int32 pixel order along a Morton (Z-order) curve through feature space.

  Each scaled feature is quantised into 2^(bits_total // D) cells of at least one kernel
  standard deviation over its range in the image, and the cell indices' bits are interleaved.
  Consecutive pixels in this order are close in position and colour, so a tile of them has a
  small bounding box: fewer key tiles survive the skip test and the re-centred distances lose
  less to cancellation (see above).
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


class _Layout(NamedTuple):
  """The Pallas kernels' pixels: Z-ordered, padded to whole key tiles (prepared once per call)."""
  order: jax.Array      # (B, N) int32 pixel at each sorted position
  rank: jax.Array       # (B, N) int32 sorted position of each pixel (the inverse permutation)
  features: jax.Array   # (B, P, D) float32 sorted, padded with copies of the last pixel


def _prepare(static: _Static, features):
  """What the filter implementation needs from the features, computed outside the iterations."""
  if static.implementation == "xla":
    return features
  b, n, d = features.shape
  if static.implementation == "pallas_gpu":
    from kernels import dense_crf_mosaic_gpu as gpu
    if d > gpu.MAX_FEATURES:
      raise ValueError(f"{_OP}: implementation='pallas_gpu' takes images of at most "
                       f"{gpu.MAX_FEATURES - 2} channels, got {d - 2}; use 'xla'.")
  plan = _tile_plan(static, n, d)
  order = z_order(features)
  rank = jnp.argsort(order, axis=1).astype(jnp.int32)
  ordered = jnp.take_along_axis(features, order[..., None], axis=1)
  # Edge padding keeps the last tile's bounding box tight; padded pixels carry Q = 0.
  ordered = jnp.pad(ordered, ((0, 0), (0, plan.pixels - n), (0, 0)), mode="edge")
  return _Layout(order, rank, ordered)


def _tile_boxes(features, size):
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


def tile_pairs_kept(image, *, bi_xy_std=67.0, bi_rgb_std=3.0, implementation="pallas_tpu",
                    block_sizes: BlockSizes = BlockSizes()):
  """(B,) float32: the fraction of (query tile, key tile) pairs a Pallas kernel computes for
  these images (the others are skipped), from the same bounding-box test in XLA."""
  b, h, w, _ = jnp.shape(image)
  static = _Static(implementation, h, w, block_sizes)
  features = bilateral_features(jnp.asarray(image), float(bi_xy_std), float(bi_rgb_std))
  layout = _prepare(static, features.reshape(b, h * w, -1))
  plan = _tile_plan(static, h * w, layout.features.shape[-1])
  active = active_tile_pairs(_tile_boxes(layout.features, plan.query),
                             _tile_boxes(layout.features, plan.key))
  return jnp.mean(active, axis=(1, 2))


def _tpu_kernel(query_boxes, key_boxes, f_query, f_keys, q_keys, out_ref, k_tiles, q_tiles, acc,
                sems, *, plan: _TilePlan):
  b, t = pl.program_id(0), pl.program_id(1)
  d, lanes = plan.features, plan.lanes

  def box(table, tiles, tile, side, k):
    return table[((b * tiles + tile) * 2 + side) * d + k]

  q_lo = [box(query_boxes, plan.query_tiles, t, 0, k) for k in range(d)]
  q_hi = [box(query_boxes, plan.query_tiles, t, 1, k) for k in range(d)]
  centre = [(lo + hi) * 0.5 for lo, hi in zip(q_lo, q_hi)]

  def within_reach(s):
    """Whether key tile s (< key_tiles) may hold a kernel value >= SKIP_EPSILON."""
    distance2 = 0.0
    for k in range(d):
      gap = jnp.maximum(jnp.maximum(box(key_boxes, plan.key_tiles, s, 0, k) - q_hi[k],
                                    q_lo[k] - box(key_boxes, plan.key_tiles, s, 1, k)), 0.0)
      distance2 = distance2 + gap * gap
    return distance2 <= SKIP_DISTANCE2

  def next_key_tile(s):
    """The first key tile after s within reach, or key_tiles when there is none."""
    def skip(s):
      return (s < plan.key_tiles) & ~within_reach(jnp.minimum(s, plan.key_tiles - 1))
    return lax.while_loop(skip, lambda s: s + 1, s + 1)

  def copies(s, slot):
    return (pltpu.make_async_copy(f_keys.at[b, :, pl.ds(s * plan.key, plan.key)], k_tiles.at[slot],
                                  sems.at[0, slot]),
            pltpu.make_async_copy(q_keys.at[b, pl.ds(s * plan.key, plan.key), :], q_tiles.at[slot],
                                  sems.at[1, slot]))

  lane = lax.broadcasted_iota(jnp.int32, (1, lanes), 1)
  sublane = lax.broadcasted_iota(jnp.int32, (lanes, 1), 0)
  centre_row = sum(jnp.where(lane == k, centre[k], 0.0) for k in range(d))
  centre_col = sum(jnp.where(sublane == k, centre[k], 0.0) for k in range(d))
  a = f_query[...] - centre_row                                   # (TQ, lanes), zero beyond D
  q_aug = a + jnp.where(lane == d, jnp.sum(a * a, axis=1, keepdims=True), 0.0)
  q_aug = q_aug + jnp.where(lane == d + 1, 1.0, 0.0)
  query_index = t * plan.query + lax.broadcasted_iota(jnp.int32, (plan.query, plan.key), 0)
  acc[...] = jnp.zeros_like(acc)

  # Double-buffered walk over the key tiles within reach: tile s computes while the next one's
  # copies run into the other slot.
  first = next_key_tile(-1)

  @pl.when(first < plan.key_tiles)
  def _():
    for copy in copies(first, 0):
      copy.start()

  def step(carry):
    s, slot = carry
    following = next_key_tile(s)

    @pl.when(following < plan.key_tiles)
    def _():
      for copy in copies(following, 1 - slot):
        copy.start()

    copy_f, copy_q = copies(s, slot)
    copy_f.wait()
    b_t = k_tiles[slot] - centre_col                              # (lanes, TK), zero beyond D
    k_aug = -2.0 * b_t + jnp.where(sublane == d, 1.0, 0.0)
    k_aug = k_aug + jnp.where(sublane == d + 1, jnp.sum(b_t * b_t, axis=0, keepdims=True), 0.0)
    d2 = jnp.dot(q_aug, k_aug, precision=_HIGHEST, preferred_element_type=jnp.float32)
    kernel = jnp.exp(-0.5 * jnp.maximum(d2, 0.0))                 # (TQ, TK)
    key_index = s * plan.key + lax.broadcasted_iota(jnp.int32, (plan.query, plan.key), 1)
    kernel = jnp.where(query_index == key_index, 0.0, kernel)     # j != i, exactly
    copy_q.wait()
    acc[...] += jnp.dot(kernel, q_tiles[slot], precision=_HIGHEST, preferred_element_type=jnp.float32)
    return following, 1 - slot

  lax.while_loop(lambda carry: carry[0] < plan.key_tiles, step, (first, jnp.int32(0)))
  out_ref[...] = acc[...]


def _ordered(layout: _Layout, q, pixels):
  """q (B, N, L) in the layout's pixel order, zero-padded to `pixels`."""
  q = jnp.take_along_axis(q, layout.order[..., None], axis=1)
  return jnp.pad(q, ((0, 0), (0, pixels - q.shape[1]), (0, 0)))


def _unordered(layout: _Layout, out):
  """(B, P, L) in the layout's order -> (B, N, L) in row-major pixel order."""
  return jnp.take_along_axis(out, layout.rank[..., None], axis=1)


def _tpu_bilateral(static: _Static, layout: _Layout, q):
  """(B, N, L) float32 bilateral message on the Pallas TPU kernel (interpret mode off TPU)."""
  b, n, l = q.shape
  d = layout.features.shape[-1]
  plan = _tile_plan(static, n, d)
  query_boxes = _tile_boxes(layout.features, plan.query).reshape(-1)
  key_boxes = _tile_boxes(layout.features, plan.key).reshape(-1)
  f_query = jnp.pad(layout.features, ((0, 0), (0, 0), (0, plan.lanes - d)))   # (B, P, lanes)
  f_keys = f_query.transpose(0, 2, 1)                                            # (B, lanes, P)
  out = pl.pallas_call(
      functools.partial(_tpu_kernel, plan=plan),
      out_shape=jax.ShapeDtypeStruct((b, plan.pixels, l), jnp.float32),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b, plan.query_tiles),
          in_specs=[pl.BlockSpec((None, plan.query, plan.lanes), lambda b, t, *_: (b, t, 0)),
                    pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=pl.BlockSpec((None, plan.query, l), lambda b, t, *_: (b, t, 0)),
          scratch_shapes=[pltpu.VMEM((2, plan.lanes, plan.key), jnp.float32),   # two slots
                          pltpu.VMEM((2, plan.key, l), jnp.float32),
                          pltpu.VMEM((plan.query, l), jnp.float32),
                          pltpu.SemaphoreType.DMA((2, 2))]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=pltpu.InterpretParams() if _common.interpret("pallas_tpu") else False,
  )(query_boxes, key_boxes, f_query, f_keys, _ordered(layout, q, plan.pixels))
  return _unordered(layout, out)


def _gpu_bilateral(static: _Static, layout: _Layout, q):
  """(B, N, L) float32 bilateral message on the Mosaic GPU kernel (64-pixel tiles)."""
  from kernels import dense_crf_mosaic_gpu as gpu
  b, n, l = q.shape
  d = layout.features.shape[-1]
  plan = _tile_plan(static, n, d)
  out = gpu.bilateral(layout.features, _ordered(layout, q, plan.pixels),
                      _tile_boxes(layout.features, gpu.TILE), SKIP_DISTANCE2,
                      _common.interpret("pallas_gpu"))
  return _unordered(layout, out)


# ---------------------------------------------------------------------------------------------
# The filter with its custom VJP (K - I is symmetric, so the adjoint is the same filter).


def _bilateral_impl(static: _Static, layout, q):
  """layout: `_prepare(static, features)`."""
  if static.implementation == "xla":
    return _xla_bilateral(layout, q)
  if static.implementation == "pallas_tpu":
    return _tpu_bilateral(static, layout, q)
  if static.implementation == "pallas_gpu":
    return _gpu_bilateral(static, layout, q)
  raise AssertionError(static.implementation)


def _no_cotangent(x):
  if jnp.issubdtype(x.dtype, jnp.integer):
    return np.zeros(x.shape, jax.dtypes.float0)
  return jnp.zeros_like(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bilateral(static: _Static, layout, q):
  return _bilateral_impl(static, layout, q)


def _bilateral_fwd(static, layout, q):
  return _bilateral_impl(static, layout, q), layout


def _bilateral_bwd(static, layout, grad_out):
  grad_q = _bilateral_impl(static, layout, grad_out.astype(jnp.float32))
  return jax.tree.map(_no_cotangent, layout), grad_q


_bilateral.defvjp(_bilateral_fwd, _bilateral_bwd)


def bilateral_filter(q, image, *, bi_xy_std=67.0, bi_rgb_std=3.0, implementation="auto",
                     block_sizes: BlockSizes = BlockSizes()):
  """m_bi (B, H, W, L) float32: the bilateral message of one mean-field step, for q (B, H, W, L).

  sum over j != i of exp(-|p_i - p_j|^2 / (2 bi_xy_std^2) - |I_i - I_j|^2 / (2 bi_rgb_std^2)) q[j].
  Differentiable with respect to q (the same filter applied to the cotangent).
  """
  q, image = jnp.asarray(q), jnp.asarray(image)
  _check_image(q, image, "q")
  _check_std(bi_xy_std, "bi_xy_std")
  _check_std(bi_rgb_std, "bi_rgb_std")
  implementation = _common.resolve_implementation(implementation, _OP, _IMPLEMENTATIONS)
  b, h, w, l = q.shape
  static = _Static(implementation, h, w, block_sizes)
  features = bilateral_features(image, float(bi_xy_std), float(bi_rgb_std)).reshape(b, h * w, -1)
  out = _bilateral(static, _prepare(static, features), q.astype(jnp.float32).reshape(b, h * w, l))
  return out.reshape(b, h, w, l)


# ---------------------------------------------------------------------------------------------
# Mean field.


def _mean_field(static, logits, features, iterations, pos_w, pos_xy_std, bi_w, compatibility):
  b, h, w, l = logits.shape
  unary = logits.astype(jnp.float32)
  layout = _prepare(static, features)   # once, outside the iterations

  def step(q, _):
    m_bi = _bilateral(static, layout, q.reshape(b, h * w, l)).reshape(b, h, w, l)
    m_pos = spatial_filter(q, pos_xy_std)
    message = bi_w * m_bi + pos_w * m_pos
    pairwise = jnp.einsum("bhwk,lk->bhwl", message, compatibility, precision=_HIGHEST)
    return jax.nn.softmax(unary - pairwise, axis=-1), None

  q, _ = lax.scan(step, jax.nn.softmax(unary, axis=-1), None, length=iterations)
  return q


# ---------------------------------------------------------------------------------------------
# Argument checks.


def _check_std(value, name):
  if isinstance(value, jax.core.Tracer) or not isinstance(value, numbers.Real) or isinstance(value, bool):
    raise ValueError(f"{_OP}: {name} must be a Python float (a static kernel width), got "
                     f"{type(value).__name__} {value!r}; pass a number, not an array.")
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f"{_OP}: {name} must be a positive finite number (a standard deviation), "
                     f"got {value!r}.")


def _check_image(values, image, name):
  if jnp.ndim(values) != 4:
    raise ValueError(f"{_OP}: {name} must have rank 4, (B, H, W, L) channels-last, got shape "
                     f"{jnp.shape(values)}.")
  if not jnp.issubdtype(jnp.result_type(values), jnp.floating):
    raise ValueError(f"{_OP}: {name} must be floating point, got {jnp.result_type(values)}.")
  if jnp.ndim(image) != 4 or jnp.shape(image)[:3] != jnp.shape(values)[:3]:
    raise ValueError(f"{_OP}: image must have shape (B, H, W, C) with the {name}'s (B, H, W) = "
                     f"{jnp.shape(values)[:3]}, got shape {jnp.shape(image)}; resize the logits "
                     "to the image (or the image to the logits) first.")
  if jnp.shape(values)[3] == 0 or jnp.shape(image)[3] == 0:
    raise ValueError(f"{_OP}: {name} and image need at least one channel, got shapes "
                     f"{jnp.shape(values)} and {jnp.shape(image)}.")
  if not (jnp.issubdtype(jnp.result_type(image), jnp.floating)
          or jnp.issubdtype(jnp.result_type(image), jnp.integer)):
    raise ValueError(f"{_OP}: image must be numeric, got {jnp.result_type(image)}.")


def _check_weight(value, name):
  if isinstance(value, bool) or jnp.ndim(value) != 0:
    raise ValueError(f"{_OP}: {name} must be a scalar (a float or a 0-d array, possibly traced), "
                     f"got shape {jnp.shape(value)}.")
  if not jnp.issubdtype(jnp.result_type(value), jnp.floating) and not jnp.issubdtype(
      jnp.result_type(value), jnp.integer):
    raise ValueError(f"{_OP}: {name} must be a real number, got {jnp.result_type(value)}.")


_IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_gpu")


def dense_crf(logits: jax.Array, image: jax.Array, *, iterations: int = 10, pos_w=3.0,
              pos_xy_std: float = 1.0, bi_w=4.0, bi_xy_std: float = 67.0, bi_rgb_std: float = 3.0,
              compatibility: jax.Array | None = None, implementation: str = "auto",
              block_sizes: BlockSizes = BlockSizes()) -> jax.Array:
  """Fully connected CRF mean-field inference, exact (all pairs of pixels).

  Args:
    logits: (B, H, W, L) float unary logits (negative unary energies), L labels.
    image: (B, H, W, C) the image the pairwise terms compare, in its own units (e.g. 0..255
      RGB; the colour std is in the same units). Gets no gradient.
    iterations: mean-field steps (0 returns softmax(logits)).
    pos_w: weight of the spatial (smoothness) kernel; a float or a 0-d array, may be traced.
    pos_xy_std: its standard deviation in pixels (Python float).
    bi_w: weight of the bilateral (appearance) kernel; a float or a 0-d array, may be traced.
    bi_xy_std: its position standard deviation in pixels (Python float).
    bi_rgb_std: its colour standard deviation in image units (Python float).
    compatibility: (L, L) label compatibility mu; mu[l, l'] scales the message of label l' in
      label l's energy. None: Potts, 1 - identity.
    implementation: "auto", "xla", "pallas_tpu" (Mosaic TPU) or "pallas_gpu" (Mosaic GPU,
      Hopper and newer); a Pallas one runs in interpret mode without its accelerator.
    block_sizes: the TPU kernel's pixel tiles (the GPU kernel's are 64 pixels, fixed).

  Returns:
    Q (B, H, W, L) in the logits' dtype (computed in float32), rows summing to 1. Differentiable
    with respect to logits, pos_w, bi_w and compatibility; jit-able and batched.
  """
  logits, image = jnp.asarray(logits), jnp.asarray(image)
  _check_image(logits, image, "logits")
  if not isinstance(iterations, numbers.Integral) or isinstance(iterations, bool) or iterations < 0:
    raise ValueError(f"{_OP}: iterations must be a non-negative int (mean-field steps), got "
                     f"{iterations!r}.")
  for name, value in (("pos_xy_std", pos_xy_std), ("bi_xy_std", bi_xy_std), ("bi_rgb_std", bi_rgb_std)):
    _check_std(value, name)
  _check_weight(pos_w, "pos_w")
  _check_weight(bi_w, "bi_w")
  b, h, w, l = logits.shape
  if compatibility is None:
    compatibility = 1.0 - jnp.eye(l, dtype=jnp.float32)
  else:
    compatibility = jnp.asarray(compatibility)
    if jnp.shape(compatibility) != (l, l):
      raise ValueError(f"{_OP}: compatibility must have shape (L, L) = ({l}, {l}) for {l} labels, "
                       f"got shape {jnp.shape(compatibility)}; None gives Potts (1 - identity).")
    if not jnp.issubdtype(compatibility.dtype, jnp.floating):
      raise ValueError(f"{_OP}: compatibility must be floating point, got {compatibility.dtype}.")
  implementation = _common.resolve_implementation(implementation, _OP, _IMPLEMENTATIONS)
  static = _Static(implementation, h, w, block_sizes)
  features = bilateral_features(image, float(bi_xy_std), float(bi_rgb_std)).reshape(b, h * w, -1)
  q = _mean_field(static, logits, features, int(iterations),
                  jnp.asarray(pos_w, jnp.float32), float(pos_xy_std),
                  jnp.asarray(bi_w, jnp.float32), compatibility.astype(jnp.float32))
  return q.astype(logits.dtype)


