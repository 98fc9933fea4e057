"""The dense CRF's bilateral filter for Hopper GPUs in Pallas Mosaic GPU: the tiled unnormalised
attention of the TPU kernel (`pallas_tpu`) on the tensor cores (wgmma).

One program per (image, query tile of 64 Z-ordered pixels, see `geometry`) walks the key tiles (64
pixels each) whose feature bounding box comes within sqrt(SKIP_DISTANCE2) of its own, double
buffered (the next such tile's TMA copies run while this one computes). Per key tile, two
products on the tensor cores:

  1. d^2 = q_aug @ k_aug (64 x 64): q_aug = [a, |a|^2, 1 ... 1] (XLA, once per query tile),
     k_aug = [-2 b; 1; b_1^2; ...; b_D^2] built in registers from the TMA'd key features, with
     a = f_i - c and b = f_j - c re-centred on the query tile's centre c. The squared norms of b
     come out of the product (the ones in q_aug), so no register reduction is needed.
  2. out += exp(-d^2 / 2) @ Q_tile (64 x L), j == i masked to 0.

wgmma takes 16-bit operands (float32 would run as TF32): every float32 operand is split into
three bfloat16 parts and the six products with i + j < 3 accumulate in float32 (relative error
~2^-24, `mosaic_gpu_common.parts` / `mma`). The filter is symmetric, so the backward pass is
this kernel on the cotangent.

Mosaic GPU: `plgpu.load(..., layout=WGMMA)` from an untransformed float32 SMEM ref fails lowering
("Failed to synthesize a transfer pattern that avoids bank conflicts"): the raw key features'
ref has an (8, 32) tiling and 128-byte swizzle.
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import mosaic_gpu_common as mgpu
from kernels.common import round_up
from kernels.crf.geometry import SKIP_DISTANCE2, BlockSizes, Layout, TilePlan, ordered, tile_boxes, unordered

TILE = 64          # pixels per query and key tile (wgmma's M granularity)
BLOCK_SIZES = BlockSizes(query=TILE, key_tiles=1)
_WIDTH = 64        # augmented feature width: 2 D + 1 <= 64 (one 128-byte bfloat16 swizzle row)
MAX_FEATURES = (_WIDTH - 1) // 2


def augmented_queries(features, boxes):
  """(B, P, 64) float32 [a, |a|^2, 1 x D, 0 ...], a = f - centre of the pixel's 64-pixel tile."""
  b, p, d = features.shape
  centre = 0.5 * (boxes[:, :, 0] + boxes[:, :, 1])                    # (B, T, D)
  a = features - jnp.repeat(centre, TILE, axis=1)
  norm = jnp.sum(a * a, axis=-1, keepdims=True)
  aug = jnp.concatenate([a, norm, jnp.ones((b, p, d), jnp.float32)], axis=-1)
  return jnp.pad(aug, ((0, 0), (0, 0), (0, _WIDTH - aug.shape[-1])))


def raw_keys(features):
  """(B, 64, P) float32 rows [f_1 .. f_D, 0, f_1 .. f_D, 0 ...]: the key side before re-centring."""
  b, p, d = features.shape
  rows = jnp.concatenate([features, jnp.zeros((b, p, 1), jnp.float32), features], axis=-1)
  rows = jnp.pad(rows, ((0, 0), (0, 0), (0, _WIDTH - rows.shape[-1])))
  return rows.transpose(0, 2, 1)


def bilateral(layout: Layout, q, plan: TilePlan, interpret: bool):
  """(B, N, L) float32: sum over j != i of exp(-|f_i - f_j|^2 / 2) q[j], q (B, N, L) float32.

  The layout's features are in tile (Z-) order, padded to P = plan.pixels, a multiple of 64
  (padded pixels get q = 0); `plan` has 64-pixel tiles (BLOCK_SIZES).
  """
  out = _bilateral(layout.features, ordered(layout, q, plan.pixels),
                   tile_boxes(layout.features, TILE), interpret)
  return unordered(layout, out)


def _bilateral(features, q, boxes, interpret: bool):
  """(B, P, L) float32 for features (B, P, D) in tile order, q (B, P, L), boxes (B, P / 64, 2, D)
  per-tile [lo, hi] feature bounding boxes."""
  b, p, d = features.shape
  l = q.shape[-1]
  tiles = p // TILE
  lp = round_up(l, 64)
  q_parts = mgpu.parts(augmented_queries(features, boxes), 3)
  keys = raw_keys(features)
  v_parts = mgpu.parts(jnp.pad(q, ((0, 0), (0, 0), (0, lp - l))), 3)
  box_table = boxes.reshape(-1).astype(jnp.float32)

  def kernel(box_table, qa0, qa1, qa2, keys, v0, v1, v2, out, *scratch):
    qa_tiles, ka_tiles, s_tiles = scratch[0:3], scratch[3:6], scratch[6:9]
    v_slots = (scratch[9:12], scratch[12:15])          # two slots of the key tile's Q parts
    key_slots = scratch[15:17]                         # two slots of its raw features
    out_smem, bar_q, bar_k, bar_v = scratch[17:]
    image, t = lax.axis_index("image"), lax.axis_index("tile")

    def box(tile, side, k):
      return box_table[((image * tiles + tile) * 2 + side) * d + k]

    q_lo = [box(t, 0, k) for k in range(d)]
    q_hi = [box(t, 1, k) for k in range(d)]
    centre = [(lo + hi) * 0.5 for lo, hi in zip(q_lo, q_hi)]
    for source, tile in zip((qa0, qa1, qa2), qa_tiles):
      plgpu.copy_gmem_to_smem(source.at[image, pl.ds(t * TILE, TILE), :], tile, bar_q)
    plgpu.barrier_wait(bar_q)

    def within_reach(s):
      distance2 = 0.0
      for k in range(d):
        gap = jnp.maximum(jnp.maximum(box(s, 0, k) - q_hi[k], q_lo[k] - box(s, 1, k)), 0.0)
        distance2 = distance2 + gap * gap
      return distance2 <= SKIP_DISTANCE2

    def next_key_tile(s):
      """The first key tile after s within reach, or `tiles` when there is none."""
      def skip(s):
        return (s < tiles) & ~within_reach(jnp.minimum(s, tiles - 1))
      return lax.while_loop(skip, lambda s: s + 1, s + 1)

    def issue(s, slot):
      plgpu.copy_gmem_to_smem(keys.at[image, :, pl.ds(s * TILE, TILE)], key_slots[slot],
                              bar_k.at[slot])
      for source, tile in zip((v0, v1, v2), v_slots[slot]):
        plgpu.copy_gmem_to_smem(source.at[image, pl.ds(s * TILE, TILE), :], tile, bar_v.at[slot])

    row = mgpu.iota((_WIDTH, TILE), 0, interpret)
    centre_rows = sum(jnp.where((row == k) | (row == d + 1 + k), centre[k], 0.0) for k in range(d))
    query_index = t * TILE + mgpu.iota((TILE, TILE), 0, interpret)
    key_offset = mgpu.iota((TILE, TILE), 1, interpret)

    def accumulate(out_acc):
      def compute(s, slot):
        key_smem = key_slots[slot]
        plgpu.barrier_wait(bar_k.at[slot])
        raw = key_smem[...] if interpret else plgpu.load(key_smem, (), layout=plgpu.Layout.WGMMA)
        g = raw - centre_rows                                          # (64, TILE)
        k_aug = jnp.where(row < d, -2.0 * g,
                          jnp.where(row == d, 1.0, jnp.where(row <= 2 * d, g * g, 0.0)))
        for tile, part in zip(ka_tiles, mgpu.parts(k_aug, 3)):
          tile[...] = part
        plgpu.commit_smem()

        def distances(d2_acc):
          mgpu.mma(d2_acc, qa_tiles, ka_tiles)
          return d2_acc[...]

        d2 = pl.run_scoped(distances, plgpu.ACC((TILE, TILE), jnp.float32))
        weights = jnp.exp(-0.5 * jnp.maximum(d2, 0.0))
        weights = jnp.where(query_index == s * TILE + key_offset, 0.0, weights)   # j != i
        for tile, part in zip(s_tiles, mgpu.parts(weights, 3)):
          tile[...] = part
        plgpu.commit_smem()
        plgpu.barrier_wait(bar_v.at[slot])
        mgpu.mma(out_acc, s_tiles, v_slots[slot])

      # Double-buffered walk over the key tiles within reach: the next tile's copies run into
      # the other slot while this one computes (static slots: two copies of the code).
      first = next_key_tile(-1)

      @pl.when(first < tiles)
      def _():
        issue(first, 0)

      def step(carry):
        s, slot = carry
        following = next_key_tile(s)
        for this in (0, 1):
          @pl.when((slot == this) & (following < tiles))
          def _():
            issue(following, 1 - this)

          @pl.when(slot == this)
          def _():
            compute(s, this)
        return following, 1 - slot

      lax.while_loop(lambda carry: carry[0] < tiles, step, (first, jnp.int32(0)))
      out_smem[...] = out_acc[...]

    pl.run_scoped(accumulate, plgpu.ACC((TILE, lp), jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out.at[image, pl.ds(t * TILE, TILE), :])
    plgpu.wait_smem_to_gmem(0)

  bf16 = jnp.bfloat16
  swizzled = lambda shape: plgpu.SMEM(shape, bf16, transforms=mgpu.smem_transforms(bf16))
  out = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((b, p, lp), jnp.float32),
      grid=(b, tiles),
      grid_names=("image", "tile"),
      scratch_types=(
          [swizzled((TILE, _WIDTH)) for _ in range(3)]       # q_aug parts (M x K)
          + [swizzled((_WIDTH, TILE)) for _ in range(3)]     # k_aug parts (K x N)
          + [swizzled((TILE, TILE)) for _ in range(3)]       # kernel values (M x K)
          + [swizzled((TILE, lp)) for _ in range(6)]         # Q of the key tile (K x N), 2 slots
          + [plgpu.SMEM((_WIDTH, TILE), jnp.float32, transforms=mgpu.smem_transforms(jnp.float32))
             for _ in range(2)]                              # raw key features, 2 slots
          + [plgpu.SMEM((TILE, lp), jnp.float32),
             plgpu.Barrier(num_arrivals=3), plgpu.Barrier(num_barriers=2),
             plgpu.Barrier(num_arrivals=3, num_barriers=2)]),
      interpret=mgpu.InterpretParams() if interpret else None,
  )(box_table, *q_parts, keys, *v_parts)
  return out[:, :, :l]
