"""max_pool_2x2 against nn.max_pool and a float64 NumPy transcription, values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from zoo.layers.pool import max_pool_2x2


@pytest.mark.parametrize("shape", [(2, 4, 6, 3), (1, 5, 7, 2), (3, 2, 2, 1)])
def test_max_pool_2x2_equals_reduce_window(shape):
  rng = np.random.default_rng()
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)  # continuous: no ties
  y = jax.jit(max_pool_2x2)(x)
  plain = jax.jit(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)))
  np.testing.assert_array_equal(y, plain(x))
  np.testing.assert_array_equal(y, ref.max_pool_2x2(np.asarray(x)))

  weights = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(max_pool_2x2(x) * weights)))(x)
  np.testing.assert_array_equal(grad, jax.jit(jax.grad(lambda x: jnp.sum(plain(x) * weights)))(x))


def test_max_pool_2x2_ties_after_relu_give_the_same_gradient_through_relu():
  rng = np.random.default_rng()
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 3)), jnp.float32)
  weights = jnp.asarray(rng.standard_normal((2, 3, 3, 3)), jnp.float32)
  ours = jax.jit(jax.grad(lambda x: jnp.sum(max_pool_2x2(nn.relu(x)) * weights)))(x)
  plain = jax.jit(jax.grad(lambda x: jnp.sum(nn.max_pool(nn.relu(x), (2, 2), (2, 2)) * weights)))(x)
  np.testing.assert_array_equal(ours, plain)
