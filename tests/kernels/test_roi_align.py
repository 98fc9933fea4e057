"""kernels.roi_align and kernels.multilevel_roi_align against a float64 NumPy transcription of
torchvision's C++ kernels (roi_reference.py), forward and backward, on fresh random inputs.

Every implementation is tested; on a CPU the Pallas ones run in interpret mode, which is slow,
so most of their cases are marked slow (`python -m pytest -m "slow or not slow"`) and the
default run keeps a few (every kind of box, bfloat16, jit/vmap/grad). Each test prints its
random seed (shown when it fails); ZOO_TEST_SEED=<base seed> replays it (tests/conftest.py).
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from tests.kernels import roi_reference as ref
from tests.kernels import roi_testing
from tests.kernels.roi_testing import IMPLEMENTATIONS, with_implementations


def assert_close(actual, expected, seed, what, rtol=1e-5, atol=1e-5):
  roi_testing.assert_close(actual, expected, seed, what, rtol, atol)


@functools.partial(jax.jit, static_argnames=("output_size", "spatial_scale", "sampling_ratio",
                                             "aligned", "implementation"))
def forward_and_vjp(features, boxes, box_indices, cotangent, *, output_size, spatial_scale=1.0,
                    sampling_ratio=0, aligned=True, implementation="xla"):
  """roi_align's output and the vjp of `cotangent`, boxes and indices as traced arguments."""
  def pool(f):
    return kernels.roi_align(f, boxes, box_indices, output_size, spatial_scale=spatial_scale,
                             sampling_ratio=sampling_ratio, aligned=aligned,
                             implementation=implementation)
  out, vjp = jax.vjp(pool, features)
  return out, vjp(cotangent)[0]


def check_against_reference(rng, seed, implementation, features, boxes, box_indices, output_size,
                            spatial_scale=1.0, sampling_ratio=0, aligned=True, rtol=1e-5,
                            atol=1e-5):
  """Forward and vjp of the implementation against the reference forward and backward."""
  out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
  cotangent = rng.standard_normal((len(boxes), out_h, out_w, features.shape[-1]))
  cotangent = cotangent.astype(features.dtype)
  out, grad = forward_and_vjp(jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(box_indices),
                              jnp.asarray(cotangent), output_size=output_size,
                              spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                              aligned=aligned, implementation=implementation)
  assert out.shape == (len(boxes), out_h, out_w, features.shape[-1])
  assert out.dtype == features.dtype and grad.dtype == features.dtype
  assert grad.shape == features.shape
  features64 = np.asarray(features, np.float64)
  expected = ref.roi_align_forward(features64, boxes, box_indices, output_size, spatial_scale,
                                   sampling_ratio, aligned)
  expected_grad = ref.roi_align_backward(np.asarray(cotangent, np.float64), boxes, box_indices,
                                         features.shape, spatial_scale, sampling_ratio, aligned)
  context = (f"{implementation}, output_size={output_size}, spatial_scale={spatial_scale}, "
             f"sampling_ratio={sampling_ratio}, aligned={aligned}")
  assert_close(out, expected, seed, f"forward, {context}", rtol, atol)
  assert_close(grad, expected_grad, seed, f"backward, {context}", rtol, atol)


# ----------------------------------------------------------------------------------------
# The reference itself: finite differences and hand-computed values.


@pytest.mark.parametrize("sampling_ratio", [0, 1, 2, 3])
@pytest.mark.parametrize("aligned", [True, False])
def test_reference_backward_equals_central_differences_of_reference_forward(
    rng, seed, sampling_ratio, aligned):
  shape = (2, 7, 9, 3)
  features = rng.standard_normal(shape)
  boxes = ref.random_boxes(rng, ref.BOX_KINDS, 7, 9, spatial_scale=0.5)
  box_indices = ref.every_image(rng, len(boxes), 2)
  args = (boxes, box_indices, (2, 3), 0.5, sampling_ratio, aligned)
  cotangent = rng.standard_normal((len(boxes), 2, 3, 3))
  grad = ref.roi_align_backward(cotangent, boxes, box_indices, shape, *args[3:])
  eps = 1e-3  # RoIAlign is linear in the features: central differences are exact but for rounding
  for _ in range(3):
    direction = rng.standard_normal(shape)
    plus = ref.roi_align_forward(features + eps * direction, *args)
    minus = ref.roi_align_forward(features - eps * direction, *args)
    numeric = np.sum((plus - minus) / (2 * eps) * cotangent)
    np.testing.assert_allclose(np.sum(grad * direction), numeric, rtol=1e-9, atol=1e-9,
                               err_msg=f"random seed {seed}")


def test_reference_samples_pixel_centres(rng, seed):
  """A one-cell box around pixel (y, x), one sample: the pixel's value (aligned or not)."""
  features = rng.standard_normal((2, 5, 6, 3))
  for b, y, x in [(0, 0, 0), (1, 4, 5), (0, 2, 3), (1, 4, 0)]:
    aligned_box = np.array([[x, y, x + 1, y + 1]], np.float32)  # -0.5: sample at (y, x)
    legacy_box = aligned_box - 0.5
    for box, aligned in ((aligned_box, True), (legacy_box, False)):
      out = ref.roi_align_forward(features, box, [b], 1, 1.0, 1, aligned)
      np.testing.assert_allclose(out[0, 0, 0], features[b, y, x], rtol=1e-12,
                                 err_msg=f"random seed {seed}")


# ----------------------------------------------------------------------------------------
# Implementations against the reference.


@pytest.mark.parametrize(
    "implementation, sampling_ratio, aligned",
    with_implementations([(s, a) for s in (0, 1, 2, 3) for a in (True, False)],
                         pallas_default=[(0, True)]))
def test_matches_reference_on_every_kind_of_box(rng, seed, implementation, sampling_ratio,
                                                aligned):
  """Boxes inside, partly and wholly outside, in the [-1, 0) border band, tiny, degenerate,
  reversed and larger than the map, every image of the batch used."""
  if implementation == "xla":
    shape, kinds = (3, 16, 21, 7), ref.BOX_KINDS * 2
  else:
    shape, kinds = (2, 11, 14, 5), ref.BOX_KINDS
  features = rng.standard_normal(shape).astype(np.float32)
  boxes = ref.random_boxes(rng, kinds, shape[1], shape[2], spatial_scale=0.5)
  box_indices = ref.every_image(rng, len(boxes), shape[0])
  check_against_reference(rng, seed, implementation, features, boxes, box_indices, (2, 3),
                          spatial_scale=0.5, sampling_ratio=sampling_ratio, aligned=aligned)


@pytest.mark.parametrize(
    "implementation, output_size, spatial_scale",
    with_implementations([(o, s) for o in (1, (2, 3), 7) for s in (0.25, 0.5, 1.0)],
                         pallas_default=[]))
def test_matches_reference_for_output_sizes_and_scales(rng, seed, implementation, output_size,
                                                       spatial_scale):
  shape = (2, 12, 10, 4)
  kinds = ("inside", "partial", "border", "huge", "tiny", "reversed")
  features = rng.standard_normal(shape).astype(np.float32)
  boxes = ref.random_boxes(rng, kinds, shape[1], shape[2], spatial_scale)
  box_indices = ref.every_image(rng, len(boxes), shape[0])
  check_against_reference(rng, seed, implementation, features, boxes, box_indices, output_size,
                          spatial_scale=spatial_scale, sampling_ratio=0, aligned=True)


def test_auto_implementation_matches_reference(rng, seed):
  """"auto" picks the backend's best implementation ("xla" on a CPU)."""
  shape = (2, 9, 8, 3)
  features = rng.standard_normal(shape).astype(np.float32)
  boxes = ref.random_boxes(rng, ("inside", "partial", "huge"), 9, 8, spatial_scale=0.5)
  check_against_reference(rng, seed, "auto", features, boxes, np.array([1, 0, 1], np.int32), 7,
                          spatial_scale=0.5)


@pytest.mark.parametrize("implementation", with_implementations([()], pallas_default=[]))
def test_many_channels(rng, seed, implementation):
  """C = 133: more than one 128-lane block of channels, and not a multiple of it."""
  shape = (2, 9, 11, 133)
  features = rng.standard_normal(shape).astype(np.float32)
  boxes = ref.random_boxes(rng, ("inside", "partial", "border", "huge"), 9, 11)
  check_against_reference(rng, seed, implementation, features, boxes,
                          ref.every_image(rng, 4, 2), (2, 3), sampling_ratio=2)


@pytest.mark.parametrize("implementation", with_implementations([()]))
def test_adaptive_grid_of_boxes_much_larger_than_the_output(rng, seed, implementation):
  """sampling_ratio=0 on boxes up to 3x the map: up to ceil(36 / 1)^2 samples per bin."""
  shape = (1, 12, 12, 3)
  features = rng.standard_normal(shape).astype(np.float32)
  boxes = np.array([[-12, -12, 24, 24], [-3.3, 1.7, 30.2, 9.9], [5.1, -20.5, 7.4, 15.8]],
                   np.float32)
  for aligned, output_size in ((True, 1), (False, (2, 3))):
    check_against_reference(rng, seed, implementation, features, boxes,
                            np.zeros(3, np.int32), output_size, aligned=aligned, atol=2e-5)


@pytest.mark.parametrize("implementation", with_implementations([()]))
def test_box_sizes_that_are_exact_multiples_of_the_output_size(rng, seed, implementation):
  """roi / out_size is an exact integer m here, so the adaptive grid is m samples per bin
  (torchvision computes ceil(roi_height / pooled_height) with a correctly rounded float
  division), and with aligned=False the samples fall on whole cells, some exactly on y = H or
  x = W, where they still count. Catches a division by the constant output size turned into
  a multiplication by its rounded reciprocal, as XLA does with a division by a broadcast
  scalar (ceil(21 * float32(1/7)) = 4, not 3; a bin 1 ulp too large moves a sample from
  y = H, which counts, to just past it, which gives 0)."""
  features = rng.standard_normal((1, 12, 12, 3)).astype(np.float32)
  boxes = []
  for m_y, m_x in ((1, 1), (3, 6), (6, 7), (7, 3), (11, 12), (13, 14)):
    x1, y1 = rng.integers(0, 4, 2) + 0.5
    boxes.append([x1, y1, x1 + 7 * m_x, y1 + 7 * m_y])
  boxes = np.asarray(boxes, np.float32) * 4  # image pixels at stride 4
  for aligned in (True, False):
    check_against_reference(rng, seed, implementation, features, boxes,
                            np.zeros(len(boxes), np.int32), 7, spatial_scale=0.25,
                            aligned=aligned, atol=2e-5)
  # The same under vmap (over boxes and indices), where the division is batched.
  boxes = np.stack([boxes, boxes[::-1]])
  out = jax.jit(jax.vmap(lambda b, i: kernels.roi_align(
      jnp.asarray(features), b, i, 7, spatial_scale=0.25, implementation=implementation)))(
          jnp.asarray(boxes), jnp.zeros(boxes.shape[:2], jnp.int32))
  for j in range(2):
    expected = ref.roi_align_forward(features, boxes[j], np.zeros(len(boxes[j]), int), 7, 0.25)
    assert_close(out[j], expected, seed, f"under vmap, element {j}", atol=2e-5)


@pytest.mark.parametrize("implementation", with_implementations([()]))
def test_linear_map_is_reproduced_at_bin_centres(rng, seed, implementation):
  """Independent of the reference: bilinear interpolation reproduces a linear function, and
  a bin's samples are symmetric about its centre, so on f = a*y + b*x + d a box whose samples
  stay inside [0, H-1] x [0, W-1] gives f at each bin centre, for every grid and alignment."""
  shape = (1, 10, 13, 2)
  slope_y, slope_x, offset = rng.standard_normal((3, 1, 1, 2))
  y = np.arange(shape[1])[:, None, None]
  x = np.arange(shape[2])[None, :, None]
  features = (slope_y * y + slope_x * x + offset)[None].astype(np.float32)
  for sampling_ratio, aligned in ((0, True), (1, False), (2, True), (3, False)):
    offset_cells = 0.5 if aligned else 0.0
    x1 = rng.uniform(offset_cells, 6, 4)
    y1 = rng.uniform(offset_cells, 4, 4)
    x2 = rng.uniform(x1 + 1.2, shape[2] - 1 + offset_cells)
    y2 = rng.uniform(y1 + 1.2, shape[1] - 1 + offset_cells)
    boxes = np.stack([x1, y1, x2, y2], 1).astype(np.float32)
    out = kernels.roi_align(jnp.asarray(features), jnp.asarray(boxes), jnp.zeros(4, jnp.int32),
                            (3, 2), sampling_ratio=sampling_ratio, aligned=aligned,
                            implementation=implementation)
    b = boxes.astype(np.float64) - offset_cells
    centre_y = b[:, 1, None] + (np.arange(3) + 0.5) * (b[:, 3, None] - b[:, 1, None]) / 3
    centre_x = b[:, 0, None] + (np.arange(2) + 0.5) * (b[:, 2, None] - b[:, 0, None]) / 2
    expected = (slope_y * centre_y[:, :, None, None] + slope_x * centre_x[:, None, :, None]
                + offset)
    assert_close(out, expected, seed,
                 f"{implementation}, sampling_ratio={sampling_ratio}, aligned={aligned}",
                 atol=2e-5)
    assert_close(ref.roi_align_forward(features, boxes, np.zeros(4, int), (3, 2), 1.0,
                                       sampling_ratio, aligned), expected, seed, "reference")


@pytest.mark.parametrize("implementation", with_implementations([()]))
def test_samples_exactly_on_the_border_band_limits(rng, seed, implementation):
  """A sample at exactly y = -1 or y = H (x = -1 or x = W) still counts, clamped to the edge
  row (column); a sample just beyond contributes 0. One sample per box (legacy alignment,
  sampling_ratio=1, one bin): its position is y1 + 0.5 exactly."""
  height, width = 5, 6
  features = rng.standard_normal((1, height, width, 2)).astype(np.float32)
  tiny = 2.0 ** -10
  cases = [  # (x1, y1) of a 1x1 box, the expected (row, col) or None for 0
      ((1.5, -1.5), (0, 2)), ((1.5, -1.5 - tiny), None),
      ((1.5, height - 0.5), (height - 1, 2)), ((1.5, height - 0.5 + tiny), None),
      ((-1.5, 2.5), (3, 0)), ((-1.5 - tiny, 2.5), None),
      ((width - 0.5, 2.5), (3, width - 1)), ((width - 0.5 + tiny, 2.5), None),
      ((-1.5, -1.5), (0, 0)), ((width - 0.5, height - 0.5), (height - 1, width - 1)),
  ]
  boxes = np.array([[x1, y1, x1 + 1, y1 + 1] for (x1, y1), _ in cases], np.float32)
  expected = np.stack([np.zeros(2) if cell is None else features[0, cell[0], cell[1]]
                       for _, cell in cases])[:, None, None]
  out = kernels.roi_align(jnp.asarray(features), jnp.asarray(boxes),
                          jnp.zeros(len(boxes), jnp.int32), 1, sampling_ratio=1, aligned=False,
                          implementation=implementation)
  assert_close(ref.roi_align_forward(features, boxes, np.zeros(len(boxes), int), 1, 1.0, 1,
                                     False), expected, seed, "reference")
  assert_close(out, expected, seed, implementation)


@pytest.mark.parametrize("implementation", with_implementations([()], pallas_default=[()]))
def test_bfloat16_features(rng, seed, implementation):
  """bfloat16 in and out, float32 accumulation: within a bfloat16 rounding (2^-8, relative to
  the features' scale) of the float64 result on the same bfloat16 values."""
  shape = (2, 10, 12, 4)
  features = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  boxes = ref.random_boxes(rng, ("inside", "partial", "border", "huge", "tiny"), 10, 12, 0.5)
  box_indices = ref.every_image(rng, len(boxes), 2)
  cotangent = jnp.asarray(rng.standard_normal((len(boxes), 7, 7, 4)), jnp.bfloat16)
  out, grad = forward_and_vjp(features, jnp.asarray(boxes), jnp.asarray(box_indices), cotangent,
                              output_size=7, spatial_scale=0.5, implementation=implementation)
  assert out.dtype == jnp.bfloat16 and grad.dtype == jnp.bfloat16
  features64 = np.asarray(features.astype(jnp.float32), np.float64)
  expected = ref.roi_align_forward(features64, boxes, box_indices, 7, 0.5)
  expected_grad = ref.roi_align_backward(np.asarray(cotangent.astype(jnp.float32), np.float64),
                                         boxes, box_indices, shape, 0.5)
  tolerance = 2.0 ** -8
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), expected, rtol=tolerance,
                             atol=tolerance * np.abs(features64).max(),
                             err_msg=f"forward (random seed {seed})")
  np.testing.assert_allclose(np.asarray(grad.astype(jnp.float32)), expected_grad, rtol=tolerance,
                             atol=tolerance * np.abs(expected_grad).max(),
                             err_msg=f"backward (random seed {seed})")


@pytest.mark.parametrize("implementation", with_implementations([()], pallas_default=[()]))
def test_jit_vmap_and_grad(rng, seed, implementation):
  """vmap over a leading batch of (features, boxes, box_indices), over (boxes, box_indices)
  and over boxes only; jax.grad under jit, wrt features (boxes get a zero gradient)."""
  batch, shape, out_size = 2, (2, 9, 10, 3), (2, 3)
  features = rng.standard_normal((batch,) + shape).astype(np.float32)
  kinds = ("inside", "partial", "border", "huge")
  boxes = np.stack([ref.random_boxes(rng, kinds, 9, 10, 0.5) for _ in range(batch)])
  box_indices = np.stack([ref.every_image(rng, len(kinds), 2) for _ in range(batch)])
  weights = rng.standard_normal((batch, len(kinds)) + out_size + (3,)).astype(np.float32)

  def pool(f, b, i):
    return kernels.roi_align(f, b, i, out_size, spatial_scale=0.5, sampling_ratio=2,
                             implementation=implementation)

  def loss(f, b, i):
    return jnp.sum(jax.vmap(pool)(f, b, i) * weights)

  out = jax.jit(jax.vmap(pool))(features, boxes, box_indices)
  grad_features, grad_boxes = jax.jit(jax.grad(loss, argnums=(0, 1)))(features, boxes, box_indices)
  boxes_only = jax.jit(jax.vmap(pool, in_axes=(None, 0, 0)))(features[0], boxes, box_indices)
  shared_indices = jax.jit(jax.vmap(pool, in_axes=(None, 0, None)))(features[0], boxes,
                                                                      box_indices[0])
  for j in range(batch):
    expected = ref.roi_align_forward(features[j], boxes[j], box_indices[j], out_size, 0.5, 2)
    assert_close(out[j], expected, seed, f"vmap over features and boxes, element {j}")
    expected = ref.roi_align_forward(features[0], boxes[j], box_indices[j], out_size, 0.5, 2)
    assert_close(boxes_only[j], expected, seed, f"vmap over boxes only, element {j}")
    expected = ref.roi_align_forward(features[0], boxes[j], box_indices[0], out_size, 0.5, 2)
    assert_close(shared_indices[j], expected, seed,
                 f"vmap over boxes only, box_indices shared, element {j}")
    expected = ref.roi_align_backward(weights[j], boxes[j], box_indices[j], shape, 0.5, 2)
    assert_close(grad_features[j], expected, seed, f"grad of vmap, element {j}")
  np.testing.assert_array_equal(grad_boxes, np.zeros_like(boxes))


@pytest.mark.parametrize("implementation", with_implementations([()]))
def test_backward_is_deterministic(rng, implementation):
  """Two runs of the backward, and a second compilation, give the same bits, with many
  overlapping boxes adding into the same cells."""
  shape = (2, 8, 9, 4)
  features = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  repeats = 6 if implementation == "xla" else 3
  boxes = jnp.asarray(ref.random_boxes(rng, ("inside", "partial", "huge") * repeats, 8, 9))
  box_indices = jnp.asarray(ref.every_image(rng, boxes.shape[0], 2))
  cotangent = jnp.asarray(rng.standard_normal((boxes.shape[0], 3, 3, 4)), jnp.float32)

  def backward(f):
    _, vjp = jax.vjp(lambda f: kernels.roi_align(f, boxes, box_indices, 3, sampling_ratio=0,
                                                 implementation=implementation), f)
    return vjp(cotangent)[0]

  roi_testing.assert_backward_bit_equal(backward, features)


# ----------------------------------------------------------------------------------------
# Bad arguments.

@roi_testing.BAD_ARGUMENTS
def test_bad_arguments_raise_value_error(features, boxes, box_indices, output_size,
                                         implementation, match):
  with pytest.raises(ValueError, match=match):
    kernels.roi_align(jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(box_indices),
                      output_size, implementation=implementation)


# ----------------------------------------------------------------------------------------
# Feature-pyramid RoIAlign (detectron2's ROIPooler).

# Bands of sqrt(box area) in image pixels, each well inside one level of the default
# assignment floor(4 + log2(size / 224)) (clamped to 2..5): below level 2 (clamped up),
# 2, 3, 4, 5, above 5 (clamped down).
_SIZE_BANDS = ((16, 50), (60, 105), (120, 210), (240, 420), (480, 850), (950, 1400))


def pyramid_boxes(rng, bands, image_h, image_w, canonical_scale=1.0):
  """One box per band: random centre inside the image, aspect ratio in [1/2, 2]."""
  boxes = []
  for lo, hi in bands:
    size = np.exp(rng.uniform(np.log(lo), np.log(hi))) * canonical_scale
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2)))
    w, h = size * np.sqrt(aspect), size / np.sqrt(aspect)
    cx, cy = rng.uniform(0, image_w), rng.uniform(0, image_h)
    boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
  return np.asarray(boxes, np.float32)


@pytest.mark.parametrize(
    "implementation, strides, canonical_box_size, canonical_level",
    with_implementations([((4, 8, 16, 32), 224, 4), ((8, 16, 32, 64), 112, 3)],
                         pallas_default=[]))
def test_multilevel_matches_reference(rng, seed, implementation, strides, canonical_box_size,
                                      canonical_level):
  image_h, image_w, channels, num_images = 64, 96, 4, 2
  features = [rng.standard_normal((num_images, image_h // s, image_w // s, channels))
              .astype(np.float32) for s in strides]
  # The bands scaled so that band j still lands on level min_level + j - 1 (before clamping):
  # size' = size * canonical_box_size / 224 * 2^(2 + min_level - canonical_level).
  scale = canonical_box_size / 224 * 2.0 ** (2 + np.log2(strides[0]) - canonical_level)
  repeats = 1 if implementation != "xla" else 2
  boxes = np.concatenate([pyramid_boxes(rng, _SIZE_BANDS, image_h, image_w, scale)
                          for _ in range(repeats)])
  box_indices = ref.every_image(rng, len(boxes), num_images)
  levels = [int(np.log2(s)) for s in strides]
  raw = np.floor(canonical_level + np.log2(np.sqrt(
      (boxes[:, 2] - boxes[:, 0]).astype(np.float64) * (boxes[:, 3] - boxes[:, 1])) /
      canonical_box_size))
  assert raw.min() < levels[0] and raw.max() > levels[-1], "the boxes should need clamping"
  assigned = ref.fpn_levels(boxes, levels[0], levels[-1], canonical_box_size, canonical_level)
  assert set(assigned) == set(levels), "the boxes should hit every level"

  cotangent = rng.standard_normal((len(boxes), 7, 7, channels)).astype(np.float32)

  @jax.jit
  def run(features, boxes, box_indices):
    def pool(features):
      return kernels.multilevel_roi_align(
          features, boxes, box_indices, 7, strides=strides,
          canonical_box_size=canonical_box_size, canonical_level=canonical_level,
          sampling_ratio=0, aligned=True, implementation=implementation)
    out, vjp = jax.vjp(pool, features)
    return out, vjp(jnp.asarray(cotangent))[0]

  out, grads = run(tuple(jnp.asarray(f) for f in features), jnp.asarray(boxes),
                   jnp.asarray(box_indices))
  expected = ref.multilevel_roi_align_forward(features, boxes, box_indices, 7, strides,
                                              canonical_box_size, canonical_level)
  assert_close(out, expected, seed, f"multilevel forward, {implementation}, strides {strides}")
  expected_grads = ref.multilevel_roi_align_backward(
      cotangent, [f.shape for f in features], boxes, box_indices, strides, canonical_box_size,
      canonical_level)
  for level, (grad, expected_grad) in enumerate(zip(grads, expected_grads)):
    assert_close(grad, expected_grad, seed, f"multilevel backward, level index {level}")


@pytest.mark.parametrize("implementation", with_implementations([()]))
def test_multilevel_assigns_canonical_sizes_to_their_levels(rng, seed, implementation):
  """Square boxes of side 112, 224, 448 (and just below) go to levels 3, 4, 5 (and 2, 3, 4);
  the result equals roi_align of each box on that level with spatial_scale 1 / stride."""
  strides = (4, 8, 16, 32)
  features = [rng.standard_normal((1, 64 // s, 64 // s, 3)).astype(np.float32) for s in strides]
  sides = [111.9, 112.0, 223.9, 224.0, 447.9, 448.0, 30.0, 1000.0]
  expected_levels = [2, 3, 3, 4, 4, 5, 2, 5]
  boxes = np.array([[10, 20, 10 + s, 20 + s] for s in sides], np.float32)
  np.testing.assert_array_equal(ref.fpn_levels(boxes, 2, 5), expected_levels)
  out = kernels.multilevel_roi_align([jnp.asarray(f) for f in features], jnp.asarray(boxes),
                                     jnp.zeros(len(boxes), jnp.int32), (2, 3), strides=strides,
                                     implementation=implementation)
  for k, level in enumerate(expected_levels):
    expected = ref.roi_align_forward(features[level - 2], boxes[k:k + 1], [0], (2, 3),
                                      1.0 / strides[level - 2])
    assert_close(out[k:k + 1], expected, seed, f"box of side {sides[k]} on level {level}")


def test_multilevel_bad_arguments_raise_value_error():
  features = [jnp.zeros((1, 16 // s, 16 // s, 2)) for s in (4, 8)]
  boxes, box_indices = jnp.asarray(roi_testing.B), jnp.asarray(roi_testing.I) * 0
  with pytest.raises(ValueError, match="stride|level"):
    kernels.multilevel_roi_align(features, boxes, box_indices, 2, strides=(4, 8, 16))
  with pytest.raises(ValueError, match="rank|shape"):
    kernels.multilevel_roi_align([f[0] for f in features], boxes, box_indices, 2, strides=(4, 8))
  with pytest.raises(ValueError, match="boxes|shape"):
    kernels.multilevel_roi_align(features, boxes[:, :2], box_indices, 2, strides=(4, 8))
  with pytest.raises(ValueError, match="box_indices"):
    kernels.multilevel_roi_align(features, boxes, box_indices[:1], 2, strides=(4, 8))
  with pytest.raises(ValueError, match="output_size"):
    kernels.multilevel_roi_align(features, boxes, box_indices, 0, strides=(4, 8))
  with pytest.raises(ValueError, match="implementation"):
    kernels.multilevel_roi_align(features, boxes, box_indices, 2, strides=(4, 8),
                                 implementation="triton")


@pytest.mark.parametrize("sampling_ratio, aligned", [(0, True), (0, False), (2, True)])
def test_xla_multilevel_equals_roi_align_per_level(rng, seed, sampling_ratio, aligned):
  """The XLA multilevel path (the levels flattened into one map, each box sampled from its own
  level in one gather, one scatter-add backward) equals roi_align run on every level with the
  other levels' boxes inactive, summed: forward, gradient of every level, and under vmap.
  Boxes on every level, plus every kind of box (empty, degenerate, reversed, outside, ...)."""
  strides, image_h, image_w, channels, num_images = (4, 8, 16, 32), 64, 96, 3, 2
  features = [rng.standard_normal((num_images, image_h // s, image_w // s, channels))
              .astype(np.float32) for s in strides]
  boxes = np.concatenate(
      [pyramid_boxes(rng, _SIZE_BANDS, image_h, image_w) for _ in range(2)]
      + [ref.random_boxes(rng, ref.BOX_KINDS, image_h // s, image_w // s, 1.0 / s)
         for s in strides])
  box_indices = ref.every_image(rng, len(boxes), num_images)
  assigned = ref.fpn_levels(boxes, 2, 5)
  assert set(assigned) == {2, 3, 4, 5}, "the boxes should hit every level"
  cotangent = rng.standard_normal((len(boxes), 3, 4, channels)).astype(np.float32)
  options = dict(sampling_ratio=sampling_ratio, aligned=aligned, implementation="xla")

  def multilevel(features, boxes, box_indices):
    return kernels.multilevel_roi_align(features, boxes, box_indices, (3, 4), strides=strides,
                                        **options)

  def per_level(features, boxes, box_indices):
    levels = kernels.fpn_levels(boxes, 2, 5)
    return sum(kernels.roi_align(f, boxes, box_indices, (3, 4), spatial_scale=1.0 / s,
                                 active=levels == i + 2, **options)
               for i, (f, s) in enumerate(zip(features, strides)))

  @jax.jit
  def run(features, boxes, box_indices):
    results = []
    for pool in (multilevel, per_level):
      out, vjp = jax.vjp(lambda f: pool(f, boxes, box_indices), features)
      results.append((out, vjp(jnp.asarray(cotangent))[0]))
    return results

  args = (tuple(jnp.asarray(f) for f in features), jnp.asarray(boxes), jnp.asarray(box_indices))
  (out, grads), (expected, expected_grads) = run(*args)
  assert_close(out, expected, seed, "multilevel forward vs per-level roi_align")
  for level, (grad, expected_grad) in enumerate(zip(grads, expected_grads)):
    assert_close(grad, expected_grad, seed, f"multilevel backward vs per-level, level index {level}")
  # Reference too, as a check that per_level is the semantics.
  expected64 = ref.multilevel_roi_align_forward(features, boxes, box_indices, (3, 4), strides,
                                                sampling_ratio=sampling_ratio, aligned=aligned)
  assert_close(out, expected64, seed, "multilevel forward vs reference")

  # vmap over a batch of two feature pyramids and two box sets.
  stacked = tuple(jnp.stack([f, -2 * f]) for f in args[0])
  stacked_boxes = jnp.stack([args[1], args[1][::-1]])
  out_v = jax.jit(jax.vmap(multilevel, in_axes=(0, 0, None)))(stacked, stacked_boxes, args[2])
  expected_v = jax.jit(jax.vmap(per_level, in_axes=(0, 0, None)))(stacked, stacked_boxes, args[2])
  assert_close(out_v, expected_v, seed, "vmapped multilevel vs per-level")


# ----------------------------------------------------------------------------------------
# Boxes that cannot be pooled: out-of-range image indices and non-finite coordinates.


@pytest.mark.parametrize("boxes, box_indices, message", [
    ([[1.0, 1.0, 6.0, 6.0]], [5], r"box_indices\[0\] = 5 is outside \[0, 2\)"),
    ([[1.0, 1.0, 6.0, 6.0], [0.0, 0.0, 3.0, 3.0]], [0, -1], r"box_indices\[1\] = -1"),
    ([[np.nan, 1.0, 6.0, 6.0]], [0], r"boxes\[0\] = \[nan, 1.0, 6.0, 6.0\] has a non-finite"),
    ([[0.0, 0.0, np.inf, 10.0]], [1], r"boxes\[0\] = \[0.0, 0.0, inf, 10.0\] has a non-finite"),
])
def test_concrete_unpoolable_boxes_raise_value_error(boxes, box_indices, message):
  features = jnp.ones((2, 12, 14, 3), jnp.float32)
  boxes, box_indices = jnp.asarray(boxes, jnp.float32), jnp.asarray(box_indices, jnp.int32)
  start = time.perf_counter()
  with pytest.raises(ValueError, match=message):
    kernels.roi_align(features, boxes, box_indices, 7)
  with pytest.raises(ValueError, match=message):
    kernels.multilevel_roi_align([features, features[:, ::2, ::2]], boxes, box_indices, 7,
                                 strides=(4, 8), implementation="xla")
  assert time.perf_counter() - start < 10


def test_unpoolable_boxes_under_jit_pool_nothing_and_return_quickly(rng, seed):
  """Traced, the values cannot be checked: a non-finite box or an index outside [0, N) gives
  zeros (and no gradient), and a box with a huge coordinate is sampled at the bounded adaptive
  count (torchvision's would be ~2^31 samples per bin: a hang)."""
  features = jnp.asarray(rng.standard_normal((2, 12, 14, 3)), jnp.float32)
  boxes, box_indices = roi_testing.unpoolable_boxes()
  out, grad, seconds = roi_testing.pool_under_jit(
      lambda f, b, i: kernels.roi_align(f, b, i, 7, implementation="xla"), features, boxes,
      box_indices)
  assert seconds < 10, "a huge box must not hang the step"
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(grad)), f"random seed {seed}"
  np.testing.assert_array_equal(out[[1, 2, 3, 5]], 0.0, err_msg=f"random seed {seed}")
  expected = kernels.roi_align(features, boxes[:1], box_indices[:1], 7, implementation="xla")
  np.testing.assert_array_equal(out[0], expected[0], err_msg=f"random seed {seed}")
  # The same under vmap, and in the multi-level version.
  out_v = jax.jit(jax.vmap(lambda b, i: kernels.roi_align(features, b, i, 7), in_axes=(0, None)))(
      jnp.stack([boxes, boxes]), box_indices)
  np.testing.assert_array_equal(out_v[1], out, err_msg=f"random seed {seed}")
  multilevel = jax.jit(lambda b, i: kernels.multilevel_roi_align(
      [features, features[:, ::2, ::2]], b, i, 7, strides=(4, 8), implementation="xla"))
  out_m = np.asarray(multilevel(boxes, box_indices))
  assert np.all(np.isfinite(out_m)), f"random seed {seed}"
  np.testing.assert_array_equal(out_m[[1, 2, 3, 5]], 0.0, err_msg=f"random seed {seed}")


@pytest.mark.parametrize("implementation", [i for i in IMPLEMENTATIONS if i != "xla"])
def test_pallas_kernels_pool_nothing_from_unpoolable_boxes(rng, seed, implementation):
  """The Pallas kernels (interpret mode on a CPU) give the XLA version's zeros for traced
  unpoolable boxes, and its numbers for the good box and the huge one beside them."""
  features = jnp.asarray(rng.standard_normal((1, 16, 16, 8)), jnp.float32)
  boxes = jnp.asarray([[1, 1, 9, 9], [0, 0, np.inf, 10], [0, 0, 1e8, 10], [1, 1, 9, 9]],
                      jnp.float32)
  box_indices = jnp.asarray([0, 0, 0, 3], jnp.int32)
  for op in (kernels.roi_align, kernels.roi_pool):
    run = jax.jit(lambda b, i, impl: op(features, b, i, 7, implementation=impl),
                  static_argnums=2)
    out = np.asarray(run(boxes, box_indices, implementation))
    np.testing.assert_array_equal(out[[1, 3]], 0.0, err_msg=f"{op.__name__}, random seed {seed}")
    assert_close(out, run(boxes, box_indices, "xla"), seed, f"{op.__name__}, {implementation}")
