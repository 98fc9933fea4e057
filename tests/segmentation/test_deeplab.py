"""DeepLab LargeFOV / v2 / v3: logit upsampling against NumPy and align_corners=True, shapes at
output strides 8 and 16, torchvision's parameter count for DeepLab v3, the ASPP heads against
float64 NumPy transcriptions (forward and gradients), and the CRF modes."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.segmentation import deeplab as deeplab_lib
from zoo.segmentation.crf import DenseCRF

from tests.backbones import caffe_reference as caffe
from tests.layers import numpy_reference as ref

TINY_RESNET = dict(blocks=(1, 1, 1, 1), width=2)


def _abstract_init(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _align_corners_resize(x, size):
  """PyTorch F.interpolate(mode="bilinear", align_corners=True), transcribed: output index o
  reads source coordinate o (h - 1) / (H - 1)."""
  for axis, n_out in zip((1, 2), size):
    n = x.shape[axis]
    source = np.arange(n_out) * (n - 1) / max(n_out - 1, 1)
    low = np.minimum(np.floor(source).astype(int), n - 1)
    high = np.minimum(low + 1, n - 1)
    frac = (source - low).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    x = np.take(x, low, axis=axis) * (1 - frac) + np.take(x, high, axis=axis) * frac
  return x


@pytest.mark.parametrize("stride, h, w", [(8, 5, 7), (16, 3, 4), (4, 1, 6)])
def test_upsample_logits_is_align_corners_at_deeplab_sizes_and_geometric_elsewhere(stride, h, w):
  x = np.random.default_rng().standard_normal((2, h, w, 3))
  size = (stride * (h - 1) + 1, stride * (w - 1) + 1)
  np.testing.assert_allclose(deeplab_lib.upsample_logits(jnp.float32(x), stride, size),
                             _align_corners_resize(x, size), rtol=1e-5, atol=1e-5)
  # Another size: pixel p reads feature coordinate p / stride, clamped past the last feature.
  size = (stride * h, stride * w + 3)
  got = deeplab_lib.upsample_logits(jnp.float32(x), stride, size)
  for p in range(size[0]):
    c = min(p / stride, h - 1)
    lo = min(int(np.floor(c)), max(h - 2, 0))
    f = c - lo
    row = x[:, lo] * (1 - f) + (x[:, lo + 1] * f if h > 1 else 0)
    cols = np.minimum(np.arange(size[1]) / stride, w - 1)
    expected = np.stack([np.interp(cols, np.arange(w), row[b, :, k]) for b in range(2)
                         for k in range(3)], -1).reshape(size[1], 2, 3).transpose(1, 0, 2)
    np.testing.assert_allclose(got[:, p], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, overrides, stride", [
    ("deeplab_largefov_vgg16", dict(widths=(2, 2, 2, 2, 2), fc_width=3), 8),
    ("deeplab_v2_r50", TINY_RESNET, 8),
    ("deeplab_v2_r50", dict(output_stride=16, **TINY_RESNET), 16),
    ("deeplab_v3_r50", dict(aspp_width=4, **TINY_RESNET), 16),
    ("deeplab_v3_r50", dict(output_stride=8, aspp_width=4, **TINY_RESNET), 8),
])
def test_shapes(name, overrides, stride):
  model = zoo.create(name, num_classes=5, **overrides)
  for shape in [(2, 65, 49, 3), (1, 32, 32, 3)]:
    logits, aux = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape), train=False),
                                 _abstract_init(model, shape))
    assert logits.shape == shape[:3] + (5,) and logits.dtype == jnp.float32
    def feature_size(n):  # Caffe's 3x3/2 pad-1 pools (ceil) for VGG, ceil(n / 2) per ResNet step.
      for _ in range(3 if name.endswith("vgg16") else int(np.log2(stride))):
        n = -(-(n - 1) // 2) + 1 if name.endswith("vgg16") else -(-n // 2)
      return n
    assert aux["scores"].shape[1:3] == (feature_size(shape[1]), feature_size(shape[2]))
    assert aux["unary"].shape == logits.shape


def test_parameter_counts():
  """DeepLab v3: torchvision 0.29.1's deeplabv3_resnet50(num_classes=21, aux_loss=False) has
  39,638,869 parameters; LargeFOV is the paper's "20.5M"; v2 = ResNet-50 backbone + 4 classifiers."""
  count = lambda name: _count(_abstract_init(zoo.create(name), (1, 33, 33, 3))["params"])
  assert count("deeplab_v3_r50") == 39_638_869
  assert count("deeplab_largefov_vgg16") == 20_505_429
  assert count("deeplab_v2_r50") == 23_508_032 + 4 * (9 * 2048 * 21 + 21)


def test_aspp_v2_matches_numpy():
  rng = np.random.default_rng()
  x = rng.standard_normal((2, 9, 8, 5))
  head = deeplab_lib.ASPPv2(num_classes=3, rates=(1, 2, 3, 5))
  params = jax.tree.map(lambda a: jnp.float32(rng.standard_normal(a.shape)),
                        head.init(jax.random.key(0), jnp.float32(x), train=False)["params"])
  got = head.apply({"params": params}, jnp.float32(x), train=False)
  p = jax.tree.map(np.float64, params)
  expected = sum(caffe.conv(x, p[f"branch{i}"]["kernel"], p[f"branch{i}"]["bias"], pad=r, dilation=r)
                 for i, r in enumerate((1, 2, 3, 5)))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def numpy_aspp_v3(p, s, x, rates):
  """torchvision's ASPP + DeepLabHead in eval mode (dropout off), float64."""
  def cbr(y, name, pad=0, dilation=1):
    y = caffe.conv(y, p[name]["conv"]["kernel"], pad=pad, dilation=dilation)
    return ref.relu(ref.batch_norm(y, p[name]["bn"], s[name]["bn"], train=False)[0])
  branches = [cbr(x, "branch0")] + [cbr(x, f"branch{i}", r, r) for i, r in enumerate(rates, 1)]
  pooled = cbr(x.mean(axis=(1, 2), keepdims=True), "image_pooling")
  branches.append(np.broadcast_to(pooled, branches[0].shape))
  y = cbr(np.concatenate(branches, -1), "project")
  y = cbr(y, "head", 1)
  return caffe.conv(y, p["classifier"]["kernel"], p["classifier"]["bias"])


def test_aspp_v3_forward_and_gradients_match_numpy():
  rng = np.random.default_rng()
  x = rng.standard_normal((2, 9, 8, 5))
  rates = (1, 2, 4)
  head = deeplab_lib.ASPPv3(num_classes=3, rates=rates, width=4)
  variables = jax.eval_shape(lambda: head.init(jax.random.key(0), jnp.float32(x), train=False))

  def sample(path, a):
    name = path[-1].key
    if name == "var":
      return jnp.float32(1 + rng.random(a.shape))
    return jnp.float32((np.sqrt(1 / np.prod(a.shape[:-1])) if a.ndim == 4 else 0.3)
                       * rng.standard_normal(a.shape) + (name == "scale"))

  variables = jax.tree_util.tree_map_with_path(sample, variables)
  apply = jax.jit(lambda p, x: head.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                                          train=False))
  p64, s64 = jax.tree.map(np.float64, (variables["params"], variables["batch_stats"]))
  np.testing.assert_allclose(apply(variables["params"], jnp.float32(x)), numpy_aspp_v3(p64, s64, x, rates),
                             rtol=1e-4, atol=1e-4)
  weights = rng.standard_normal((2, 9, 8, 3))
  grads = jax.jit(jax.grad(lambda p, x: jnp.sum(weights * apply(p, x)), argnums=(0, 1)))(
      variables["params"], jnp.float32(x))
  leaves, treedef = jax.tree.flatten((p64, x))
  f = lambda *leaves: np.sum(weights * numpy_aspp_v3(*jax.tree.unflatten(treedef, leaves)[:1], s64,
                                                     jax.tree.unflatten(treedef, leaves)[1], rates))
  directions = ref.unit_directions(rng, leaves)
  expected = ref.directional_derivative(f, leaves, directions)
  got = sum(np.sum(np.float64(g) * d) for g, d in zip(jax.tree.leaves(grads), directions))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # ~70 s on the shared 2-core CPU (compiles four tiny DeepLabs).
def test_crf_modes():
  rng = np.random.default_rng()
  images = jnp.float32(rng.random((2, 17, 17, 3)))
  crf = dict(crf_iterations=2, crf_bi_xy_std=5.0, crf_bi_rgb_std=20.0, crf_implementation="xla")
  plain = zoo.create("deeplab_v2_r50", num_classes=3, **TINY_RESNET, **crf)
  variables = jax.jit(lambda x: plain.init(jax.random.key(0), x, train=False))(images)
  post = zoo.create("deeplab_v2_r50", num_classes=3, crf="postprocess", **TINY_RESNET, **crf)
  # The post-processing CRF adds no parameters: a trained plain model's variables serve.
  assert jax.tree.structure(jax.eval_shape(lambda x: post.init(jax.random.key(0), x, train=False), images)) \
      == jax.tree.structure(variables)
  layer = DenseCRF(2, 3.0, 1.0, 4.0, 5.0, 20.0, trainable=False, implementation="xla")

  @jax.jit
  def outputs(v, x):
    (trained, _), _ = post.apply(v, x, train=True, mutable=["batch_stats"])
    (train_unary, _), _ = plain.apply(v, x, train=True, mutable=["batch_stats"])
    unary, _ = plain.apply(v, x, train=False)
    evaluated, aux_post = post.apply(v, x, train=False)
    return trained, train_unary, unary, evaluated, aux_post["unary"], layer.apply({}, unary, x)

  trained, train_unary, unary, evaluated, post_unary, expected = outputs(variables, images)
  np.testing.assert_allclose(trained, train_unary, rtol=1e-6)  # no CRF in training
  np.testing.assert_allclose(post_unary, unary, rtol=1e-6)
  np.testing.assert_allclose(evaluated, expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(evaluated, unary, atol=1e-3)

  trainable = zoo.create("deeplab_v2_r50", num_classes=3, crf="trainable", **TINY_RESNET, **crf)
  params = jax.eval_shape(lambda x: trainable.init(jax.random.key(0), x, train=False), images)["params"]
  assert jax.tree.map(lambda a: a.shape, params["crf"]) == {"pos_w": (), "bi_w": (), "compatibility": (3, 3)}


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="output_stride must be 8 or 16"):
    zoo.create("deeplab_v3_r50", output_stride=32)
  with pytest.raises(ValueError, match="crf must be one of"):
    zoo.create("deeplab_v3_r50", crf="dense")
  with pytest.raises(ValueError, match="does not fit backbone"):
    deeplab_lib.DeepLab(num_classes=2, backbone="vgg16", head="aspp_v3", output_stride=8)
  model = zoo.create("deeplab_v3_r50", **TINY_RESNET)
  with pytest.raises(ValueError, match=r"takes images \(B, H, W, C\)"):
    _abstract_init(model, (16, 16, 3))
