"""The generic trainer: state, mesh and sharding, optimizer, checkpoints, summaries, tasks."""

from zoo.training.trainer import (Experiment, Preempted, TrainState, prepare_workdir, read_config,
                                  train_and_evaluate)

__all__ = ["Experiment", "Preempted", "TrainState", "prepare_workdir", "read_config",
           "train_and_evaluate"]
