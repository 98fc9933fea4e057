"""FCN-32s/16s/8s: Caffe Deconvolution and Crop against float64 NumPy transcriptions, the
bilinear initialisation against FCN's upsample_filt, output size = input size, pixel-exact
alignment (impulses through an identity path, against the receptive-field geometry), and the
whole net's forward and gradients against a float64 NumPy transcription of the release."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.segmentation import fcn as fcn_lib
from zoo.segmentation.fcn import FCN

from tests.backbones import caffe_reference as caffe
from tests.layers import numpy_reference as ref

TINY = dict(widths=(2, 3, 2, 3, 2), fc_width=3)


def _abstract_init(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _random_params(model, shape, rng):
  def sample(path, a):
    fan_in = np.prod(a.shape[:-1]) if len(a.shape) > 1 else 1
    scale = np.sqrt(2 / fan_in) if len(a.shape) > 1 else 0.1
    return jnp.asarray(scale * rng.standard_normal(a.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(sample, _abstract_init(model, shape)["params"])


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 8, 16, 32, 64])
def test_bilinear_kernel_equals_fcn_upsample_filt(size):
  np.testing.assert_array_equal(fcn_lib.bilinear_upsampling_kernel(size),
                                np.float32(caffe.upsample_filt(size)))


@pytest.mark.parametrize("k, stride, pad, c_in, c_out", [(4, 2, 0, 3, 2), (16, 8, 0, 2, 2),
                                                         (3, 2, 1, 2, 3), (5, 3, 2, 1, 2),
                                                         (2, 1, 0, 2, 2)])
def test_caffe_deconvolution_forward_and_gradients_match_the_scatter(k, stride, pad, c_in, c_out):
  rng = np.random.default_rng()
  x = rng.standard_normal((2, 5, 4, c_in))
  kernel = rng.standard_normal((k, k, c_in, c_out))
  got = fcn_lib.caffe_deconvolution(jnp.float32(x), jnp.float32(kernel), stride, pad)
  expected = caffe.deconvolution(x, kernel, stride, pad)
  assert got.shape == expected.shape == (2, 4 * stride + k - 2 * pad, 3 * stride + k - 2 * pad, c_out)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  g = rng.standard_normal(expected.shape)
  loss = lambda x, kernel: jnp.sum(g * fcn_lib.caffe_deconvolution(x, kernel, stride, pad))
  grad_x, grad_kernel = jax.grad(loss, argnums=(0, 1))(jnp.float32(x), jnp.float32(kernel))
  np.testing.assert_allclose(grad_x, caffe.deconvolution_input_gradient(g, kernel, stride, x.shape, pad),
                             rtol=1e-4, atol=1e-4)
  direction = rng.standard_normal(kernel.shape)
  expected = ref.directional_derivative(
      lambda kern: np.sum(g * caffe.deconvolution(x, kern, stride, pad)), [kernel], [direction])
  np.testing.assert_allclose(np.sum(np.float64(grad_kernel) * direction), expected, rtol=1e-4)


def test_bilinear_deconvolution_is_the_deconvolution_with_the_diagonal_kernel():
  rng = np.random.default_rng()
  x = rng.standard_normal((1, 3, 4, 3))
  layer = fcn_lib.BilinearDeconvolution(4)
  got = layer.apply({}, jnp.float32(x))
  kernel = np.zeros((8, 8, 3, 3))
  for c in range(3):
    kernel[:, :, c, c] = caffe.upsample_filt(8)
  np.testing.assert_allclose(got, caffe.deconvolution(x, kernel, 4), rtol=1e-5, atol=1e-5)
  learnable = fcn_lib.BilinearDeconvolution(4, learnable=True)
  variables = learnable.init(jax.random.key(0), jnp.float32(x))
  np.testing.assert_array_equal(variables["params"]["kernel"], np.float32(kernel))


def test_crop_matches_caffe_and_rejects_too_small_maps():
  x = np.float32(np.random.default_rng().standard_normal((1, 9, 10, 2)))
  np.testing.assert_array_equal(fcn_lib.crop(jnp.asarray(x), 3, (5, 4)), caffe.crop(x, 3, (5, 4)))
  with pytest.raises(ValueError, match=r"Cannot crop 5x4 at offset 6 from a 9x10 map"):
    fcn_lib.crop(jnp.asarray(x), 6, (5, 4))


@pytest.mark.parametrize("variant", ["32s", "16s", "8s"])
@pytest.mark.parametrize("pad100", [False, True])
def test_output_size_equals_input_size(variant, pad100):
  model = FCN(num_classes=4, variant=variant, pad100=pad100, **TINY)
  for height, width in [(1, 1), (7, 30), (32, 32), (33, 65), (64, 64), (100, 83), (224, 224)]:
    images = jax.ShapeDtypeStruct((2, height, width, 3), jnp.float32)
    variables = _abstract_init(model, images.shape)
    logits, aux = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    assert logits.shape == (2, height, width, 4) and logits.dtype == jnp.float32


def _identity_path_params(model, shape, path):
  """Every convolution passes channel 0 through its centre tap (all else zero); of the score
  layers only `path` (score_fr, score_pool4 or score_pool3) passes channel 0 to class 0."""
  def value(keypath, a):
    names = [k.key for k in keypath]
    out = np.zeros(a.shape, np.float32)
    if names[-1] == "kernel" and names[0] == "backbone":
      out[a.shape[0] // 2, a.shape[1] // 2, 0, 0] = 1
    elif names[-1] == "kernel" and names[0] == path:
      out[0, 0, 0, 0] = 1
    return jnp.asarray(out)
  return jax.tree_util.tree_map_with_path(value, _abstract_init(model, shape)["params"])


def _expected_response(position, stride, upsampling_factors, pad100, size):
  """1-D response at pixels 0..size-1 of an impulse at `position` that reaches the stride-s map
  (its max-pooling cell), then is upsampled bilinearly by each factor in turn.

  Geometry only: a stride-s cell i covers conv1 rows [s i, s (i + 1)); conv1's row r is image
  row r (same padding) or r - 99 (conv1_1 padded by 100, 3x3). A bilinear upsampling by f of a
  stride-s map is linear interpolation between its cell centres (a tent of half-width s)."""
  shift = 99 if pad100 else 0
  centre = lambda s, i: s * i - shift + (s - 1) / 2
  cells = {stride: {(position + shift) // stride: 1.0}}
  s = stride
  for f in upsampling_factors:
    fine = s // f
    values = {}
    lo, hi = min(cells[s]) * f - 2 * f, max(cells[s]) * f + 3 * f
    for j in range(lo, hi):
      v = sum(w * max(0.0, 1 - abs(centre(fine, j) - centre(s, i)) / s) for i, w in cells[s].items())
      if v:
        values[j] = v
    cells[fine] = values
    s = fine
  assert s == 1
  out = np.zeros(size)
  # Stride-1 cell p has centre p - shift: the image pixel p - shift.
  for p, v in cells[1].items():
    if 0 <= p - shift < size:
      out[p - shift] = v
  return out


@pytest.mark.parametrize("variant, path, stride, factors", [
    ("32s", "score_fr", 32, (32,)),
    ("16s", "score_fr", 32, (2, 16)), ("16s", "score_pool4", 16, (16,)),
    ("8s", "score_fr", 32, (2, 2, 8)), ("8s", "score_pool4", 16, (2, 8)),
    ("8s", "score_pool3", 8, (8,)),
])
@pytest.mark.parametrize("pad100", [False, True])
def test_alignment_is_pixel_exact_for_impulses_through_each_path(variant, path, stride, factors,
                                                                 pad100):
  """An impulse at input pixel (y, x) must come out centred on the centre of the pooling cell
  that contains it, as the receptive-field geometry says, with the shape of the chained
  bilinear interpolations: the whole map is compared, not just its peak."""
  rng = np.random.default_rng()
  height, width = 200, 168
  model = FCN(num_classes=1, variant=variant, pad100=pad100, skip_scaling=False,
              widths=(1,) * 5, fc_width=1)
  params = _identity_path_params(model, (1, height, width, 1), path)
  positions = [(int(rng.integers(70, 130)), int(rng.integers(70, 98))) for _ in range(3)]
  positions.append((100, 84))
  images = np.zeros((len(positions), height, width, 1), np.float32)
  for b, (y, x) in enumerate(positions):
    images[b, y, x, 0] = 1.0
  logits, _ = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(params, images)
  assert logits.shape == (len(positions), height, width, 1)
  for b, (y, x) in enumerate(positions):
    expected = np.outer(_expected_response(y, stride, factors, pad100, height),
                        _expected_response(x, stride, factors, pad100, width))
    np.testing.assert_allclose(logits[b, :, :, 0], expected, atol=1e-6)


@pytest.mark.parametrize("variant, pad100, skip_scaling, learn_upsampling, size", [
    pytest.param("32s", False, True, False, (20, 17), marks=pytest.mark.slow),
    pytest.param("16s", True, False, True, (9, 12), marks=pytest.mark.slow),
    ("8s", False, True, True, (24, 24)),
    ("8s", True, True, False, (13, 11)),
])
def test_forward_and_gradients_match_numpy(variant, pad100, skip_scaling, learn_upsampling, size):
  rng = np.random.default_rng()
  model = FCN(num_classes=3, variant=variant, pad100=pad100, skip_scaling=skip_scaling,
              learn_upsampling=learn_upsampling, **TINY)
  images = jnp.asarray(rng.standard_normal((2, *size, 3)), jnp.float32)
  params = _random_params(model, images.shape, rng)
  if skip_scaling:  # Make the scaled skips count: score weights of the order of 1 / scale.
    for name, scale in fcn_lib.ATONCE_SCALES.items():
      if f"score_{name}" in params:
        params[f"score_{name}"]["kernel"] = params[f"score_{name}"]["kernel"] / scale
  if learn_upsampling:  # Random kernels, so that a wrong flip or transpose shows.
    for name in [n for n in params if n.startswith("upscore")]:
      params[name]["kernel"] = jnp.asarray(rng.standard_normal(params[name]["kernel"].shape),
                                           jnp.float32)
  apply = lambda p, x: model.apply({"params": p}, x, train=False)[0]
  logits = jax.jit(apply)(params, images)

  params64 = jax.tree.map(np.float64, params)

  def forward(p, x):
    kernels = {n: p[n]["kernel"] for n in p if n.startswith("upscore")}
    return caffe.fcn(p, x, variant=variant, pad100=pad100, skip_scaling=skip_scaling,
                     kernels=kernels)

  np.testing.assert_allclose(logits, forward(params64, np.float64(images)), rtol=1e-4, atol=1e-4)

  weights = rng.standard_normal(logits.shape)
  loss = lambda p, x: jnp.sum(weights * apply(p, x))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, images)
  leaves, treedef = jax.tree.flatten((params64, np.float64(images)))
  f = lambda *leaves: np.sum(weights * forward(*jax.tree.unflatten(treedef, leaves)))
  directions = ref.unit_directions(rng, leaves)
  expected = ref.directional_derivative(f, leaves, directions)
  got = sum(np.sum(np.float64(g) * d) for g, d in zip(jax.tree.leaves(grads), directions))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
  # With the release's zero-initialised score layers, the score layers still get gradients.
  zero_scores = {n: ({k: jnp.zeros_like(v) for k, v in p.items()} if n.startswith("score") else p)
                 for n, p in params.items()}
  # fc7 made positive: on these tiny maps fc7 has a few channels at one or two positions, and
  # random weights can leave them all dead (ReLU), which would zero score_fr's gradient.
  fc7 = {k: jnp.abs(v) + (1.0 if k == "bias" else 0.0)
         for k, v in zero_scores["backbone"]["fc7"].items()}
  zero_scores["backbone"] = {**zero_scores["backbone"], "fc7": fc7}
  zero_grads = jax.jit(jax.grad(loss))(zero_scores, images)
  assert float(jnp.abs(zero_grads["score_fr"]["kernel"]).sum()) > 0


def test_frozen_upsampling_has_no_parameters_and_learnable_does():
  images = (1, 32, 32, 3)
  frozen = _abstract_init(FCN(num_classes=5, variant="8s", **TINY), images)["params"]
  learnable = _abstract_init(FCN(num_classes=5, variant="8s", learn_upsampling=True, **TINY),
                             images)["params"]
  assert not any(name.startswith("upscore") for name in frozen)
  assert {n: learnable[n]["kernel"].shape for n in learnable if n.startswith("upscore")} == {
      "upscore2": (4, 4, 5, 5), "upscore_pool4": (4, 4, 5, 5), "upscore8": (16, 16, 5, 5)}


def test_registry_parameter_counts_and_errors():
  # VGG-16's convolutions (14,714,688) + fc6 (7*7*512*4096 + 4096) + fc7 (4096^2 + 4096)
  # + score_fr (4096*21 + 21); FCN-16s adds score_pool4 (512*21 + 21), FCN-8s score_pool3 (256*21 + 21).
  base = 14_714_688 + 7 * 7 * 512 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 21 + 21
  for name, expected in (("fcn_32s_vgg16", base), ("fcn_16s_vgg16", base + 512 * 21 + 21),
                         ("fcn_8s_vgg16", base + 512 * 21 + 21 + 256 * 21 + 21)):
    params = _abstract_init(zoo.create(name), (1, 64, 64, 3))["params"]
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params)) == expected
  assert base == 134_346_581
  with pytest.raises(ValueError, match="variant must be one of"):
    FCN(num_classes=2, variant="4s")
  with pytest.raises(ValueError, match="has no hyper-parameter 'pad'"):
    zoo.create("fcn_8s_vgg16", pad=100)
  model = zoo.create("fcn_8s_vgg16", num_classes=2, **TINY)
  with pytest.raises(ValueError, match=r"FCN takes images \(B, H, W, C\)"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((8, 8, 3)), train=False))


def test_training_mode_uses_dropout_and_batch_norm():
  model = zoo.create("fcn_8s_vgg16", num_classes=3, norm="batch", **TINY)
  images = jnp.asarray(np.random.default_rng().standard_normal((2, 16, 16, 3)), jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images)
  (logits, _), updates = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}))(variables, images)
  assert logits.shape == (2, 16, 16, 3) and "batch_stats" in updates
