r"""Trains a model from a config, resuming from the newest checkpoint in --workdir.

    python -m experiments.train --config=experiments/configs/unet.py --workdir=runs/unet \
        [--config.total_steps=3000] [--jax_distributed] [--allow_config_change]

On SIGTERM it checkpoints the current step and exits with status 143; the same command
resumes. Resuming with a config that changes what is trained (model, task, data, optimizer,
total steps, ...) is refused, listing the changed fields, unless --allow_config_change is
given (config.json then records the change). A non-finite loss or gradient norm stops the
run (exit status 2) naming the step; the newest checkpoint then holds the last finite state.
At the end it evaluates `config.final_eval_splits` and writes results.json.
"""

import sys

from absl import flags
from ml_collections import config_flags

from experiments import launcher

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (Python, get_config()).",
                                         lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries, results.")
ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume --workdir even though its saved config differs from --config in what is trained; "
    "config.json records the change.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments {argv[1:]}: every setting is a flag.")
  launcher.start()
  from zoo import training
  try:
    results = training.train_and_evaluate(CONFIG.value, WORKDIR.value,
                                          allow_config_change=ALLOW_CONFIG_CHANGE.value)
  except training.Preempted as e:
    print(e, file=sys.stderr)
    sys.exit(143)
  for split, metrics in results.items():
    if isinstance(metrics, dict):
      headline = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "/" not in k)
      print(f"{split}: {headline}")


if __name__ == "__main__":
  launcher.run(main)
