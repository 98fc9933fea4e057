"""The dense CRF's bilateral filter in Pallas (Mosaic TPU): tiled unnormalised attention over
Z-ordered pixels (see `geometry`), negligible tile pairs skipped.

For a query tile with feature centre c (the middle of its bounding box), the augmented vectors
    q_aug = [a, |a|^2, 1, 0...],  k_aug = [-2 b, 1, |b|^2, 0...],   a = f_i - c, b = f_j - c
give q_aug . k_aug = |f_i - f_j|^2 in one (TQ, 8) @ (8, TK) product on the matrix unit;
out += exp(-d^2 / 2) @ Q_tile. Key tiles out of reach are skipped (bounding boxes in SMEM) and
the ones within reach are walked double-buffered (the next tile's DMA runs while this one
computes).

Error bound: in float32 (HIGHEST precision: float32-accurate bfloat16 passes) the expansion
loses |delta d^2| <= (D + 2) 2^-24 (|a| + |b|)^2 to cancellation. Re-centring on the query tile
makes |a| <= r, the tile's feature radius (half its bounding-box diagonal), and for every pair
that is not negligible (d^2 <= SKIP_DISTANCE2 = 55.3) |b| <= r + 7.4, so each kernel value
exp(-d^2 / 2) has a relative error <= (D + 2) 2^-25 (2 r + 7.4)^2: for RGB (D = 5) about
1.6e-4 at r = 10 (a tile spanning 20 colour stds) and 6.6e-3 at r = 85 (a black/white edge in
a tile, colour std 3 units). Z-order keeps most tiles' r small.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.crf.geometry import SKIP_DISTANCE2, Layout, TilePlan, ordered, tile_boxes, unordered

_HIGHEST = lax.Precision.HIGHEST


def _kernel(query_boxes, key_boxes, f_query, f_keys, q_keys, out_ref, k_tiles, q_tiles, acc,
                sems, *, plan: TilePlan):
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


def bilateral(layout: Layout, q, plan: TilePlan, interpret: bool):
  """(B, N, L) float32: sum over j != i of exp(-|f_i - f_j|^2 / 2) q[j], q (B, N, L) float32."""
  b, n, l = q.shape
  d = layout.features.shape[-1]
  query_boxes = tile_boxes(layout.features, plan.query).reshape(-1)
  key_boxes = tile_boxes(layout.features, plan.key).reshape(-1)
  f_query = jnp.pad(layout.features, ((0, 0), (0, 0), (0, plan.lanes - d)))   # (B, P, lanes)
  f_keys = f_query.transpose(0, 2, 1)                                            # (B, lanes, P)
  out = pl.pallas_call(
      functools.partial(_kernel, plan=plan),
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
      interpret=pltpu.InterpretParams() if interpret else False,
  )(query_boxes, key_boxes, f_query, f_keys, ordered(layout, q, plan.pixels))
  return unordered(layout, out)
