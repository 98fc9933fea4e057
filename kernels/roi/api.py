"""The RoI ops' API: argument checks, implementation choice, batching and gradients.

roi_align / multilevel_roi_align / fpn_levels: RoIAlign (He et al. 2017, Mask R-CNN) as
torchvision's C++/CUDA `roi_align` kernels (csrc/ops/cpu/roi_align_kernel.cpp), channels-last,
and detectron2's ROIPooler level assignment. roi_pool / spatial_pyramid_pool: RoI max pooling
(Girshick 2015, Fast R-CNN) as torchvision's `roi_pool` (csrc/ops/cpu/roi_pool_kernel.cpp) and
SPPnet's pyramid of them (He et al. 2014). The arithmetic both share with every backend is in
`kernels.roi.geometry`; each implementation is a module of its own (`xla`, `pallas_tpu`,
`pallas_mosaic_gpu`), imported here only when chosen.

RoIAlign's sample arithmetic (geometry.py): a sample outside [-1, H] x [-1, W] contributes 0;
inside, its coordinates clamp to [0, H - 1] x [0, W - 1]; the sum is divided by
max(grid_h * grid_w, 1). Both the sample grid and the validity rule are products of a y part and
an x part, so a box's output is a separable weighting of the map: out[k] = Wy[k] @ F[b] @ Wx[k]^T
per channel, with

    Wy[k][ph, y] = 1/grid_h * sum_iy [y sample valid] * max(0, 1 - |clip(y_sample, 0, H-1) - y|)

The XLA version gathers the four bilinear taps of every sample; the Pallas versions walk the map
tiles a box touches and contract each tile with the Kronecker product of Wy and Wx on the matrix
unit. Gradients flow to the features only; the Pallas RoIAlign backward passes and the GPU
RoIPool backward are deterministic by construction (one program per feature tile, the image's
boxes in a fixed order); the XLA ones are scatter-adds (deterministic on CPU/TPU, on GPU only
under `--xla_gpu_deterministic_ops=true`). Under vmap the mapped axis is folded into the images
and boxes: still one kernel call.
"""

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels import common
from kernels.roi.geometry import (BinBounds, BlockSizes, BoxGeometry, FlatMaps, Plan, bin_bounds,
                                  box_geometry, empty_bins, tile_plan)

def _backend(implementation: str):
  return common.backend("kernels.roi", implementation)


def check_box_arguments(features, boxes, box_indices, op: str) -> None:
  """Checks the (features, boxes, box_indices) triple every RoI op takes: shapes and dtypes,
  and, where the values are concrete (not traced), finite boxes and indices in [0, N)."""
  if jnp.ndim(features) != 4:
    raise ValueError(f"{op}: features must have rank 4, (N, H, W, C) channels-last, got shape "
                     f"{jnp.shape(features)}.")
  if not jnp.issubdtype(jnp.result_type(features), jnp.floating):
    raise ValueError(f"{op}: features must be floating point, got {jnp.result_type(features)}.")
  if jnp.ndim(boxes) != 2 or jnp.shape(boxes)[1] != 4:
    raise ValueError(f"{op}: boxes must have shape (K, 4) as (x1, y1, x2, y2), got shape "
                     f"{jnp.shape(boxes)}.")
  if jnp.ndim(box_indices) != 1 or jnp.shape(box_indices)[0] != jnp.shape(boxes)[0]:
    raise ValueError(f"{op}: box_indices must have shape (K,) = ({jnp.shape(boxes)[0]},), one "
                     f"batch index per box, got shape {jnp.shape(box_indices)}.")
  if not jnp.issubdtype(jnp.result_type(box_indices), jnp.integer):
    raise ValueError(f"{op}: box_indices must be integers (batch index of each box), got "
                     f"{jnp.result_type(box_indices)}.")
  _check_box_values(features, boxes, box_indices, op)


def _concrete(x) -> np.ndarray | None:
  """x as a NumPy array, or None for a tracer (under jit, vmap or grad its values are unknown)."""
  return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def _check_box_values(features, boxes, box_indices, op: str) -> None:
  """ValueError for a non-finite box or an index outside [0, N), where the values are concrete.

  Traced values cannot be checked: there such a box pools nothing (output 0, no gradient),
  see `kernels.roi.geometry`.
  """
  n = jnp.shape(features)[0]
  indices = _concrete(box_indices)
  if indices is not None:
    bad = np.flatnonzero((indices < 0) | (indices >= n))
    if bad.size:
      k = int(bad[0])
      raise ValueError(f"{op}: box_indices[{k}] = {int(indices[k])} is outside [0, {n}) for "
                       f"features of {n} images ({bad.size} such boxes); pass each box's image "
                       "index in [0, N), or drop the box.")
  values = _concrete(boxes)
  if values is not None:
    bad = np.flatnonzero(~np.all(np.isfinite(values), axis=1))
    if bad.size:
      k = int(bad[0])
      raise ValueError(f"{op}: boxes[{k}] = {values[k].tolist()} has a non-finite coordinate "
                       f"({bad.size} such boxes); drop those boxes or clip them to the image "
                       "(e.g. keep = jnp.all(jnp.isfinite(boxes), axis=1)).")


# ---------------------------------------------------------------------------------------------
# RoIAlign: dispatch, batching and differentiation.


class _Static(NamedTuple):
  shape: tuple[int, int, int, int]   # features (N, H, W, C)
  dtype: jnp.dtype
  out_h: int
  out_w: int
  implementation: str                # "xla", "pallas_tpu" or "pallas_gpu"
  blocks: BlockSizes


def _plan(static: _Static) -> Plan:
  """The Pallas kernel's plan; the GPU kernel takes smaller tiles for outputs of > 64 bins."""
  blocks = static.blocks
  if static.implementation == "pallas_gpu":
    blocks = _backend("pallas_gpu").roi_align_block_sizes(blocks, static.out_h * static.out_w)
  return tile_plan(static.shape, static.out_h, static.out_w, blocks)


def _unless_gpu_cannot(requested, implementation, shapes, dtype, out_h, out_w, blocks, op) -> str:
  """"xla" instead of an "auto"-chosen "pallas_gpu" the Mosaic GPU kernels cannot take (their
  limits: pallas_mosaic_gpu.roi_align_check_supported); ValueError for an explicit "pallas_gpu"."""
  if implementation != "pallas_gpu":
    return implementation
  backend = _backend("pallas_gpu")
  for shape in shapes:
    plan = _plan(_Static(tuple(shape), jnp.dtype(dtype), out_h, out_w, implementation, blocks))
    reason = backend.roi_align_check_supported(plan, shape[-1], dtype)
    implementation = common.unless_unsupported(requested, implementation, reason, op)
  return implementation


def _forward_unbatched(static: _Static, features, geometry: BoxGeometry):
  if static.implementation == "xla":
    return _backend("xla").roi_align_forward(features, geometry, static.out_h, static.out_w)
  backend = _backend(static.implementation)
  out = backend.roi_align_forward(features, geometry, _plan(static),
                                  common.interpret(static.implementation))
  m = static.out_h * static.out_w
  out = out[:, :m].reshape(-1, static.out_h, static.out_w, static.shape[3])
  return out.astype(features.dtype)


def _backward_unbatched(static: _Static, geometry: BoxGeometry, grad_out):
  if static.implementation == "xla":
    return _backend("xla").roi_align_backward(static.shape, static.dtype, geometry, grad_out)
  plan = _plan(static)
  k, _, _, c = grad_out.shape
  grad_out = grad_out.astype(static.dtype).reshape(k, -1, c)
  grad_out = jnp.pad(grad_out, ((0, 0), (0, plan.bins_pad - grad_out.shape[1]), (0, 0)))
  backend = _backend(static.implementation)
  return backend.roi_align_backward(static.shape, static.dtype, geometry, grad_out, plan,
                                    common.interpret(static.implementation))


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
    boxes: (K, 4) float (x1, y1, x2, y2) in input-image pixels, finite.
    box_indices: (K,) int32 image of each box, in [0, N).
    output_size: out_h = out_w, or (out_h, out_w).
    spatial_scale: feature cells per input pixel (1 / stride).
    sampling_ratio: samples per bin along each axis; <= 0 means ceil(roi_size / output_size)
      (adaptive, torchvision's rule) for boxes up to max(10 map sizes, 256 cells) across (H
      along y, W along x); a larger box gets the count of one that size, so no box can hang a
      step (torchvision's uncapped count gives a box with a 1e8 coordinate ~2^31 samples per
      bin; kernels.roi.geometry.ADAPTIVE_EXTENT and ADAPTIVE_MIN_CAP).
    aligned: shift boxes by -0.5 cell (pixel-centre model, ROIAlignV2); False is the
      Mask R-CNN paper's original, which also forces boxes to at least 1x1 cell.
    implementation: "auto", "xla", "pallas_gpu" (Mosaic GPU, Hopper and newer; outputs of at
      most 256 bins that fit its shared memory, pallas_mosaic_gpu.roi_align_check_supported: "auto"
      uses xla for the others, e.g. Mask R-CNN's 28 x 28 mask targets) or "pallas_tpu".
    block_sizes: the Pallas kernels' map tile.
    active: optional (K,) bool; inactive boxes pool nothing (output 0) and cost nothing in the
      Pallas kernels.

  Returns:
    (K, out_h, out_w, C) in the features' dtype, accumulated in float32. Differentiable with
    respect to `features` (deterministic backward); boxes get no gradient.

  Raises:
    ValueError: for a box with a non-finite coordinate or an index outside [0, N), when boxes
      and box_indices are concrete. Traced (under jit, vmap or grad) they cannot be checked:
      such a box then pools nothing (output 0, no gradient to the features).
  """
  features, boxes, box_indices = jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(box_indices)
  check_box_arguments(features, boxes, box_indices, "roi_align")
  out_h, out_w = common.pair(output_size, "roi_align: output_size")
  if not isinstance(sampling_ratio, int):
    raise ValueError(f"roi_align: sampling_ratio must be an int (<= 0 for adaptive), got {sampling_ratio!r}.")
  requested = implementation
  implementation = common.resolve_implementation(implementation, "roi_align")
  implementation = _unless_gpu_cannot(requested, implementation, [features.shape], features.dtype,
                                      out_h, out_w, block_sizes, "roi_align")
  geometry = box_geometry(boxes, box_indices, features.shape[0], (out_h, out_w),
                          features.shape[1:3], spatial_scale, sampling_ratio, bool(aligned), active)
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
    Non-finite boxes and indices outside [0, N): as `roi_align` (ValueError when concrete,
    output 0 when traced).

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
  implementation = common.resolve_implementation(implementation, "multilevel_roi_align")
  implementation = _unless_gpu_cannot(
      requested, implementation, [f.shape for f in features_per_level],
      features_per_level[0].dtype, *common.pair(output_size, "multilevel_roi_align: output_size"),
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
def _flat_roi_align(static: _FlatStatic, flat, geometry: BoxGeometry, maps: FlatMaps):
  out = _backend("xla").roi_align_flat_forward(flat, geometry, maps, static.out_h, static.out_w)
  return out.astype(static.dtype)


def _flat_roi_align_fwd(static, flat, geometry, maps):
  return _flat_roi_align(static, flat, geometry, maps), (geometry, maps)


def _flat_roi_align_bwd(static, residuals, grad_out):
  geometry, maps = residuals
  grad = _backend("xla").roi_align_flat_backward(static.rows, geometry, maps, grad_out)
  grad = grad.astype(static.dtype)
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
    check_box_arguments(features, boxes, box_indices, "multilevel_roi_align")
  out_h, out_w = common.pair(output_size, "multilevel_roi_align: output_size")
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
  height, width = per_box(heights, jnp.int32), per_box(widths, jnp.int32)
  geometry = box_geometry(boxes, box_indices, n, (out_h, out_w), (height, width),
                          per_box([1.0 / s for s in strides], jnp.float32), sampling_ratio,
                          bool(aligned))
  maps = FlatMaps(per_box(offsets[:-1], jnp.int32) + geometry.batch * height * width, height, width)
  flat = jnp.concatenate([f.astype(dtype).reshape(-1, c) for f in features_per_level])
  return _flat_roi_align(_FlatStatic(out_h, out_w, offsets[-1], jnp.dtype(dtype)), flat,
                         geometry, maps)


# ---------------------------------------------------------------------------------------------
# RoIPool: dispatch and differentiation.


class _PoolStatic(NamedTuple):
  shape: tuple[int, int, int, int]   # features (N, H, W, C)
  dtype: jnp.dtype
  implementation: str                # "xla", "pallas_tpu" or "pallas_gpu"
  blocks: BlockSizes


def _from_kernel(best, index, bounds: BinBounds, shape):
  """Pallas outputs (K, >= bins, C) with in-image indices -> the XLA version's (values, flat index)."""
  _, h, w, c = shape
  k, out_h = bounds.h_start.shape
  out_w = bounds.w_start.shape[1]
  best = best[:, :out_h * out_w].reshape(k, out_h, out_w, c)
  index = index[:, :out_h * out_w].reshape(k, out_h, out_w, c)
  empty = empty_bins(bounds)
  flat = jnp.where(index >= 0, bounds.batch[:, None, None, None] * (h * w) + index, -1)
  return jnp.where(empty, 0.0, best), jnp.where(empty, -1, flat)


def _pool_forward(static: _PoolStatic, features, bounds: BinBounds):
  """Max (K, out_h, out_w, C) float32 and its flat index into (N*H*W) (-1: none)."""
  if static.implementation == "xla":
    return _backend("xla").roi_pool_forward(features, bounds)
  plan = tile_plan(features.shape, bounds.h_start.shape[1], bounds.w_start.shape[1], static.blocks)
  best, index = _backend(static.implementation).roi_pool_forward(
      features, bounds, plan, common.interpret(static.implementation))
  return _from_kernel(best, index, bounds, features.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _roi_pool(static: _PoolStatic, features, bounds: BinBounds):
  return _pool_forward(static, features, bounds)[0].astype(features.dtype)


def _roi_pool_fwd(static, features, bounds):
  best, argmax = _pool_forward(static, features, bounds)
  return best.astype(features.dtype), (argmax, bounds)


def _roi_pool_bwd(static, residuals, grad_out):
  argmax, bounds = residuals
  shape = static.shape
  if static.implementation == "pallas_gpu":  # XLA's GPU scatter-add would use atomics
    k, out_h, out_w, c = grad_out.shape
    plan = tile_plan(shape, out_h, out_w, static.blocks)
    in_image = jnp.where(argmax >= 0, argmax - bounds.batch[:, None, None, None] * (shape[1] * shape[2]), -1)
    grad = _backend("pallas_gpu").roi_pool_backward(
        shape, static.dtype, bounds, plan, in_image.reshape(k, -1, c), grad_out.reshape(k, -1, c),
        common.interpret("pallas_gpu"))
  else:  # xla and pallas_tpu: the scatter-add is deterministic on CPU and TPU
    grad = _backend("xla").roi_pool_backward(shape, static.dtype, argmax, grad_out)
  return grad, jax.tree.map(jnp.zeros_like, bounds)


_roi_pool.defvjp(_roi_pool_fwd, _roi_pool_bwd)


def roi_pool(features: jax.Array, boxes: jax.Array, box_indices: jax.Array,
             output_size: int | Sequence[int], *, spatial_scale: float = 1.0,
             implementation: str = "auto", block_sizes: BlockSizes = BlockSizes()) -> jax.Array:
  """RoI max pooling, torchvision's kernels channels-last.

  Args:
    features: (N, H, W, C) float32 or bfloat16.
    boxes: (K, 4) float (x1, y1, x2, y2) in input-image pixels, finite.
    box_indices: (K,) int32 image of each box, in [0, N).
    output_size: out_h = out_w, or (out_h, out_w).
    spatial_scale: feature cells per input pixel (1 / stride).
    implementation: "auto", "xla" (a loop over the cells of the largest bin, memory
      K x out_h x out_w x C), "pallas_gpu" (Mosaic GPU, Hopper and newer; up to 98 bins (9 x 9)
      with the default tile, pallas_mosaic_gpu.roi_pool_check_supported: "auto" uses xla beyond)
      or "pallas_tpu".
    block_sizes: the Pallas kernel's map tile.

  Returns:
    (K, out_h, out_w, C) in the features' dtype: each bin's maximum (an empty bin gives 0).
    The gradient goes to each bin's first maximum in row-major order: a scatter-add for "xla"
    and "pallas_tpu" (deterministic on CPU and TPU, and on GPU under XLA's deterministic-ops
    flag), a gather kernel without atomics for "pallas_gpu".

  Raises:
    ValueError: for a box with a non-finite coordinate or an index outside [0, N), when boxes
      and box_indices are concrete. Traced (under jit, vmap or grad), such a box gets empty
      bins (output 0, no gradient).
  """
  features, boxes, box_indices = jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(box_indices)
  check_box_arguments(features, boxes, box_indices, "roi_pool")
  out_h, out_w = common.pair(output_size, "roi_pool: output_size")
  requested = implementation
  implementation = common.resolve_implementation(implementation, "roi_pool")
  if implementation == "pallas_gpu":
    reason = _backend("pallas_gpu").roi_pool_check_supported(
        tile_plan(features.shape, out_h, out_w, block_sizes), features.dtype)
    implementation = common.unless_unsupported(requested, implementation, reason, "roi_pool")
  bounds = bin_bounds(boxes, box_indices, features.shape, (out_h, out_w), spatial_scale)
  static = _PoolStatic(tuple(features.shape), jnp.dtype(features.dtype), implementation, block_sizes)
  return _roi_pool(static, features, bounds)


def spatial_pyramid_pool(features: jax.Array, boxes: jax.Array, box_indices: jax.Array,
                         levels: Sequence[int] = (1, 2, 4), *, spatial_scale: float = 1.0,
                         implementation: str = "auto") -> jax.Array:
  """SPPnet pooling (He et al. 2014, section 2.3): max pooling of each box at several grids.

  Fast R-CNN's RoI pooling is the one-level case; here each level is `roi_pool` with an
  l x l output, flattened and concatenated, so every box gives a fixed-length vector. Non-finite
  boxes and indices outside [0, N): as `roi_pool` (ValueError when concrete, 0 when traced).

  Returns:
    (K, sum(l * l for l in levels) * C): for each level in order, the (l, l, C) bins
    flattened row-major (bin row, bin column, channel).
  """
  levels = tuple(levels)
  if not levels or not all(isinstance(l, int) and l > 0 for l in levels):
    raise ValueError(f"spatial_pyramid_pool: levels must be a non-empty sequence of positive ints, "
                     f"got {levels!r}.")
  pooled = [roi_pool(features, boxes, box_indices, (l, l), spatial_scale=spatial_scale,
                     implementation=implementation) for l in levels]
  return jnp.concatenate([p.reshape(p.shape[0], -1) for p in pooled], axis=1)
