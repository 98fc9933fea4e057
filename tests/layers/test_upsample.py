"""UpConvolution and upsample_bilinear_2x against nn.ConvTranspose, jax.image.resize and float64
NumPy transcriptions of the definitions, forward and gradients, on fresh random inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.layers import numpy_reference as ref
from zoo.layers.upsample import UpConvolution, upsample_bilinear_2x


def _random(rng, *shape):
  return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("shape, features", [((2, 3, 5, 4), 3), ((1, 4, 4, 8), 8), ((3, 1, 2, 1), 2)])
def test_up_convolution_equals_conv_transpose(shape, features):
  rng = np.random.default_rng()
  x = jnp.asarray(_random(rng, *shape))
  plain = nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding="VALID")
  variables = {"params": {"kernel": _random(rng, 2, 2, shape[-1], features),
                          "bias": _random(rng, features)}}
  ours = UpConvolution(features)
  shapes = lambda module: jax.tree.map(jnp.shape, jax.eval_shape(module.init, jax.random.key(0), x))
  assert shapes(ours) == shapes(plain)
  y = jax.jit(ours.apply)(variables, x)
  assert y.shape == (shape[0], 2 * shape[1], 2 * shape[2], features)
  np.testing.assert_allclose(y, jax.jit(plain.apply)(variables, x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      y, ref.conv_transpose_flax(np.float64(x), *map(np.float64, variables["params"].values())),
      rtol=1e-5, atol=1e-5)

  weights = jnp.asarray(_random(rng, *y.shape))
  loss = lambda module: lambda v, x: jnp.sum(module.apply(v, x) * weights)
  ours_grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(variables, x)
  plain_grads = jax.jit(jax.grad(loss(plain), argnums=(0, 1)))(variables, x)
  for a, b in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_up_convolution_gradients_match_finite_differences():
  rng = np.random.default_rng()
  x, kernel, bias = _random(rng, 2, 3, 3, 4), _random(rng, 2, 2, 4, 3), _random(rng, 3)
  weights = rng.standard_normal((2, 6, 6, 3))
  grads = jax.jit(jax.grad(lambda k, b, x: jnp.sum(
      UpConvolution(3).apply({"params": {"kernel": k, "bias": b}}, x) * weights),
      argnums=(0, 1, 2)))(kernel, bias, x)
  arrays = [np.float64(a) for a in (kernel, bias, x)]
  for _ in range(3):
    directions = ref.unit_directions(rng, arrays)
    expected = ref.directional_derivative(
        lambda k, b, x: np.sum(ref.conv_transpose_flax(x, k, b) * weights), arrays, directions)
    got = sum(np.sum(np.float64(g) * d) for g, d in zip(grads, directions))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_torch_weight_layout_maps_by_transpose_and_flip():
  """The docstring's rule: PyTorch W (C_in, C_out, 2, 2) -> kernel W.transpose(2, 3, 0, 1)[::-1, ::-1]."""
  rng = np.random.default_rng()
  x, weight, bias = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((5, 6, 2, 2)), rng.standard_normal(6)
  kernel = weight.transpose(2, 3, 0, 1)[::-1, ::-1]
  y = jax.jit(UpConvolution(6).apply)({"params": {"kernel": kernel, "bias": bias}}, np.float32(x))
  np.testing.assert_allclose(y, ref.conv_transpose_torch(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_up_convolution_compute_dtype():
  x = jnp.ones((1, 2, 2, 4))
  module = UpConvolution(3, dtype=jnp.bfloat16)
  variables = jax.eval_shape(module.init, jax.random.key(0), x)
  assert variables["params"]["kernel"].dtype == jnp.float32
  assert jax.eval_shape(module.apply, variables, x).dtype == jnp.bfloat16


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 1, 1, 2), (1, 8, 6, 3)])
def test_bilinear_2x(shape):
  rng = np.random.default_rng()
  x = _random(rng, *shape)
  y = jax.jit(upsample_bilinear_2x)(x)
  big = (shape[0], 2 * shape[1], 2 * shape[2], shape[3])
  np.testing.assert_allclose(y, ref.upsample_bilinear_2x(np.float64(x)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y, jax.image.resize(x, big, "bilinear"), rtol=1e-5, atol=1e-6)

  weights = rng.standard_normal(big)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(upsample_bilinear_2x(x) * weights)))(x)
  direction, = ref.unit_directions(rng, [x])
  expected = ref.directional_derivative(
      lambda x: np.sum(ref.upsample_bilinear_2x(x) * weights), [np.float64(x)], [direction])
  np.testing.assert_allclose(np.sum(np.float64(grad) * direction), expected, rtol=1e-4, atol=1e-6)
