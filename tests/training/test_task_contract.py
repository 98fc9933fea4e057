"""The task contract (zoo.training.task) takes more than one image per model call, and a
composite task reports every head's metrics from one evaluation.

Both run through the unchanged trainer (`train_and_evaluate`) on the tiny digit canvases:
- an image-pair regressor: the model gets two images (`first`, `second`: a canvas and the next
  canvas of the batch) and predicts how much more ink (mean intensity, in percent) the first
  holds than the second;
- a two-head network (segmentation + which-digits classification) under the `multitask` task.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import unet as unet_config
from zoo import training, visualization
from zoo.registry import register_model
from zoo.training import task as task_lib
from zoo.training.task import SumEvaluator, Task, register_task
from tests.training import logged

DATASET = "digit_canvases/tiny"


class PairEncoder(nn.Module):
  """Two convolutions and a global average: (B, H, W, 3) -> (B, width)."""
  width: int = 16

  @nn.compact
  def __call__(self, x):
    for _ in range(2):
      x = nn.relu(nn.Conv(self.width, (3, 3), strides=2)(x))
    return x.mean((1, 2))


class CountDifference(nn.Module):
  """A Siamese regressor: one shared encoder for both images, a linear head on the pair."""

  @nn.compact
  def __call__(self, first, second, *, train: bool):
    del train
    encoder = PairEncoder()
    a, b = encoder(first), encoder(second)
    return nn.Dense(1)(jnp.concatenate([a, b, a - b], -1))[:, 0], {}


@register_model("test_count_difference")
def count_difference():
  return CountDifference()


@register_task("test_count_difference")
class CountDifferenceTask(Task):
  """Regresses 100 x (mean intensity of image i - that of image i + 1 of the batch); RMSE
  over a split."""

  features = ("image",)

  def model_inputs(self, batch, *, train):
    del train
    return {"first": batch["image"], "second": jnp.roll(batch["image"], -1, axis=0)}

  def _targets(self, batch):
    ink = 100 * batch["image"].mean((1, 2, 3))
    return ink - jnp.roll(ink, -1, axis=0)

  def loss(self, predicted, batch):
    loss = jnp.mean((predicted - self._targets(batch)) ** 2)
    return loss, {"loss": loss}

  def eval_outputs(self, predicted, batch):
    # Pairs that touch a padding row do not count.
    valid = batch["example_valid"] & jnp.roll(batch["example_valid"], -1)
    return {"squared_error": jnp.sum(jnp.where(valid, (predicted - self._targets(batch)) ** 2, 0)),
            "pairs": valid.sum()}

  def evaluator(self):
    return SumEvaluator(lambda s: {"rmse": float(np.sqrt(s["squared_error"] / max(s["pairs"], 1))),
                                   "pairs": int(s["pairs"])})

  def draw(self, batch, predictions, index, class_names=None):
    del class_names
    first = visualization.to_uint8(batch["image"][index])
    second = visualization.to_uint8(np.roll(batch["image"], -1, axis=0)[index])
    return [first, second]


class SegmentAndClassify(nn.Module):
  """A shared trunk with two heads: per-pixel logits and which-digits logits."""
  num_segmentation_classes: int = 11
  num_classes: int = 10

  @nn.compact
  def __call__(self, images, *, train: bool):
    del train
    x = nn.relu(nn.Conv(16, (3, 3))(images))
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    return {"segmentation": nn.Conv(self.num_segmentation_classes, (1, 1))(x),
            "classes": nn.Dense(self.num_classes)(x.max((1, 2)))}, {}


@register_model("test_segment_and_classify")
def segment_and_classify():
  return SegmentAndClassify()


def config_for(model_name, task, data_dir, total_steps=30):
  config = unet_config.get_config("smoke")
  config.model = ml_collections.ConfigDict({"name": model_name})
  config.task = ml_collections.ConfigDict(task)
  config.data.name = DATASET
  config.data.data_dir = data_dir
  config.mesh.num_devices = 1
  config.total_steps = total_steps
  config.log_every = 1
  config.checkpoint_every = total_steps
  config.eval_every = 0
  config.optimizer.learning_rate = 3e-3
  config.final_eval_splits = ("validation",)
  return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def test_unknown_task_is_named():
  with pytest.raises(ValueError, match="Unknown task.name 'segmentaton'.*semantic_segmentation"):
    task_lib.create_task(ml_collections.ConfigDict({"name": "segmentaton"}))


def test_a_task_must_implement_the_whole_contract():
  class Incomplete(Task):
    features = ("image",)

    def model_inputs(self, batch, *, train):
      return {"images": batch["image"]}

  with pytest.raises(TypeError, match="abstract"):
    Incomplete()


def test_image_pair_model_trains_through_the_trainer(data_dir, tmp_path):
  config = config_for("test_count_difference", {"name": "test_count_difference"}, data_dir,
                      total_steps=80)
  workdir = str(tmp_path / "pair")
  results = training.train_and_evaluate(config, workdir)
  losses = logged.training_losses(workdir)
  print("pair losses", losses[:3], "...", losses[-3:], "results", results)
  assert len(losses) == config.total_steps and np.all(np.isfinite(losses))
  assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20])
  assert results["validation"]["pairs"] > 0 and np.isfinite(results["validation"]["rmse"])

  # Evaluation and prediction go through the same contract.
  experiment = training.Experiment(config)
  state = experiment.restore(workdir)
  batch = next(iter(experiment.eval_batches("validation")))
  panels = experiment.task.draw(batch, experiment.predict(state, batch), 0)
  assert [p.shape for p in panels] == [batch["image"].shape[1:]] * 2


def test_composite_task_reports_both_heads_from_one_evaluation(data_dir, tmp_path):
  task = {"name": "multitask",
          "tasks": {"segmentation": {"name": "semantic_segmentation", "num_classes": 11},
                    "classes": {"name": "multi_label_classification", "num_classes": 10}},
          "weights": {"classes": 0.5}}
  config = config_for("test_segment_and_classify", task, data_dir)
  workdir = str(tmp_path / "multitask")
  results = training.train_and_evaluate(config, workdir)
  losses = logged.training_losses(workdir)
  print("multitask losses", losses[:3], "...", losses[-3:], "results", results)
  assert np.all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5])
  metrics = results["validation"]
  assert 0 <= metrics["segmentation/miou"] <= 1 and 0 <= metrics["classes/exact_accuracy"] <= 1
  assert {"segmentation/pixel_accuracy", "classes/f1", "segmentation/iou/0"} <= set(metrics)

  # The composite evaluation equals each head's own evaluation.
  experiment = training.Experiment(config)
  state = experiment.restore(workdir)
  for head, sub_task in experiment.task.tasks.items():
    evaluator = sub_task.evaluator()
    for batch in experiment.eval_batches("validation"):
      logits = jax.device_get(experiment.model.apply(
          {"params": state.params, **state.model_state}, batch["image"], train=False)[0][head])
      evaluator.update(jax.device_get(sub_task.eval_outputs(logits, batch)), batch)
    for name, value in evaluator.result().items():
      np.testing.assert_allclose(metrics[f"{head}/{name}"], value, rtol=1e-6)


def test_multitask_rejects_weights_of_unknown_heads():
  with pytest.raises(ValueError, match="names heads \\['clases'\\]"):
    task_lib.create_task(ml_collections.ConfigDict({
        "name": "multitask", "tasks": {"classes": {"name": "multi_label_classification",
                                                   "num_classes": 10}},
        "weights": {"clases": 1.0}}))


def test_every_family_task_checks_its_labels():
  """`check_batch` names the data's label range and the field to change; in-range labels,
  ignored pixels and padding objects pass."""
  segmentation = task_lib.create_task(ml_collections.ConfigDict(
      {"name": "semantic_segmentation", "num_classes": 5}))
  pixels = np.array([[[0, 4], [255, 3]]])
  segmentation.check_batch({"segmentation": pixels})
  with pytest.raises(ValueError, match=r"segmentation labels \(ignore label 255 aside\) range over "
                     r"\[0, 7\], but num_classes=5 .*--config.model.num_classes .*8 or more"):
    segmentation.check_batch({"segmentation": np.where(pixels == 3, 7, pixels)})

  objects = {"labels": np.array([[2, 9, 0]]), "objects_valid": np.array([[True, False, False]])}
  for name in ("multi_label_classification", "detection"):
    task = task_lib.create_task(ml_collections.ConfigDict({"name": name, "num_classes": 3}))
    task.check_batch(objects)  # 9 is padding
    with pytest.raises(ValueError, match=r"object labels range over \[2, 9\], but num_classes=3"):
      task.check_batch(dict(objects, objects_valid=np.array([[True, True, False]])))

  both = task_lib.create_task(ml_collections.ConfigDict({"name": "multitask", "tasks": {
      "segmentation": {"name": "semantic_segmentation", "num_classes": 11},
      "classes": {"name": "multi_label_classification", "num_classes": 3}}}))
  with pytest.raises(ValueError, match="object labels range over"):
    both.check_batch(dict(objects, segmentation=pixels, objects_valid=np.ones((1, 3), bool)))


def test_task_config_fields_are_checked():
  with pytest.raises(ValueError, match=r"task.classes is not a field of task "
                     r"'multi_label_classification'; it takes: num_classes"):
    task_lib.create_task(ml_collections.ConfigDict({"name": "multi_label_classification",
                                                    "classes": 3}))
  with pytest.raises(ValueError, match="needs task.num_classes"):
    task_lib.create_task(ml_collections.ConfigDict({"name": "semantic_segmentation"}))


def test_segmentation_drawing_names_the_classes_drawn():
  task = task_lib.create_task(ml_collections.ConfigDict(
      {"name": "semantic_segmentation", "num_classes": 11}))
  target = np.zeros((1, 16, 16), np.int32)  # Panels 64 pixels tall: the legend has 4 rows.
  target[0, :4] = 3
  prediction = np.zeros((1, 16, 16), np.int32)
  prediction[0, 4:] = 5
  batch = {"image": np.full((1, 16, 16, 3), 0.5, np.float32), "segmentation": target}
  panels = task.draw(batch, prediction, 0, class_names=[f"class {c}" for c in range(11)])
  assert len(panels) == 4 and len({p.shape[0] for p in panels}) == 1
  legend = panels[-1]
  # One swatch per class drawn (3 and 5, not the uncoloured 0), in the overlay's colours.
  for row, colour in enumerate(visualization.colorize(np.array([3, 5]))):
    assert np.all(legend[4 + 14 * row + 5, 4 + 5] == colour)
  assert np.all(legend[4 + 14 * 2 + 5] == 255)
