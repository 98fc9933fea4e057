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
  out += exp(-d^2 / 2) @ Q_tile. Error bounds: see `pallas_tpu`.
- `pallas_gpu` (`pallas_mosaic_gpu`, Hopper and newer) is the same algorithm on the tensor cores
  (wgmma) with 64-pixel tiles and float32 operands as three bfloat16 parts.

Each implementation is a module of its own (`xla`, `pallas_tpu`, `pallas_mosaic_gpu`), imported
here only when chosen; what they share (features, Z-order, tiles, the skip test) is `geometry`.

K is symmetric and m_bi = (K - I) Q is linear in Q, so the filter's custom VJP applies the same
filter to the cotangent (its backward costs one forward filter). Gradients flow to the logits, to
`pos_w`, `bi_w` and `compatibility` (through JAX autodiff of the mean-field loop, which keeps
each iteration's Q); the image and the standard deviations get none.
"""

import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels import common
from kernels.crf.geometry import (BlockSizes, TilePlan, active_tile_pairs,
                                  bilateral_features, prepare, tile_boxes, tile_plan)

_OP = "dense_crf"
_HIGHEST = lax.Precision.HIGHEST
def _backend(implementation: str):
  return common.backend("kernels.crf", implementation)


class _Static(NamedTuple):
  """Hashable configuration of one call (the custom VJP's non-differentiable argument)."""
  implementation: str
  height: int
  width: int
  blocks: BlockSizes


# ---------------------------------------------------------------------------------------------
# The separable spatial filter (XLA for every implementation).


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
# The bilateral filter with its custom VJP (K - I is symmetric, so the adjoint is the same filter).


def _tile_plan(static: _Static, n: int, d: int) -> TilePlan:
  """The Pallas kernel's tiles: the TPU kernel's from `static.blocks`, the GPU kernel's fixed."""
  if static.implementation == "pallas_gpu":
    gpu = _backend("pallas_gpu")
    blocks, multiple = gpu.BLOCK_SIZES, gpu.TILE
  else:
    blocks, multiple = static.blocks, 128
  if blocks.query <= 0 or blocks.query % multiple or blocks.key_tiles <= 0:
    raise ValueError(f"{_OP}: block_sizes must have query a positive multiple of {multiple} "
                     f"pixels and key_tiles >= 1, got {blocks}.")
  return tile_plan(blocks, n, d)


def _prepare(static: _Static, features):
  """What the filter implementation needs from features (B, N, D), computed outside the
  iterations: the features themselves (xla) or their Z-ordered Layout (Pallas)."""
  if static.implementation == "xla":
    return features
  b, n, d = features.shape
  if static.implementation == "pallas_gpu" and d > _backend("pallas_gpu").MAX_FEATURES:
    raise ValueError(f"{_OP}: implementation='pallas_gpu' takes images of at most "
                     f"{_backend('pallas_gpu').MAX_FEATURES - 2} channels, got {d - 2}; use 'xla'.")
  return prepare(features, _tile_plan(static, n, d))


def _bilateral_impl(static: _Static, prepared, q):
  """prepared: `_prepare(static, features)`."""
  backend = _backend(static.implementation)
  if static.implementation == "xla":
    return backend.bilateral(prepared, q)
  plan = _tile_plan(static, q.shape[1], prepared.features.shape[-1])
  return backend.bilateral(prepared, q, plan, common.interpret(static.implementation))


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
  implementation = common.resolve_implementation(implementation, _OP)
  b, h, w, l = q.shape
  static = _Static(implementation, h, w, block_sizes)
  features = bilateral_features(image, float(bi_xy_std), float(bi_rgb_std)).reshape(b, h * w, -1)
  out = _bilateral(static, _prepare(static, features), q.astype(jnp.float32).reshape(b, h * w, l))
  return out.reshape(b, h, w, l)


def tile_pairs_kept(image, *, bi_xy_std=67.0, bi_rgb_std=3.0, implementation="pallas_tpu",
                    block_sizes: BlockSizes = BlockSizes()):
  """(B,) float32: the fraction of (query tile, key tile) pairs a Pallas kernel computes for
  these images (the others are skipped), from the same bounding-box test in XLA."""
  if implementation not in ("pallas_tpu", "pallas_gpu"):
    raise ValueError(f"tile_pairs_kept: implementation must be 'pallas_tpu' or 'pallas_gpu' (the "
                     f"kernels that skip tiles), got {implementation!r}.")
  b, h, w, _ = jnp.shape(image)
  static = _Static(implementation, h, w, block_sizes)
  features = bilateral_features(jnp.asarray(image), float(bi_xy_std), float(bi_rgb_std))
  layout = _prepare(static, features.reshape(b, h * w, -1))
  plan = _tile_plan(static, h * w, layout.features.shape[-1])
  active = active_tile_pairs(tile_boxes(layout.features, plan.query),
                             tile_boxes(layout.features, plan.key))
  return jnp.mean(active, axis=(1, 2))


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
  implementation = common.resolve_implementation(implementation, _OP)
  static = _Static(implementation, h, w, block_sizes)
  features = bilateral_features(image, float(bi_xy_std), float(bi_rgb_std)).reshape(b, h * w, -1)
  q = _mean_field(static, logits, features, int(iterations),
                  jnp.asarray(pos_w, jnp.float32), float(pos_xy_std),
                  jnp.asarray(bi_w, jnp.float32), compatibility.astype(jnp.float32))
  return q.astype(logits.dtype)


