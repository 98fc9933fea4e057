"""What the RoI kernel tests share: the implementations under test, their parameters, closeness."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels

IMPLEMENTATIONS = tuple(name for name in kernels.IMPLEMENTATIONS if name != "auto")


def with_implementations(values, pallas_default=()):
  """pytest params (implementation, *value): every value for "xla"; for the Pallas versions
  (interpret mode on a CPU) the values not in `pallas_default` are marked slow."""
  params = []
  for implementation in IMPLEMENTATIONS:
    for value in values:
      value = value if isinstance(value, tuple) else (value,)
      slow = implementation != "xla" and value not in pallas_default
      params.append(pytest.param(implementation, *value,
                                 marks=[pytest.mark.slow] if slow else []))
  return params


def assert_close(actual, expected, seed, what, rtol, atol):
  """allclose with atol relative to the largest expected magnitude (at least 1)."""
  expected = np.asarray(expected, np.float64)
  scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol,
                             atol=atol * scale, err_msg=f"{what} (random seed {seed})")


def assert_backward_bit_equal(backward, features):
  """backward(features) gives the same bits on two runs and after a second compilation."""
  first = np.asarray(jax.jit(backward)(features))
  second = np.asarray(jax.jit(backward)(features))
  third = np.asarray(jax.jit(lambda f: backward(f) * 1)(features))
  np.testing.assert_array_equal(first.view(np.uint32), second.view(np.uint32))
  np.testing.assert_array_equal(first.view(np.uint32), third.view(np.uint32))


F = np.zeros((2, 6, 7, 3), np.float32)  # small valid arguments for error tests
B = np.array([[0, 0, 3, 3], [1, 1, 5, 4]], np.float32)
I = np.array([0, 1], np.int32)

# (features, boxes, box_indices, output_size, implementation, message regex): bad arguments
# every RoI op must reject with a ValueError naming the problem.
BAD_ARGUMENTS = pytest.mark.parametrize(
    "features, boxes, box_indices, output_size, implementation, match", [
        (F[0], B, I, 2, "xla", "rank|shape"),
        (F[None], B, I, 2, "xla", "rank|shape"),
        (F, B[:, :3], I, 2, "xla", "boxes|shape"),
        (F, B[0], I, 2, "xla", "boxes|rank|shape"),
        (F, B, I[:1], 2, "xla", "box_indices"),
        (F, B, np.array([0, 1, 1], np.int32), 2, "xla", "box_indices"),
        (F, B, I, 0, "xla", "output_size"),
        (F, B, I, -3, "xla", "output_size"),
        (F, B, I, (2, 0), "xla", "output_size"),
        (F, B, I, (0, 2), "xla", "output_size"),
        (F, B, I, 2, "cuda", "implementation"),
        (F, B, I, 2, "gpu", "implementation"),
        (F, B, I, 2, "pallas", "implementation"),
    ], ids=["features_rank_3", "features_rank_5", "boxes_k_by_3", "boxes_rank_1",
            "fewer_indices", "more_indices", "output_size_0", "output_size_negative",
            "output_width_0", "output_height_0", "implementation_cuda", "implementation_gpu",
            "implementation_pallas"])


def unpoolable_boxes():
  """(boxes (7, 4) float32, box_indices (7,) int32) for 2 images of at least 12 x 14: box 0 (and
  3's coordinates) a good box; unpoolable ones: 1 an infinite corner, 2 a NaN, 3 image 5,
  5 every corner infinite; huge finite ones: 4 ([0, 0, 1e8, 10]) and 6 (+-1e8)."""
  good = [1.0, 2.0, 9.0, 8.0]
  boxes = jnp.asarray([good, [0, 0, np.inf, 10], [np.nan, 1, 6, 6], good, [0, 0, 1e8, 10],
                       [-np.inf, -np.inf, np.inf, np.inf], [-1e8, -1e8, 1e8, 1e8]], jnp.float32)
  return boxes, jnp.asarray([1, 0, 1, 5, 1, 0, 0], jnp.int32)


def pool_under_jit(op, features, boxes, box_indices):
  """(out, gradient of out's sum with respect to the features, seconds incl. compilation) of
  `op(features, boxes, box_indices)` inside jax.jit, so the boxes are traced."""
  @jax.jit
  def run(features, boxes, box_indices):
    out, vjp = jax.vjp(lambda f: op(f, boxes, box_indices), features)
    return out, vjp(jnp.ones_like(out))[0]

  start = time.perf_counter()
  out, grad = jax.block_until_ready(run(features, boxes, box_indices))
  return np.asarray(out), np.asarray(grad), time.perf_counter() - start

