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
- `pallas_tpu` tiles the pixels (2-D blocks, so that a tile is compact in position), computes
  |f_i - f_j|^2 = |a|^2 + |b|^2 - 2 a.b on the matrix unit with features re-centred on the query
  tile's centre (a = f_i - c, b = f_j - c) and skips key tiles whose feature bounding box is
  farther than `cutoff` from the query tile's (see `SKIP_EPSILON`); out += exp(-d^2 / 2) @ Q_tile.

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
from jax import lax

from kernels import _common

_OP = "dense_crf"
_HIGHEST = lax.Precision.HIGHEST

# A key tile is skipped when every kernel value between it and the query tile is below this;
# the bilateral message of a pixel then errs by at most SKIP_EPSILON * (number of skipped
# pixels) per label in absolute value (Q <= 1), e.g. <= 1.9e-7 for a 500 x 375 image.
SKIP_EPSILON = 1e-12
SKIP_DISTANCE2 = 2.0 * math.log(1.0 / SKIP_EPSILON)   # exp(-d^2 / 2) < eps  <=>  d^2 > this

# The xla filter's working set: one (B, chunk, N) float32 kernel block of at most this many
# elements (64 MiB).
_XLA_BLOCK_ELEMENTS = 1 << 24


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """The Pallas kernels' pixel tiles: a query tile is `tile_rows` x `tile_cols` pixels (a
  multiple of 128 pixels), a key tile `key_tiles` consecutive query tiles along a row."""
  tile_rows: int = 8
  tile_cols: int = 16
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
  chunk = _XLA_BLOCK_ELEMENTS // max(n * batch, 1)
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
# The filter with its custom VJP (K - I is symmetric, so the adjoint is the same filter).


def _bilateral_impl(static: _Static, features, q):
  if static.implementation == "xla":
    return _xla_bilateral(features, q)
  if static.implementation == "pallas_tpu":
    return _tpu_bilateral(static, features, q)
  raise AssertionError(static.implementation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bilateral(static: _Static, features, q):
  return _bilateral_impl(static, features, q)


def _bilateral_fwd(static, features, q):
  return _bilateral_impl(static, features, q), features


def _bilateral_bwd(static, features, grad_out):
  return jnp.zeros_like(features), _bilateral_impl(static, features, grad_out.astype(jnp.float32))


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
  out = _bilateral(static, features, q.astype(jnp.float32).reshape(b, h * w, l))
  return out.reshape(b, h, w, l)


# ---------------------------------------------------------------------------------------------
# Mean field.


def _mean_field(static, logits, features, iterations, pos_w, pos_xy_std, bi_w, compatibility):
  b, h, w, l = logits.shape
  unary = logits.astype(jnp.float32)

  def step(q, _):
    m_bi = _bilateral(static, features, q.reshape(b, h * w, l)).reshape(b, h, w, l)
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


_IMPLEMENTATIONS = ("xla", "pallas_tpu")


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
    implementation: "auto", "xla" or "pallas_tpu" (Mosaic TPU; interpret mode elsewhere).
    block_sizes: the Pallas kernels' pixel tiles.

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


def _tpu_bilateral(static, features, q):
  raise NotImplementedError
