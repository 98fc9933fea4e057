"""ConvNormAct against a float64 NumPy transcription (convolution as a sum over taps, batch
norm from its definition), forward in train and eval mode, and gradients; strides, dilations,
explicit padding and frozen statistics; the parameter layouts that keep releases' names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.layers import numpy_reference as ref
from zoo.layers.conv import ConvNormAct, conv_norm_act


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


@pytest.mark.parametrize("stride, dilation, pad", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 2, 0)])
@pytest.mark.parametrize("train", [False, True])
def test_strided_dilated_frozen_norm(stride, dilation, pad, train):
  """ResNet's and DeepLab's use: stride, dilation, explicit padding, norm="frozen" (stored
  statistics in training too, none updated), no activation."""
  rng = np.random.default_rng()
  x = jnp.asarray(rng.standard_normal((2, 9, 8, 3)), jnp.float32)
  module = ConvNormAct(5, 3, stride=stride, dilation=dilation, padding=pad, norm="frozen",
                       activation=None)
  variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)
  variables = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), variables)
  variables["batch_stats"]["norm"]["var"] = jnp.abs(variables["batch_stats"]["norm"]["var"]) + 0.5
  y, updates = module.apply(variables, x, train=train, mutable=["batch_stats"])
  p = jax.tree.map(np.float64, variables["params"])
  s = jax.tree.map(np.float64, variables["batch_stats"])
  conv = ref.conv2d_strided(np.float64(x), p["conv"]["kernel"], stride=stride, dilation=dilation,
                            pad=pad)
  expected, _ = ref.batch_norm(conv, p["norm"], s["norm"], train=False)
  assert y.shape == expected.shape
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])


class _Parent(nn.Module):
  """Holds the convolution and norm itself, as torchvision's ResNet blocks do."""
  features: int

  @nn.compact
  def __call__(self, x, *, train: bool):
    return conv_norm_act(self, x, train=train, features=self.features, norm="frozen",
                         conv_name="conv1", norm_name="bn1")


def _shapes(module):
  variables = jax.eval_shape(
      lambda: module.init(jax.random.key(0), jnp.ones((1, 6, 6, 2)), train=False))
  return jax.tree.map(lambda a: a.shape, variables)


def test_parameter_layouts():
  """The layouts that keep the releases' names (module doc): default, renamed norm, the
  convolution in the block itself (Caffe's layer), both in the parent (torchvision's ResNet)."""
  kernel = (3, 3, 2, 4)
  assert _shapes(ConvNormAct(4, norm="batch")) == {
      "params": {"conv": {"kernel": kernel}, "norm": {"scale": (4,), "bias": (4,)}},
      "batch_stats": {"norm": {"mean": (4,), "var": (4,)}}}
  assert _shapes(ConvNormAct(4, norm="batch", norm_name="bn"))["params"] == {
      "conv": {"kernel": kernel}, "bn": {"scale": (4,), "bias": (4,)}}
  assert _shapes(ConvNormAct(4, conv_name=None))["params"] == {"kernel": kernel, "bias": (4,)}
  assert _shapes(ConvNormAct(4, norm="batch", conv_name=None))["params"] == {
      "kernel": kernel, "norm": {"scale": (4,), "bias": (4,)}}
  assert _shapes(_Parent(4)) == {
      "params": {"conv1": {"kernel": kernel}, "bn1": {"scale": (4,), "bias": (4,)}},
      "batch_stats": {"bn1": {"mean": (4,), "var": (4,)}}}


def test_initialisers():
  """He et al.'s fan-in normal kernel by default (std sqrt(2 / (9 C_in))), a given kernel_init
  and norm_scale_init otherwise."""
  x = jnp.ones((1, 4, 4, 64))
  params = ConvNormAct(256, norm="batch").init(jax.random.key(0), x, train=False)["params"]
  assert abs(float(params["conv"]["kernel"].std()) / np.sqrt(2 / (9 * 64)) - 1) < 0.05
  module = ConvNormAct(8, norm="batch", kernel_init=nn.initializers.zeros,
                       norm_scale_init=nn.initializers.zeros)
  params = module.init(jax.random.key(0), x, train=False)["params"]
  assert not params["conv"]["kernel"].any() and not params["norm"]["scale"].any()


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_convolution_in_the_block_itself(norm):
  """conv_name=None (Caffe's layer: kernel and bias in the block) computes what nn.Conv does:
  the same parameters give the same outputs, at every padding, stride and dilation."""
  rng = np.random.default_rng()
  x = jnp.asarray(rng.standard_normal((2, 9, 8, 3)), jnp.float32)
  for padding, stride, dilation in (("SAME", 1, 1), ("VALID", 2, 1), (2, 1, 2), ("SAME", 2, 3)):
    settings = dict(kernel_size=3, stride=stride, dilation=dilation, padding=padding, norm=norm)
    inside, child = ConvNormAct(4, conv_name=None, **settings), ConvNormAct(4, **settings)
    variables = inside.init(jax.random.key(0), x, train=False)
    params = dict(variables["params"])
    conv = {k: params.pop(k) for k in ("kernel", "bias") if k in params}
    nested = {**variables, "params": {**params, "conv": conv}}
    np.testing.assert_array_equal(inside.apply(variables, x, train=False),
                                  child.apply(nested, x, train=False))


def test_parent_intermediates_hold_only_its_output():
  """conv_norm_act adds children, not a scope-sharing module: the parent's own `__call__`
  intermediate stays its output alone (a feature extractor reading it gets the right map)."""
  x = jnp.ones((1, 6, 6, 2))
  module = _Parent(4)
  variables = module.init(jax.random.key(0), x, train=False)
  y, state = module.apply(variables, x, train=False, capture_intermediates=True,
                          mutable=["intermediates"])
  assert len(state["intermediates"]["__call__"]) == 1
  np.testing.assert_array_equal(state["intermediates"]["__call__"][0], y)
