"""The XLA RoI ops in plain jax.numpy: the readable specification and the fallback everywhere.

RoIAlign gathers the four bilinear taps of every sample from the maps flattened to (M, C) (one
gather for every FPN level at once, see `FlatMaps`): memory K x out_h x out_w x C per sample
number, a loop over sample numbers as long as the box with the most samples needs. RoIPool loops
over the cells of the largest bin. The backward passes are scatter-adds: deterministic on CPU and
TPU, and on GPU only under `--xla_gpu_deterministic_ops=true`.
"""

import jax.numpy as jnp
from jax import lax

from kernels.roi.geometry import LOWEST, BinBounds, BoxGeometry, FlatMaps, empty_bins, single_map


# ---------------------------------------------------------------------------------------------
# RoIAlign


def _sample_positions(start, bin_size, grid, index, n_out):
  """Sample coordinates (K, n_out) of sample number `index` (K,) in each bin, torchvision's order."""
  p = jnp.arange(n_out, dtype=jnp.float32)
  return (start[:, None] + p * bin_size[:, None]
          + (index.astype(jnp.float32) + 0.5)[:, None] * bin_size[:, None]
          / grid[:, None].astype(jnp.float32))


def _bilinear_taps(start, bin_size, grid, index, active, n_out, size):
  """Low/high cell indices (K, n_out) int32 and their weights for sample `index` (K,) of every bin.

  size: the map's extent on this axis, an int or (K,) int32 per box. Samples outside
  [-1, size] and boxes with active False get weight 0; inside, coordinates clamp to
  [0, size - 1] (torchvision's rule).
  """
  size = size[:, None] if jnp.ndim(size) else size
  s = _sample_positions(start, bin_size, grid, index, n_out)
  valid = active[:, None] & (s >= -1.0) & (s <= size)
  s = jnp.clip(s, 0.0, size - 1.0)
  low = jnp.floor(s).astype(jnp.int32)
  high = jnp.minimum(low + 1, size - 1)
  frac = s - low.astype(jnp.float32)
  return low, high, jnp.where(valid, 1.0 - frac, 0.0), jnp.where(valid, frac, 0.0)


def _sample_loop(geometry: BoxGeometry, maps: FlatMaps, out_h, out_w, body, init):
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


def roi_align_flat_forward(flat, geometry: BoxGeometry, maps: FlatMaps, out_h, out_w):
  """(K, out_h, out_w, C) float32 from the flattened maps (M, C)."""
  def accumulate(taps, acc):
    for index, weight in taps:
      acc = acc + weight[..., None] * flat[index].astype(jnp.float32)
    return acc

  k, c = geometry.batch.shape[0], flat.shape[1]
  return _sample_loop(geometry, maps, out_h, out_w, accumulate,
                      jnp.zeros((k, out_h, out_w, c), jnp.float32))


def roi_align_flat_backward(num_rows, geometry: BoxGeometry, maps: FlatMaps, grad_out):
  """Gradient (M, C) float32 of the flattened maps: each sample's weights scatter grad_out back."""
  c = grad_out.shape[-1]
  grad_out = grad_out.astype(jnp.float32)

  def scatter(taps, grad):
    for index, weight in taps:
      grad = grad.at[index.reshape(-1)].add((weight[..., None] * grad_out).reshape(-1, c))
    return grad

  out_h, out_w = grad_out.shape[1:3]
  return _sample_loop(geometry, maps, out_h, out_w, scatter, jnp.zeros((num_rows, c), jnp.float32))


def roi_align_forward(features, geometry: BoxGeometry, out_h, out_w):
  """(K, out_h, out_w, C) in the features' dtype from features (N, H, W, C)."""
  n, h, w, c = features.shape
  out = roi_align_flat_forward(features.reshape(n * h * w, c), geometry,
                               single_map(geometry, features.shape), out_h, out_w)
  return out.astype(features.dtype)


def roi_align_backward(shape, dtype, geometry: BoxGeometry, grad_out):
  """Feature gradient (N, H, W, C)."""
  n, h, w, _ = shape
  grad = roi_align_flat_backward(n * h * w, geometry, single_map(geometry, shape), grad_out)
  return grad.reshape(shape).astype(dtype)


# ---------------------------------------------------------------------------------------------
# RoIPool


def roi_pool_forward(features, bounds: BinBounds):
  """Max (K, out_h, out_w, C) float32 and its flat index into (N*H*W) (-1: none), first maximum.

  An empty bin gives 0; otherwise the maximum, found in row-major order with a strict '>'
  (torchvision's scan), so the gradient goes to the first maximum.
  """
  n, h, w, c = features.shape
  flat = features.reshape(n * h * w, c)
  b = bounds
  k, out_h = b.h_start.shape
  out_w = b.w_start.shape[1]
  max_h = jnp.maximum(jnp.max(b.h_end - b.h_start, initial=0), 0)
  max_w = jnp.maximum(jnp.max(b.w_end - b.w_start, initial=0), 0)

  def step(t, carry):
    best, where_best = carry
    y = b.h_start + t // jnp.maximum(max_w, 1)  # row-major over each bin: rows outer
    x = b.w_start + t % jnp.maximum(max_w, 1)
    inside = (y < b.h_end)[:, :, None] & (x < b.w_end)[:, None, :]
    index = (b.batch[:, None, None] * h + jnp.minimum(y, h - 1)[:, :, None]) * w + jnp.minimum(x, w - 1)[:, None, :]
    value = flat[index].astype(jnp.float32)
    better = inside[..., None] & (value > best)
    return jnp.where(better, value, best), jnp.where(better, index[..., None], where_best)

  init = (jnp.full((k, out_h, out_w, c), LOWEST, jnp.float32),
          jnp.full((k, out_h, out_w, c), -1, jnp.int32))
  best, where_best = lax.fori_loop(0, max_h * max_w, step, init)
  empty = empty_bins(bounds)
  return jnp.where(empty, 0.0, best), jnp.where(empty, -1, where_best)


def roi_pool_backward(shape, dtype, argmax, grad_out):
  """Feature gradient: each output's gradient added at its first maximum (a scatter-add)."""
  n, h, w, c = shape
  channel = jnp.broadcast_to(jnp.arange(c), argmax.shape)
  target = jnp.where(argmax >= 0, argmax, n * h * w)  # -1 (empty bin) goes to a dropped row
  grad = jnp.zeros((n * h * w + 1, c), jnp.float32)
  grad = grad.at[target.reshape(-1), channel.reshape(-1)].add(grad_out.astype(jnp.float32).reshape(-1))
  return grad[:-1].reshape(shape).astype(dtype)
