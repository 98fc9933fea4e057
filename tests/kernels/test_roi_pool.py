"""kernels.roi_pool and kernels.spatial_pyramid_pool against a float64 NumPy transcription of
torchvision's C++ roi_pool kernel (roi_reference.py), forward and backward, on fresh random
inputs, ties included.

As in test_roi_align.py: every implementation is tested, most Pallas cases are marked slow
(interpret mode on a CPU), each test
prints its random seed and ZOO_TEST_SEED=<base seed> replays it (tests/conftest.py).
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
from tests.kernels.roi_testing import with_implementations


def assert_close(actual, expected, seed, what, rtol=1e-6, atol=1e-6):
  roi_testing.assert_close(actual, expected, seed, what, rtol, atol)


@functools.partial(jax.jit, static_argnames=("output_size", "spatial_scale", "implementation"))
def forward_and_vjp(features, boxes, box_indices, cotangent, *, output_size, spatial_scale=1.0,
                    implementation="xla"):
  def pool(f):
    return kernels.roi_pool(f, boxes, box_indices, output_size, spatial_scale=spatial_scale,
                            implementation=implementation)
  out, vjp = jax.vjp(pool, features)
  return out, vjp(cotangent)[0]


def check_against_reference(rng, seed, implementation, features, boxes, box_indices, output_size,
                            spatial_scale=1.0):
  """The forward must equal the reference exactly (a max picks one of the inputs); the vjp
  must put each output's cotangent on the reference's argmax (the first maximum)."""
  out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
  cotangent = rng.standard_normal((len(boxes), out_h, out_w, features.shape[-1]))
  cotangent = cotangent.astype(features.dtype)
  out, grad = forward_and_vjp(jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(box_indices),
                              jnp.asarray(cotangent), output_size=output_size,
                              spatial_scale=spatial_scale, implementation=implementation)
  assert out.shape == (len(boxes), out_h, out_w, features.shape[-1])
  assert out.dtype == features.dtype and grad.dtype == features.dtype
  expected, argmax = ref.roi_pool_forward(np.asarray(features, np.float64), boxes, box_indices,
                                          output_size, spatial_scale)
  expected_grad = ref.roi_pool_backward(np.asarray(cotangent, np.float64), argmax, box_indices,
                                        features.shape)
  context = f"{implementation}, output_size={output_size}, spatial_scale={spatial_scale}"
  np.testing.assert_array_equal(np.asarray(out, np.float64), expected,
                                err_msg=f"forward, {context} (random seed {seed})")
  assert_close(grad, expected_grad, seed, f"backward, {context}")


# ----------------------------------------------------------------------------------------
# The reference itself: finite differences and hand-computed bins.


def test_reference_backward_equals_central_differences_of_reference_forward(rng, seed):
  """Distinct feature values at least 0.01 apart: the max is linear within eps = 1e-4."""
  shape = (2, 8, 9, 3)
  features = (rng.permutation(np.prod(shape)).reshape(shape) * 0.01
              + rng.uniform(0, 0.001, shape) - 2)
  boxes = ref.random_boxes(rng, ref.BOX_KINDS, 8, 9, spatial_scale=0.5)
  box_indices = ref.every_image(rng, len(boxes), 2)
  for output_size in (1, (2, 3), 7):
    out, argmax = ref.roi_pool_forward(features, boxes, box_indices, output_size, 0.5)
    cotangent = rng.standard_normal(out.shape)
    grad = ref.roi_pool_backward(cotangent, argmax, box_indices, shape)
    eps = 1e-4
    for _ in range(3):
      direction = rng.uniform(-1, 1, shape)
      plus, _ = ref.roi_pool_forward(features + eps * direction, boxes, box_indices,
                                     output_size, 0.5)
      minus, _ = ref.roi_pool_forward(features - eps * direction, boxes, box_indices,
                                      output_size, 0.5)
      numeric = np.sum((plus - minus) / (2 * eps) * cotangent)
      np.testing.assert_allclose(np.sum(grad * direction), numeric, rtol=1e-9, atol=1e-9,
                                 err_msg=f"output_size {output_size}, random seed {seed}")


def test_reference_bins_by_hand():
  # Half away from zero: x = -0.5 -> -1, 1.5 -> 2 (np.round would give -0 and 2): start -1,
  # end 2, width 4, bins of 2: columns [-1, 1) -> [0, 1) and [1, 3).
  bins = ref.roi_pool_bins([-0.5, -0.5, 1.5, 1.5], 5, 5, 2)
  assert bins[0, 0] == (0, 1, 0, 1) and bins[1, 1] == (1, 3, 1, 3)
  assert ref.roi_pool_bins([0.5, 2.5, 2.5, 2.5], 9, 9, 1)[0, 0] == (3, 4, 1, 4)
  # 2.5 * 0.5 = 1.25 -> 1; 5 * 0.5 = 2.5 -> 3.
  assert ref.roi_pool_bins([5, 2.5, 5, 5], 9, 9, 1, spatial_scale=0.5)[0, 0] == (1, 4, 3, 4)
  # torchvision's float arithmetic: height 57 in 7 bins, last bin ceil(7 * float32(57 / 7)) = 58.
  bins = ref.roi_pool_bins([0, 0, 56, 56], 64, 64, 7)
  assert bins[6, 6] == (48, 58, 48, 58) and bins[0, 0] == (0, 9, 0, 9)
  # A box wholly outside: every bin clipped to empty.
  assert set(ref.roi_pool_bins([-9, -9, -4, -4], 5, 5, 2).values()) == {(0, 0, 0, 0)}


# ----------------------------------------------------------------------------------------
# Implementations against the reference.


@pytest.mark.parametrize(
    "implementation, output_size, spatial_scale",
    with_implementations([(o, s) for o in (1, (2, 3), 7) for s in (0.25, 0.5, 1.0)],
                         pallas_default=[((2, 3), 0.5)]))
def test_matches_reference_on_every_kind_of_box(rng, seed, implementation, output_size,
                                                spatial_scale):
  """Boxes inside, partly and wholly outside, at the border, tiny, degenerate, reversed and
  larger than the map (empty bins give 0), every image of the batch used."""
  if implementation == "xla":
    shape, kinds = (3, 13, 15, 5), ref.BOX_KINDS * 2
  else:
    shape, kinds = (2, 11, 12, 4), ref.BOX_KINDS
  features = rng.standard_normal(shape).astype(np.float32)
  boxes = ref.random_boxes(rng, kinds, shape[1], shape[2], spatial_scale)
  box_indices = ref.every_image(rng, len(boxes), shape[0])
  check_against_reference(rng, seed, implementation, features, boxes, box_indices, output_size,
                          spatial_scale)


@pytest.mark.parametrize("implementation", with_implementations([()], pallas_default=[()]))
def test_ties_and_negative_maxima(rng, seed, implementation):
  """Few distinct values (ties in most bins: the first maximum in row-major order takes the
  gradient), and all-negative maps (a non-empty bin's maximum is below 0, not 0)."""
  shape = (1, 9, 10, 3)
  features = np.concatenate([rng.integers(-1, 2, shape),  # image 0: values -1, 0, 1
                             np.maximum(rng.integers(-2, 2, shape), 0),  # 1: mostly 0 (ReLU)
                             -1 - np.abs(rng.standard_normal(shape))])  # 2: all below -1
  kinds = ("inside", "partial", "border", "huge", "outside")
  boxes = np.concatenate([ref.random_boxes(rng, kinds, 9, 10) for _ in range(3)])
  box_indices = np.repeat(np.arange(3, dtype=np.int32), len(kinds))
  check_against_reference(rng, seed, implementation, features.astype(np.float32), boxes,
                          box_indices, (2, 3))


@pytest.mark.parametrize("implementation", with_implementations([()]))
def test_gradient_goes_to_the_first_maximum(implementation):
  features = jnp.zeros((1, 3, 3, 1), jnp.float32)
  boxes = jnp.array([[0, 0, 2, 2], [1, 1, 2, 2]], jnp.float32)
  def total(f):
    return kernels.roi_pool(f, boxes, jnp.zeros(2, jnp.int32), 1,
                            implementation=implementation).sum()

  grad = jax.jit(jax.grad(total))(features)
  np.testing.assert_array_equal(grad[0, :, :, 0], [[1, 0, 0], [0, 1, 0], [0, 0, 0]])


@pytest.mark.parametrize("implementation", with_implementations([()]))
def test_corners_round_half_away_from_zero(rng, seed, implementation):
  """Corners at exact halves after scaling, positive and negative: C's round(), not
  round-half-to-even."""
  features = rng.standard_normal((1, 9, 9, 2)).astype(np.float32)
  boxes = np.array([[-0.5, -0.5, 1.5, 1.5], [0.5, 2.5, 2.5, 2.5], [-1.5, 3.5, 4.5, 6.5],
                    [2.5, 0.5, 6.5, 7.5]], np.float32)
  check_against_reference(rng, seed, implementation, features, boxes, np.zeros(4, np.int32), 2)
  check_against_reference(rng, seed, implementation, features, boxes * 2, np.zeros(4, np.int32),
                          (2, 3), spatial_scale=0.5)


@pytest.mark.parametrize("implementation", with_implementations([()]))
def test_bin_edges_of_every_small_integer_box(rng, seed, implementation):
  """Boxes 1 to 16 cells high and wide (integer corners) in 2, 3, 5 and 7 bins: each bin's
  edges as torchvision's float kernel computes them, floor(ph * float32(roi / out)) and
  ceil((ph + 1) * float32(roi / out)). Catches a division by the constant output size
  turned into a multiplication by its rounded reciprocal (3 * (7 * float32(1/3)) > 7)."""
  features = rng.standard_normal((1, 20, 20, 2)).astype(np.float32)
  sizes = np.arange(1, 17)
  x1, y1 = rng.integers(0, 4, (2, len(sizes)))
  boxes = np.stack([x1, y1, x1 + sizes - 1, y1 + rng.permutation(sizes) - 1], 1)
  boxes = boxes.astype(np.float32)
  for output_size in (2, 3, 5, 7, (3, 7)):
    check_against_reference(rng, seed, implementation, features, boxes,
                            np.zeros(len(sizes), np.int32), output_size)
  # The same under vmap (over boxes and indices), where the division is batched.
  boxes = np.stack([boxes, boxes[::-1]])
  for output_size in (3, 7):
    out = jax.jit(jax.vmap(lambda b, i: kernels.roi_pool(
        jnp.asarray(features), b, i, output_size, implementation=implementation)))(
            jnp.asarray(boxes), jnp.zeros(boxes.shape[:2], jnp.int32))
    for j in range(2):
      expected, _ = ref.roi_pool_forward(features, boxes[j], np.zeros(len(sizes), int),
                                         output_size)
      np.testing.assert_array_equal(np.asarray(out[j], np.float64), expected,
                                    err_msg=f"vmap, output_size {output_size}, element {j} "
                                    f"(random seed {seed})")


@pytest.mark.parametrize("implementation", with_implementations([()]))
def test_bin_edges_follow_torchvision_float_arithmetic(rng, seed, implementation):
  """A 57-cell box in 7, 9 or 14 bins: torchvision's float kernel ends the last bin at
  ceil(7 * float32(57 / 7)) = 58, one row and column past the box (exact arithmetic: 57).
  (14 x 14 bins do not fit the GPU kernel's shared memory: check_supported, tested in
  test_lowering.py; 9 x 9 do.)"""
  features = rng.standard_normal((1, 64, 64, 2)).astype(np.float32)
  for cell in (57, 59, 60):  # rows and columns just past the boxes
    features[0, cell, :, :] = 10.0 + cell
    features[0, :, cell, :] = 10.0 + cell
  boxes = np.array([[0, 0, 56, 56], [3, 2, 59, 58]], np.float32)
  for output_size in (7, 9) if implementation == "pallas_gpu" else (7, 9, 14):
    check_against_reference(rng, seed, implementation, features, boxes, np.zeros(2, np.int32),
                            output_size)


@pytest.mark.parametrize("implementation", with_implementations([()], pallas_default=[()]))
def test_bfloat16_features(rng, seed, implementation):
  """bfloat16 in and out: the forward picks an input (exact); the gradient is accumulated in
  float32 and rounded once (within 2^-8 of the float64 sum)."""
  shape = (2, 10, 12, 4)
  features = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)  # ties are likely
  boxes = ref.random_boxes(rng, ("inside", "partial", "border", "huge", "tiny") * 2, 10, 12, 0.5)
  box_indices = ref.every_image(rng, len(boxes), 2)
  cotangent = jnp.asarray(rng.standard_normal((len(boxes), 3, 3, 4)), jnp.bfloat16)
  out, grad = forward_and_vjp(features, jnp.asarray(boxes), jnp.asarray(box_indices), cotangent,
                              output_size=3, spatial_scale=0.5, implementation=implementation)
  assert out.dtype == jnp.bfloat16 and grad.dtype == jnp.bfloat16
  expected, argmax = ref.roi_pool_forward(np.asarray(features.astype(jnp.float32), np.float64),
                                          boxes, box_indices, 3, 0.5)
  expected_grad = ref.roi_pool_backward(np.asarray(cotangent.astype(jnp.float32), np.float64),
                                        argmax, box_indices, shape)
  np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), expected,
                                err_msg=f"forward (random seed {seed})")
  np.testing.assert_allclose(np.asarray(grad.astype(jnp.float32)), expected_grad,
                             rtol=2.0 ** -8, atol=2.0 ** -8 * np.abs(expected_grad).max(),
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
    return kernels.roi_pool(f, b, i, out_size, spatial_scale=0.5, implementation=implementation)

  def loss(f, b, i):
    return jnp.sum(jax.vmap(pool)(f, b, i) * weights)

  out = jax.jit(jax.vmap(pool))(features, boxes, box_indices)
  grad_features, grad_boxes = jax.jit(jax.grad(loss, argnums=(0, 1)))(features, boxes, box_indices)
  boxes_only = jax.jit(jax.vmap(pool, in_axes=(None, 0, 0)))(features[0], boxes, box_indices)
  shared_indices = jax.jit(jax.vmap(pool, in_axes=(None, 0, None)))(features[0], boxes,
                                                                      box_indices[0])
  for j in range(batch):
    expected, argmax = ref.roi_pool_forward(features[j], boxes[j], box_indices[j], out_size, 0.5)
    assert_close(out[j], expected, seed, f"vmap over features and boxes, element {j}")
    expected_grad = ref.roi_pool_backward(weights[j], argmax, box_indices[j], shape)
    assert_close(grad_features[j], expected_grad, seed, f"grad of vmap, element {j}")
    expected, _ = ref.roi_pool_forward(features[0], boxes[j], box_indices[j], out_size, 0.5)
    assert_close(boxes_only[j], expected, seed, f"vmap over boxes only, element {j}")
    expected, _ = ref.roi_pool_forward(features[0], boxes[j], box_indices[0], out_size, 0.5)
    assert_close(shared_indices[j], expected, seed,
                 f"vmap over boxes only, box_indices shared, element {j}")
  np.testing.assert_array_equal(grad_boxes, np.zeros_like(boxes))


@pytest.mark.parametrize("implementation", with_implementations([()]))
def test_backward_is_deterministic(rng, implementation):
  """Two runs of the backward, and a second compilation, give the same bits, with many
  overlapping boxes adding into the same cells."""
  shape = (2, 8, 9, 4)
  features = jnp.asarray(rng.integers(-2, 3, shape), jnp.float32)  # ties: shared maxima
  boxes = jnp.asarray(ref.random_boxes(rng, ("inside", "partial", "huge") * 5, 8, 9))
  box_indices = jnp.asarray(ref.every_image(rng, boxes.shape[0], 2))
  cotangent = jnp.asarray(rng.standard_normal((boxes.shape[0], 3, 3, 4)), jnp.float32)

  def backward(f):
    _, vjp = jax.vjp(lambda f: kernels.roi_pool(f, boxes, box_indices, 3,
                                                implementation=implementation), f)
    return vjp(cotangent)[0]

  roi_testing.assert_backward_bit_equal(backward, features)


@roi_testing.BAD_ARGUMENTS
def test_bad_arguments_raise_value_error(features, boxes, box_indices, output_size,
                                         implementation, match):
  with pytest.raises(ValueError, match=match):
    kernels.roi_pool(jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(box_indices),
                     output_size, implementation=implementation)


# ----------------------------------------------------------------------------------------
# Spatial pyramid pooling (SPPnet).


@pytest.mark.parametrize(
    "implementation, levels",
    with_implementations([((1, 2, 4),), ((3,),), ((1, 2),)]))
def test_spatial_pyramid_pool_matches_reference(rng, seed, implementation, levels):
  shape = (2, 11, 13, 3)
  features = rng.standard_normal(shape).astype(np.float32)
  boxes = ref.random_boxes(rng, ("inside", "partial", "border", "huge", "tiny", "outside"),
                           11, 13, 0.5)
  box_indices = ref.every_image(rng, len(boxes), 2)
  width = sum(l * l for l in levels) * shape[-1]
  cotangent = rng.standard_normal((len(boxes), width)).astype(np.float32)

  @jax.jit
  def run(features, boxes, box_indices):
    def pool(f):
      return kernels.spatial_pyramid_pool(f, boxes, box_indices, levels, spatial_scale=0.5,
                                          implementation=implementation)
    out, vjp = jax.vjp(pool, features)
    return out, vjp(jnp.asarray(cotangent))[0]

  out, grad = run(jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(box_indices))
  assert out.shape == (len(boxes), width)
  expected, argmaxes = ref.spatial_pyramid_pool_forward(features, boxes, box_indices, levels, 0.5)
  np.testing.assert_array_equal(np.asarray(out, np.float64), expected,
                                err_msg=f"levels {levels}, random seed {seed}")
  expected_grad = ref.spatial_pyramid_pool_backward(cotangent, argmaxes, box_indices, shape,
                                                    levels)
  assert_close(grad, expected_grad, seed, f"backward, levels {levels}")


def test_spatial_pyramid_pool_bad_arguments_raise_value_error():
  features, boxes, box_indices = jnp.asarray(roi_testing.F), jnp.asarray(roi_testing.B), jnp.asarray(roi_testing.I)
  for levels in ((), (0,), (1, -2)):
    with pytest.raises(ValueError, match="levels"):
      kernels.spatial_pyramid_pool(features, boxes, box_indices, levels)
  with pytest.raises(ValueError, match="rank|shape"):
    kernels.spatial_pyramid_pool(features[0], boxes, box_indices)
  with pytest.raises(ValueError, match="box_indices"):
    kernels.spatial_pyramid_pool(features, boxes, box_indices[:1])
  with pytest.raises(ValueError, match="implementation"):
    kernels.spatial_pyramid_pool(features, boxes, box_indices, implementation="tpu")


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
    kernels.roi_pool(features, boxes, box_indices, 7)
  with pytest.raises(ValueError, match=message):
    kernels.spatial_pyramid_pool(features, boxes, box_indices)
  assert time.perf_counter() - start < 10


def test_unpoolable_boxes_under_jit_pool_nothing(rng, seed):
  """Traced, the values cannot be checked: a non-finite box or an index outside [0, N) gets
  empty bins (zeros, no gradient) instead of NaN arithmetic's garbage or another image;
  a box with a huge finite coordinate is clipped to the map as any other."""
  features = jnp.asarray(rng.standard_normal((2, 12, 14, 3)), jnp.float32)
  boxes, box_indices = roi_testing.unpoolable_boxes()
  out, grad, seconds = roi_testing.pool_under_jit(
      lambda f, b, i: kernels.roi_pool(f, b, i, 7, implementation="xla"), features, boxes,
      box_indices)
  assert seconds < 10, "a huge box must not hang the step"
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(grad)), f"random seed {seed}"
  np.testing.assert_array_equal(out[[1, 2, 3, 5]], 0.0, err_msg=f"random seed {seed}")
  expected = kernels.roi_pool(features, boxes[:1], box_indices[:1], 7, implementation="xla")
  np.testing.assert_array_equal(out[0], expected[0], err_msg=f"random seed {seed}")
  # A box of +-1e8 cells: its middle bin covers the whole map, the others lie beyond it.
  np.testing.assert_array_equal(out[6, 3, 3], np.max(features[0], axis=(0, 1)),
                                err_msg=f"random seed {seed}")
  np.testing.assert_array_equal(np.delete(out[6].reshape(49, -1), 24, axis=0), 0.0,
                                err_msg=f"random seed {seed}")
  spp = jax.jit(lambda b, i: kernels.spatial_pyramid_pool(features, b, i))(boxes, box_indices)
  assert np.all(np.isfinite(spp)), f"random seed {seed}"
  np.testing.assert_array_equal(np.asarray(spp)[[1, 2, 3, 5]], 0.0, err_msg=f"random seed {seed}")
