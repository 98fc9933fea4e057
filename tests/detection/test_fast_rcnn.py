"""Fast R-CNN / Faster R-CNN on VGG-16 (zoo/detection/fast_rcnn.py) and the embedded data's
stand-in proposal generator (zoo/data/standin_proposals.py): the box head's logits, deltas, targets, loss and
head-parameter gradients against a float64 NumPy transcription (torchvision's roi_pool CPU kernel,
Fast R-CNN's fc6/fc7/cls_score/bbox_pred, torchvision's box coder, detectron2's losses, backprop
written out by hand); shapes; finite training with an image without objects for every head
(RoIPool, RoIAlign, SPP, RPN); the SPP head's size; the generator's determinism and statistics;
clear errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.backbones import VGG16
from zoo.data import standin_proposals as proposals
from zoo.detection import fast_rcnn, rpn, two_stage
from zoo.detection.task import Detection

from tests.detection import box_reference

TINY = dict(num_classes=3, widths=(4, 4, 8, 8, 8), representation_size=16, dropout_rate=0.0,
            roi_heads=dict(batch_size_per_image=16, detections_per_image=8,
                           detection_candidates=32))
RPN = dict(rpn=dict(anchor_sizes=((8, 16, 32),), pre_nms_topk_train=36, post_nms_topk_train=16,
                    pre_nms_topk_test=36, post_nms_topk_test=16, batch_size_per_image=16))


def targets(batch=2, empty_image=1):
  boxes = np.zeros((batch, 3, 4), np.float32)
  valid = np.zeros((batch, 3), bool)
  for b in range(batch):
    if b != empty_image:
      boxes[b, :2] = [(4, 4, 30, 28), (30, 20, 60, 50)]
      valid[b, :2] = True
  labels = np.where(valid, np.arange(3) % 3, -1).astype(np.int32)
  return dict(boxes=boxes, labels=labels, objects_valid=valid)


def standin(batch_targets, num_proposals=32, copies=4):
  """The embedded data's stand-in proposals of examples 0.. with these targets: (P, valid)."""
  ids = np.arange(len(batch_targets["boxes"]), dtype=np.int32)
  boxes = jax.vmap(lambda i, b, v: proposals.jittered_proposals(
      proposals.example_key(0, i), b, v, (64, 64), num_proposals=num_proposals, copies=copies))(
          ids, batch_targets["boxes"], batch_targets["objects_valid"])
  return np.asarray(boxes), np.ones(boxes.shape[:2], bool)


def model_inputs(name, batch_targets):
  """The model's positional inputs besides the images: Fast R-CNN's proposals."""
  return standin(batch_targets) if name == "fast_rcnn_vgg16" else ()


@functools.lru_cache(maxsize=None)
def model_and_variables(name="fast_rcnn_vgg16", **overrides):
  model = zoo.create(name, **{**TINY, **(RPN if name == "faster_rcnn_vgg16" else {}), **overrides})
  variables = jax.jit(lambda key, inputs: model.init(
      {"params": key}, jnp.zeros((1, 64, 64, 3)), *inputs, train=False))(
          jax.random.key(0), model_inputs(name, targets(batch=1)))
  return model, variables


def images(batch=2, seed=1):
  return jnp.asarray(np.random.default_rng(seed).random((batch, 64, 64, 3)), jnp.float32)


# ------------------------------------------------------------------------------ proposals

def test_proposals_are_a_deterministic_function_of_id_and_ground_truth():
  gt = jnp.asarray([[4.0, 6.0, 30.0, 28.0], [30.0, 20.0, 60.0, 50.0], [0, 0, 0, 0]])
  valid = jnp.asarray([True, True, False])
  make = jax.jit(lambda i: proposals.jittered_proposals(
      proposals.example_key(0, i), gt, valid, (64, 80), num_proposals=40, copies=8))
  a, again, other = make(jnp.int32(7)), make(jnp.int32(7)), make(jnp.int32(8))
  assert a.shape == (40, 4)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(again))
  assert not np.allclose(np.asarray(a), np.asarray(other))
  padding = make(jnp.int32(-1))   # eval padding rows have id -1: still boxes, still inside
  assert np.isfinite(np.asarray(padding)).all()


def test_proposal_statistics():
  rng = np.random.default_rng(0)
  g, copies, translate, scale = 6, 200, 0.15, 0.25
  x1, y1 = rng.uniform(30, 60, g), rng.uniform(30, 60, g)
  gt = np.stack([x1, y1, x1 + rng.uniform(10, 40, g), y1 + rng.uniform(10, 40, g)], -1)
  valid = np.array([True] * 5 + [False])
  size = (160, 200)
  out = np.asarray(proposals.jittered_proposals(
      jax.random.key(int(rng.integers(1 << 30))), jnp.asarray(gt, jnp.float32), jnp.asarray(valid),
      size, num_proposals=g * copies + 2000, copies=copies, translate=translate, scale=scale,
      min_size=4.0, max_aspect=2.0), np.float64)
  assert ((out[:, 0] >= 0) & (out[:, 1] >= 0) & (out[:, 2] <= 200) & (out[:, 3] <= 160)).all()
  assert ((out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])).all()
  # Jittered copies (these gt boxes sit far from the border: no clipping): centre shifts in
  # box sides ~ U(-t, t), log side factors ~ U(-s, s): bounds, means and standard deviations.
  jittered = out[:5 * copies].reshape(5, copies, 4)
  w, h = gt[:5, 2] - gt[:5, 0], gt[:5, 3] - gt[:5, 1]
  shift_x = ((jittered[..., 0] + jittered[..., 2]) / 2 - (gt[:5, 0] + gt[:5, 2])[:, None] / 2) / w[:, None]
  log_w = np.log((jittered[..., 2] - jittered[..., 0]) / w[:, None])
  log_h = np.log((jittered[..., 3] - jittered[..., 1]) / h[:, None])
  n = 5 * copies
  for values, bound in ((shift_x, translate), (log_w, scale), (log_h, scale)):
    assert np.abs(values).max() <= bound * (1 + 1e-5)
    assert abs(values.mean()) < 4 * bound / np.sqrt(3 * n)
    np.testing.assert_allclose(values.std(), bound / np.sqrt(3), rtol=0.1)
  iou = np.array([box_reference.box_iou(gt[i:i + 1], jittered[i])[0] for i in range(5)])
  assert iou.min() > 0.3 and 0.6 < iou.mean() < 0.85
  # The padding gt's slots and the rest are random boxes: log-uniform sides in [4, 200],
  # aspect in [1/2, 2] (before capping at the image), spread over the whole image.
  random = out[5 * copies:]
  side = np.sqrt((random[:, 2] - random[:, 0]) * (random[:, 3] - random[:, 1]))
  assert side.min() >= 4.0 * (1 - 1e-5) and side.max() <= 200
  aspect = (random[:, 3] - random[:, 1]) / (random[:, 2] - random[:, 0])
  uncapped = side < 100
  assert (aspect[uncapped] <= 2.0 + 1e-4).all() and (aspect[uncapped] >= 0.5 - 1e-4).all()
  np.testing.assert_allclose(np.log(side[uncapped]).mean(), (np.log(4) + np.log(100)) / 2, atol=0.15)
  best = box_reference.box_iou(gt[:5], random).max(0)
  assert (best < 0.5).mean() > 0.9   # mostly background, as Selective Search's clutter


def test_too_few_proposal_slots_is_a_clear_error():
  with pytest.raises(ValueError, match="3 ground-truth slots x 8 copies = 24 > num_proposals=16"):
    proposals.jittered_proposals(jax.random.key(0), jnp.zeros((3, 4)), jnp.zeros(3, bool),
                                 (64, 64), num_proposals=16, copies=8)


# ------------------------------------------------------------------------------ the model

def reference_roi_pool(features, box, scale, size):
  """float64 transcription of torchvision's roi_pool CPU kernel for one box on one (H, W, C)
  map (bin sizes in float32, as the kernel computes them)."""
  height, width, channels = features.shape
  start_w, start_h, end_w, end_h = (int(np.sign(v) * np.floor(abs(v) + 0.5))
                                    for v in np.float32(box) * np.float32(scale))
  roi_w, roi_h = max(end_w - start_w + 1, 1), max(end_h - start_h + 1, 1)
  bin_h, bin_w = np.float32(roi_h) / np.float32(size), np.float32(roi_w) / np.float32(size)
  out = np.zeros((size, size, channels))
  for ph in range(size):
    for pw in range(size):
      hs = min(max(int(np.floor(np.float32(ph) * bin_h)) + start_h, 0), height)
      he = min(max(int(np.ceil(np.float32(ph + 1) * bin_h)) + start_h, 0), height)
      ws = min(max(int(np.floor(np.float32(pw) * bin_w)) + start_w, 0), width)
      we = min(max(int(np.ceil(np.float32(pw + 1) * bin_w)) + start_w, 0), width)
      if he <= hs or we <= ws:
        continue
      for c in range(channels):
        best = -np.inf
        for y in range(hs, he):
          for x in range(ws, we):
            if features[y, x, c] > best:
              best = features[y, x, c]
        out[ph, pw, c] = best
  return out


def reference_head(params, pooled, classes, positive, valid, target_deltas):
  """Fast R-CNN's head and detectron2's box losses in float64, with the head parameters'
  gradients by hand. pooled (N, D); classes, positive, valid (N,); target_deltas (N, 4)."""
  p = {k: {n: np.asarray(v, np.float64) for n, v in params[k].items()}
       for k in ("fc6", "fc7", "cls_score", "bbox_pred")}
  h6 = np.maximum(pooled @ p["fc6"]["kernel"] + p["fc6"]["bias"], 0)
  h7 = np.maximum(h6 @ p["fc7"]["kernel"] + p["fc7"]["bias"], 0)
  logits = h7 @ p["cls_score"]["kernel"] + p["cls_score"]["bias"]
  deltas = (h7 @ p["bbox_pred"]["kernel"] + p["bbox_pred"]["bias"]).reshape(len(pooled), -1, 4)
  picked = deltas[np.arange(len(pooled)), classes]
  n = max(valid.sum(), 1)
  shifted = logits - logits.max(-1, keepdims=True)
  log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  box_cls = -(log_softmax[np.arange(len(pooled)), classes] * valid).sum() / n
  box_reg = np.where(positive, np.abs(picked - target_deltas).sum(-1), 0).sum() / n
  # backward
  d_logits = (np.exp(log_softmax) - np.eye(logits.shape[1])[classes]) * valid[:, None] / n
  d_deltas = np.zeros_like(deltas)
  d_deltas[np.arange(len(pooled)), classes] = np.where(positive[:, None], np.sign(picked - target_deltas), 0) / n
  d_deltas = d_deltas.reshape(len(pooled), -1)
  grads = {"cls_score": {"kernel": h7.T @ d_logits, "bias": d_logits.sum(0)},
           "bbox_pred": {"kernel": h7.T @ d_deltas, "bias": d_deltas.sum(0)}}
  d7 = (d_logits @ p["cls_score"]["kernel"].T + d_deltas @ p["bbox_pred"]["kernel"].T) * (h7 > 0)
  grads["fc7"] = {"kernel": h6.T @ d7, "bias": d7.sum(0)}
  d6 = (d7 @ p["fc7"]["kernel"].T) * (h6 > 0)
  grads["fc6"] = {"kernel": pooled.T @ d6, "bias": d6.sum(0)}
  return logits, picked, box_cls, box_reg, grads


def test_box_head_loss_and_gradients_match_float64_reference():
  model, variables = model_and_variables()
  x = images()
  rng = np.random.default_rng(int(np.random.SeedSequence().entropy % (1 << 32)))
  batch_targets = targets()
  xy = rng.uniform(0, 48, (2, 24, 2))
  given = np.concatenate([xy, xy + rng.uniform(4, 40, (2, 24, 2))], -1).astype(np.float32)
  given[0, :4] = batch_targets["boxes"][0, [0, 0, 1, 1]] + rng.uniform(-3, 3, (4, 4))  # positives
  task = Detection(3)

  def loss(params):
    (outputs, aux) = model.apply({**variables, "params": params}, x, given,
                                 np.ones(given.shape[:2], bool), train=True,
                                 targets=batch_targets, rngs={"sampling": jax.random.key(5)})
    total, metrics = task.loss(outputs, {})
    return total, (outputs, aux, metrics)

  (total, (outputs, aux, metrics)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
  box = {k: np.asarray(v) for k, v in outputs["box"].items()}
  rois = np.asarray(aux["rois"], np.float64)
  assert set(metrics) == {"box_cls", "box_reg", "loss"}   # no RPN, no RPN losses

  # The sampled RoIs: proposals and gt, IoU-matched (fg >= 0.5), targets encoded (10, 10, 5, 5).
  gt = batch_targets["boxes"]
  for b in range(2):
    candidates = np.concatenate([given[b], gt[b][batch_targets["objects_valid"][b]]])
    for k in np.flatnonzero(box["valid"][b]):
      assert np.isclose(candidates, rois[b, k], atol=1e-5).all(-1).any()
    if not batch_targets["objects_valid"][b].any():
      assert not box["positive"][b].any()
      continue
    iou = box_reference.box_iou(gt[b][batch_targets["objects_valid"][b]], rois[b]).max(0)
    np.testing.assert_array_equal(box["positive"][b], (iou >= 0.5) & box["valid"][b])
    for k in np.flatnonzero(box["positive"][b]):
      np.testing.assert_allclose(box["target_deltas"][b, k], box_reference.encode(
          gt[b, box["gt_index"][b, k]][None], rois[b, k][None], (10, 10, 5, 5))[0], rtol=1e-4, atol=1e-4)
      assert box["classes"][b, k] == batch_targets["labels"][b, box["gt_index"][b, k]] + 1
  assert box["positive"][0].sum() >= 4

  # conv5_3 from the model's own backbone (VGG-16 is tested in tests/backbones), then the head.
  normalized = (x - jnp.asarray(fast_rcnn.IMAGENET_MEAN)) / jnp.asarray(fast_rcnn.IMAGENET_STD)
  conv5 = np.asarray(VGG16(TINY["widths"], fc_width=None).apply(
      {"params": variables["params"]["backbone"]}, normalized, train=False)["conv5_3"], np.float64)
  assert conv5.shape == (2, 4, 4, 8)
  pooled = np.stack([reference_roi_pool(conv5[b], rois[b, k], 1 / 16, 7).reshape(-1)
                     for b in range(2) for k in range(rois.shape[1])])
  flat = lambda a: a.reshape((-1,) + a.shape[2:])
  head_params = {**variables["params"]["roi_heads"]["box_head"],
                 **variables["params"]["roi_heads"]["box_predictor"]}
  logits, picked, box_cls, box_reg, reference_grads = reference_head(
      head_params, pooled, flat(box["classes"]), flat(box["positive"]),
      flat(box["valid"]), flat(box["target_deltas"]).astype(np.float64))
  np.testing.assert_allclose(flat(box["class_logits"]), logits, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(flat(box["deltas"]), picked, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(float(metrics["box_cls"]), box_cls, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["box_reg"]), box_reg, rtol=1e-5)
  for layer, values in reference_grads.items():
    for name, value in values.items():
      head = "box_head" if layer in ("fc6", "fc7") else "box_predictor"
      np.testing.assert_allclose(np.asarray(grads["roi_heads"][head][layer][name]), value, rtol=1e-3,
                                 atol=1e-4 * np.abs(value).max() + 1e-9, err_msg=f"{layer}/{name}")


def test_inference_gives_padded_detections_and_uses_given_proposals():
  model, variables = model_and_variables()
  x = images(batch=2)
  detections, aux = jax.jit(lambda v, x, p, valid: model.apply(v, x, p, valid, train=False))(
      variables, x, *standin(targets()))
  assert {k: v.shape for k, v in detections.items()} == {
      "boxes": (2, 8, 4), "scores": (2, 8), "classes": (2, 8), "valid": (2, 8)}
  assert aux["proposals"].shape == (2, 32, 4)
  boxes, valid = np.asarray(detections["boxes"]), np.asarray(detections["valid"])
  assert (boxes >= 0).all() and (boxes <= 64).all()
  classes = np.asarray(detections["classes"])
  assert ((classes >= 1) & (classes <= 3))[valid].all() and (classes[~valid] == 0).all()
  given = np.tile(np.array([[[0, 0, 20, 20], [10, 10, 50, 60]]], np.float32), (2, 1, 1))
  _, aux = model.apply(variables, x, given, np.ones((2, 2), bool), train=False)
  np.testing.assert_array_equal(np.asarray(aux["proposals"]), given)


@pytest.mark.parametrize("name, overrides", [
    ("fast_rcnn_vgg16", ()), ("faster_rcnn_vgg16", (("image_scale", 2.0),)),
    # ~45 s each on a loaded 2-core CPU; the kernels' own tests cover these poolings' values.
    pytest.param("fast_rcnn_vgg16", (("pooling", "spp"), ("spp_levels", (1, 2))), marks=pytest.mark.slow),
    pytest.param("fast_rcnn_vgg16", (("pooling", "roi_align"),), marks=pytest.mark.slow)])
def test_training_step_is_finite_with_an_image_without_objects(name, overrides):
  model, variables = model_and_variables(name, **dict(overrides), dropout_rate=0.5)
  task = Detection(3)

  def loss(params, batch_targets, inputs):
    (outputs, _) = model.apply({**variables, "params": params}, images(), *inputs, train=True,
                               targets=batch_targets, rngs={"sampling": jax.random.key(3),
                                                            "dropout": jax.random.key(4)})
    return task.loss(outputs, {})

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (total, metrics), grads = step(variables["params"], targets(), model_inputs(name, targets()))
  assert np.isfinite(float(total)) and float(metrics["box_reg"]) > 0
  assert ("rpn_objectness" in metrics) == (name == "faster_rcnn_vgg16")
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  empty = {k: np.zeros_like(v) if k != "labels" else np.full_like(v, -1)
           for k, v in targets().items()}
  (total, metrics), grads = step(variables["params"], empty, model_inputs(name, empty))
  assert np.isfinite(float(total)) and float(metrics["box_reg"]) == 0
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("pooling, levels, cells", [("roi_pool", None, 49), ("spp", (1, 2, 3, 6), 50),
                                                   ("spp", (1, 2, 4), 21)])
def test_fc6_takes_the_pooled_size(pooling, levels, cells):
  model = zoo.create("fast_rcnn_vgg16", **TINY, pooling=pooling,
                     **({"spp_levels": levels} if levels else {}))
  shapes = jax.eval_shape(lambda inputs: model.init({"params": jax.random.key(0)},
                                                   jnp.zeros((1, 64, 64, 3)), *inputs,
                                                   train=False),
                          standin(targets(1)))["params"]["roi_heads"]
  assert shapes["box_head"]["fc6"]["kernel"].shape == (cells * 8, 16)
  assert shapes["box_predictor"]["bbox_pred"]["kernel"].shape == (16, 4 * 4)
  assert shapes["box_predictor"]["cls_score"]["kernel"].shape == (16, 4)


def test_clear_errors():
  model, variables = model_and_variables()
  given = standin(targets())
  with pytest.raises(ValueError, match="training needs targets.*missing \\['labels'\\]"):
    model.apply(variables, images(), *given, train=True,
                targets={"boxes": np.zeros((2, 3, 4)), "objects_valid": np.zeros((2, 3), bool)},
                rngs={"sampling": jax.random.key(0)})
  with pytest.raises(ValueError, match="proposals must be \\(B, P, 4\\)"):
    model.apply(variables, images(), np.zeros((2, 3)), np.ones((2, 3), bool), train=False)
  with pytest.raises(ValueError, match="images \\(B, H, W, 3\\)"):
    model.apply(variables, jnp.zeros((2, 64, 64)), *given, train=False)
  with pytest.raises(ValueError, match="pooling must be one of"):
    zoo.create("fast_rcnn_vgg16", pooling="max")
  with pytest.raises(ValueError, match="image_scale must be > 0"):
    zoo.create("faster_rcnn_vgg16", image_scale=0.0)
  with pytest.raises(ValueError, match="spp_levels must be positive ints"):
    zoo.create("fast_rcnn_vgg16", pooling="spp", spp_levels=(0, 2))


def test_registry_names_each_variants_hyperparameters():
  assert {"fast_rcnn_vgg16", "faster_rcnn_vgg16"} <= set(zoo.list_models())
  with pytest.raises(ValueError, match="has no hyper-parameter 'rpn'.*roi_heads"):
    zoo.create("fast_rcnn_vgg16", rpn=dict(nms_threshold=0.5))
  with pytest.raises(ValueError, match="has no hyper-parameter 'num_proposals'.*rpn"):
    zoo.create("faster_rcnn_vgg16", num_proposals=8)
  with pytest.raises(ValueError, match="roi_heads has no field 'nope'.*batch_size_per_image"):
    zoo.create("fast_rcnn_vgg16", roi_heads=dict(nope=1))
  assert isinstance(zoo.create("faster_rcnn_vgg16"), two_stage.FasterRCNN)
  assert isinstance(zoo.create("fast_rcnn_vgg16"), fast_rcnn.FastRCNN)
  assert zoo.create("faster_rcnn_vgg16").rpn.anchor_sizes == ((128, 256, 512),)


@pytest.mark.parametrize("image_scale", [1.0, 2.0])
def test_rpn_anchors_are_torchvisions_for_the_resized_image_in_input_pixels(image_scale):
  anchors = np.asarray(rpn.anchors([(3, 5)], ((16, 32, 64),), (0.5, 1.0, 2.0), (16,),
                                   image_scale)[0])
  cell = box_reference.cell_anchors_torchvision([s * image_scale for s in (16, 32, 64)],
                                                (0.5, 1.0, 2.0))
  expected = box_reference.grid_anchors(cell, (3, 5), (16, 16)) / image_scale
  np.testing.assert_allclose(anchors, expected, atol=1e-5)
  # Stride 16 / s input pixels: cell (0, 1)'s anchors are cell (0, 0)'s moved by 16 / s.
  np.testing.assert_allclose(anchors[9:18] - anchors[:9], np.tile([16 / image_scale, 0] * 2, (9, 1)))


@pytest.mark.parametrize("implementation", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("name, overrides, poolings", [
    ("fast_rcnn_vgg16", (), 1), ("fast_rcnn_vgg16", (("pooling", "roi_align"),), 1),
    ("fast_rcnn_vgg16", (("pooling", "spp"), ("spp_levels", (1, 2, 4))), 3),
    ("faster_rcnn_vgg16", (), 1)])
def test_training_step_lowers_for_gpu_and_tpu(implementation, name, overrides, poolings):
  """jax.export of the training step (loss and gradients) for CUDA and TPU, the pooling kernels
  lowered for real (conv5_3 has 8 channels here: the GPU RoI pooling kernel pads them to 128)."""
  from tests.lowering import export, kernel_calls
  model = zoo.create(name, **{**TINY, **(RPN if name == "faster_rcnn_vgg16" else {}),
                              **dict(overrides)})
  task = Detection(3)
  inputs = model_inputs(name, targets())
  variables = jax.eval_shape(lambda key, inputs: model.init(
      {"params": key}, jnp.zeros((1, 64, 64, 3)), *inputs, train=False),
      jax.random.key(0), model_inputs(name, targets(1)))

  def step(variables, images, batch_targets, inputs):
    def loss(params):
      outputs, _ = model.apply({**variables, "params": params}, images, *inputs, train=True,
                               targets=batch_targets, rngs={"sampling": jax.random.key(3)})
      return task.loss(outputs, {})[0]
    return jax.value_and_grad(loss)(variables["params"])

  shapes = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
  module = export(implementation, step, variables, shapes(images()), shapes(targets()),
                  shapes(inputs)).mlir_module()
  # Forward kernels; the GPU also has backward kernels for RoI pooling (the TPU's is XLA's
  # scatter-add) and both for RoIAlign.
  backward = implementation == "pallas_gpu" or dict(overrides).get("pooling") == "roi_align"
  assert kernel_calls(implementation, module) == poolings * (2 if backward else 1)
