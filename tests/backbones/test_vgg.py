"""VGG-16 backbone: torchvision's parameter count, Caffe pooling arithmetic, the FCN and
DeepLab-LargeFOV layouts' shapes, and forward/gradients against a float64 NumPy transcription."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.backbones import VGG16
from zoo.backbones.vgg import caffe_pool, caffe_pool_size

from tests.backbones import caffe_reference as caffe
from tests.layers import numpy_reference as ref

TINY = dict(widths=(2, 3, 2, 3, 2), fc_width=3)


def _abstract_init(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def test_imagenet_vgg16_has_torchvisions_parameter_count():
  """torchvision.models.vgg16(): 138,357,544 (its classifier's Linear(25088, 4096) is fc6's
  7x7x512x4096 kernel); the convolutions alone 14,714,688."""
  params = _abstract_init(VGG16(num_classes=1000), (1, 224, 224, 3))["params"]
  count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
  assert count(params) == 138_357_544
  assert count({k: v for k, v in params.items() if k.startswith("conv")}) == 14_714_688
  features = jax.eval_shape(lambda v: VGG16(num_classes=1000).apply(v, jnp.zeros((1, 224, 224, 3)),
                                                                    train=False), {"params": params})
  # fc6 is "same" padded unless pad100, so the 7x7 pool5 gives 7x7 scores (the ImageNet
  # classifier's one output is fc6 unpadded: the centre of a pad100-free VALID fc6).
  assert features["fc8"].shape == (1, 7, 7, 1000) and features["pool5"].shape == (1, 7, 7, 512)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("kernel, stride, pad", [(2, 2, 0), (3, 2, 1), (3, 1, 1), (3, 2, 0), (4, 3, 2)])
def test_caffe_pool_matches_numpy(kind, kernel, stride, pad):
  x = np.random.default_rng().standard_normal((2, 9, 12, 3))
  got = caffe_pool(jnp.asarray(x, jnp.float32), kind, kernel, stride, pad)
  expected = caffe.pool(x, kind, kernel, stride, pad)
  assert got.shape == expected.shape
  assert got.shape[1:3] == (caffe_pool_size(9, kernel, stride, pad), caffe_pool_size(12, kernel, stride, pad))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_layouts_shapes():
  images = (1, 65, 64, 3)
  fcn = jax.eval_shape(lambda v: VGG16(**TINY).apply(v, jnp.zeros(images), train=False),
                       _abstract_init(VGG16(**TINY), images))
  assert [fcn[f"pool{i}"].shape[1:3] for i in range(1, 6)] == [(33, 32), (17, 16), (9, 8), (5, 4), (3, 2)]
  assert fcn["fc7"].shape == (1, 3, 2, 3)
  pad100 = VGG16(pad100=True, **TINY)
  out = jax.eval_shape(lambda v: pad100.apply(v, jnp.zeros(images), train=False), _abstract_init(pad100, images))
  assert out["pool5"].shape[1:3] == (9, 9) and out["fc6"].shape[1:3] == (3, 3)
  largefov = VGG16(dilated=True, fc6_kernel=3, fc6_dilation=12, num_classes=5, **TINY)
  out = jax.eval_shape(lambda v: largefov.apply(v, jnp.zeros(images), train=False),
                       _abstract_init(largefov, images))
  assert {k: v.shape[1:3] for k, v in out.items()} == {
      "pool1": (33, 33), "pool2": (17, 17), "pool3": (9, 9), "pool4": (9, 9), "conv5_3": (9, 9),
      "pool5": (9, 9),
      "pool5a": (9, 9), "fc6": (9, 9), "fc7": (9, 9), "fc8": (9, 9)}
  assert largefov.strides["fc8"] == 8 and VGG16().strides["pool4"] == 16
  assert fcn["conv5_3"].shape[1:3] == (5, 4) and VGG16().strides["conv5_3"] == 16


def test_frozen_stages_get_no_gradient_and_keep_batch_statistics():
  """Fast R-CNN's conv5_3 backbone: VGG16(fc_width=None, frozen_stages=2) trains conv3_1 on."""
  model = VGG16(widths=(2, 3, 2, 3, 2), fc_width=None, norm="batch", frozen_stages=2)
  images = jnp.asarray(np.random.default_rng().standard_normal((2, 16, 16, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), images, train=False)

  def loss(params):
    features, _ = model.apply({**variables, "params": params}, images, train=True,
                              mutable=["batch_stats"])
    return jnp.sum(features["conv5_3"] ** 2)

  grads = jax.grad(loss)(variables["params"])
  for name, grad in grads.items():
    frozen = name.startswith(("conv1", "conv2"))
    assert (float(jnp.abs(jax.tree.leaves(grad)[0]).max()) == 0) == frozen, name
  _, state = model.apply(variables, images, train=True, mutable=["batch_stats"])
  for name, stats in state["batch_stats"].items():
    unchanged = jax.tree.map(lambda a, b: bool((a == b).all()), stats, variables["batch_stats"][name])
    assert all(jax.tree.leaves(unchanged)) == name.startswith(("conv1", "conv2")), name


@pytest.mark.parametrize("layout", ["fcn", pytest.param("pad100", marks=pytest.mark.slow), "largefov"])
def test_forward_and_gradients_match_numpy(layout):
  rng = np.random.default_rng()
  kw = {"fcn": {}, "pad100": dict(pad100=True),
        "largefov": dict(dilated=True, fc6_kernel=3, fc6_dilation=12)}[layout]
  model = VGG16(**TINY, **kw)
  images = jnp.asarray(rng.standard_normal((2, 13, 11, 3)), jnp.float32)
  he = lambda a: np.sqrt(2 / np.prod(a.shape[:-1])) if a.ndim == 4 else 0.1
  params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * he(a), jnp.float32),
                        _abstract_init(model, images.shape)["params"])
  names = ["pool3", "pool5", "fc7"]
  apply = lambda p, x: [model.apply({"params": p}, x, train=False)[n] for n in names]
  got = jax.jit(apply)(params, images)
  params64 = jax.tree.map(np.float64, params)
  forward = lambda p, x: [caffe.vgg16(p, x, pad100=layout == "pad100",
                                      dilated=layout == "largefov")[n] for n in names]
  for g, e in zip(got, forward(params64, np.float64(images))):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)
  weights = [rng.standard_normal(g.shape) for g in got]
  loss = lambda p, x: sum(jnp.sum(w * y) for w, y in zip(weights, apply(p, x)))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, images)
  leaves, treedef = jax.tree.flatten((params64, np.float64(images)))
  f = lambda *leaves: sum(np.sum(w * y) for w, y in zip(weights, forward(*jax.tree.unflatten(treedef, leaves))))
  directions = ref.unit_directions(rng, leaves)
  expected = ref.directional_derivative(f, leaves, directions)
  got = sum(np.sum(np.float64(g) * d) for g, d in zip(jax.tree.leaves(grads), directions))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="pad100 .* and dilated .* exclude each other"):
    VGG16(pad100=True, dilated=True)
  with pytest.raises(ValueError, match="5 positive stage widths"):
    VGG16(widths=(1, 2))
  with pytest.raises(ValueError, match=r"takes images \(B, H, W, C\)"):
    _abstract_init(VGG16(**TINY), (8, 8, 3))
