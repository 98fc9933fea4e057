"""Faster / Mask R-CNN (zoo/detection/two_stage.py, rpn.py, roi_heads.py) and the detection
task: shapes, static-shape training on images with and without objects, 8 devices vs 1, clear
errors, mask pasting against a float64 NumPy transcription of detectron2's grid_sample pasting."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.backbones import fpn
from zoo.detection import roi_heads
from zoo.layers import cpu_conv_gradient
from zoo.detection.task import Detection
from tests.lowering import export, kernel_calls

TINY = dict(num_classes=3, width=4, norm="batch", frozen_stages=-1, fpn_width=8,
            representation_size=16,
            rpn=dict(anchor_sizes=((8,), (16,), (32,), (64,), (128,)), pre_nms_topk_train=64,
                     post_nms_topk_train=32, pre_nms_topk_test=64, post_nms_topk_test=16,
                     batch_size_per_image=32),
            roi_heads=dict(batch_size_per_image=16, detections_per_image=8,
                           detection_candidates=32))
MASKS = dict(mask_width=8)


def targets(batch=8, objects=3, size=64, empty_image=1):
  boxes = np.zeros((batch, objects, 4), np.float32)
  masks = np.zeros((batch, objects, size, size), bool)
  valid = np.zeros((batch, objects), bool)
  for b in range(batch):
    if b == empty_image:
      continue
    for k, (x1, y1, x2, y2) in enumerate([(4, 4, 30, 28), (30, 20, 60, 50)]):
      boxes[b, k] = (x1, y1, x2, y2)
      masks[b, k, y1 + 2:y2 - 2, x1 + 2:x2 - 2] = True
      valid[b, k] = True
  labels = np.where(valid, np.arange(objects) % 3, -1).astype(np.int32)
  return dict(boxes=boxes, labels=labels, objects_valid=valid, instance_masks=masks)


@functools.lru_cache(maxsize=None)
def model_and_variables(masks=True):
  model = (zoo.create("mask_rcnn_r50_fpn", **TINY, **MASKS) if masks else
           zoo.create("faster_rcnn_r50_fpn", **TINY))
  images = jnp.zeros((1, 64, 64, 3))
  variables = jax.jit(lambda key: model.init({"params": key}, images, train=False))(jax.random.key(0))
  return model, variables


@functools.lru_cache(maxsize=None)
def training_loss(masks=True):
  """jitted (variables, images, targets, key) -> ((loss, metrics), grads)."""
  model, _ = model_and_variables(masks)
  task = Detection(3, masks=masks)

  @jax.jit
  def run(variables, images, batch_targets, key):
    def loss(params):
      (outputs, _), _ = model.apply({**variables, "params": params}, images, train=True,
                                    targets=batch_targets, rngs={"sampling": key},
                                    mutable=["batch_stats"])
      return task.loss(outputs, {})
    return jax.value_and_grad(loss, has_aux=True)(variables["params"])
  return run


def test_inference_gives_padded_detections_inside_the_image():
  model, variables = model_and_variables()
  images = jnp.asarray(np.random.default_rng(0).random((2, 64, 96, 3)), jnp.float32)
  detections, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  shapes = {k: v.shape for k, v in detections.items()}
  assert shapes == {"boxes": (2, 8, 4), "scores": (2, 8), "classes": (2, 8), "valid": (2, 8),
                    "masks": (2, 8, 28, 28)}
  boxes, valid = np.asarray(detections["boxes"]), np.asarray(detections["valid"])
  assert (boxes[..., 0] >= 0).all() and (boxes[..., 2] <= 96).all() and (boxes[..., 3] <= 64).all()
  classes = np.asarray(detections["classes"])
  assert ((classes >= 1) & (classes <= 3))[valid].all() and (classes[~valid] == 0).all()
  masks = np.asarray(detections["masks"])
  assert ((masks >= 0) & (masks <= 1)).all()


def test_training_step_is_finite_with_an_image_without_objects():
  model, variables = model_and_variables()
  images = jnp.asarray(np.random.default_rng(1).random((8, 64, 64, 3)), jnp.float32)
  (loss, metrics), grads = training_loss()(variables, images, targets(), jax.random.key(3))
  assert np.isfinite(float(loss)) and float(loss) > 0
  for name in ("rpn_objectness", "rpn_box", "box_cls", "box_reg", "mask"):
    assert np.isfinite(float(metrics[name])), name
  assert float(metrics["rpn_box"]) > 0 and float(metrics["mask"]) > 0
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  # A batch with no objects at all trains too (only negatives, no box/mask regression).
  empty = {k: np.zeros_like(v) if k != "labels" else np.full_like(v, -1)
           for k, v in targets().items()}
  (loss, metrics), grads = training_loss()(variables, images, empty, jax.random.key(3))
  assert np.isfinite(float(loss)) and float(metrics["box_reg"]) == 0 and float(metrics["mask"]) == 0
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_eight_devices_give_the_loss_of_one():
  """One Mask R-CNN training step (a single jitted function) on a batch sharded over 8
  devices gives the loss it gives on one device."""
  assert jax.device_count() >= 8
  model, variables = model_and_variables()
  images = jnp.asarray(np.random.default_rng(2).random((8, 64, 64, 3)), jnp.float32)
  batch_targets = targets(empty_image=5)
  step = lambda v, x, t: training_loss()(v, x, t, jax.random.key(4))[0][0]
  single = step(variables, images, batch_targets)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  sharded = step(variables, jax.device_put(images, shard),
                 {k: jax.device_put(v, shard) for k, v in batch_targets.items()})
  assert np.isfinite(float(single)), "the loss of a batch with an image without objects is finite"
  np.testing.assert_allclose(float(sharded), float(single), rtol=1e-5)


def test_mask_chunks_change_nothing_but_unused_slots():
  """The mask head skips chunks of slots without a positive / detection: per-slot chunks give
  the loss and gradients of one chunk, and the masks of the valid detections (0 elsewhere)."""
  _, variables = model_and_variables()
  one_chunk = zoo.create("mask_rcnn_r50_fpn", **TINY, **MASKS, mask_chunk=1000)
  per_slot = zoo.create("mask_rcnn_r50_fpn", **TINY, **MASKS, mask_chunk=1)
  task = Detection(3, masks=True)
  images = jnp.asarray(np.random.default_rng(6).random((2, 64, 64, 3)), jnp.float32)
  batch_targets = targets(batch=2, empty_image=1)

  @functools.partial(jax.jit, static_argnums=0)
  def run(model):
    def loss(params):
      (outputs, _), _ = model.apply({**variables, "params": params}, images, train=True,
                                    targets=batch_targets, rngs={"sampling": jax.random.key(7)},
                                    mutable=["batch_stats"])
      return task.loss(outputs, {})[0], outputs["mask"]["valid"]
    (value, valid), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    return value, valid, grads, model.apply(variables, images, train=False)[0]

  (loss, valid, grads, detections), (loss1, _, grads1, detections1) = run(per_slot), run(one_chunk)
  assert 0 < int(valid.sum()) < valid.size, "some slots should hold positives, some not"
  np.testing.assert_allclose(float(loss), float(loss1), rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5), grads, grads1)
  keep = np.asarray(detections["valid"])
  np.testing.assert_allclose(np.asarray(detections["masks"]), np.asarray(detections1["masks"]),
                             atol=1e-6)
  assert (np.asarray(detections["masks"])[~keep] == 0).all()


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_mask_head_convolution_gradient_is_the_convolutions(kernel_size):
  """The mask head's hand-written convolution gradient (CPU) equals XLA's autodiff of it."""
  rng = np.random.default_rng()
  x = jnp.asarray(rng.standard_normal((3, 7, 6, 5)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((kernel_size, kernel_size, 5, 4)), jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal((3, 7, 6, 4)), jnp.float32)
  pads = [(kernel_size // 2,) * 2] * 2
  grads = [jax.jit(jax.grad(lambda x, k: jnp.sum(f(x, k) * cotangent), argnums=(0, 1)))(x, kernel)
           for f in (cpu_conv_gradient.same_convolution,
                     cpu_conv_gradient.same_convolution_reference,
                     lambda x, k: cpu_conv_gradient.cpu_gradient_conv_general_dilated(
                         x, k, (1, 1), pads))]
  for ours in (grads[0], grads[2]):
    for a, b in zip(ours, grads[1]):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(cpu_conv_gradient.same_convolution(x, kernel),
                             cpu_conv_gradient.same_convolution_reference(x, kernel))


@pytest.mark.parametrize("implementation", ["pallas_gpu", "pallas_tpu"])
def test_training_step_and_inference_lower_for_gpu_and_tpu(implementation):
  """jax.export of the whole Mask R-CNN training step (loss and gradients) and inference for
  CUDA and TPU, kernels lowered for real: what interpret mode hides, e.g. the GPU RoIAlign's
  shared memory for 28 x 28 mask targets (those run as xla on GPUs)."""
  model = zoo.create("mask_rcnn_r50_fpn", **TINY, **MASKS)
  task = Detection(3, masks=True)
  variables = jax.eval_shape(
      lambda key: model.init({"params": key}, jnp.zeros((1, 64, 64, 3)), train=False),
      jax.random.key(0))
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  batch_targets = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), targets(batch=2))

  def step(variables, images, batch_targets):
    def loss(params):
      (outputs, _), _ = model.apply({**variables, "params": params}, images, train=True,
                                    targets=batch_targets, rngs={"sampling": jax.random.key(0)},
                                    mutable=["batch_stats"])
      return task.loss(outputs, {})[0]
    return jax.value_and_grad(loss)(variables["params"])

  infer = lambda variables, images: model.apply(variables, images, train=False)[0]
  train_calls = kernel_calls(implementation, export(
      implementation, step, variables, images, batch_targets).mlir_module())
  infer_calls = kernel_calls(implementation, export(
      implementation, infer, variables, images).mlir_module())
  # RoIAlign kernels: box head (4 levels) and mask head (4 levels), forward and backward in
  # training; the TPU also runs the 28 x 28 mask targets as a kernel.
  assert (train_calls, infer_calls) == ((16, 8) if implementation == "pallas_gpu" else (17, 8))


def test_image_sides_must_be_multiples_of_32():
  model, variables = model_and_variables()
  with pytest.raises(ValueError, match="multiples of 32.*got 65x64.*96x64"):
    model.apply(variables, jnp.zeros((1, 65, 64, 3)), train=False)


def test_training_without_targets_is_a_clear_error():
  model, variables = model_and_variables()
  with pytest.raises(ValueError, match="needs targets"):
    model.apply(variables, jnp.zeros((1, 64, 64, 3)), train=True, rngs={"sampling": jax.random.key(0)},
                mutable=["batch_stats"])


def reference_paste(mask, box, height, width):
  """float64: grid_sample(align_corners=False, zeros padding) of the M x M mask at each pixel
  centre mapped into the box, as detectron2's paste_masks_in_image (_do_paste_mask)."""
  m = mask.shape[0]
  x1, y1, x2, y2 = box
  out = np.zeros((height, width))
  for y in range(height):
    for x in range(width):
      # normalised grid coordinate in [-1, 1] over the box, then unnormalised to the mask grid
      gx = (x + 0.5 - x1) / (x2 - x1) * 2 - 1
      gy = (y + 0.5 - y1) / (y2 - y1) * 2 - 1
      u, v = ((gx + 1) * m - 1) / 2, ((gy + 1) * m - 1) / 2
      u0, v0 = int(np.floor(u)), int(np.floor(v))
      total = 0.0
      for dv, wv in ((0, 1 - (v - v0)), (1, v - v0)):
        for du, wu in ((0, 1 - (u - u0)), (1, u - u0)):
          r, c = v0 + dv, u0 + du
          if 0 <= r < m and 0 <= c < m:
            total += wv * wu * mask[r, c]
      out[y, x] = total
  return out


def test_paste_masks_matches_grid_sample():
  rng = np.random.default_rng(5)
  masks = rng.random((3, 6, 6))
  boxes = np.array([[2.3, 4.1, 15.7, 11.2], [0.0, 0.0, 20.0, 16.0], [-3.0, 5.5, 8.25, 30.0]])
  out = np.asarray(roi_heads.paste_masks(jnp.asarray(masks, jnp.float32), jnp.asarray(boxes, jnp.float32),
                                    (16, 20)))
  for d in range(3):
    np.testing.assert_allclose(out[d], reference_paste(masks[d], boxes[d], 16, 20), atol=2e-6)


@pytest.mark.parametrize("shape", [(3, 5, 6, 8), (2, 14, 14, 16)])
def test_mask_up_convolution_is_flax_conv_transpose(shape):
  """conv5_mask as matmul + depth-to-space: nn.ConvTranspose's parameters, init, outputs and
  gradients (its XLA CPU gradient is a slow naive loop, hence the rewrite)."""
  import flax.linen as nn
  from zoo.layers import UpConvolution
  x = jnp.asarray(np.random.default_rng(3).standard_normal(shape), jnp.float32)
  plain = nn.ConvTranspose(4, (2, 2), strides=(2, 2),
                           kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))
  ours = UpConvolution(4, kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))
  variables = plain.init(jax.random.key(1), x)
  jax.tree.map(np.testing.assert_array_equal, ours.init(jax.random.key(1), x), variables)
  variables = {"params": {**variables["params"], "bias": jnp.arange(4.0)}}
  np.testing.assert_allclose(ours.apply(variables, x), plain.apply(variables, x), atol=1e-5)
  cotangent = jnp.asarray(np.random.default_rng(4).standard_normal(
      (shape[0], 2 * shape[1], 2 * shape[2], 4)), jnp.float32)
  grads = [jax.grad(lambda v, x: jnp.sum(m.apply(v, x) * cotangent), argnums=(0, 1))(variables, x)
           for m in (ours, plain)]
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-4), *grads)


def test_fpn_nearest_resize_is_torchvision_floor_rule():
  x = jnp.arange(2 * 7 * 5, dtype=jnp.float32).reshape(1, 7, 5, 2)
  out = np.asarray(fpn.nearest_resize(x, (13, 9)))
  for i in range(13):
    for j in range(9):
      np.testing.assert_array_equal(out[0, i, j], np.asarray(x)[0, (i * 7) // 13, (j * 5) // 9])


def test_registry_names_the_hyperparameters():
  assert {"faster_rcnn_r50_fpn", "mask_rcnn_r50_fpn"} <= set(zoo.list_models())
  with pytest.raises(ValueError, match="has no hyper-parameter 'nope'.*rpn, roi_heads"):
    zoo.create("faster_rcnn_r50_fpn", nope=1)
  with pytest.raises(ValueError, match="rpn has no field 'nope'; RPNConfig takes .*nms_threshold"):
    zoo.create("faster_rcnn_r50_fpn", rpn=dict(nope=1))
  model = zoo.create("mask_rcnn_r50_fpn", rpn=dict(nms_threshold=0.6),
                     roi_heads=roi_heads.ROIHeadsConfig(detections_per_image=7))
  assert model.rpn.nms_threshold == 0.6 and model.rpn.pre_nms_topk_test == 1000
  assert model.roi_heads.detections_per_image == 7 and model.masks
