"""What a training run logged, for tests: its losses and the check every smoke test makes."""

import numpy as np

from zoo.training import summaries


def training_losses(workdir: str) -> list[float]:
  """The logged training losses (means over each logging interval), in step order."""
  losses = summaries.read_scalars(workdir, "train")["loss"]
  return [losses[k] for k in sorted(losses)]


def assert_loss_finite_and_falling(workdir: str):
  """Every logged training loss is finite, and the last is below the first."""
  losses = training_losses(workdir)
  assert len(losses) >= 2, f"a smoke run should log at least two losses, got {losses}"
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], f"the training loss did not fall: {losses}"
