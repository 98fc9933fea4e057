"""ResNet (torchvision v1.5 layout): parameter counts and names, output strides by dilation,
frozen BN / stages, and forward and gradients against a float64 NumPy transcription of
torchvision's ResNet/Bottleneck."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.backbones import RESNET_BLOCKS, ResNet

from tests.backbones import caffe_reference as caffe
from tests.layers import numpy_reference as ref


def _abstract_init(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def test_parameter_counts_equal_torchvisions():
  """torchvision resnet50(): 25,557,032 with its 1000-way fc; resnet101(): 44,549,160; the
  backbones alone (no fc) 23,508,032 and 42,500,160."""
  for name, with_fc in (("resnet50", 25_557_032), ("resnet101", 44_549_160)):
    params = _abstract_init(ResNet(RESNET_BLOCKS[name], num_classes=1000), (1, 64, 64, 3))["params"]
    assert _count(params) == with_fc
    assert _count({k: v for k, v in params.items() if k != "fc"}) == with_fc - 2048 * 1000 - 1000
  params = _abstract_init(ResNet(), (1, 64, 64, 3))["params"]
  assert jax.tree.map(lambda a: a.shape, params["layer2"]["0"]["downsample"]) == {
      "0": {"kernel": (1, 1, 256, 512)}, "1": {"scale": (512,), "bias": (512,)}}
  assert params["layer1"]["2"]["conv2"]["kernel"].shape == (3, 3, 64, 64)
  assert set(params) == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}


@pytest.mark.parametrize("output_stride, sizes", [(32, [17, 17, 9, 5, 3]), (16, [17, 17, 9, 5, 5]),
                                                  (8, [17, 17, 9, 9, 9])])
def test_output_strides(output_stride, sizes):
  model = ResNet((1, 1, 1, 1), width=4, output_stride=output_stride)
  images = (1, 65, 65, 3)
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(images), train=False), _abstract_init(model, images))
  assert [out[k].shape[1] for k in ("stem", "C2", "C3", "C4", "C5")] == sizes
  assert [out[k].shape[3] for k in ("C2", "C3", "C4", "C5")] == [16, 32, 64, 128]
  assert model.strides["C5"] == output_stride


def test_captured_intermediates_are_the_modules_outputs():
  """The convolutions and norms are children named as torchvision's (conv1, bn1 side by side),
  so a feature extractor reading `capture_intermediates` gets each module's own output: the
  ResNet's features dict, a bottleneck's output, a convolution's output."""
  model = ResNet((1, 1, 1, 1), width=2)
  images = jnp.ones((1, 32, 32, 3))
  variables = model.init(jax.random.key(0), images, train=False)
  out, state = model.apply(variables, images, train=False, capture_intermediates=True,
                           mutable=["intermediates"])
  captured = state["intermediates"]
  assert len(captured["__call__"]) == 1 and captured["__call__"][0].keys() == out.keys()
  assert captured["layer1"]["0"]["__call__"][0].shape == out["C2"].shape == (1, 8, 8, 8)
  assert captured["conv1"]["__call__"][0].shape == (1, 16, 16, 2)
  assert set(captured["layer2"]["0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3",
                                          "downsample", "__call__"}


def _torch_maxpool(x):
  """nn.MaxPool2d(3, 2, 1): floor mode, padding ignored by the max."""
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  height, width = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  return np.max([x[:, a:a + 2 * height - 1:2, b:b + 2 * width - 1:2] for a in range(3) for b in range(3)], 0)


def _bn(x, params, stats, train):
  return ref.batch_norm(x, params, stats, train=train)[0]


def numpy_resnet(params, stats, x, *, blocks, output_stride, train, fixed=()):
  """torchvision's ResNet forward (Bottleneck v1.5, replace_stride_with_dilation) in float64."""
  bn = lambda y, name, p, s: _bn(y, p[name], s[name], train and name not in fixed)
  y = caffe.conv(x, params["conv1"]["kernel"], pad=3, stride=2)
  y = _torch_maxpool(caffe.relu(_bn(y, params["bn1"], stats["bn1"], train and "stem" not in fixed)))
  features, dilation, channels = {}, 1, y.shape[-1]
  for stage, count in enumerate(blocks, start=1):
    stride = 1 if stage == 1 else 2
    previous = dilation
    if stage >= 2 and 2**(stage + 1) > output_stride:
      dilation, stride = dilation * stride, 1
    for index in range(count):
      p, s = params[f"layer{stage}"][str(index)], stats[f"layer{stage}"][str(index)]
      f = train and f"layer{stage}" not in fixed
      d = previous if index == 0 else dilation
      st = stride if index == 0 else 1
      out = caffe.relu(_bn(caffe.conv(y, p["conv1"]["kernel"]), p["bn1"], s["bn1"], f))
      out = caffe.relu(_bn(caffe.conv(out, p["conv2"]["kernel"], pad=d, dilation=d, stride=st),
                           p["bn2"], s["bn2"], f))
      out = _bn(caffe.conv(out, p["conv3"]["kernel"]), p["bn3"], s["bn3"], f)
      shortcut = y
      if "downsample" in p:
        shortcut = _bn(caffe.conv(y, p["downsample"]["0"]["kernel"], stride=st), p["downsample"]["1"],
                       s["downsample"]["1"], f)
      y = caffe.relu(out + shortcut)
    features[f"C{stage + 1}"] = y
  return features


@pytest.mark.parametrize("output_stride, train, norm", [
    pytest.param(32, False, "batch", marks=pytest.mark.slow),
    pytest.param(16, True, "batch", marks=pytest.mark.slow),
    (8, True, "frozen")])
def test_forward_and_gradients_match_numpy(output_stride, train, norm):
  rng = np.random.default_rng()
  blocks = (1, 2, 1, 1)
  model = ResNet(blocks, width=2, output_stride=output_stride, norm=norm)
  images = jnp.asarray(rng.standard_normal((2, 19, 17, 3)), jnp.float32)
  variables = _abstract_init(model, images.shape)

  def sample(path, a):
    name = path[-1].key
    if name == "var":
      return jnp.asarray(1 + 0.5 * rng.random(a.shape), jnp.float32)
    if name == "scale":
      return jnp.asarray(1 + 0.2 * rng.standard_normal(a.shape), jnp.float32)
    scale = np.sqrt(2 / np.prod(a.shape[:-1])) if a.ndim == 4 else 0.2
    return jnp.asarray(scale * rng.standard_normal(a.shape), jnp.float32)

  variables = jax.tree_util.tree_map_with_path(sample, variables)
  names = ["C3", "C5"]

  def apply(p, x):
    out, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, train=train,
                         mutable=["batch_stats"])
    return [out[n] for n in names]

  got = jax.jit(apply)(variables["params"], images)
  params64, stats64 = jax.tree.map(np.float64, (variables["params"], variables["batch_stats"]))
  fixed = ("stem", "layer1", "layer2", "layer3", "layer4") if norm == "frozen" else ()
  forward = lambda p, x: [numpy_resnet(p, stats64, x, blocks=blocks, output_stride=output_stride,
                                       train=train, fixed=fixed)[n] for n in names]
  for g, e in zip(got, forward(params64, np.float64(images))):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)
  weights = [rng.standard_normal(g.shape) for g in got]
  loss = lambda p, x: sum(jnp.sum(w * y) for w, y in zip(weights, apply(p, x)))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], images)
  leaves, treedef = jax.tree.flatten((params64, np.float64(images)))
  f = lambda *leaves: sum(np.sum(w * y) for w, y in zip(weights, forward(*jax.tree.unflatten(treedef, leaves))))
  directions = ref.unit_directions(rng, leaves)
  expected = ref.directional_derivative(f, leaves, directions)
  got = sum(np.sum(np.float64(g) * d) for g, d in zip(jax.tree.leaves(grads), directions))
  # float32 gradients: the error scales with |grad| |direction| (training-mode BatchNorm over a
  # few positions amplifies rounding), not with the directional derivative itself, which can be
  # small by cancellation (seen: 9e-5 off on -0.15 with the gradient norm ~1).
  scale = np.sqrt(sum(np.sum(np.float64(g) ** 2) for g in jax.tree.leaves(grads)) *
                  sum(np.sum(d ** 2) for d in directions))
  assert abs(got - expected) <= 1e-4 * scale + 1e-4 * abs(expected), (got, expected, scale)


@pytest.mark.slow  # ~60 s on the shared 2-core CPU (compiles a ResNet's init and gradient).
def test_frozen_stages_stop_gradients_and_keep_statistics():
  model = ResNet((1, 1, 1, 1), width=2, frozen_stages=2)
  images = jnp.asarray(np.random.default_rng().standard_normal((2, 32, 32, 3)), jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images)

  @jax.jit
  def loss_and_grads(p):
    return jax.grad(loss, has_aux=True)(p)

  def loss(p):
    out, updates = model.apply({**variables, "params": p}, images, train=True, mutable=["batch_stats"])
    return jnp.sum(out["C5"] ** 2), updates

  grads, updates = loss_and_grads(variables["params"])
  norms = {k: float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(v))) for k, v in grads.items()}
  assert norms["conv1"] == norms["bn1"] == norms["layer1"] == norms["layer2"] == 0
  assert norms["layer3"] > 0 and norms["layer4"] > 0
  stats = updates["batch_stats"]
  same = lambda k: all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                                                    variables["batch_stats"][k], stats[k])))
  assert same("bn1") and same("layer2") and not same("layer3")


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
    ResNet(output_stride=4)
  with pytest.raises(ValueError, match="norm must be one of"):
    ResNet(norm="group")
  with pytest.raises(ValueError, match="frozen_stages must be in -1..4"):
    ResNet(frozen_stages=5)
  with pytest.raises(ValueError, match="blocks must be 4 positive counts"):
    ResNet(blocks=(3, 4, 6))
