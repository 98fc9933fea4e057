"""The Swin and ViT configs: every variant resolves, builds its model and task, and the smoke
variants train and evaluate end to end on the tiny digit canvases (a few steps, 1 device)."""

import math

import pytest

from experiments.configs import swin as swin_config
from experiments.configs import vit as vit_config
from zoo import training
from tests.training import logged

DATASET = "digit_canvases/tiny"
VARIANTS = [(swin_config, v) for v in ("", "smoke", "segmentation", "segmentation,smoke",
                                        "res=96")] + [
    (vit_config, v) for v in ("", "smoke", "res=96")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.parametrize("module, variant", VARIANTS, ids=lambda x: getattr(x, "__name__", x))
def test_variant_resolves(module, variant):
  config = module.get_config(variant)
  assert config.model.num_classes == config.task.num_classes
  assert config.optimizer.warmup_steps < config.total_steps


@pytest.mark.parametrize("module", [swin_config, vit_config])
def test_unknown_variant_names_the_choices(module):
  with pytest.raises(ValueError, match="choose"):
    module.get_config("paper_size")


@pytest.mark.parametrize("module, variant", [(swin_config, "smoke"),
                                             (swin_config, "segmentation,smoke"),
                                             (vit_config, "smoke")],
                         ids=["swin", "swin_segmentation", "vit"])
def test_smoke_variant_trains_and_evaluates(module, variant, data_dir, tmp_path):
  config = module.get_config(variant)
  config.data.name = DATASET
  config.data.data_dir = data_dir
  config.mesh.num_devices = 1
  config.eval_every = 0
  results = training.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["step"] == config.total_steps
  logged.assert_loss_finite_and_falling(str(tmp_path / "run"))
  for split in config.final_eval_splits:
    metric = "miou" if config.task.name == "semantic_segmentation" else "decision_accuracy"
    assert 0.0 <= results[split][metric] <= 1.0 and math.isfinite(results[split][metric])
