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
  return f"{value:.0f}" if 1e4 <= abs(value) < 1e12 else f"{value:.4g}"


def read_scalars(workdir: str, name: str = "train") -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of the scalars a MetricWriter wrote to `<workdir>/tensorboard/<name>`
  (every event file there; a resumed run's later value of a step wins)."""
  import glob
  import struct
  from tensorboardX.proto import event_pb2

  scalars = {}
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", name, "events*"))):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):  # TFRecord framing: length, its CRC, payload, payload CRC.
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars
