"""ConvNormAct against a float64 NumPy transcription (convolution as a sum over taps, batch
norm from its definition), forward in train and eval mode, and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.layers import numpy_reference as ref
from zoo.layers.conv import ConvNormAct


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("norm, train", [("none", False), ("batch", False), ("batch", True)])
def test_conv_norm_act(padding, norm, train):
  rng = np.random.default_rng()
  x = jnp.asarray(rng.standard_normal((2, 7, 6, 3)), jnp.float32)
  module = ConvNormAct(4, (3, 3), padding=padding, norm=norm)
  variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)
  variables = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), variables)
  if norm == "batch":
    variables["batch_stats"]["norm"]["var"] = jnp.abs(variables["batch_stats"]["norm"]["var"]) + 0.5
    assert "bias" not in variables["params"]["conv"]
  assert variables["params"]["conv"]["kernel"].shape == (3, 3, 3, 4)  # HWIO, as nn.Conv

  apply = jax.jit(lambda v, x: module.apply(v, x, train=train, mutable=["batch_stats"]))
  y, updates = apply(variables, x)
  params64 = jax.tree.map(np.float64, variables["params"])
  stats64 = jax.tree.map(np.float64, variables.get("batch_stats"))
  expected = ref.conv_norm_act(np.float64(x), params64, stats64, padding=padding, norm=norm,
                               train=train)
  assert y.shape == expected.shape == ((2, 7, 6, 4) if padding == "SAME" else (2, 5, 4, 4))
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
  if train:  # running mean <- 0.9 running mean + 0.1 batch mean (PyTorch momentum 0.1)
    conv = ref.conv2d(np.float64(x), params64["conv"]["kernel"], None, padding)
    np.testing.assert_allclose(updates["batch_stats"]["norm"]["mean"],
                               0.9 * stats64["norm"]["mean"] + 0.1 * conv.mean(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-4)

  weights = rng.standard_normal(y.shape)
  loss = lambda params, x: jnp.sum(apply({**variables, "params": params}, x)[0] * weights)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)
  leaves, treedef = jax.tree.flatten((params64, np.float64(x)))
  f = lambda *leaves: np.sum(weights * ref.conv_norm_act(
      leaves[-1], jax.tree.unflatten(treedef, leaves)[0], stats64, padding=padding, norm=norm,
      train=train))
  directions = ref.unit_directions(rng, leaves)
  expected = ref.directional_derivative(f, leaves, directions)
  got = sum(np.sum(np.float64(g) * d) for g, d in zip(jax.tree.leaves(grads), directions))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_unknown_norm_raises():
  with pytest.raises(ValueError, match="norm must be one of"):
    jax.eval_shape(lambda x: ConvNormAct(4, norm="group").init(jax.random.key(0), x, train=False),
                   jnp.ones((1, 4, 4, 1)))
