"""U-Net: shapes (SAME, VALID, the paper's 572 -> 388), parameter count, clear input errors, and
the whole forward pass and its gradients against a float64 NumPy transcription of the paper."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.segmentation.unet import UNet

from tests.layers import numpy_reference as ref  # shared with tests/layers


def _abstract_init(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _random_variables(model, shape, rng):
  """Fresh random variables without compiling `init` (XLA:CPU takes ~10 s for it): He-normal
  kernels as the paper's Sec. 3, random biases, scales and statistics so every one is exercised."""

  def sample(path, a):
    noise = 0.1 * rng.standard_normal(a.shape)
    if len(a.shape) > 1:  # HWIO kernel
      value = rng.standard_normal(a.shape) * np.sqrt(2 / np.prod(a.shape[:-1]))
    else:
      value = {"scale": 1 + noise, "var": 1 + np.abs(noise)}.get(path[-1].key, noise)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(sample, _abstract_init(model, shape))


def _num_params(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("padding, size, expected", [("SAME", 32, 32), ("SAME", 24, 24),
                                                      ("VALID", 44, 4), ("VALID", 60, 20)])
@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
def test_output_and_aux_shapes(padding, size, expected, upsample):
  model = UNet(num_classes=5, in_channels=2, width=4, depth=2, padding=padding,
               upsample=upsample)
  assert model.output_size(size) == expected
  images = jnp.zeros((3, size, size + 2**2 * (padding == "SAME"), 2))
  variables = _abstract_init(model, images.shape)
  logits, aux = jax.eval_shape(lambda v: model.apply(v, images, train=False), variables)
  width = model.output_size(images.shape[2])
  assert logits.shape == (3, expected, width, 5) and logits.dtype == jnp.float32
  assert [e.shape[-1] for e in aux["encoder"]] == [4, 8]
  assert aux["bottleneck"].shape[-1] == 16
  assert [d.shape[-1] for d in aux["decoder"]] == [8, 4]
  assert aux["decoder"][-1].shape[1:3] == (expected, width)


def test_paper_shapes_and_parameter_count():
  """572x572 -> 388x388 (paper Fig. 1). The parameter count, layer by layer: 3x3 convs
  9 C_in C_out + C_out, up-convs 4 C_in C_out + C_out, a 1x1 head. For the paper's grayscale
  input that is 31,030,658; the often-quoted 31,031,685 is zhixuhao/unet's Keras model, which
  ends in an extra 3x3 conv 64->2 and a 1x1 conv 2->1 instead of the 1x1 conv 64->2
  (31,030,658 - 130 + 1,154 + 3)."""
  widths = [64, 128, 256, 512, 1024]
  for in_channels, expected in ((1, 31_030_658), (3, 31_031_810)):
    model = zoo.create("unet", in_channels=in_channels)
    count, c = 0, in_channels
    for w in widths:
      count += 9 * c * w + w + 9 * w * w + w
      c = w
    for w in reversed(widths[:-1]):
      count += 4 * c * w + w + 9 * 2 * w * w + w + 9 * w * w + w
      c = w
    count += 64 * 2 + 2
    assert count == expected
    images = jax.ShapeDtypeStruct((1, 572, 572, in_channels), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    assert _num_params(variables["params"]) == expected
    logits, aux = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    assert logits.shape == (1, 388, 388, 2)
    assert [e.shape[1] for e in aux["encoder"]] == [568, 280, 136, 64]
    assert aux["bottleneck"].shape == (1, 28, 28, 1024)
  assert variables["params"]["up_0"]["kernel"].shape == (2, 2, 128, 64)  # HWIO, as nn.ConvTranspose


def test_valid_input_sizes():
  model = UNet(num_classes=2)  # the paper: depth 4, VALID
  sizes = model.valid_input_sizes(1, 600)
  assert 572 in sizes and sizes[0] == 188  # the smallest tile with a positive output (4x4)
  assert np.all(np.diff(sizes) == 16)
  assert UNet(num_classes=2, padding="SAME", depth=3).valid_input_sizes(1, 40) == [8, 16, 24, 32, 40]


@pytest.mark.parametrize("shape, message", [
    ((1, 96, 96, 3), r"U-Net \(VALID, depth 3\) cannot take 96x96 inputs: working sizes near it "
                     r"are 92 and 100 \(every 2x2 max-pooling needs an even input"),
    ((1, 96, 92, 3), r"cannot take 96x92 inputs: height 96 does not work \(nearest working: 92 "
                     r"and 100\)"),
    ((1, 10, 10, 3), r"cannot take 10x10 inputs: working sizes near it are 92 \("),
])
def test_bad_valid_sizes_name_working_sizes(shape, message):
  model = UNet(num_classes=2, width=2, depth=3)
  variables = _abstract_init(model, (1, 92, 92, 3))
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, jnp.zeros(shape))


def test_bad_same_size_and_bad_shapes_raise_clear_errors_also_under_jit():
  model = zoo.create("unet", num_classes=11, padding="SAME", width=4, depth=3)
  variables = _random_variables(model, (1, 16, 16, 3), np.random.default_rng())
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  with pytest.raises(ValueError, match=r"cannot take 20x16 inputs: height 20 does not work "
                                       r"\(nearest working: 16 and 24\).*multiples of 2\*\*depth = 8"):
    apply(variables, jnp.zeros((1, 20, 16, 3)))
  with pytest.raises(ValueError, match=r"shape \(16, 16, 3\) of rank 3"):
    apply(variables, jnp.zeros((16, 16, 3)))
  with pytest.raises(ValueError, match=r"in_channels=3, got images of shape \(2, 16, 16, 1\) with 1"):
    apply(variables, jnp.zeros((2, 16, 16, 1)))
  logits, _ = apply(variables, jnp.ones((2, 16, 16, 3)))
  assert logits.shape == (2, 16, 16, 11)


def test_bad_hyperparameters_raise():
  with pytest.raises(ValueError, match="padding must be one of"):
    zoo.create("unet", padding="same")
  with pytest.raises(ValueError, match="upsample must be one of"):
    UNet(num_classes=2, upsample="nearest")


def test_registry_defaults_are_the_paper():
  model = zoo.create("unet")
  assert (model.num_classes, model.width, model.depth, model.padding, model.norm,
          model.upsample) == (2, 64, 4, "VALID", "none", "transpose")
  assert zoo.hyperparameters("unet") == ["num_classes", "in_channels", "width", "depth",
                                         "padding", "norm", "upsample", "dtype", "param_dtype"]


@pytest.mark.parametrize("padding, norm, upsample, train, size", [
    ("VALID", "none", "transpose", False, 44),
    ("SAME", "batch", "bilinear", True, 16),
    ("SAME", "batch", "transpose", False, 12),
])
def test_forward_and_gradients_match_numpy(padding, norm, upsample, train, size):
  rng = np.random.default_rng()
  model = UNet(num_classes=3, in_channels=2, width=2, depth=2, padding=padding, norm=norm,
               upsample=upsample)
  images = jnp.asarray(rng.standard_normal((2, size, size, 2)), jnp.float32)
  variables = _random_variables(model, images.shape, rng)
  apply = lambda variables, x: model.apply(variables, x, train=train, mutable=["batch_stats"])[0][0]
  logits = jax.jit(apply)(variables, images)

  params64 = jax.tree.map(np.float64, variables["params"])
  stats64 = jax.tree.map(np.float64, variables.get("batch_stats"))
  forward = lambda params, x: ref.unet(params, x, depth=2, padding=padding, norm=norm,
                                       upsample=upsample, batch_stats=stats64, train=train)
  np.testing.assert_allclose(logits, forward(params64, np.float64(images)), rtol=1e-4, atol=1e-4)

  weights = rng.standard_normal(logits.shape)
  loss = lambda params, x: jnp.sum(weights * apply({**variables, "params": params}, x))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], images)
  leaves, treedef = jax.tree.flatten((params64, np.float64(images)))
  f = lambda *leaves: np.sum(weights * forward(*jax.tree.unflatten(treedef, leaves)))
  for _ in range(2):
    directions = ref.unit_directions(rng, leaves)
    expected = ref.directional_derivative(f, leaves, directions)
    got = sum(np.sum(np.float64(g) * d) for g, d in zip(jax.tree.leaves(grads), directions))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_batch_norm_training_updates_batch_stats_and_eval_uses_them():
  model = zoo.create("unet", num_classes=4, padding="SAME", width=4, depth=2, norm="batch")
  images = jnp.asarray(np.random.default_rng().standard_normal((2, 8, 8, 3)), jnp.float32)
  variables = _random_variables(model, images.shape, np.random.default_rng())
  (_, _), updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, images)
  before, after = variables["batch_stats"], updates["batch_stats"]
  assert jax.tree.structure(before) == jax.tree.structure(after)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after)
  assert all(jax.tree.leaves(changed))
  eval_logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))({**variables, **updates}, images)
  assert eval_logits.shape == (2, 8, 8, 4)


def test_compute_dtype_bfloat16_keeps_float32_params_and_logits():
  model = zoo.create("unet", num_classes=3, padding="SAME", width=4, depth=2, dtype="bfloat16")
  images = jnp.ones((1, 8, 8, 3))
  variables = _random_variables(model, images.shape, np.random.default_rng())
  assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  logits, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  assert logits.dtype == jnp.float32 and aux["bottleneck"].dtype == jnp.bfloat16


def test_create_builds_the_config_model_and_it_jits():
  model = zoo.create("unet", num_classes=11, padding="SAME", width=16, depth=3, norm="batch")
  images = jnp.asarray(np.random.default_rng().standard_normal((2, 16, 16, 3)), jnp.float32)
  variables = _random_variables(model, images.shape, np.random.default_rng())
  logits, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  assert logits.shape == (2, 16, 16, 11) and bool(jnp.all(jnp.isfinite(logits)))
  assert [e.shape for e in aux["encoder"]] == [(2, 16, 16, 16), (2, 8, 8, 32), (2, 4, 4, 64)]
