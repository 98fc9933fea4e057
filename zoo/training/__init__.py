"""The generic trainer: state, mesh and sharding, optimizer, checkpoints, summaries, tasks."""

from zoo.training.run_config import read as read_config
from zoo.training.trainer import (Diverged, Experiment, Preempted, TrainState, prepare_workdir,
                                  restore_workdir, train_and_evaluate)

__all__ = ["Diverged", "Experiment", "Preempted", "TrainState", "prepare_workdir", "read_config",
           "restore_workdir", "train_and_evaluate"]
