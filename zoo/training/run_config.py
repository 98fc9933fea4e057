"""The run config as the trainer reads it: accepted fields per section, config.json, resuming.

A config (experiments/configs/*.py) has top-level trainer fields and the sections `model`
(checked by `zoo.create` against the model's hyper-parameters), `task` (checked by
`create_task` against the task's arguments), `data`, `optimizer` and `mesh` (checked here).
A field a section does not accept is a ValueError naming it and the accepted ones, never a
silent fall-back to a default (`optimizer.warmup_step=500` would otherwise train without
warm-up).

Every run writes its resolved config to `<workdir>/config.json`. Resuming a workdir with a
config that differs from the saved one in what is trained (the model, task, data, optimizer,
schedule, total steps, seed, ...) is an error listing the differing fields, unless the caller
allows it; then config.json is the new config and keeps, under `config_changes`, each resume's
step and changed fields (old and new values), so the history of the run stays readable.
Fields that say only how the run is watched or where it runs (RUN_ENVIRONMENT) may change freely.
"""

import json
import os
from typing import Any

import jax
import ml_collections

REQUIRED = object()  # A field without a default.

# section -> {field: default}. The top level also holds the sections themselves.
FIELDS = {
    "": dict(
        seed=REQUIRED, init_from=None, batch_size=REQUIRED, eval_batch_size=REQUIRED,
        total_steps=REQUIRED, log_every=REQUIRED, checkpoint_every=REQUIRED,
        keep_checkpoints=REQUIRED, eval_every=REQUIRED, eval_split=REQUIRED,
        final_eval_splits=REQUIRED, model=REQUIRED, task=REQUIRED, data=REQUIRED,
        optimizer=REQUIRED, mesh=REQUIRED),
    "data": dict(
        name=REQUIRED, data_dir=None, train_split="train", augment=(), max_objects=8,
        max_proposals=2000, max_length=16, proposals=None),
    "optimizer": dict(
        name=REQUIRED, learning_rate=REQUIRED, schedule="constant", warmup_steps=0,
        weight_decay=0.0, momentum=0.9, grad_clip_norm=None),
    "mesh": dict(num_devices=-1, model_axis_size=1),
}

# Fields that do not change what is trained: they may differ when a run is resumed.
RUN_ENVIRONMENT = ("log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_split",
                   "final_eval_splits", "eval_batch_size", "data.data_dir", "mesh.num_devices",
                   "mesh.model_axis_size")

CHANGES_KEY = "config_changes"


def section(values, name: str) -> dict:
  """The fields of config section `name` ("" for the top level), given as `values` (a
  ConfigDict or dict), with defaults filled in.

  Raises:
    ValueError: for a field the section does not accept or a required field it lacks; the
      message lists the accepted fields.
  """
  fields = FIELDS[name]
  where = f"config.{name}." if name else "config."
  accepted = f"{where[:-1] if name else 'the config'} takes: {', '.join(fields)}."
  for key in values.keys():
    if key not in fields:
      raise ValueError(f"{where}{key} is not a field the trainer reads; {accepted}")
  missing = [key for key, default in fields.items() if default is REQUIRED and key not in values]
  if missing:
    raise ValueError(f"{where}{missing[0]} is missing; {accepted}")
  return {key: values[key] if key in values else default for key, default in fields.items()}


def check(config: ml_collections.ConfigDict):
  """Raises ValueError if the top level, `data`, `optimizer` or `mesh` has a field the trainer
  does not read (or lacks a required one); `model` and `task` are checked where they are built."""
  for name in FIELDS:
    section(config[name] if name else config, name)


def as_json(config: ml_collections.ConfigDict) -> dict:
  """The config as config.json holds it (tuples as lists, references resolved)."""
  return json.loads(config.to_json_best_effort())


def read(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a training run wrote into `workdir` (its newest, if resumed with
  changes)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{path} does not exist: --workdir must be a directory written by "
                     "experiments.train, or pass --config.")
  with open(path) as f:
    saved = json.load(f)
  saved.pop(CHANGES_KEY, None)
  return ml_collections.ConfigDict(saved)


def write(config: ml_collections.ConfigDict, workdir: str, *, resumed_at: int | None = None,
          allow_changes: bool = False):
  """Writes `config` to `<workdir>/config.json` (from host 0), comparing it with the saved one
  on resumption (on every host, so all of them stop together).

  Args:
    config: the new run's config.
    workdir: the run's directory.
    resumed_at: the checkpoint step a resumed run starts from; None for a fresh run (any old
      config.json is replaced).
    allow_changes: on resumption, accept a config that differs from the saved one in what is
      trained, and record the change in config.json's `config_changes`.

  Raises:
    ValueError: on resumption with trained fields that differ from the saved config, unless
      `allow_changes`; the message lists each field with its saved and new value.
  """
  path = os.path.join(workdir, "config.json")
  new = as_json(config)
  history = []
  if resumed_at is not None and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    history = saved.pop(CHANGES_KEY, [])
    changed = {key: (old, value) for key, (old, value) in differences(saved, new).items()
               if key not in RUN_ENVIRONMENT}
    if changed and not allow_changes:
      listed = "; ".join(f"{key}: {old!r} -> {value!r}" for key, (old, value) in changed.items())
      raise ValueError(
          f"{workdir} holds a run (checkpoint of step {resumed_at}) whose config differs from this "
          f"one in {listed}. Resume with the saved config (drop the overrides), use a new "
          "--workdir, or pass --allow_config_change to continue with the new values (config.json "
          "then records the change).")
    if changed:
      history.append({"step": resumed_at, "changed": {
          key: {"before": old, "after": value} for key, (old, value) in changed.items()}})
  if history:
    new[CHANGES_KEY] = history
  if jax.process_index() == 0:  # Every host compares; one writes.
    write_json(path, new)


def differences(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
  """{dotted field: (old value, new value)} where two config dicts differ (absent: None)."""
  old, new = _flatten(old), _flatten(new)
  return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
          if old.get(key) != new.get(key)}


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def write_json(path: str, value):
  """Writes atomically: a reader never sees a half-written file."""
  temporary = f"{path}.tmp{os.getpid()}"
  with open(temporary, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(temporary, path)
