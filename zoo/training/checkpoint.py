"""The one way the zoo saves and restores training: Orbax's CheckpointManager.

A checkpoint holds two items: `state` (the TrainState pytree: step, parameters, model
state, optimizer state) and `data` (the grain iterator's position, one JSON file per host),
so a resumed run sees exactly the examples an uninterrupted one would. Orbax writes each
step into a temporary directory and renames it when complete, so a crash mid-save leaves
the previous checkpoint intact and the half-written one is ignored.
"""

import os

import jax
import orbax.checkpoint as ocp
from grain import checkpoint as grain_checkpoint


class Checkpointer:
  """Saves every `save_every` steps into `directory`, keeping the newest `keep`."""

  def __init__(self, directory: str, *, save_every: int, keep: int, read_only: bool = False):
    # Orbax wants an absolute path (a relative --workdir fails at restore otherwise); read-only
    # managers save nothing and delete nothing (said explicitly, Orbax warns otherwise).
    directory = os.path.abspath(os.path.expanduser(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
        create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
    self.directory = directory
    self.save_every = save_every
    self._manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def is_due(self, step: int, *, force: bool = False) -> bool:
    """Whether `save(step, ..., force=force)` would write a checkpoint."""
    # The schedule is decided here, not by Orbax's policies (which also save the first step).
    return (force or step % self.save_every == 0) and step != self.latest_step()

  def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
    """Saves if `step` is due (or `force`); returns whether a save started.

    The device-to-host copy happens before this returns, so `state` may be donated to
    the next step; the files are written in the background until `wait()`.
    """
    if not self.is_due(step, force=force):
      return False
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain_checkpoint.CheckpointSave(data_iterator))
    return self._manager.save(step, args=args, force=True)

  def restore(self, abstract_state, data_iterator=None, *, step: int | None = None):
    """Restores `state` (and the iterator's position, in place) from `step` (default newest).

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct with shardings, the target layout.
      data_iterator: a grain DatasetIterator to reposition, or None for evaluation.

    Returns:
      The restored state, laid out as `abstract_state` says.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"No checkpoint in {self.directory}: train first (experiments.train) "
                       "or check the workdir.")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain_checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) placed with `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
