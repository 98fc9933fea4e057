"""The device mesh and the shardings the trainer uses.

The mesh has two axes: `data` (the batch is split over it) and `model` (for tensor or FSDP
parallelism; size 1 until a model needs it). Parameters are replicated over `data`.
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
MODEL_AXIS = "model"


def make_mesh(num_devices: int = -1, model_axis_size: int = 1) -> Mesh:
  """A (data, model) mesh over the first `num_devices` devices (-1: all of them).

  Raises:
    ValueError: if more devices are asked for than exist, or the device count is not a
      multiple of `model_axis_size`.
  """
  devices = jax.devices()
  if num_devices == -1:
    num_devices = len(devices)
  if not 1 <= num_devices <= len(devices):
    raise ValueError(f"mesh.num_devices={num_devices}, but this process sees {len(devices)} "
                     f"{devices[0].platform} device(s); use -1 for all of them.")
  if num_devices % model_axis_size:
    raise ValueError(f"mesh.model_axis_size={model_axis_size} must divide the number of "
                     f"devices ({num_devices}).")
  grid = np.asarray(devices[:num_devices]).reshape(num_devices // model_axis_size, model_axis_size)
  return Mesh(grid, (DATA_AXIS, MODEL_AXIS), axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis; other dimensions whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles each host's local numpy batch into global arrays sharded over `data`.

  Args:
    local_batch: dict of (B_local, ...) numpy arrays; B_local * process_count is the
      global batch size, which must be a multiple of the data-axis size.
  """
  sharding = batch_sharding(mesh)
  data_size = mesh.shape[DATA_AXIS]
  def to_global(array):
    global_size = array.shape[0] * jax.process_count()
    if global_size % data_size:
      raise ValueError(f"The global batch size {global_size} must be a multiple of the "
                       f"{data_size} devices on the mesh's data axis; change batch_size.")
    return jax.make_array_from_process_local_data(sharding, array)
  return jax.tree.map(to_global, local_batch)
