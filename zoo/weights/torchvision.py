"""`zoo.load_checkpoint(source, format="torchvision", ...)`: torchvision's ResNet-50, VGG-16,
Faster R-CNN and Mask R-CNN (R50-FPN) weights.

    model, variables = zoo.load_checkpoint("maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
                                           format="torchvision")
    detections, aux = model.apply(variables, images_nhwc_in_0_1, train=False)

The model is told from the names (`backbone.body.*` = an R-CNN, with `roi_heads.mask_predictor.*`
a Mask R-CNN; `features.*` + `classifier.*` = VGG; `layer1.*` = ResNet) or by `model=` one of
MODELS. Widths, block counts and class counts are read from the checkpoint's shapes; keyword
hyper-parameters (the zoo model's names) override them and must agree with the shapes. Every
tensor is converted, nothing is dropped silently: a name the model lacks, a parameter the
checkpoint lacks or a shape that disagrees is a ValueError naming each.

Conversions (torchvision -> zoo):
- Convolutions: weight (O, I, kh, kw) -> kernel (kh, kw, I, O); Linear (out, in) -> (in, out).
- BatchNorm2d and FrozenBatchNorm2d (the pretrained detectors' norm; eps 1e-5 in both):
  weight, bias -> params scale, bias; running_mean, running_var -> batch_stats mean, var;
  num_batches_tracked is ignored.
- Flatten order: torchvision flattens NCHW maps before its first Linear, so an input feature
  index is c * h * w + y * w + x; the zoo's maps are NHWC. VGG's classifier.0 (4096, 512 * 7 * 7)
  becomes fc6's 7 x 7 x 512 x 4096 convolution kernel, and the box head's fc6 (1024, 256 * 7 * 7)
  has its rows permuted to the (y, x, c) order of our flattened (7, 7, 256) RoI features.
- ConvTranspose2d (mask head's conv5_mask): weight (I, O, kh, kw) -> kernel (kh, kw, I, O)
  flipped in both spatial axes (flax's ConvTranspose correlates with the kernel unflipped).

Models:
  resnet50   torchvision.models.resnet50 (any `ResNet(Bottleneck, ...)` state dict) ->
             zoo.backbones.ResNet(blocks, width, num_classes, norm="batch"): its outputs["logits"]
             are torchvision's logits, "C2".."C5" the outputs of layer1..layer4 (NHWC).
  vgg16      torchvision.models.vgg16 -> zoo.backbones.VGG16(widths, fc_width, num_classes)
             (features.{0, 2, 5, ...} -> conv1_1 .. conv5_3, classifier.{0, 3, 6} -> fc6, fc7, fc8
             as convolutions). On a 224 x 224 image, outputs["fc8"][:, 3, 3] are torchvision's
             logits (its adaptive 7 x 7 average pool is then the identity and fc6's "same"-padded
             7 x 7 window at the centre sees exactly pool5); other sizes give the fully
             convolutional map, not torchvision's resized classifier input. vgg16_bn is not
             supported (its BN tensors are reported as names the model lacks).
  fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn
             -> zoo.detection.two_stage.FasterRCNN ("faster_rcnn_r50_fpn" / "mask_rcnn_r50_fpn")
             with torchvision's RoI pooling: norm="frozen", roi_heads sampling_ratio=2,
             aligned=False (MultiScaleRoIAlign); num_classes = torchvision's num_classes - 1 (the
             zoo's count excludes the background class, torchvision's includes it: 91 -> 90 for
             COCO); blocks, width, fpn_width, representation_size, mask_width from the
             shapes. Names are torchvision's module paths with "/" for "." (backbone/body,
             backbone/fpn, rpn/head, roi_heads/{box_head, box_predictor, mask_head,
             mask_predictor}), list indices as flax's (inner_blocks.0 -> inner_blocks_0), and
             torchvision >= 0.13's Conv2dNormActivation wrappers read as the plain convolutions
             they were before (inner_blocks.{i}.0, rpn.head.conv.0.0, mask_head.{i}.0 ->
             mask_fcn{i+1}).
             Known differences from torchvision that remain (they change no weights): the zoo's
             inference takes images whose sides are multiples of 32 and does not resize them
             (torchvision resizes to min_size 800 / max_size 1333 and pads); the zoo's P6
             anchors use stride 64 where torchvision uses image size // P6 grid size (the same
             when the sides are multiples of 64); RoIs are assigned to FPN levels with
             detectron2's floor(4 + log2(sqrt(area) / 224 + 1e-8)) where torchvision's
             LevelMapper adds its 1e-6 after the log2 (they disagree only for boxes within a
             relative 1e-6 below a level boundary); and detection_candidates caps the boxes
             entering the final NMS (torchvision has no cap).
"""

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np

from zoo import factory
from zoo.backbones.resnet import RESNET_BLOCKS, ResNet
from zoo.backbones.vgg import STAGE_DEPTHS, VGG16
from zoo.detection.roi_heads import ROIHeadsConfig
from zoo.weights.conversion import convert_state

MODELS = ("resnet50", "vgg16", "fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn")
_REGISTRY_NAMES = {"fasterrcnn_resnet50_fpn": "faster_rcnn_r50_fpn",
                   "maskrcnn_resnet50_fpn": "mask_rcnn_r50_fpn"}
# torchvision's detection RoI heads: MultiScaleRoIAlign(sampling_ratio=2), aligned=False.
TORCHVISION_ROI_HEADS = dict(sampling_ratio=2, aligned=False)
_POOLED = 7  # the box head's RoI resolution (TwoMLPHead reads 256 * 7 * 7 features)

_same = lambda a: a
_hwio = lambda a: a.transpose(2, 3, 1, 0) if a.ndim == 4 else a          # OIHW -> HWIO
_dense = lambda a: a.T if a.ndim == 2 else a                             # (out, in) -> (in, out)
_kernel = lambda a: _hwio(_dense(a))                                     # a Conv2d's or a Linear's
# ConvTranspose2d (I, O, kh, kw) -> flax ConvTranspose (kh, kw, I, O), spatially flipped.
_transposed_conv = lambda a: a[:, :, ::-1, ::-1].transpose(2, 3, 0, 1) if a.ndim == 4 else a


def _nchw_flattened(a, size=_POOLED):
  """Linear weight (out, C * size * size) over an NCHW-flattened map -> kernel (size, size, C,
  out); unchanged when the input width is not C * size * size."""
  if a.ndim != 2 or a.shape[1] % (size * size):
    return a
  return a.reshape(a.shape[0], -1, size, size).transpose(2, 3, 1, 0)


def _box_fc6(a):
  """The box head's fc6 (R, C * 7 * 7) over NCHW-flattened RoI features -> Dense kernel
  (7 * 7 * C, R) whose rows follow our NHWC flatten (y, x, c)."""
  kernel = _nchw_flattened(a)
  return kernel.reshape(-1, a.shape[0]) if kernel.ndim == 4 else _dense(a)


def which_model(state) -> str:
  """One of MODELS, told from a torchvision state dict's names."""
  if any(name.startswith("backbone.body.") for name in state):
    if any(name.startswith("roi_heads.mask_") for name in state):
      return "maskrcnn_resnet50_fpn"
    return "fasterrcnn_resnet50_fpn"
  if any(name.startswith("features.") for name in state) and any(
      name.startswith("classifier.") for name in state):
    return "vgg16"
  if any(name.startswith("layer1.") for name in state):
    return "resnet50"
  raise ValueError("torchvision: cannot tell which model this state dict is (no backbone.body.*, "
                   "features.* + classifier.* or layer1.* names); pass model= one of "
                   f"{MODELS}.")


def load(state, *, model: str | None = None, **hyperparameters):
  """(model, variables) from a torchvision state dict (name -> array, `module.` prefixes allowed).

  Args:
    state: torchvision's `model.state_dict()` as NumPy arrays (any float dtype).
    model: one of MODELS; None tells it from the names.
    **hyperparameters: the zoo model's (ResNet's, VGG16's or RCNN's fields); unset ones come
      from the checkpoint's shapes (module doc).

  Raises:
    ValueError naming every unknown, missing or mis-shaped tensor.
  """
  state = {name.removeprefix("module."): np.asarray(array) for name, array in state.items()}
  model = model or which_model(state)
  if model not in MODELS:
    raise ValueError(f"torchvision: model={model!r} is not one of {MODELS}.")
  if model == "resnet50":
    return _load_resnet(state, **hyperparameters)
  if model == "vgg16":
    return _load_vgg(state, **hyperparameters)
  return _load_rcnn(state, model, **hyperparameters)


def _check_names(cls, hyperparameters, model):
  accepted = [f for f in cls.__dataclass_fields__ if f not in ("parent", "name")]
  unknown = sorted(set(hyperparameters) - set(accepted))
  if unknown:
    raise ValueError(f"torchvision ({model}): no hyper-parameter {', '.join(map(repr, unknown))}; "
                     f"{cls.__name__} takes {', '.join(accepted)}.")


def _expected(module, size, **kwargs):
  """Our variables' shapes: {"params": ..., "batch_stats": ...} of ShapeDtypeStructs."""
  return flax.core.unfreeze(jax.eval_shape(lambda: module.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False, **kwargs)))


def _block_counts(state, prefix):
  """Bottlenecks per layer from `{prefix}layer{k}.{i}.` names: (n1, n2, n3, n4)."""
  counts = []
  for stage in range(1, 5):
    found = {int(m.group(1)) for name in state
             for m in [re.match(rf"{re.escape(prefix)}layer{stage}\.(\d+)\.", name)] if m}
    counts.append(max(found) + 1 if found else 0)
  return tuple(counts)


def _shape(state, name, axis=0, default=None):
  return state[name].shape[axis] if name in state and state[name].ndim > axis else default


def _resnet_rename(name, root):
  """A torchvision ResNet (Bottleneck) name without its prefix -> ((collection, *root, ...), fn)."""
  *path, leaf = name.split(".")
  module = path[-1] if path else ""
  is_norm = re.fullmatch(r"bn\d", module) or path[-2:] == ["downsample", "1"]
  if leaf == "num_batches_tracked" and is_norm:
    return None
  if is_norm:
    collection, ours = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                        "running_mean": ("batch_stats", "mean"),
                        "running_var": ("batch_stats", "var")}.get(leaf, ("torchvision", leaf))
    return (collection, *root, *path, ours), _same
  if leaf == "weight" and (re.fullmatch(r"conv\d", module) or path[-2:] == ["downsample", "0"]):
    return ("params", *root, *path, "kernel"), _hwio
  if path == ["fc"]:
    return (("params", *root, "fc", "kernel"), _dense) if leaf == "weight" else (
        ("params", *root, "fc", leaf), _same)
  return ("torchvision", name), _same  # not ours: convert_state names it


def _load_resnet(state, **hyperparameters):
  blocks = _block_counts(state, "")
  h = dict(blocks=blocks if min(blocks) > 0 else RESNET_BLOCKS["resnet50"],
           width=_shape(state, "conv1.weight", 0, 64),
           num_classes=_shape(state, "fc.weight", 0), norm="batch")
  _check_names(ResNet, hyperparameters, "resnet50")
  module = ResNet(**{**h, **hyperparameters})
  expected = _expected(module, 64)
  variables = convert_state(state, lambda n: _resnet_rename(n, ()), expected,
                            "torchvision (resnet50)")
  return module, variables


def _vgg_conv_names():
  """torchvision's features.{index} -> our conv{stage}_{i} for configuration D without BN."""
  names, index = {}, 0
  for stage, depth in enumerate(STAGE_DEPTHS, start=1):
    for i in range(1, depth + 1):
      names[index] = f"conv{stage}_{i}"
      index += 2          # Conv2d, ReLU
    index += 1            # MaxPool2d
  return names


def _load_vgg(state, **hyperparameters):
  convs = _vgg_conv_names()
  last_conv = max(convs)
  stage_ends = {int(name[4]): index for index, name in sorted(convs.items())}  # conv{stage}_{i}
  widths = tuple(_shape(state, f"features.{stage_ends[s]}.weight", 0, 0) for s in range(1, 6))
  h = dict(widths=widths if min(widths) > 0 else (64, 128, 256, 512, 512),
           fc_width=_shape(state, "classifier.0.weight", 0, 4096),
           num_classes=_shape(state, "classifier.6.weight", 0, 1000))
  _check_names(VGG16, hyperparameters, "vgg16")
  module = VGG16(**{**h, **hyperparameters})
  expected = _expected(module, 32)
  fc = {"0": ("fc6", _nchw_flattened), "3": ("fc7", lambda a: _dense(a)[None, None]),
        "6": ("fc8", lambda a: _dense(a)[None, None])}

  def rename(name):
    match = re.fullmatch(r"features\.(\d+)\.(weight|bias)", name)
    if match and int(match.group(1)) in convs:
      layer = convs[int(match.group(1))]
      return (("params", layer, "kernel"), _hwio) if match.group(2) == "weight" else (
          ("params", layer, "bias"), _same)
    match = re.fullmatch(r"classifier\.(\d+)\.(weight|bias)", name)
    if match and match.group(1) in fc:
      layer, convert = fc[match.group(1)]
      return (("params", layer, "kernel"), convert) if match.group(2) == "weight" else (
          ("params", layer, "bias"), _same)
    return ("torchvision", name), _same

  hints = {("params", "fc6", "kernel"): (
      f"torchvision's classifier.0 reads pool5 ({h['widths'][-1]} channels after "
      f"features.{last_conv}) average-pooled to 7 x 7 and flattened NCHW.")}
  variables = convert_state(state, rename, expected, "torchvision (vgg16)", hints)
  return module, variables


# torchvision >= 0.13 wraps the FPN's, the RPN head's and the mask head's convolutions in
# Conv2dNormActivation (a Sequential, hence a ".0"); before, they were plain convolutions named
# as our modules are. Older names are the zoo's; a list index ".i" is flax's "_i".
_TORCHVISION_013 = ((re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d)\.0\."), r"\1."),
                    (re.compile(r"^rpn\.head\.conv\.0\.0\."), "rpn.head.conv."),
                    (re.compile(r"^roi_heads\.mask_head\.(\d)\.0\."),
                     lambda m: f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}."))
_LIST_INDEX = re.compile(r"_blocks\.(\d)\.")


def _rcnn_rename(name):
  """A torchvision R-CNN name -> ((collection, *our path), convert): the same module path with
  "/" for "." (module doc), the ResNet body through `_resnet_rename`."""
  if name.startswith("backbone.body."):
    return _resnet_rename(name.removeprefix("backbone.body."), ("backbone", "body"))
  for pattern, replacement in _TORCHVISION_013:
    name_013 = name
    name = pattern.sub(replacement, name)
    if name != name_013:
      break
  *path, leaf = _LIST_INDEX.sub(r"_blocks_\1.", name).split(".")
  if leaf == "bias":
    return ("params", *path, "bias"), _same
  if leaf != "weight" or not path:
    return ("torchvision", name), _same
  convert = {"fc6": _box_fc6, "conv5_mask": _transposed_conv}.get(path[-1], _kernel)
  return ("params", *path, "kernel"), convert


def _load_rcnn(state, model, **hyperparameters):
  masks = model == "maskrcnn_resnet50_fpn"
  blocks = _block_counts(state, "backbone.body.")
  inferred = dict(blocks=blocks if min(blocks) > 0 else None,
                  width=_shape(state, "backbone.body.conv1.weight", 0),
                  fpn_width=_shape(state, "rpn.head.cls_logits.weight", 1),
                  representation_size=_shape(state, "roi_heads.box_head.fc6.weight", 0),
                  num_classes=(_shape(state, "roi_heads.box_predictor.cls_score.weight", 0, 92)
                               - 1))
  if masks:
    inferred["mask_width"] = _shape(state, "roi_heads.mask_predictor.conv5_mask.weight", 1)
  inferred = {k: v for k, v in inferred.items() if v is not None}
  roi_heads = hyperparameters.pop("roi_heads", None)
  if not isinstance(roi_heads, ROIHeadsConfig):   # torchvision's pooler unless told otherwise
    roi_heads = {**TORCHVISION_ROI_HEADS, **dict(roi_heads or {})}
  module = factory.create(_REGISTRY_NAMES[model], norm="frozen", roi_heads=roi_heads,
                          **{**inferred, **hyperparameters})
  expected = _expected(module, 64)
  fc6, cls_score = ("params", "roi_heads", "box_head", "fc6"), ("params", "roi_heads",
                                                                "box_predictor", "cls_score")
  hints = {(*fc6, "kernel"): (
      f"torchvision's box head reads fpn_width x {_POOLED} x {_POOLED} RoI features "
      "(flattened NCHW) into representation_size units.")}
  for leaf in ("kernel", "bias"):
    hints[(*cls_score, leaf)] = ("torchvision's num_classes counts the background; the zoo's "
                                 "does not (give it minus one).")
  variables = convert_state(state, _rcnn_rename, expected, f"torchvision ({model})", hints)
  return module, variables
