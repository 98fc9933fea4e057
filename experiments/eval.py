r"""Evaluates the newest (or a given) checkpoint of a training workdir on one split.

    python -m experiments.eval --workdir=runs/unet --split=test [--step=1500]

The config is the one the run wrote into --workdir (config.json) unless --config is given.
"""

import json

from absl import flags
from ml_collections import config_flags

from experiments import launcher

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file; default: the workdir's.")
WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by experiments.train.")
SPLIT = flags.DEFINE_string("split", "test", "The split to evaluate.")
STEP = flags.DEFINE_integer("step", None, "The checkpoint step; default the newest.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  launcher.start()
  from zoo import training
  experiment, state = training.restore_workdir(WORKDIR.value, CONFIG.value, step=STEP.value)
  metrics = experiment.evaluate(state, SPLIT.value)
  print(json.dumps({"step": int(state.step), "split": SPLIT.value, **metrics}, indent=2))


if __name__ == "__main__":
  launcher.run(main)
