r"""Writes PNGs of a trained model's predictions beside the ground truth, for a person to look at.

    python -m experiments.predict --workdir=runs/unet --split=test --num_images=16

Each file `<output_dir>/<split>_<index>.png` shows what the config's task draws
(`task.draw`): the image | ground truth | prediction (segmentation: class colours and a legend
naming them; detection: boxes, class names, scores and instance masks; classification: the
classes present and predicted, and a legend). A relative --workdir is relative to the current
directory, as in experiments.train.
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


def main(argv):
  del argv
  launcher.start()
  from zoo import training, visualization
  from zoo.data import CLASS_NAMES, detection_sources
  experiment, state = training.restore_workdir(WORKDIR.value, CONFIG.value)
  config = experiment.config
  output_dir = OUTPUT_DIR.value or os.path.join(WORKDIR.value, "predictions")
  os.makedirs(output_dir, exist_ok=True)
  written = 0
  # Names indexed by the model's class ids (detectors: 0 = background, class c = label c - 1).
  class_names = (CLASS_NAMES if config.data.name.startswith("digit_canvases") else
                 detection_sources.detector_class_names(config.data.name))
  for batch in experiment.eval_batches(SPLIT.value):
    predictions = experiment.predict(state, batch)
    for i in np.flatnonzero(batch["example_valid"]):
      if written == NUM_IMAGES.value:
        break
      panels = experiment.task.draw(batch, predictions, i, class_names=class_names)
      path = os.path.join(output_dir, f"{SPLIT.value}_{written:04d}.png")
      Image.fromarray(visualization.side_by_side(panels, scale=1)).save(path)
      written += 1
    if written == NUM_IMAGES.value:
      break
  print(f"Wrote {written} images (image | ground truth | prediction) to {output_dir}")


if __name__ == "__main__":
  launcher.run(main)
