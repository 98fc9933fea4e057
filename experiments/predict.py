r"""Writes PNGs of a trained model's predictions beside the ground truth, for a person to look at.

    python -m experiments.predict --workdir=runs/unet --split=test --num_images=16

Each file `<output_dir>/<split>_<index>.png` shows: the image | ground truth | prediction
(segmentation: class colours; detection: boxes, labels, scores and instance masks).
"""

import os

import numpy as np
from absl import flags
from ml_collections import config_flags
from PIL import Image

from experiments import launcher

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file; default: the workdir's.")
WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by experiments.train.")
SPLIT = flags.DEFINE_string("split", "test", "The split to draw examples from.")
NUM_IMAGES = flags.DEFINE_integer("num_images", 16, "How many examples to draw.")
OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Default: <workdir>/predictions.")
flags.mark_flags_as_required(["workdir"])


def _detection_panels(image, batch, detections, i, class_names=None):
  """image | ground truth boxes and masks | detections (boxes, class, score, masks), enlarged."""
  from zoo import visualization
  scale = 4
  masks = batch.get("instance_masks")
  truth = visualization.draw_detections(
      image, batch["boxes"][i], batch["labels"][i] + 1, batch["objects_valid"][i],
      masks=None if masks is None else masks[i], scale=scale, class_names=class_names)
  pasted = None
  if "masks" in detections:
    from zoo.detection.rcnn import paste_masks
    pasted = np.asarray(paste_masks(detections["masks"][i], detections["boxes"][i],
                                    image.shape[:2])) >= 0.5
  found = visualization.draw_detections(
      image, detections["boxes"][i], detections["classes"][i], detections["valid"][i],
      scores=detections["scores"][i], masks=pasted, scale=scale, class_names=class_names)
  return [np.kron(visualization.to_uint8(image), np.ones((scale, scale, 1), np.uint8)), truth, found]


def main(argv):
  del argv
  launcher.start()
  import jax
  from zoo import training, visualization
  from zoo.data import CLASS_NAMES, detection_sources
  from zoo.data import pipeline
  config = CONFIG.value or training.read_config(WORKDIR.value)
  experiment = training.Experiment(config)
  state = experiment.restore(WORKDIR.value)
  output_dir = OUTPUT_DIR.value or os.path.join(WORKDIR.value, "predictions")
  os.makedirs(output_dir, exist_ok=True)
  written = 0
  # Detector class c is dataset label c - 1: the embedded data's names line up with it.
  class_names = (CLASS_NAMES if config.data.name.startswith("digit_canvases") else
                 detection_sources.detector_class_names(config.data.name))
  batches = pipeline.eval_batches(experiment.data_source(SPLIT.value),
                                  global_batch_size=config.eval_batch_size,
                                  **experiment.batch_layout())
  for batch in batches:
    predictions = jax.device_get(experiment.predict(state, batch["image"], batch))
    for i in np.flatnonzero(batch["example_valid"]):
      if written == NUM_IMAGES.value:
        break
      image = batch["image"][i]
      if isinstance(predictions, dict) and "boxes" in predictions:
        panels = _detection_panels(image, batch, predictions, i, class_names)
      elif "segmentation" in batch:
        target = batch["segmentation"][i]
        # A VALID-padding model predicts only the centre: the uncovered border is drawn grey.
        prediction = visualization.pad_to_center(np.asarray(predictions)[i], target.shape)
        panels = [visualization.to_uint8(image), visualization.overlay(image, target),
                  visualization.overlay(image, prediction)]
      else:
        raise ValueError(f"predict.py draws segmentation and detection tasks; this config's task "
                         f"is {config.task.name!r}.")
      path = os.path.join(output_dir, f"{SPLIT.value}_{written:04d}.png")
      scale = 1 if panels[0].shape[0] != image.shape[0] else 4   # detection panels come enlarged
      Image.fromarray(visualization.side_by_side(panels, scale=scale)).save(path)
      written += 1
    if written == NUM_IMAGES.value:
      break
  print(f"Wrote {written} images (image | ground truth | prediction) to {output_dir}")


if __name__ == "__main__":
  launcher.run(main)
