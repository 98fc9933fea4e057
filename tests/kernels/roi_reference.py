"""Float64 NumPy transcriptions of RoIAlign, RoIPool and FPN level assignment, channels-last.

Independent of the `kernels` package: these are loop-by-loop transcriptions of the
definitions the kernels promise to follow, written from

- torchvision/csrc/ops/cpu/roi_align_kernel.cpp (`roi_align_forward_kernel_impl`,
  `roi_align_backward_kernel_impl`, `bilinear_interpolate_gradient`) and
  torchvision/csrc/ops/cpu/roi_align_common.h (`pre_calc_for_bilinear_interpolate`);
  the CUDA kernel (csrc/ops/cuda/roi_align_kernel.cu) does the same arithmetic;
- torchvision/csrc/ops/cpu/roi_pool_kernel.cpp (`roi_pool_forward_kernel_impl`,
  `roi_pool_backward_kernel_impl`);
- detectron2/modeling/poolers.py (`assign_boxes_to_levels`, `ROIPooler`);
- SPPnet (He et al. 2014) as RoI max pooling on several grids, concatenated.

Torchvision's layout is NCHW with rois (K, 5) = (batch index, x1, y1, x2, y2); here features
are (N, H, W, C), boxes (K, 4) = (x1, y1, x2, y2) in input-image pixels and box_indices (K,).

Precision. Torchvision runs the whole kernel in the input's type T (float for float32
features). The box geometry (scaled corners, bin sizes, the adaptive sampling grid
`ceil(roi_height / pooled_height)`, sample coordinates, RoIPool's bin edges
`floor(ph * bin_size_h)`) is computed here in `geometry_dtype`, float32 by default, in the
same operation order as the C++ code, so that integer decisions (grid sizes, bin edges)
come out as torchvision's float kernel makes them on float32 inputs: they can differ from
float64 or exact rational arithmetic (e.g. RoIPool with roi height 57 and 7 bins: float32
gives the last bin rows [48, 58), exact arithmetic [48, 57)). Interpolation weights,
feature values and sums are float64.
"""

import math

import numpy as np

FLT_MAX = float(np.finfo(np.float32).max)


def _pair(output_size):
  if isinstance(output_size, (int, np.integer)):
    return int(output_size), int(output_size)
  out_h, out_w = output_size
  return int(out_h), int(out_w)


# ----------------------------------------------------------------------------------------
# RoIAlign
# ----------------------------------------------------------------------------------------


def bilinear_taps(y, x, height, width):
  """The (row, col, weight) taps of one sample point, as torchvision's bilinear_interpolate.

  roi_align_common.h `pre_calc_for_bilinear_interpolate` (forward) and
  roi_align_kernel.cpp `bilinear_interpolate_gradient` (backward):
  - a sample with y < -1 or y > height or x < -1 or x > width (or NaN) contributes nothing;
  - y <= 0 -> y = 0 (same for x); y_low = (int) y;
  - if y_low >= height - 1: y_low = y_high = height - 1 and y = y_low, else y_high = y_low + 1;
  - ly = y - y_low, hy = 1 - ly; weights hy*hx, hy*lx, ly*hx, ly*lx on
    (y_low, x_low), (y_low, x_high), (y_high, x_low), (y_high, x_high).
  """
  y, x = float(y), float(x)
  if not (-1.0 <= y <= height and -1.0 <= x <= width):
    return []
  y = max(y, 0.0)
  x = max(x, 0.0)
  y_low, x_low = int(y), int(x)
  if y_low >= height - 1:
    y_low = y_high = height - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= width - 1:
    x_low = x_high = width - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1.0 - ly, 1.0 - lx
  return [(y_low, x_low, hy * hx), (y_low, x_high, hy * lx),
          (y_high, x_low, ly * hx), (y_high, x_high, ly * lx)]


def roi_align_geometry(box, spatial_scale, output_size, sampling_ratio, aligned,
                       geometry_dtype=np.float32):
  """Per-box quantities of roi_align_kernel.cpp lines "T offset = aligned ? ..." to "count".

  Returns dict(start_h, start_w, bin_h, bin_w, grid_h, grid_w, count) where start/bin are
  `geometry_dtype` scalars and grid/count Python ints. grid may be <= 0 (aligned=True with a
  reversed or empty box and sampling_ratio=0): the sample loops then run zero times.
  """
  t = geometry_dtype
  out_h, out_w = _pair(output_size)
  scale = t(spatial_scale)
  offset = t(0.5) if aligned else t(0.0)
  x1, y1, x2, y2 = (t(c) for c in box)
  start_w = t(x1 * scale - offset)  # no rounding: "this implementation detail is critical"
  start_h = t(y1 * scale - offset)
  end_w = t(x2 * scale - offset)
  end_h = t(y2 * scale - offset)
  roi_w = t(end_w - start_w)
  roi_h = t(end_h - start_h)
  if not aligned:  # "Force malformed ROIs to be 1x1"
    roi_w = max(roi_w, t(1.0))
    roi_h = max(roi_h, t(1.0))
  bin_h = t(roi_h / t(out_h))
  bin_w = t(roi_w / t(out_w))
  # `int roi_bin_grid_h = sampling_ratio > 0 ? sampling_ratio : ceil(roi_height / pooled_height)`
  grid_h = sampling_ratio if sampling_ratio > 0 else int(math.ceil(t(roi_h / t(out_h))))
  grid_w = sampling_ratio if sampling_ratio > 0 else int(math.ceil(t(roi_w / t(out_w))))
  count = max(grid_h * grid_w, 1)  # forward: "When the grid is empty, output zeros."
  return dict(start_h=start_h, start_w=start_w, bin_h=bin_h, bin_w=bin_w,
              grid_h=grid_h, grid_w=grid_w, count=count)


def sample_coordinate(start, p, bin_size, i, grid, geometry_dtype=np.float32):
  """`roi_start_h + ph * bin_size_h + static_cast<T>(iy + .5f) * bin_size_h / roi_bin_grid_h`,
  evaluated left to right in T."""
  t = geometry_dtype
  return t(t(start + t(p) * bin_size) + t(t(t(i + 0.5) * bin_size) / t(grid)))


def roi_align_taps(box, height, width, output_size, spatial_scale=1.0, sampling_ratio=0,
                   aligned=True, geometry_dtype=np.float32):
  """For one box: {(ph, pw): [(row, col, weight / count), ...]}, every sample's taps.

  The forward is out[ph, pw] = sum of weight * f[row, col]; the backward scatters
  grad[ph, pw] * weight into (row, col): the same taps, as in torchvision.
  """
  out_h, out_w = _pair(output_size)
  g = roi_align_geometry(box, spatial_scale, output_size, sampling_ratio, aligned,
                         geometry_dtype)
  taps = {}
  for ph in range(out_h):
    for pw in range(out_w):
      bin_taps = []
      for iy in range(g["grid_h"]):
        y = sample_coordinate(g["start_h"], ph, g["bin_h"], iy, g["grid_h"], geometry_dtype)
        for ix in range(g["grid_w"]):
          x = sample_coordinate(g["start_w"], pw, g["bin_w"], ix, g["grid_w"], geometry_dtype)
          for row, col, weight in bilinear_taps(y, x, height, width):
            bin_taps.append((row, col, weight / g["count"]))
      taps[ph, pw] = bin_taps
  return taps


def roi_align_forward(features, boxes, box_indices, output_size, spatial_scale=1.0,
                      sampling_ratio=0, aligned=True, geometry_dtype=np.float32):
  """torchvision roi_align forward (roi_align_forward_kernel_impl), channels-last.

  features (N, H, W, C), boxes (K, 4) (x1, y1, x2, y2), box_indices (K,) ->
  (K, out_h, out_w, C) float64: per bin, the mean over the grid_h x grid_w samples
  (count = max(grid_h * grid_w, 1)) of the bilinear interpolation at each sample.
  """
  features = np.asarray(features, np.float64)
  _, height, width, channels = features.shape
  out_h, out_w = _pair(output_size)
  boxes = np.asarray(boxes)
  out = np.zeros((len(boxes), out_h, out_w, channels))
  for k, (box, b) in enumerate(zip(boxes, np.asarray(box_indices))):
    taps = roi_align_taps(box, height, width, output_size, spatial_scale, sampling_ratio,
                          aligned, geometry_dtype)
    for (ph, pw), bin_taps in taps.items():
      for row, col, weight in bin_taps:
        out[k, ph, pw] += weight * features[b, row, col]
  return out


def roi_align_backward(grad_output, boxes, box_indices, features_shape, spatial_scale=1.0,
                       sampling_ratio=0, aligned=True, geometry_dtype=np.float32):
  """torchvision roi_align backward (roi_align_backward_kernel_impl), channels-last.

  grad_output (K, out_h, out_w, C) -> gradient wrt features, `features_shape` (N, H, W, C):
  each sample adds grad * w_i / count to its four taps (count = grid_h * grid_w). Boxes get
  no gradient.
  """
  grad_output = np.asarray(grad_output, np.float64)
  _, height, width, _ = features_shape
  output_size = grad_output.shape[1:3]
  grad = np.zeros(features_shape)
  for k, (box, b) in enumerate(zip(np.asarray(boxes), np.asarray(box_indices))):
    taps = roi_align_taps(box, height, width, output_size, spatial_scale, sampling_ratio,
                          aligned, geometry_dtype)
    for (ph, pw), bin_taps in taps.items():
      for row, col, weight in bin_taps:
        grad[b, row, col] += weight * grad_output[k, ph, pw]
  return grad


# ----------------------------------------------------------------------------------------
# RoIPool
# ----------------------------------------------------------------------------------------


def round_half_away_from_zero(value):
  """C's round(): halves go away from zero (np.round would round them to even)."""
  value = float(value)
  return int(math.copysign(math.floor(abs(value) + 0.5), value))


def roi_pool_bins(box, height, width, output_size, spatial_scale=1.0,
                  geometry_dtype=np.float32):
  """{(ph, pw): (hstart, hend, wstart, wend)}, the clipped bin rectangles of
  roi_pool_forward_kernel_impl (half-open; empty when hend <= hstart or wend <= wstart)."""
  t = geometry_dtype
  out_h, out_w = _pair(output_size)
  scale = t(spatial_scale)
  x1, y1, x2, y2 = (t(c) for c in box)
  start_w = round_half_away_from_zero(t(x1 * scale))
  start_h = round_half_away_from_zero(t(y1 * scale))
  end_w = round_half_away_from_zero(t(x2 * scale))
  end_h = round_half_away_from_zero(t(y2 * scale))
  roi_w = max(end_w - start_w + 1, 1)  # "Force malformed ROIs to be 1x1"
  roi_h = max(end_h - start_h + 1, 1)
  bin_h = t(t(roi_h) / t(out_h))
  bin_w = t(t(roi_w) / t(out_w))
  bins = {}
  for ph in range(out_h):
    for pw in range(out_w):
      hstart = int(math.floor(t(t(ph) * bin_h)))
      wstart = int(math.floor(t(t(pw) * bin_w)))
      hend = int(math.ceil(t(t(ph + 1) * bin_h)))
      wend = int(math.ceil(t(t(pw + 1) * bin_w)))
      # "Add roi offsets and clip to input boundaries"
      hstart = min(max(hstart + start_h, 0), height)
      hend = min(max(hend + start_h, 0), height)
      wstart = min(max(wstart + start_w, 0), width)
      wend = min(max(wend + start_w, 0), width)
      bins[ph, pw] = (hstart, hend, wstart, wend)
  return bins


def roi_pool_forward(features, boxes, box_indices, output_size, spatial_scale=1.0,
                     geometry_dtype=np.float32):
  """torchvision roi_pool forward, channels-last.

  Returns (values (K, out_h, out_w, C) float64, argmax (K, out_h, out_w, C) int64 with the
  flat index row * W + col of the first maximum in row-major order (strict '>'), -1 and
  value 0 for an empty bin).
  """
  features = np.asarray(features, np.float64)
  _, height, width, channels = features.shape
  out_h, out_w = _pair(output_size)
  boxes = np.asarray(boxes)
  values = np.zeros((len(boxes), out_h, out_w, channels))
  argmax = np.full((len(boxes), out_h, out_w, channels), -1, np.int64)
  for k, (box, b) in enumerate(zip(boxes, np.asarray(box_indices))):
    bins = roi_pool_bins(box, height, width, output_size, spatial_scale, geometry_dtype)
    for (ph, pw), (hstart, hend, wstart, wend) in bins.items():
      is_empty = hend <= hstart or wend <= wstart
      for c in range(channels):
        max_value = 0.0 if is_empty else -FLT_MAX  # "Define an empty pooling region to be zero"
        max_index = -1
        for h in range(hstart, hend):
          for w in range(wstart, wend):
            if features[b, h, w, c] > max_value:
              max_value = features[b, h, w, c]
              max_index = h * width + w
        values[k, ph, pw, c] = max_value
        argmax[k, ph, pw, c] = max_index
  return values, argmax


def roi_pool_backward(grad_output, argmax, box_indices, features_shape):
  """torchvision roi_pool backward: each output's gradient goes to its argmax (none if -1)."""
  grad_output = np.asarray(grad_output, np.float64)
  _, _, width, _ = features_shape
  grad = np.zeros(features_shape)
  num_boxes, out_h, out_w, channels = grad_output.shape
  for k in range(num_boxes):
    b = int(box_indices[k])
    for ph in range(out_h):
      for pw in range(out_w):
        for c in range(channels):
          index = argmax[k, ph, pw, c]
          if index != -1:
            grad[b, index // width, index % width, c] += grad_output[k, ph, pw, c]
  return grad


# ----------------------------------------------------------------------------------------
# Feature-pyramid RoIAlign (detectron2 ROIPooler) and spatial pyramid pooling (SPPnet)
# ----------------------------------------------------------------------------------------


def fpn_levels(boxes, min_level, max_level, canonical_box_size=224, canonical_level=4):
  """detectron2 assign_boxes_to_levels, returning the level itself (not minus min_level).

  level = floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8)), clamped to
  [min_level, max_level]; area = (x2 - x1) * (y2 - y1) in image pixels (Boxes.area()).
  Float64 here (detectron2 uses the boxes' float32): they differ only for boxes within about
  1e-7 (relative) of a level boundary.
  """
  boxes = np.asarray(boxes, np.float64)
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  levels = np.floor(canonical_level + np.log2(np.sqrt(area) / canonical_box_size + 1e-8))
  return np.clip(levels, min_level, max_level).astype(np.int64)


def _levels_of_strides(strides):
  levels = [int(round(math.log2(s))) for s in strides]
  assert [2 ** l for l in levels] == list(strides), strides
  return levels


def multilevel_roi_align_forward(features_per_level, boxes, box_indices, output_size, strides,
                                 canonical_box_size=224, canonical_level=4, sampling_ratio=0,
                                 aligned=True, geometry_dtype=np.float32):
  """detectron2 ROIPooler("ROIAlignV2"-style): each box pooled from its FPN level with
  spatial_scale = 1 / stride. Returns (K, out_h, out_w, C) float64."""
  levels = _levels_of_strides(strides)
  assigned = fpn_levels(boxes, levels[0], levels[-1], canonical_box_size, canonical_level)
  out_h, out_w = _pair(output_size)
  channels = np.shape(features_per_level[0])[-1]
  out = np.zeros((len(boxes), out_h, out_w, channels))
  for i, (features, stride) in enumerate(zip(features_per_level, strides)):
    picked = np.flatnonzero(assigned == levels[i])
    if picked.size:
      out[picked] = roi_align_forward(features, np.asarray(boxes)[picked],
                                      np.asarray(box_indices)[picked], output_size,
                                      1.0 / stride, sampling_ratio, aligned, geometry_dtype)
  return out


def multilevel_roi_align_backward(grad_output, features_shapes, boxes, box_indices, strides,
                                  canonical_box_size=224, canonical_level=4, sampling_ratio=0,
                                  aligned=True, geometry_dtype=np.float32):
  """Gradients wrt each level's features (a list, shapes `features_shapes`)."""
  levels = _levels_of_strides(strides)
  assigned = fpn_levels(boxes, levels[0], levels[-1], canonical_box_size, canonical_level)
  grads = []
  for i, (shape, stride) in enumerate(zip(features_shapes, strides)):
    picked = np.flatnonzero(assigned == levels[i])
    grads.append(roi_align_backward(np.asarray(grad_output)[picked], np.asarray(boxes)[picked],
                                    np.asarray(box_indices)[picked], shape, 1.0 / stride,
                                    sampling_ratio, aligned, geometry_dtype))
  return grads


def spatial_pyramid_pool_forward(features, boxes, box_indices, levels=(1, 2, 4),
                                 spatial_scale=1.0, geometry_dtype=np.float32):
  """SPPnet pooling of each box: (K, sum(l * l) * C), levels concatenated in order, each
  level's (l, l, C) RoI max-pool flattened row-major (bin_y, bin_x, channel).
  Returns (values, [argmax of each level])."""
  values, argmaxes = [], []
  for level in levels:
    v, a = roi_pool_forward(features, boxes, box_indices, (level, level), spatial_scale,
                            geometry_dtype)
    values.append(v.reshape(len(v), -1))
    argmaxes.append(a)
  return np.concatenate(values, axis=1), argmaxes


def spatial_pyramid_pool_backward(grad_output, argmaxes, box_indices, features_shape,
                                  levels=(1, 2, 4)):
  grad_output = np.asarray(grad_output, np.float64)
  channels = features_shape[-1]
  grad = np.zeros(features_shape)
  offset = 0
  for level, argmax in zip(levels, argmaxes):
    size = level * level * channels
    g = grad_output[:, offset:offset + size].reshape(len(grad_output), level, level, channels)
    grad += roi_pool_backward(g, argmax, box_indices, features_shape)
    offset += size
  return grad


# ----------------------------------------------------------------------------------------
# Random test inputs
# ----------------------------------------------------------------------------------------

BOX_KINDS = ("inside", "partial", "outside", "border", "tiny", "degenerate", "reversed", "huge")


def random_boxes(rng, kinds, height, width, spatial_scale=1.0):
  """(len(kinds), 4) float32 boxes (x1, y1, x2, y2) in image pixels, one per kind, drawn in
  feature-map cells (a map of height x width) and divided by spatial_scale:

  inside      within [0, H - 1] x [0, W - 1]
  partial     crossing the map's border
  outside     wholly beyond the map by more than a cell on one side (RoIAlign gives 0)
  border      a corner in the [-1, 0) band before the map, the other near the far border
  tiny        less than half a cell wide and high
  degenerate  x1 == x2 (and, half of the time, y1 == y2 too)
  reversed    x2 < x1 and y2 < y1
  huge        covering the map with a margin of up to one map size
  """
  boxes = []
  for kind in kinds:
    corners = []
    for axis, size in enumerate((width, height)):  # x pair, then y pair
      if kind == "inside":
        lo = rng.uniform(0, size - 1.5)
        hi = rng.uniform(lo + 0.3, size - 1)
      elif kind == "partial":
        if rng.integers(2):
          lo, hi = rng.uniform(-3, -0.2), rng.uniform(0.5, size)
        else:
          lo, hi = rng.uniform(0, size - 0.5), rng.uniform(size + 0.2, size + 3)
      elif kind == "outside":
        lo = rng.uniform(0, size - 1.5)
        hi = rng.uniform(lo + 0.3, size - 1)
      elif kind == "border":
        lo, hi = rng.uniform(-1, 0), rng.uniform(size - 1, size + 1)
      elif kind == "tiny":
        lo = rng.uniform(-0.5, size - 0.5)
        hi = lo + rng.uniform(0, 0.5)
      elif kind == "degenerate":
        lo = rng.uniform(-0.5, size - 0.5)
        hi = lo if (axis == 0 or rng.integers(2)) else lo + rng.uniform(0.5, 3)
      elif kind == "reversed":
        hi = rng.uniform(-0.5, size - 2)
        lo = rng.uniform(hi + 0.5, size + 0.5)
      elif kind == "huge":
        lo, hi = rng.uniform(-size, -1), rng.uniform(size, 2 * size)
      else:
        raise ValueError(kind)
      corners.append((lo, hi))
    (x1, x2), (y1, y2) = corners
    if kind == "outside":  # push the box off one side of the map
      side = rng.integers(4)
      if side == 0:
        x1, x2 = x1 - width - 2.5, x2 - width - 2.5
      elif side == 1:
        x1, x2 = x1 + width + 2.5, x2 + width + 2.5
      elif side == 2:
        y1, y2 = y1 - height - 2.5, y2 - height - 2.5
      else:
        y1, y2 = y1 + height + 2.5, y2 + height + 2.5
    boxes.append([x1, y1, x2, y2])
  return (np.asarray(boxes) / spatial_scale).astype(np.float32)


def every_image(rng, num_boxes, num_images):
  """(num_boxes,) int32 box indices in shuffled order, every image used when K >= N."""
  return rng.permutation(np.arange(num_boxes) % num_images).astype(np.int32)
