"""Writes torchvision_weights_*.npz: torchvision's own state dicts and intermediate outputs for
tests/detection/test_torchvision_weights.py (zoo.load_checkpoint(..., format="torchvision")).

Produced with torch 2.14.1 + torchvision 0.29.1 (CPU) by

    /tmp/venv-torch/bin/python tests/detection/golden/make_torchvision_goldens.py

(any Python with torch + torchvision works; it needs nothing from this repo and downloads
nothing). Every model is built by torchvision's own classes with `weights=None`, then every
parameter and every BatchNorm buffer is overwritten with random numbers from a fixed seed
(convolutions and linears ~ N(0, 1 / fan_in), the box classifier 20 times that, BN scales
U(0.5, 1.5) (the last BN of a residual branch U(0.1, 0.5), so that 16 blocks neither explode
nor vanish), biases and running means N(0, 0.1^2), running variances U(0.5, 2)), so that nothing sits at its init value (a
transposition or a swapped mean / variance shows). Parameters are rounded to float16 before
the outputs are computed, so the float16 arrays stored here are exactly the weights that
produced them (halving the file size); the input images are float16 values too, stored as
float32 like every output.

Size: the real models' state dicts are 100-550 MB. The layout (every name, the block counts
3-4-6-3, the module types and the forward code) is torchvision's, only the widths are reduced:
- ResNet-50: torchvision's `ResNet(Bottleneck, [3, 4, 6, 3])`, whose widths are fixed at 64 ..
  512, with its stem and four layers rebuilt by its own `_make_layer` after setting `inplanes`
  to w: bottleneck widths w, 2w, 4w, 8w (outputs 4w .. 32w) instead of 64 .. 512 (= the zoo's
  ResNet(width=w)); w = 4 for the classifier (BatchNorm2d, 10 classes), 8 in the R-CNN. Its
  forward is torchvision's.
- Faster / Mask R-CNN: that body with FrozenBatchNorm2d (as `fasterrcnn_resnet50_fpn` with
  pretrained weights) inside torchvision's `BackboneWithFPN` (what its `_resnet_fpn_extractor`
  builds) with 32 FPN channels instead of 256, `TwoMLPHead(32 * 7 * 7, 64)` instead of 1024,
  `MaskRCNNHeads(32, [16] * 4, 1)` and `MaskRCNNPredictor(16, 16, 4)` instead of 256, passed to
  torchvision's `MaskRCNN` / `FasterRCNN` (num_classes 4 with background); anchors, RoI
  poolers and heads are the default ones. One state dict serves both: the Faster R-CNN built from
  it without the mask keys gives the very same box outputs (checked below).
- VGG-16: torchvision's `VGG(make_layers(cfg D with widths 8, 16, 32, 32, 32))` with its
  classifier Sequential rebuilt at width 32 (same indices 0, 3, 6), 10 classes.
The golden input images are 2 x 3 x 128 x 128 (R-CNN; sides multiples of 64 so that
torchvision's P6 anchor stride, image size // grid size, is 64 as in the zoo), 2 x 3 x 96 x 64
(ResNet) and 1 x 3 x 224 x 224 (VGG: its adaptive 7 x 7 average pool is then the identity).

Also written: torchvision_layouts.json, the names and shapes of the full-size state dicts of
resnet50, vgg16, fasterrcnn_resnet50_fpn and maskrcnn_resnet50_fpn (91 classes, FrozenBN as
with pretrained weights), for the test that the importer maps the real layouts.
"""

import collections
import json
import os

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models import vgg as tv_vgg
from torchvision.models.detection import backbone_utils, faster_rcnn, mask_rcnn, rpn
from torchvision.ops import feature_pyramid_network, misc

HERE = os.path.dirname(os.path.abspath(__file__))
WIDTH, FPN_CHANNELS, REPRESENTATION, MASK_CHANNELS, CLASSES = 8, 32, 64, 16, 4
MASKS_KEPT = 20  # mask probabilities stored for the first (highest-scoring) detections


def narrow_resnet50(width, num_classes, norm_layer):
  """torchvision's ResNet-50 with its stem and layers rebuilt at bottleneck widths
  width * (1, 2, 4, 8) by torchvision's own `_make_layer` (module doc)."""
  model = tv_resnet.ResNet(tv_resnet.Bottleneck, [3, 4, 6, 3], num_classes=num_classes,
                           norm_layer=norm_layer)
  model.inplanes = width
  model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
  model.bn1 = norm_layer(width)
  for stage, blocks in enumerate([3, 4, 6, 3], start=1):
    setattr(model, f"layer{stage}", model._make_layer(tv_resnet.Bottleneck, width * 2**(stage - 1),
                                                      blocks, stride=1 if stage == 1 else 2))
  model.fc = nn.Linear(width * 8 * tv_resnet.Bottleneck.expansion, num_classes)
  return model


def randomise(model, generator):
  """Overwrites every parameter and BN buffer (module doc), rounded to float16 values."""
  with torch.no_grad():
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
      leaf = name.rsplit(".", 1)[-1]
      module = model.get_submodule(name.rsplit(".", 1)[0])
      is_norm = isinstance(module, (nn.BatchNorm2d, misc.FrozenBatchNorm2d))
      randn = lambda: torch.randn(tensor.shape, generator=generator)
      uniform = lambda low, high: low + (high - low) * torch.rand(tensor.shape, generator=generator)
      if leaf == "num_batches_tracked":
        continue
      if is_norm and leaf == "weight":
        last = name.endswith(("bn3.weight", "downsample.1.weight"))
        value = uniform(0.1, 0.5) if last else uniform(0.5, 1.5)
      elif leaf == "running_var":
        value = uniform(0.5, 2.0)
      elif leaf in ("bias", "running_mean"):
        value = 0.1 * randn()
      elif leaf == "weight":
        transposed = isinstance(module, nn.ConvTranspose2d)  # weight (in, out, kh, kw)
        fan_in = tensor.shape[0] if transposed else tensor[0].numel()
        value = randn() / fan_in**0.5
        if name.endswith("cls_score.weight"):  # spread the class scores: fewer near-ties in NMS
          value = 20 * value
      else:
        raise ValueError(f"no rule for {name}")
      tensor.copy_(value.half().float())


def numpy_state(model):
  return {name: value.numpy().astype(np.float16) for name, value in model.state_dict().items()
          if not name.endswith("num_batches_tracked")}


def save(name, arrays):
  path = os.path.join(HERE, name)
  np.savez_compressed(path, torch_version=np.array(torch.__version__),
                      torchvision_version=np.array(torchvision.__version__), **arrays)
  print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB")


def resnet_golden(generator):
  model = narrow_resnet50(4, 10, nn.BatchNorm2d).eval()
  randomise(model, generator)
  images = torch.randn((2, 3, 96, 64), generator=generator).half().float()
  with torch.no_grad():
    getter = torchvision.models._utils.IntermediateLayerGetter(
        model, {"layer1": "C2", "layer2": "C3", "layer3": "C4", "layer4": "C5"})
    features = getter(images)
    logits = model(images)
  out = {f"state/{k}": v for k, v in numpy_state(model).items()}
  out.update({f"out/{k}": v.numpy() for k, v in features.items()})
  out.update({"in/images": images.numpy(), "out/logits": logits.numpy()})
  save("torchvision_weights_resnet50.npz", out)


def vgg_golden(generator):
  widths = [8, 16, 32, 32, 32]
  cfg = []
  for depth, width in zip([2, 2, 3, 3, 3], widths):
    cfg += [width] * depth + ["M"]
  model = tv_vgg.VGG(tv_vgg.make_layers(cfg), num_classes=10, init_weights=False)
  model.classifier = nn.Sequential(nn.Linear(widths[-1] * 7 * 7, 32), nn.ReLU(True),
                                   nn.Dropout(), nn.Linear(32, 32), nn.ReLU(True), nn.Dropout(),
                                   nn.Linear(32, 10))
  model.eval()
  randomise(model, generator)
  images = torch.randn((1, 3, 224, 224), generator=generator).half().float()
  with torch.no_grad():
    pool5 = model.features(images)
    logits = model(images)
  out = {f"state/{k}": v for k, v in numpy_state(model).items()}
  out.update({"in/images": images.numpy(), "out/pool5": pool5.numpy(),
              "out/logits": logits.numpy()})
  save("torchvision_weights_vgg16.npz", out)


def random_rois(generator, count, height, width):
  """(count, 4) boxes with sides 4..~180 px (so every FPN level is used), inside the image."""
  side = 4.0 * torch.exp(torch.rand((count, 2), generator=generator) * np.log(45.0))
  side = torch.minimum(side, torch.tensor([width - 1.0, height - 1.0]))
  corner = torch.rand((count, 2), generator=generator) * (torch.tensor([width, height]) - side)
  return torch.cat([corner, corner + side], 1)


def rcnn_golden(generator):
  body = narrow_resnet50(WIDTH, 10, misc.FrozenBatchNorm2d)
  layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
  channels = [WIDTH * 4 * 2**i for i in range(4)]
  backbone = backbone_utils.BackboneWithFPN(body, layers, channels, FPN_CHANNELS,
                                            extra_blocks=feature_pyramid_network.LastLevelMaxPool())
  height, width = 128, 128
  # Whole-image settings that make the comparison exact rather than approximately equal: the
  # transform's resize is the identity (scale 1); every anchor goes into NMS (no top-k cut at a
  # rank where two libraries' last-ulp differences could swap neighbours), and no detection cap.
  common = dict(min_size=height, max_size=width, rpn_pre_nms_top_n_test=10000,
                rpn_post_nms_top_n_test=10000, box_detections_per_img=10000,
                box_head=faster_rcnn.TwoMLPHead(FPN_CHANNELS * 7 * 7, REPRESENTATION),
                box_predictor=faster_rcnn.FastRCNNPredictor(REPRESENTATION, CLASSES))
  mask_head = mask_rcnn.MaskRCNNHeads(FPN_CHANNELS, [MASK_CHANNELS] * 4, 1)
  mask_predictor = mask_rcnn.MaskRCNNPredictor(MASK_CHANNELS, MASK_CHANNELS, CLASSES)
  model = mask_rcnn.MaskRCNN(backbone, num_classes=None, mask_head=mask_head,
                             mask_predictor=mask_predictor, **common).eval()
  randomise(model, generator)
  state = model.state_dict()
  images = torch.rand((2, 3, height, width), generator=generator).half().float()
  image_sizes = [(height, width)] * 2
  proposals = [random_rois(generator, 24, height, width) for _ in range(2)]
  mask_boxes = [random_rois(generator, 10, height, width) for _ in range(2)]
  out = {"in/images": images.numpy(), "in/proposals": torch.stack(proposals).numpy(),
         "in/mask_boxes": torch.stack(mask_boxes).numpy()}
  with torch.no_grad():
    transformed, _ = model.transform(list(images))
    normalised = (images - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
        [0.229, 0.224, 0.225])[:, None, None]
    assert transformed.tensors.shape == images.shape, transformed.tensors.shape
    assert torch.allclose(transformed.tensors, normalised, atol=1e-6), "resize is not the identity"
    x = transformed.tensors
    c = model.backbone.body(x)
    out.update({f"out/C{int(k) + 2}": v.numpy() for k, v in c.items()})
    features = model.backbone.fpn(c)
    names = {"0": "P2", "1": "P3", "2": "P4", "3": "P5", "pool": "P6"}
    out.update({f"out/{names[k]}": v.numpy() for k, v in features.items()})
    objectness, deltas = model.rpn.head(list(features.values()))
    for level, (o, d) in enumerate(zip(objectness, deltas), start=2):  # torchvision's order
      n, a, h, w = o.shape
      flat = rpn.permute_and_flatten(o, n, a, 1, h, w)[..., 0]
      out[f"out/rpn_objectness_P{level}"] = flat.numpy()
      out[f"out/rpn_deltas_P{level}"] = rpn.permute_and_flatten(d, n, a, 4, h, w).numpy()
    rpn_boxes, _ = model.rpn(transformed, features)
    box_features = model.roi_heads.box_roi_pool(features, proposals, image_sizes)
    class_logits, box_regression = model.roi_heads.box_predictor(
        model.roi_heads.box_head(box_features))
    out["out/class_logits"] = class_logits.reshape(2, 24, CLASSES).numpy()
    out["out/box_regression"] = box_regression.reshape(2, 24, CLASSES, 4).numpy()
    mask_features = model.roi_heads.mask_head(model.roi_heads.mask_roi_pool(features, mask_boxes,
                                                                            image_sizes))
    mask_logits = model.roi_heads.mask_predictor(mask_features)
    out["out/mask_logits"] = mask_logits.reshape(2, 10, CLASSES, 28, 28).numpy()
    detections, _ = model.roi_heads(features, rpn_boxes, image_sizes)
    for i, (boxes, d) in enumerate(zip(rpn_boxes, detections)):
      out[f"out/proposals_{i}"] = boxes.numpy()
      out.update({f"out/detections_{i}_{k}": v.numpy() for k, v in d.items() if k != "masks"})
      out[f"out/detections_{i}_masks"] = d["masks"][:MASKS_KEPT, 0].numpy()
    # The whole model (transform, postprocess with scale 1, masks pasted) gives the same boxes.
    whole = model(list(images))
    for d, w in zip(detections, whole):
      assert torch.equal(d["boxes"], w["boxes"]) and torch.equal(d["scores"], w["scores"])

    # Faster R-CNN from the same state dict minus the mask keys: identical box outputs.
    faster = faster_rcnn.FasterRCNN(backbone_utils.BackboneWithFPN(
        narrow_resnet50(WIDTH, 10, misc.FrozenBatchNorm2d), layers, channels, FPN_CHANNELS,
        extra_blocks=feature_pyramid_network.LastLevelMaxPool()), num_classes=None,
        **{**common, "box_head": faster_rcnn.TwoMLPHead(FPN_CHANNELS * 7 * 7, REPRESENTATION),
           "box_predictor": faster_rcnn.FastRCNNPredictor(REPRESENTATION, CLASSES)}).eval()
    faster.load_state_dict({k: v for k, v in state.items() if ".mask_" not in k})
    for d, f in zip(detections, faster(list(images))):
      assert torch.equal(d["boxes"], f["boxes"]) and torch.equal(d["scores"], f["scores"])
  out.update({f"state/{k}": v for k, v in numpy_state(model).items()})
  for k in ("C2", "C5", "P2", "P6", "rpn_objectness_P2", "class_logits", "mask_logits"):
    print(f"  {k}: std {out['out/' + k].std():.3g}")
  print(f"  proposals {len(out['out/proposals_0'])}, detections "
        f"{len(out['out/detections_0_boxes'])}, {len(out['out/detections_1_boxes'])}")
  save("torchvision_weights_rcnn.npz", out)


def layouts():
  """Names and shapes of the full-size state dicts (no values)."""
  models = {
      "resnet50": torchvision.models.resnet50(weights=None),
      "vgg16": torchvision.models.vgg16(weights=None),
      # norm_layer FrozenBatchNorm2d: the layout of the pretrained models (with weights=None
      # torchvision would use BatchNorm2d, adding num_batches_tracked buffers).
      "fasterrcnn_resnet50_fpn": faster_rcnn.FasterRCNN(
          backbone_utils._resnet_fpn_extractor(
              torchvision.models.resnet50(norm_layer=misc.FrozenBatchNorm2d), 3), num_classes=91),
      "maskrcnn_resnet50_fpn": mask_rcnn.MaskRCNN(
          backbone_utils._resnet_fpn_extractor(
              torchvision.models.resnet50(norm_layer=misc.FrozenBatchNorm2d), 3), num_classes=91),
  }
  table = {name: collections.OrderedDict((k, list(v.shape)) for k, v in m.state_dict().items())
           for name, m in models.items()}
  path = os.path.join(HERE, "torchvision_layouts.json")
  with open(path, "w") as f:
    json.dump({"torch_version": torch.__version__, "torchvision_version": torchvision.__version__,
               "models": table}, f, indent=0)
  print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB")


def main():
  generator = torch.Generator().manual_seed(20261125)
  torch.set_num_threads(1)
  resnet_golden(generator)
  vgg_golden(generator)
  rcnn_golden(generator)
  layouts()


if __name__ == "__main__":
  main()
