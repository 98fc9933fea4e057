"""The CRF-as-RNN layer (zoo.segmentation.crf.DenseCRF) against a float64 NumPy brute-force
transcription of the fully connected CRF's mean field (Krähenbühl and Koltun 2011, as
kernels/crf/api.py states it): forward, and gradients with respect to the logits, the
softplus-parametrised kernel weights and a non-Potts compatibility matrix; the segmentation
task's loss on its log Q output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.segmentation.crf import DenseCRF
from zoo.segmentation.task import SemanticSegmentation

SETTINGS = dict(iterations=3, pos_xy_std=1.5, bi_xy_std=4.0, bi_rgb_std=20.0, image_scale=255.0,
                implementation="xla")


def softplus(x):
  return np.log1p(np.exp(x))


def numpy_mean_field(logits, image, *, iterations, pos_w, pos_xy_std, bi_w, bi_xy_std, bi_rgb_std,
                     compatibility):
  """Brute force over all pairs i != j; p = (row, column) in pixels. Returns Q (B, H, W, L)."""
  b, h, w, l = logits.shape
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  p = np.stack([rows.ravel(), cols.ravel()], -1).astype(np.float64)
  d_pos = ((p[:, None] - p[None]) ** 2).sum(-1)
  not_self = 1 - np.eye(h * w)
  out = []
  for n in range(b):
    colours = image[n].reshape(h * w, -1)
    d_rgb = ((colours[:, None] - colours[None]) ** 2).sum(-1)
    k_bi = np.exp(-d_pos / (2 * bi_xy_std**2) - d_rgb / (2 * bi_rgb_std**2)) * not_self
    k_pos = np.exp(-d_pos / (2 * pos_xy_std**2)) * not_self
    u = logits[n].reshape(h * w, l)
    q = np.exp(u - u.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    for _ in range(iterations):
      message = bi_w * (k_bi @ q) + pos_w * (k_pos @ q)
      energy = u - message @ compatibility.T
      q = np.exp(energy - energy.max(-1, keepdims=True))
      q /= q.sum(-1, keepdims=True)
    out.append(q.reshape(h, w, l))
  return np.stack(out)


def _inputs(rng, shape=(2, 5, 6, 3)):
  logits = 2.0 * rng.standard_normal(shape)
  image = rng.random(shape[:3] + (3,))
  image[:, :, : shape[2] // 2] *= 0.3  # Two colour regions, so the bilateral kernel matters.
  return logits, image


def test_forward_matches_numpy_at_the_potts_initialisation():
  rng = np.random.default_rng()
  logits, image = _inputs(rng)
  layer = DenseCRF(pos_w=2.0, bi_w=3.0, **SETTINGS)
  variables = jax.jit(layer.init)(jax.random.key(0), jnp.float32(logits), jnp.float32(image))
  params = variables["params"]
  np.testing.assert_allclose(softplus(np.float64(params["pos_w"])), 2.0, rtol=1e-6)
  np.testing.assert_allclose(softplus(np.float64(params["bi_w"])), 3.0, rtol=1e-6)
  np.testing.assert_array_equal(params["compatibility"], 1 - np.eye(3))
  log_q = jax.jit(layer.apply)(variables, jnp.float32(logits), jnp.float32(image))
  expected = numpy_mean_field(logits, image * 255.0, iterations=3, pos_w=2.0, pos_xy_std=1.5,
                              bi_w=3.0, bi_xy_std=4.0, bi_rgb_std=20.0, compatibility=1 - np.eye(3))
  np.testing.assert_allclose(np.exp(log_q), expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.exp(log_q).sum(-1), 1, rtol=1e-5)


def test_gradients_match_numpy_for_a_non_potts_compatibility():
  rng = np.random.default_rng()
  logits, image = _inputs(rng)
  layer = DenseCRF(**SETTINGS)
  params = {"pos_w": jnp.float32(rng.normal()), "bi_w": jnp.float32(rng.normal()),
            "compatibility": jnp.float32(rng.standard_normal((3, 3)))}
  weights = rng.standard_normal(logits.shape)

  def loss(params, logits):
    return jnp.sum(weights * layer.apply({"params": params}, logits, jnp.float32(image)))

  def numpy_loss(pos_raw, bi_raw, compatibility, logits):
    q = numpy_mean_field(logits, image * 255.0, iterations=3, pos_w=softplus(pos_raw), pos_xy_std=1.5,
                         bi_w=softplus(bi_raw), bi_xy_std=4.0, bi_rgb_std=20.0,
                         compatibility=compatibility)
    # The layer's log Q is clamped at float32's smallest normal (module doc): so is this one.
    return np.sum(weights * np.log(np.maximum(q, np.finfo(np.float32).tiny)))

  np.testing.assert_allclose(
      jax.jit(loss)(params, jnp.float32(logits)),
      numpy_loss(np.float64(params["pos_w"]), np.float64(params["bi_w"]),
                 np.float64(params["compatibility"]), logits), rtol=1e-4)
  grads, grad_logits = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.float32(logits))
  arrays = [np.float64(params["pos_w"]), np.float64(params["bi_w"]),
            np.float64(params["compatibility"]), logits]
  got = [grads["pos_w"], grads["bi_w"], grads["compatibility"], grad_logits]
  epsilon = 1e-6
  for index, (array, gradient) in enumerate(zip(arrays, got)):
    direction = rng.standard_normal(np.shape(array))
    plus = list(arrays)
    minus = list(arrays)
    plus[index] = array + epsilon * direction
    minus[index] = array - epsilon * direction
    expected = (numpy_loss(*plus) - numpy_loss(*minus)) / (2 * epsilon)
    np.testing.assert_allclose(np.sum(np.float64(gradient) * direction), expected, rtol=2e-3,
                               atol=1e-4)


def test_fixed_layer_has_no_parameters_and_is_potts_postprocessing():
  rng = np.random.default_rng()
  logits, image = _inputs(rng)
  layer = DenseCRF(pos_w=3.0, bi_w=4.0, trainable=False, **SETTINGS)
  variables = layer.init(jax.random.key(0), jnp.float32(logits), jnp.float32(image))
  assert not variables
  log_q = jax.jit(layer.apply)({}, jnp.float32(logits), jnp.float32(image))
  expected = numpy_mean_field(logits, image * 255.0, iterations=3, pos_w=3.0, pos_xy_std=1.5,
                              bi_w=4.0, bi_xy_std=4.0, bi_rgb_std=20.0, compatibility=1 - np.eye(3))
  np.testing.assert_allclose(np.exp(log_q), expected, rtol=1e-4, atol=1e-6)


def test_segmentation_task_loss_on_log_q_is_the_negative_log_marginal():
  """The model outputs log Q: the task's softmax cross-entropy is then exactly -log Q[target]
  (log_softmax(log Q) = log Q), finite even where Q underflows to 0."""
  rng = np.random.default_rng()
  logits, image = _inputs(rng)
  logits[0, 0, 0] = [200.0, -200.0, 0.0]  # Q of label 1 underflows to 0 there.
  layer = DenseCRF(trainable=False, **SETTINGS)
  log_q = jax.jit(layer.apply)({}, jnp.float32(logits), jnp.float32(image))
  targets = rng.integers(0, 3, logits.shape[:3])
  targets[0, 0, 0] = 1
  loss, metrics = SemanticSegmentation(num_classes=3).loss(log_q, {"segmentation": jnp.int32(targets)})
  expected = -np.take_along_axis(np.float64(log_q), targets[..., None], -1).mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert np.isfinite(float(loss))
  grad = jax.jit(jax.grad(lambda l: SemanticSegmentation(num_classes=3).loss(
      layer.apply({}, l, jnp.float32(image)), {"segmentation": jnp.int32(targets)})[0]))(jnp.float32(logits))
  assert bool(jnp.all(jnp.isfinite(grad)))


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="iterations >= 1"):
    DenseCRF(iterations=0)
  with pytest.raises(ValueError, match="bi_rgb_std must be positive"):
    DenseCRF(bi_rgb_std=0.0)
  with pytest.raises(ValueError, match="implementation must be one of"):
    DenseCRF(implementation="cuda")
  with pytest.raises(ValueError, match=r"same B, H, W.*upsample the logits to the image first"):
    DenseCRF().init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 8, 8, 3)))
