"""max_pool_2x2 against nn.max_pool and a float64 NumPy transcription, values and gradients,
ties included."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.layers import numpy_reference as ref
from zoo.layers.pool import max_pool_2x2

plain = jax.jit(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)))


def _gradients(pool, x, weights):
  return jax.jit(jax.grad(lambda x: jnp.sum(pool(x) * weights)))(x)


@pytest.mark.parametrize("shape", [(2, 4, 6, 3), (1, 5, 7, 2), (3, 2, 2, 1)])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_2x2_equals_reduce_window(shape, ties):
  rng = np.random.default_rng()
  x = rng.standard_normal(shape)
  if ties:  # a few values only: most windows hold repeated maxima, zeros as after a ReLU
    x = np.maximum(rng.integers(-1, 2, shape), 0)
  x = jnp.asarray(x, jnp.float32)
  y = jax.jit(max_pool_2x2)(x)
  np.testing.assert_array_equal(y, plain(x))
  np.testing.assert_array_equal(y, ref.max_pool_2x2(np.asarray(x)))

  weights = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  np.testing.assert_array_equal(_gradients(max_pool_2x2, x, weights),
                                _gradients(plain, x, weights))


def test_max_pool_2x2_gradient_goes_to_the_first_maximum_in_row_major_order():
  x = jnp.array([[0., 0.], [0., 0.]])[None, :, :, None]
  grad = jax.grad(lambda x: max_pool_2x2(x).sum())(x)
  np.testing.assert_array_equal(grad[0, :, :, 0], [[1., 0.], [0., 0.]])
