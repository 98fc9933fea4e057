"""experiments/configs/common.py and the configs built on it: every variant that existed before
the configs became composable resolves to the same values (golden/configs_before_composable.json,
written by golden/make_configs_golden.py at 5718333); the variant parser; combined variants;
values tied across sections."""

import copy
import importlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from experiments.configs import common
from zoo.data import digit_canvases
from zoo.training.task import create_task
from zoo.training.trainer import create_model

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "configs_before_composable.json")
CONFIGS = ("unet", "swin", "vit", "fcn", "deeplab", "mask_rcnn", "fast_rcnn")
# Old variant names that became combinations.
RENAMED = {("swin", "segmentation_smoke"): "segmentation,smoke"}
# Fields the comparison leaves out, on both sides, each changed on purpose: (config, variant or
# None for every variant, dotted path).
EXCLUDED = (
    # Every config can start from another run's parameters (trainer's init_from), not only deeplab.
    *((name, None, "init_from") for name in CONFIGS if name != "deeplab"),
    # The paper-sized detectors' model and task share rpn_batch_size_per_image (a FieldReference);
    # 256 is also the model's default, which those model sections used before.
    *(("mask_rcnn", variant, "model.rpn_batch_size_per_image")
      for variant in ("voc", "coco", "coco_boxes")),
    # ... now as model.rpn.batch_size_per_image.
    *(("mask_rcnn", variant, "model.rpn") for variant in ("voc", "coco", "coco_boxes")),
    # Faster R-CNN takes no mask head width (one registered function per variant).
    ("mask_rcnn", "faster", "model.mask_channels"),
    # Fast R-CNN's stand-in proposals moved from the model to the data (data.proposals: their
    # settings, data.max_proposals: their slots); the task reads them from the batch.
    *(("fast_rcnn", variant, path) for variant in ("", "spp", "roi_align", "smoke")
      for path in ("model.num_proposals", "model.proposal_copies", "data.proposals",
                   "data.max_proposals", "task.proposals")),
    *(("fast_rcnn", "file", path) for path in ("model.num_proposals", "model.proposal_copies")),
    # faster_rcnn_vgg16: anchor sizes per level (one level), the RPN conv as wide as conv5_3.
    *(("fast_rcnn", "faster", path) for path in ("model.anchor_sizes", "model.rpn.anchor_sizes",
                                                 "model.rpn_channels")),
    # The detection task normalises the RPN loss by the anchors the model sampled (their count
    # is in its outputs): the RPN batch size is the model's alone.
    *(("mask_rcnn", variant, "task.rpn_batch_size_per_image")
      for variant in ("", "smoke", "faster", "voc", "coco", "coco_boxes")),
    ("fast_rcnn", "faster", "task.rpn_batch_size_per_image"),
    # VOC is scored as its benchmark defines it (the devkit's 11-point AP), not with COCO AP.
    ("mask_rcnn", "voc", "task.evaluation"), ("fast_rcnn", "voc", "task.evaluation"),
)
# Hyper-parameters renamed since the golden file, with their values kept: (config, old dotted
# path, new dotted path). A rename in a config section adds its line here.
RENAMED_FIELDS = (
    ("unet", "model.base_width", "model.width"),
    ("swin", "model.in_chans", "model.in_channels"),
    ("deeplab", "model.resnet_blocks", "model.blocks"),
    ("deeplab", "model.resnet_width", "model.width"),
    ("deeplab", "model.vgg_widths", "model.widths"),
    # The detectors' stage hyper-parameters became nested dicts (zoo.detection.rpn.RPNConfig,
    # zoo.detection.roi_heads.ROIHeadsConfig).
    *((name, f"model.rpn_{old}", f"model.rpn.{new}") for name in ("mask_rcnn", "fast_rcnn")
      for old, new in (("pre_nms_top_n_train", "pre_nms_topk_train"),
                       ("post_nms_top_n_train", "post_nms_topk_train"),
                       ("pre_nms_top_n_test", "pre_nms_topk_test"),
                       ("post_nms_top_n_test", "post_nms_topk_test"),
                       ("batch_size_per_image", "batch_size_per_image"))),
    *((name, f"model.{old}", f"model.roi_heads.{new}") for name in ("mask_rcnn", "fast_rcnn")
      for old, new in (("box_batch_size_per_image", "batch_size_per_image"),
                       ("detections_per_image", "detections_per_image"),
                       ("detection_candidates", "detection_candidates"))),
    ("mask_rcnn", "model.anchor_sizes", "model.rpn.anchor_sizes"),
    ("mask_rcnn", "model.fpn_channels", "model.fpn_width"),
    ("mask_rcnn", "model.mask_channels", "model.mask_width"),
)
# Registry names renamed since the golden file (one scheme: family_variant_backbone).
RENAMED_MODELS = {"fcn32s_vgg16": "fcn_32s_vgg16", "fcn16s_vgg16": "fcn_16s_vgg16",
                  "fcn8s_vgg16": "fcn_8s_vgg16", "deeplab_v2_resnet50": "deeplab_v2_r50",
                  "deeplab_v3_resnet50": "deeplab_v3_r50", "swin_segmenter": "semantic_fpn_swin"}


def config_module(name):
  return importlib.import_module(f"experiments.configs.{name}")


def golden_cases():
  with open(GOLDEN) as f:
    golden = json.load(f)
  return [(name, variant, resolved) for name, variants in golden.items()
          for variant, resolved in variants.items()]


def pop(tree: dict, path: str, default=None):
  """Removes and returns tree[a][b][c] for path "a.b.c" (`default` where it is absent)."""
  *parents, leaf = path.split(".")
  for parent in parents:
    tree = tree.get(parent, {})
  return tree.pop(leaf, default)


def put(tree: dict, path: str, value):
  *parents, leaf = path.split(".")
  for parent in parents:
    tree = tree.setdefault(parent, {})
  tree[leaf] = value


@pytest.mark.parametrize("name, variant, before", golden_cases(),
                         ids=lambda x: x if isinstance(x, str) else "")
def test_variant_resolves_as_before(name, variant, before):
  resolved = config_module(name).get_config(RENAMED.get((name, variant), variant)).to_dict()
  after = json.loads(json.dumps(resolved))  # tuples -> lists, as in the golden file
  before = copy.deepcopy(before)
  for config, excluded_variant, path in EXCLUDED:
    if config == name and excluded_variant in (None, variant):
      pop(before, path)
      pop(after, path)
  missing = object()
  for config, old, new in RENAMED_FIELDS:
    if config == name and (value := pop(before, old, missing)) is not missing:
      put(before, new, value)
  before["model"]["name"] = RENAMED_MODELS.get(before["model"]["name"], before["model"]["name"])
  assert after == before
  # int vs float matters to command-line overrides: compare the JSON text too.
  assert json.dumps(after, sort_keys=True) == json.dumps(before, sort_keys=True)


def test_golden_file_covers_every_config():
  assert sorted({name for name, _, _ in golden_cases()}) == sorted(CONFIGS)


# Combinations that had no name before, and the new `res` option.
COMBINED = {
    "unet": ("paper,smoke", "res=96", "res=96,smoke"),
    "swin": ("smoke,segmentation", "res=96", "segmentation,res=96,smoke"),
    "vit": ("res=96,smoke",),
    "fcn": ("fcn32s,smoke", "fcn16s,voc", "pet,smoke"),
    "deeplab": ("postprocess,smoke", "crf_trainable,smoke", "voc,postprocess", "pet,crf_trainable",
                "largefov,smoke", "v2,smoke", "voc,smoke"),
    "mask_rcnn": ("faster,smoke", "coco,faster", "voc,smoke", "coco_boxes,smoke"),
    "fast_rcnn": ("faster,smoke", "spp,smoke", "roi_align,smoke", "file,smoke", "file,roi_align",
                  "voc,roi_align", "voc,smoke"),
}
ALL_VARIANTS = ([(name, RENAMED.get((name, variant), variant)) for name, variant, _ in golden_cases()]
                + [(name, variant) for name, variants in COMBINED.items() for variant in variants])


@pytest.mark.parametrize("name, variant", [(n, v) for n, vs in COMBINED.items() for v in vs])
def test_combined_variant_builds(name, variant):
  config = config_module(name).get_config(variant)
  assert config.optimizer.warmup_steps < config.total_steps
  create_model(config.model)
  create_task(config.task)


def test_combination_is_order_free():
  assert (config_module("fast_rcnn").get_config("smoke,faster").to_dict()
          == config_module("fast_rcnn").get_config("faster,smoke").to_dict())


@pytest.mark.parametrize("name, variant", ALL_VARIANTS)
def test_num_classes_is_one_value(name, variant):
  config = config_module(name).get_config(variant)
  config.model.num_classes = 5
  assert config.task.num_classes == 5
  config.task.num_classes = 7
  assert config.model.num_classes == 7


def test_proposal_count_is_one_value():
  config = config_module("fast_rcnn").get_config("")
  config.data.max_proposals = 64   # the pipeline's slots and the stand-ins generated
  assert config.data.proposals.num_proposals == 64


def test_command_line_override_reaches_both_sections():
  from absl import flags
  from ml_collections import config_flags
  argv = ["prog", "--config=experiments/configs/mask_rcnn.py:faster,smoke",
          "--config.model.num_classes=5"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  assert config.model.name == "faster_rcnn_r50_fpn" and config.total_steps == 2
  assert config.task.num_classes == 5


@pytest.mark.parametrize("variant", ["", "segmentation"])
def test_swin_at_96_pixels_runs(variant):
  config = config_module("swin").get_config(",".join(filter(None, [variant, "res=96", "smoke"])))
  assert config.data.name == "digit_canvases/canvas96"
  model = create_model(config.model)
  images = jnp.zeros((1, 96, 96, 3))
  variables = jax.eval_shape(lambda key: model.init(key, images, train=False), jax.random.key(0))
  outputs, _ = jax.eval_shape(lambda v: model.apply(v, images, train=False), variables)
  assert outputs.shape[-1] == config.task.num_classes


def test_digit_canvases_sizes_match_the_builder():
  sizes = {config.canvas_size for config in digit_canvases.DigitCanvases.BUILDER_CONFIGS}
  assert sizes == set(common.DIGIT_CANVASES)
  for size, name in common.DIGIT_CANVASES.items():
    builder_config = name.partition("/")[2] or "canvas64"
    assert {c.name: c.canvas_size for c in digit_canvases.DigitCanvases.BUILDER_CONFIGS
            }[builder_config] == size


def test_parse_variant():
  arg = common.parse_variant("res=96, smoke", smoke=False, paper=False, res=64, lr=1e-3,
                             schedule="cosine")
  assert (arg.smoke, arg.paper, arg.res, arg.lr, arg.schedule) == (True, False, 96, 1e-3, "cosine")
  arg = common.parse_variant("lr=0.5,schedule=linear", lr=1e-3, schedule="cosine")
  assert (arg.lr, arg.schedule) == (0.5, "linear")
  assert common.parse_variant("", smoke=False).smoke is False
  with pytest.raises(AttributeError):
    arg.lr = 1.0  # frozen: the options are read, not changed


@pytest.mark.parametrize("argument, message", [
    ("fast", r"Unknown config variant 'fast' in 'fast'; choose from: smoke, res=<int>"),
    ("smoke,smoke", "given twice"),
    ("smoke=1", "is a switch"),
    ("res", "needs a value: write 'res=<int>'"),
    ("res=high", "'high' is not a int"),
])
def test_parse_variant_errors(argument, message):
  with pytest.raises(ValueError, match=message):
    common.parse_variant(argument, smoke=False, res=64)


def test_parse_variant_takes_switches_and_typed_values_only():
  with pytest.raises(ValueError, match="'hires' defaults to True"):
    common.parse_variant("", hires=True)


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_variant_lists_the_accepted_ones(name):
  with pytest.raises(ValueError, match="choose from: .*smoke"):
    config_module(name).get_config("smoke,paper_size")


@pytest.mark.parametrize("name, variant", [
    ("fcn", "voc,pet"), ("fcn", "fcn32s,fcn16s"), ("deeplab", "largefov,v2"),
    ("deeplab", "postprocess,crf_trainable"), ("deeplab", "largefov,voc"),
    ("mask_rcnn", "voc,coco"), ("fast_rcnn", "faster,spp"), ("fast_rcnn", "file,voc"),
    ("swin", "segmentation,res=80"),
])
def test_contradictory_variants_are_refused(name, variant):
  with pytest.raises(ValueError, match="do not combine|choose"):
    config_module(name).get_config(variant)


def test_trainer_config_defaults_and_overrides():
  config = common.trainer_config(batch_size=4, total_steps=10, checkpoint_every=5, eval_every=0,
                                 keep_checkpoints=1, final_eval_splits=("test",))
  assert (config.seed, config.eval_batch_size, config.log_every, config.keep_checkpoints,
          config.final_eval_splits, config.init_from) == (0, 64, 50, 1, ("test",), None)
  assert config.mesh.to_dict() == dict(num_devices=-1, model_axis_size=1)
  assert isinstance(config, ml_collections.ConfigDict)
