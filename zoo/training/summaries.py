"""Metric writing: console lines (absl logging) and TensorBoard event files, from host 0 only.

TensorBoard files are written with tensorboardX, which needs no TensorFlow.
"""

import os

import jax
from absl import logging


class MetricWriter:
  """Writes scalar metrics to the console and to `<workdir>/tensorboard/<name>`."""

  def __init__(self, workdir: str, name: str = "train"):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # Imported lazily: only host 0 writes.
      self._writer = SummaryWriter(os.path.join(workdir, "tensorboard", name), flush_secs=30)
    self._name = name

  def write_scalars(self, step: int, scalars: dict, *, console_suffix: str = ""):
    if self._writer is None:
      return
    for key, value in scalars.items():
      self._writer.add_scalar(key, float(value), global_step=step)
    text = ", ".join(f"{key}={_format(value)}" for key, value in scalars.items())
    logging.info("[%s] step %d: %s%s", self._name, step, text, console_suffix)

  def flush(self):
    if self._writer is not None:
      self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()


def _format(value) -> str:
  value = float(value)
  return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
