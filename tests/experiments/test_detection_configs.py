"""The detection and segmentation configs (the transformers' are in test_transformer_configs.py): every variant resolves and builds its model and task;
the smoke variants train and evaluate end to end on the tiny digit canvases (a few steps, 1
device) with a finite, falling training loss, Fast R-CNN also from proposal files through the
data pipeline."""

import math

import pytest

from experiments.configs import deeplab, fast_rcnn, fcn, mask_rcnn
from zoo.data.standin_proposals import split_proposals
from zoo import training
from zoo.data import load_data_source, proposal_files
from zoo.training.trainer import create_model
from tests.training import logged

DATASET = "digit_canvases/tiny"
VARIANTS = {
    mask_rcnn: ("", "faster", "smoke", "voc", "coco", "coco_boxes"),
    fast_rcnn: ("", "spp", "roi_align", "file", "voc", "faster", "smoke"),
    fcn: ("", "fcn32s", "fcn16s", "smoke", "voc", "pet"),
    deeplab: ("", "postprocess", "crf_trainable", "largefov", "v2", "smoke", "voc", "pet"),
}


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.parametrize("module, variant", [(m, v) for m, vs in VARIANTS.items() for v in vs],
                         ids=lambda x: getattr(x, "__name__", x))
def test_variant_resolves_and_builds(module, variant):
  config = module.get_config(variant)
  assert config.model.num_classes == config.task.num_classes
  assert config.optimizer.warmup_steps < config.total_steps
  create_model(config.model)
  training.task.create_task(config.task)


@pytest.mark.parametrize("module", [mask_rcnn, fast_rcnn, fcn, deeplab])
def test_unknown_variant_names_the_choices(module):
  with pytest.raises(ValueError, match="choose"):
    module.get_config("paper_size")


def smoke(config, tiny_data_dir):
  config.data.name = DATASET
  config.data.data_dir = tiny_data_dir
  config.mesh.num_devices = 1
  config.eval_every = 0
  return config


@pytest.mark.parametrize("module", [fast_rcnn, mask_rcnn],
                         ids=["fast_rcnn", "mask_rcnn"])
def test_smoke_variant_trains_and_evaluates(module, tiny_data_dir, tmp_path):
  config = smoke(module.get_config("smoke"), tiny_data_dir)
  # Two steps (the first at warm-up's learning rate 0) cannot show the loss falling; six
  # logged as two means of three can (the steps after compilation take ~0.1 s each).
  config.update(total_steps=6, log_every=3)
  results = training.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["step"] == config.total_steps
  logged.assert_loss_finite_and_falling(str(tmp_path / "run"))
  for split in config.final_eval_splits:
    assert 0.0 <= results[split]["box_AP"] <= 1.0
    assert math.isfinite(results[split]["box_AP"])


@pytest.mark.parametrize("module", [fcn, deeplab], ids=["fcn", "deeplab"])
def test_segmentation_smoke_variant_trains_and_evaluates(module, tiny_data_dir, tmp_path):
  config = smoke(module.get_config("smoke"), tiny_data_dir)
  results = training.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["step"] == config.total_steps
  logged.assert_loss_finite_and_falling(str(tmp_path / "run"))
  for split in config.final_eval_splits:
    assert 0.0 <= results[split]["miou"] <= 1.0


def test_fast_rcnn_trains_from_proposal_files(tiny_data_dir, tmp_path):
  config = smoke(fast_rcnn.get_config("file"), tiny_data_dir)
  config.update(batch_size=2, eval_batch_size=8, total_steps=2, log_every=1, checkpoint_every=2,
                final_eval_splits=("validation",))
  config.optimizer.warmup_steps = 1
  pattern = str(tmp_path / "proposals_{split}.npz")
  config.data.proposals = pattern
  for split in ("train", "validation"):
    boxes = split_proposals(load_data_source(DATASET, split, data_dir=tiny_data_dir),
                            num_proposals=config.data.max_proposals,
                            copies=16, seed=0,
                            max_objects=config.data.max_objects)
    proposal_files.save_proposals(pattern.replace("{split}", split), boxes)
  results = training.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["step"] == 2 and math.isfinite(results["validation"]["box_AP"])
