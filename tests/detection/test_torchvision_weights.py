"""zoo.load_checkpoint(..., format="torchvision") against torchvision's own outputs.

The golden files (golden/torchvision_weights_{resnet50,vgg16,rcnn}.npz) hold randomised
torchvision state dicts (real names and layouts, reduced widths), inputs and torchvision's
intermediate outputs; golden/torchvision_layouts.json the names and shapes of the full-size
models. golden/make_torchvision_goldens.py says how they were made (torch 2.14.1, torchvision
0.29.1, CPU). torch is not needed here.
"""

import functools
import json
import os

import jax
import numpy as np
import pytest

import zoo
from zoo.detection import boxes as box_ops
from zoo.detection import roi_heads, rpn, two_stage
from zoo.weights import torchvision as tv_weights

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


@functools.lru_cache(maxsize=None)
def golden(name):
  """(state dict, arrays) of golden/torchvision_weights_{name}.npz."""
  with np.load(os.path.join(GOLDEN, f"torchvision_weights_{name}.npz")) as archive:
    arrays = dict(archive)
  state = {k.removeprefix("state/"): v for k, v in arrays.items() if k.startswith("state/")}
  return state, arrays


def nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


def assert_close(got, want, rtol=1e-4, name=""):
  """Elementwise within rtol, plus rtol times the reference's largest magnitude (float32 sums
  in another order)."""
  want = np.asarray(want, np.float32)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=rtol,
                             atol=rtol * float(np.abs(want).max()), err_msg=name)


def match_rows(got, want, atol):
  """Index of the row of `got` (N, 4) equal to each row of `want` (N, 4) within atol (boxes
  whose scores tie in float32 may come in either order), asserting there is one for each."""
  distance = np.abs(np.asarray(got)[None, :, :] - np.asarray(want)[:, None, :]).max(-1)
  index = distance.argmin(1)
  assert distance[np.arange(len(want)), index].max() <= atol, distance.min(1).max()
  assert len(set(index.tolist())) == len(want) == len(got)
  return index


# ------------------------------------------------------------------------------ classifiers

def test_resnet50_features_and_logits_match_torchvision():
  state, arrays = golden("resnet50")
  model, variables = zoo.load_checkpoint(state, format="torchvision")
  assert model.width == 4 and model.blocks == (3, 4, 6, 3) and model.num_classes == 10
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, nhwc(arrays["in/images"]))
  for level in ("C2", "C3", "C4", "C5"):
    assert_close(out[level], nhwc(arrays[f"out/{level}"]), name=level)
  assert_close(out["logits"], arrays["out/logits"], name="logits")


def test_vgg16_logits_match_torchvision_with_its_nchw_flatten_order():
  state, arrays = golden("vgg16")
  model, variables = zoo.load_checkpoint(state, format="torchvision", model="vgg16")
  assert model.widths == (8, 16, 32, 32, 32) and model.fc_width == 32 and model.num_classes == 10
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, nhwc(arrays["in/images"]))
  assert_close(out["pool5"], nhwc(arrays["out/pool5"]), name="pool5")
  # 224 x 224: pool5 is 7 x 7 and fc6's centre window sees all of it (zoo.weights.torchvision).
  assert_close(out["fc8"][:, 3, 3], arrays["out/logits"], name="logits")


# ------------------------------------------------------------------------------ R-CNN

@functools.lru_cache(maxsize=None)
def rcnn_model(masks=True, rpn=(), roi_heads=()):
  """zoo.load_checkpoint of the golden R-CNN; rpn, roi_heads: (field, value) pairs to change."""
  state, _ = golden("rcnn")
  if not masks:
    state = {k: v for k, v in state.items() if not k.startswith("roi_heads.mask_")}
  return zoo.load_checkpoint(state, format="torchvision", rpn=dict(rpn), roi_heads=dict(roi_heads))


def run_head(model, variables, head, rois):
  """Our box or mask head on torchvision's FPN outputs P2..P5 (the heads' inputs): the RoI
  pooler, then roi_heads/{box_head, box_predictor} or roi_heads/{mask_head, mask_predictor}."""
  _, arrays = golden("rcnn")
  features = [nhwc(arrays[f"out/P{i}"]) for i in range(2, 6)]
  params = variables["params"]["roi_heads"]

  def run(params, features, rois):
    if head == "box":
      x = roi_heads.BoxHead(model.representation_size).apply(
          {"params": params["box_head"]}, model.pooler(features, rois, 7), train=False)
      return roi_heads.BoxPredictor(model.num_classes).apply({"params": params["box_predictor"]}, x)
    pooled = model.pooler(features, rois, roi_heads.MASK_POOL)
    x = roi_heads.MaskHead(model.mask_width).apply(
        {"params": params["mask_head"]}, pooled.reshape((-1,) + pooled.shape[2:]))
    x = roi_heads.MaskPredictor(model.mask_width, model.num_classes).apply(
        {"params": params["mask_predictor"]}, x)
    return x.reshape(rois.shape[:2] + x.shape[1:])

  return jax.jit(run)(params, features, rois)


def test_rcnn_hyperparameters_come_from_the_checkpoint():
  model, variables = rcnn_model()
  assert isinstance(model, two_stage.FasterRCNN) and model.masks
  backbone = model.backbone
  assert (backbone.blocks, backbone.width, backbone.fpn_width, model.representation_size,
          model.mask_width, model.num_classes) == ((3, 4, 6, 3), 8, 32, 64, 16, 3)
  assert (backbone.norm, model.roi_heads.sampling_ratio, model.roi_heads.aligned) == (
      "frozen", 2, False)
  assert (model.pooler.sampling_ratio, model.pooler.aligned) == (2, False)
  assert set(variables["params"]) == {"backbone", "rpn", "roi_heads"}
  assert set(variables["params"]["roi_heads"]) == {"box_head", "box_predictor", "mask_head",
                                                   "mask_predictor"}
  faster, _ = rcnn_model(masks=False)
  assert not faster.masks
  with pytest.raises(ValueError, match="conv5_mask"):  # mask tensors are not dropped silently
    zoo.load_checkpoint(golden("rcnn")[0], format="torchvision", model="fasterrcnn_resnet50_fpn")


def test_rpn_proposals_match_torchvision():
  """select_proposals (decode, clip, per-level NMS) on torchvision's RPN outputs: its boxes."""
  _, arrays = golden("rcnn")
  levels = ("P2", "P3", "P4", "P5", "P6")
  grids = [arrays[f"out/{level}"].shape[2:] for level in levels]
  anchors = box_ops.AnchorGenerator()(grids)
  height, width = arrays["in/images"].shape[2:]
  for i in range(2):
    want = arrays[f"out/proposals_{i}"]
    boxes, _, valid = jax.jit(lambda lg, dl: rpn.select_proposals(
        lg, dl, anchors, (height, width), pre_nms_topk=10000, post_nms_topk=4096,
        nms_threshold=0.7))([arrays[f"out/rpn_objectness_{l}"][i] for l in levels],
                            [arrays[f"out/rpn_deltas_{l}"][i] for l in levels])
    boxes = np.asarray(boxes)[np.asarray(valid)]
    index = match_rows(boxes, want, atol=1e-5 * np.abs(want).max())
    assert (np.diff(index) > 0).mean() > 0.99  # the same order but for ties


@pytest.mark.parametrize("masks", [True, False])
def test_box_head_for_given_proposals_matches_torchvision(masks):
  """Multi-level RoIAlign (sampling ratio 2, not aligned), fc6 (rows permuted from the NCHW
  flatten), fc7, class logits and class-specific deltas, Faster and Mask R-CNN alike."""
  model, variables = rcnn_model(masks)
  _, arrays = golden("rcnn")
  logits, deltas = run_head(model, variables, "box", arrays["in/proposals"])
  assert_close(logits, arrays["out/class_logits"], name="class logits")
  assert_close(deltas, arrays["out/box_regression"], name="box regression")


def test_mask_head_for_given_boxes_matches_torchvision():
  """14 x 14 RoIAlign, four 3 x 3 convolutions, the 2 x 2 transposed convolution, the 1 x 1
  per-class logits."""
  model, variables = rcnn_model()
  _, arrays = golden("rcnn")
  logits = run_head(model, variables, "mask", arrays["in/mask_boxes"])
  assert_close(np.moveaxis(np.asarray(logits), -1, 2), arrays["out/mask_logits"],
               name="mask logits")


def test_whole_model_matches_torchvision():
  """images in [0, 1] -> body C2..C5 (normalisation included), FPN P2..P6, RPN objectness and
  deltas per level (torchvision's order), captured in one forward pass, and the detections:
  torchvision's `roi_heads` outputs (its postprocess at scale 1 only pastes the masks). Every
  anchor and every candidate is kept on both sides (the golden model keeps them too), so the
  comparison is exact up to float32 rounding (and the order of boxes whose scores tie)."""
  _, arrays = golden("rcnn")
  # Room for every proposal torchvision kept after NMS and for all their class boxes.
  proposals = max(len(arrays[f"out/proposals_{i}"]) for i in range(2))
  model, variables = rcnn_model(
      rpn=(("pre_nms_topk_test", 10000), ("post_nms_topk_test", proposals)),
      roi_heads=(("detection_candidates", 3 * proposals), ("detections_per_image", 1000)))
  paths = {"body": ("backbone", "body"), "fpn": ("backbone", "fpn"), "rpn_head": ("rpn", "head")}
  (detections, _), state = jax.jit(lambda v, x: model.apply(
      v, x, train=False, capture_intermediates=lambda m, _: m.path in paths.values(),
      mutable=["intermediates"]))(variables, nhwc(arrays["in/images"]))
  captured = {k: state["intermediates"][p[0]][p[1]]["__call__"][0] for k, p in paths.items()}
  for level in ("C2", "C3", "C4", "C5"):
    assert_close(captured["body"][level], nhwc(arrays[f"out/{level}"]), name=level)
  for level in ("P2", "P3", "P4", "P5", "P6"):
    assert_close(captured["fpn"][level], nhwc(arrays[f"out/{level}"]), name=level)
  logits, deltas = captured["rpn_head"]
  for i, level in enumerate(("P2", "P3", "P4", "P5", "P6")):
    assert_close(logits[i], arrays[f"out/rpn_objectness_{level}"], name=f"objectness {level}")
    assert_close(deltas[i], arrays[f"out/rpn_deltas_{level}"], name=f"deltas {level}")

  detections = jax.tree.map(np.asarray, detections)
  for i in range(2):
    valid = detections["valid"][i]
    want_boxes = arrays[f"out/detections_{i}_boxes"]
    index = match_rows(detections["boxes"][i][valid], want_boxes, 1e-5 * np.abs(want_boxes).max())
    assert_close(detections["scores"][i][valid][index], arrays[f"out/detections_{i}_scores"],
                 name="scores")
    np.testing.assert_array_equal(detections["classes"][i][valid][index],
                                  arrays[f"out/detections_{i}_labels"])
    want_masks = arrays[f"out/detections_{i}_masks"]
    assert_close(detections["masks"][i][index[:len(want_masks)]], want_masks, name="masks")


# ------------------------------------------------------------------------------ layouts, errors

LAYOUTS = os.path.join(GOLDEN, "torchvision_layouts.json")


def zeros_of(layout):
  return {name: np.broadcast_to(np.float32(0), shape) for name, shape in layout.items()}


@pytest.mark.parametrize("name", ["resnet50", "vgg16", "fasterrcnn_resnet50_fpn",
                                  "maskrcnn_resnet50_fpn"])
def test_full_size_torchvision_layouts_load(name):
  """Every name and shape of the real state dicts (torchvision 0.29.1) maps onto the zoo's
  full-size model (ImageNet: 1000 classes; COCO: torchvision's 91 = 90 + background)."""
  with open(LAYOUTS) as f:
    layout = json.load(f)["models"][name]
  model, variables = zoo.load_checkpoint(zeros_of(layout), format="torchvision")
  count = sum(int(np.prod(shape)) for key, shape in layout.items()
              if not key.endswith("num_batches_tracked"))
  assert sum(x.size for x in jax.tree.leaves(variables)) == count
  if name == "resnet50":
    assert model.num_classes == 1000 and model.blocks == (3, 4, 6, 3) and model.width == 64
  elif name == "vgg16":
    assert model.widths == (64, 128, 256, 512, 512) and model.fc_width == 4096
  else:
    assert (model.num_classes, model.backbone.fpn_width, model.representation_size) == (
        90, 256, 1024)
    assert model.masks == (name == "maskrcnn_resnet50_fpn")


def test_old_torchvision_names_load_too():
  """Before torchvision 0.13 the FPN, RPN conv and mask head were plain convolutions:
  inner_blocks.{i}.weight, rpn.head.conv.weight, mask_head.mask_fcn{k}.weight."""
  state, _ = golden("rcnn")
  _, new = rcnn_model()
  renamed = {}
  for name, value in state.items():
    name = name.replace(".0.weight", ".weight").replace(".0.bias", ".bias") if (
        name.startswith("backbone.fpn.")) else name
    name = name.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
    for k in range(4):
      name = name.replace(f"roi_heads.mask_head.{k}.0.", f"roi_heads.mask_head.mask_fcn{k + 1}.")
    renamed[name] = value
  assert renamed.keys() != state.keys()
  _, old = zoo.load_checkpoint(renamed, format="torchvision")
  jax.tree.map(np.testing.assert_array_equal, old, new)


def test_mismatches_are_named():
  state, _ = golden("resnet50")
  broken = {k: v for k, v in state.items() if k != "layer2.1.bn2.running_var"}
  broken["layer9.0.conv1.weight"] = state["layer1.0.conv1.weight"]
  broken["layer1.0.conv2.weight"] = state["layer1.0.conv2.weight"][:, :2]
  with pytest.raises(ValueError) as error:
    zoo.load_checkpoint(broken, format="torchvision")
  message = str(error.value)
  assert "layer9.0.conv1.weight" in message                      # a name the model lacks
  assert "batch_stats/layer2/1/bn2/var" in message               # a tensor the checkpoint lacks
  assert "params/layer1/0/conv2/kernel: checkpoint (3, 3, 2, 4) vs model (3, 3, 4, 4)" in message


def test_rcnn_class_count_mismatch_says_torchvision_counts_the_background():
  state, _ = golden("rcnn")
  with pytest.raises(ValueError, match="counts the background"):
    zoo.load_checkpoint(state, format="torchvision", num_classes=4)


def test_bad_model_and_unknown_state_dicts_are_errors():
  state, _ = golden("vgg16")
  with pytest.raises(ValueError, match="not one of"):
    zoo.load_checkpoint(state, format="torchvision", model="vgg19")
  with pytest.raises(ValueError, match="pass model="):
    zoo.load_checkpoint({"encoder.weight": np.zeros((2, 2))}, format="torchvision")
  with pytest.raises(ValueError, match="no hyper-parameter 'depth'.*VGG16 takes widths"):
    zoo.load_checkpoint(state, format="torchvision", depth=16)
  assert tv_weights.which_model(state) == "vgg16"
