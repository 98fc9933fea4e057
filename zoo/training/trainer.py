"""The generic trainer: one jitted train step, a data-parallel mesh, Orbax checkpoints.

    state = create_train_state(model, optimizer, rng, task.model_inputs(first_batch, train=False))
    state, metrics = train_step(state, batch, rng)  # one XLA program, batch sharded over `data`
    outputs = eval_step(state, batch)               # task.eval_outputs, fed to task.evaluator()

The model is called as `model.apply(variables, **task.model_inputs(batch, train=...), train=...)`
(zoo.training.task): the trainer knows nothing of images, pairs or sequences.

`train_and_evaluate(config, workdir)` runs the loop: logging with step rate and ETA (timed
from the end of the first step, so compilation does not inflate it), TensorBoard summaries,
checkpoints every `checkpoint_every` steps (and on SIGTERM), evaluation every `eval_every`
steps and at the end, and resumption from the newest checkpoint (with the same config unless
allowed: zoo.training.run_config). The step's random key is `fold_in(key, step)` and the data
position is checkpointed, so a resumed run reproduces an uninterrupted one exactly.

Training never goes on silently wrong: the config's sections accept only the fields they read
(run_config), the task checks the first batch's labels (`task.check_batch`) before the first
step, and a non-finite loss or gradient norm (or non-finite parameters at a checkpoint) stops
the run with `Diverged`, naming the step and the value; no checkpoint is written after it, so
the newest one holds the last finite state.
"""

import functools
import math
import os
import signal
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from zoo import factory
from zoo.data import load_data_source, pipeline
from zoo.training import checkpoint as checkpoint_lib
from zoo.training import mesh as mesh_lib
from zoo.training import run_config
from zoo.training.optimizer import make_optimizer
from zoo.training.summaries import MetricWriter
from zoo.training.task import Task, create_task


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree.

  Attributes:
    step: () int32, the number of optimizer steps taken.
    params: the model's `params` collection.
    model_state: the model's other collections (e.g. `batch_stats`); {} if none.
    opt_state: the optax optimizer state.
  """
  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any


class Preempted(Exception):
  """Raised after a SIGTERM: the state was checkpointed and the run can be restarted."""


class Diverged(ValueError):
  """Raised when the loss, the gradient norm or the parameters stop being finite; the newest
  checkpoint (if any) holds the last finite state."""


def create_model(model_config) -> nn.Module:
  """`zoo.create(model_config.name, **other fields)`."""
  kwargs = {k: v for k, v in model_config.items() if k != "name"}
  return factory.create(model_config.name, **kwargs)


def create_train_state(model: nn.Module, optimizer: optax.GradientTransformation, rng,
                       model_inputs: dict) -> TrainState:
  """Initialises parameters from `rng` for inputs shaped like `model_inputs` (the keyword
  arguments of `model.apply`, e.g. `task.model_inputs(example_batch, train=False)`)."""
  rngs = {"params": rng, "dropout": rng, "sampling": rng}
  variables = dict(model.init(rngs, **model_inputs, train=False))
  params = variables.pop("params")
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                    opt_state=optimizer.init(params))


def train_step(state: TrainState, batch: dict, rng, *, model: nn.Module, task: Task,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule):
  """One optimizer step on a (global) batch. Returns (new state, {metric: scalar})."""
  step_rng = jax.random.fold_in(rng, state.step)
  mutable = list(state.model_state)

  inputs = task.model_inputs(batch, train=True)
  rngs = {"dropout": step_rng, "sampling": jax.random.fold_in(step_rng, 1)}

  def loss_fn(params):
    variables = {"params": params, **state.model_state}
    if mutable:
      (outputs, _), new_model_state = model.apply(
          variables, **inputs, train=True, mutable=mutable, rngs=rngs)
    else:
      outputs, _ = model.apply(variables, **inputs, train=True, rngs=rngs)
      new_model_state = {}
    loss, metrics = task.loss(outputs, batch)
    return loss, (metrics, new_model_state)

  grads, (metrics, new_model_state) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            model_state=dict(new_model_state), opt_state=opt_state)
  metrics = dict(metrics, grad_norm=optax.global_norm(grads), learning_rate=schedule(state.step))
  return new_state, metrics


def _inference(state: TrainState, batch: dict, model: nn.Module, task: Task):
  outputs, _ = model.apply({"params": state.params, **state.model_state},
                           **task.model_inputs(batch, train=False), train=False)
  return outputs


def eval_step(state: TrainState, batch: dict, *, model: nn.Module, task: Task):
  """`task.eval_outputs` of one batch (what the task's evaluator takes)."""
  return task.eval_outputs(_inference(state, batch, model, task), batch)


def predict_step(state: TrainState, batch: dict, *, model: nn.Module, task: Task):
  """`task.predictions` of one batch (what the task draws)."""
  return task.predictions(_inference(state, batch, model, task), batch)


class Experiment:
  """A config made concrete: mesh, model, task, optimizer, data and the jitted steps."""

  def __init__(self, config: ml_collections.ConfigDict):
    run_config.check(config)
    self.config = config
    mesh = run_config.section(config.mesh, "mesh")
    self.mesh = mesh_lib.make_mesh(mesh["num_devices"], mesh["model_axis_size"])
    self.model = create_model(config.model)
    self.task = create_task(config.task)
    self.optimizer, self.schedule = make_optimizer(config.optimizer, config.total_steps)
    data_size = self.mesh.shape[mesh_lib.DATA_AXIS]
    for name in ("batch_size", "eval_batch_size"):
      if config[name] % data_size:
        raise ValueError(f"{name}={config[name]} must be a multiple of the {data_size} devices "
                         "on the mesh's data axis.")
    self.rng = jax.random.key(config.seed)

    replicated = mesh_lib.replicated(self.mesh)
    batched = mesh_lib.batch_sharding(self.mesh)
    self._train_step = jax.jit(
        functools.partial(train_step, model=self.model, task=self.task,
                          optimizer=self.optimizer, schedule=self.schedule),
        in_shardings=(replicated, batched, replicated), out_shardings=(replicated, replicated),
        donate_argnums=0)
    self._eval_step = jax.jit(functools.partial(eval_step, model=self.model, task=self.task),
                              in_shardings=(replicated, batched), out_shardings=replicated)
    self._predict_step = jax.jit(functools.partial(predict_step, model=self.model, task=self.task),
                                 in_shardings=(replicated, batched), out_shardings=replicated)

  @property
  def data(self) -> dict:
    """`config.data` with defaults filled in (run_config.FIELDS["data"])."""
    return run_config.section(self.config.data, "data")

  def data_source(self, split: str):
    return load_data_source(self.data["name"], split, data_dir=self.data["data_dir"],
                            proposals=self.data["proposals"])

  def batch_layout(self, *, train: bool) -> dict:
    """What a batch holds: the task's `features` (and in evaluation its `eval_features`),
    padded to `max_objects`, `max_proposals` and `max_length` (sequences)."""
    features = self.task.features + (() if train else self.task.eval_features)
    return dict(features=features, max_objects=self.data["max_objects"],
                max_proposals=self.data["max_proposals"], max_length=self.data["max_length"])

  def train_iterator(self):
    return pipeline.train_batches(
        self.data_source(self.data["train_split"]), global_batch_size=self.config.batch_size,
        seed=self.config.seed, augment=tuple(self.data["augment"]),
        **self.batch_layout(train=True))

  def example_inputs(self) -> dict:
    """The model's inputs for one unaugmented training example: parameters are
    initialised from their shapes."""
    batch = pipeline.example_batch(self.data_source(self.data["train_split"]),
                                   **self.batch_layout(train=True))
    return self.task.model_inputs(batch, train=False)

  def abstract_state(self) -> TrainState:
    """The state's shapes and dtypes, replicated over the mesh, without computing it."""
    init_rng, _ = jax.random.split(self.rng)
    shapes = jax.eval_shape(functools.partial(create_train_state, self.model, self.optimizer),
                            init_rng, self.example_inputs())
    return checkpoint_lib.abstract_like(shapes, jax.tree.map(lambda _: mesh_lib.replicated(self.mesh), shapes))

  def init_state(self) -> TrainState:
    init_rng, _ = jax.random.split(self.rng)
    # Initialisation runs once: compiling it without backend optimisation cuts its compile
    # time ~10x on the CPU (XLA's unrolled threefry random bits are slow to optimise).
    init = jax.jit(functools.partial(create_train_state, self.model, self.optimizer),
                   out_shardings=mesh_lib.replicated(self.mesh),
                   compiler_options={"xla_backend_optimization_level": 0})
    return init(init_rng, self.example_inputs())

  def train_step(self, state: TrainState, local_batch: dict):
    _, step_rng = jax.random.split(self.rng)
    return self._train_step(state, mesh_lib.global_batch(local_batch, self.mesh), step_rng)

  def eval_batches(self, split: str):
    """One pass over `split` in order, host-local batches (`example_valid` marks padding)."""
    return pipeline.eval_batches(self.data_source(split),
                                 global_batch_size=self.config.eval_batch_size,
                                 **self.batch_layout(train=False))

  def evaluate(self, state: TrainState, split: str) -> dict:
    """The task's evaluator's result over one whole pass of `split`."""
    evaluator = self.task.evaluator()
    for local_batch in self.eval_batches(split):
      outputs = self._eval_step(state, mesh_lib.global_batch(local_batch, self.mesh))
      evaluator.update(jax.device_get(outputs), local_batch)
    return evaluator.result()

  def predict(self, state: TrainState, local_batch: dict):
    """`task.predictions` for a host-local batch, on the host (what `task.draw` draws)."""
    return jax.device_get(self._predict_step(state, mesh_lib.global_batch(local_batch, self.mesh)))

  def checkpointer(self, workdir: str, read_only: bool = False) -> checkpoint_lib.Checkpointer:
    return checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), save_every=self.config.checkpoint_every,
        keep=self.config.keep_checkpoints, read_only=read_only)

  def restore(self, workdir: str, *, step: int | None = None) -> TrainState:
    """The trained state in `workdir` (newest checkpoint unless `step`), for evaluation."""
    checkpointer = self.checkpointer(workdir, read_only=True)
    try:
      return checkpointer.restore(self.abstract_state(), step=step)
    finally:
      checkpointer.close()


def restore_workdir(workdir: str, config: ml_collections.ConfigDict | None = None, *,
                    step: int | None = None) -> tuple[Experiment, TrainState]:
  """The experiment of a training workdir (its config.json unless `config` is given) and the
  state of its newest checkpoint (or of `step`): what eval, predict and fine-tuning start from."""
  experiment = Experiment(config or run_config.read(workdir))
  return experiment, experiment.restore(workdir, step=step)


def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` and checks it is writable; raises ValueError naming the fix if not."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"--workdir={workdir} is not a writable directory ({e.strerror}); "
                     "pass a directory you can create and write to.") from None
  return workdir


class _SigtermFlag:
  """Records SIGTERM instead of dying, so the loop can checkpoint first."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: leave signals alone.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint, then stopping.")
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _preemption_requested(flag: _SigtermFlag, step: int) -> bool:
  if jax.process_count() > 1:
    # Every host must stop at the same step, so agree through the coordination service.
    from jax.experimental import multihost_utils
    return multihost_utils.reached_preemption_sync_point(step) or flag.received
  return flag.received


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> dict:
  """Trains (resuming from the newest checkpoint in `workdir`), then evaluates.

  Args:
    config: the run's config (experiments/configs).
    workdir: where checkpoints, summaries, config.json and results.json go.
    allow_config_change: resume a workdir whose saved config differs from `config` in what is
      trained (config.json then records the change); otherwise that is a ValueError.

  Returns:
    {split: {metric: value}} for `config.final_eval_splits`, also written to
    `<workdir>/results.json`.

  Raises:
    Preempted: after SIGTERM, once the checkpoint of the current step is written.
    Diverged: when the loss or gradient norm stops being finite (a ValueError).
    ValueError: for a config the trainer cannot run, labels outside the task's classes, or a
      resumed workdir whose config differs (unless `allow_config_change`).
  """
  workdir = prepare_workdir(workdir)
  # From here on SIGTERM only sets a flag; the loop checkpoints and stops at the next step.
  with _SigtermFlag() as sigterm:
    experiment = Experiment(config)
    checkpointer = experiment.checkpointer(workdir)
    try:
      run_config.write(config, workdir, resumed_at=checkpointer.latest_step(),
                       allow_changes=allow_config_change)
      state = _train(experiment, checkpointer, workdir, sigterm)
    finally:
      checkpointer.close()

  results = {"step": int(state.step)}
  eval_writer = MetricWriter(workdir, "eval")
  for split in config.final_eval_splits:
    results[split] = experiment.evaluate(state, split)
    eval_writer.write_scalars(results["step"], _prefixed(results[split], split))
  eval_writer.close()
  if jax.process_index() == 0:
    run_config.write_json(os.path.join(workdir, "results.json"), results)
  return results


def initialized_from(state: TrainState, init_from: str) -> TrainState:
  """`state` (step 0) with the parameters and model state of the newest checkpoint in workdir
  `init_from` wherever names and shapes agree: fine-tuning. The rest (e.g. a CRF layer added
  on top) keeps its initialisation; the optimizer state starts afresh. Logs what was copied."""
  if not os.path.isdir(os.path.join(init_from, "checkpoints")):
    raise ValueError(f"init_from={init_from!r} is not a workdir with checkpoints; pass the "
                     "--workdir of a finished or interrupted run.")
  _, source = restore_workdir(init_from)
  source = flax.traverse_util.flatten_dict({"params": source.params, **source.model_state})
  copied, kept = [], []

  def take(path, value):
    old = source.get(path)
    if old is not None and old.shape == value.shape:
      copied.append("/".join(path))
      return jax.device_put(jnp.asarray(old, value.dtype), value.sharding)
    kept.append("/".join(path))
    return value

  target = flax.traverse_util.flatten_dict({"params": state.params, **state.model_state})
  merged = flax.traverse_util.unflatten_dict({k: take(k, v) for k, v in target.items()})
  if not copied:
    raise ValueError(f"init_from={init_from!r}: no parameter name and shape agrees with this "
                     "model; is it a run of the same architecture?")
  logging.info("Initialised %d arrays from %s; %d kept their initialisation: %s", len(copied),
               init_from, len(kept), ", ".join(kept) or "none")
  params = merged.pop("params")
  return state.replace(params=params, model_state=merged)


def _train(experiment: Experiment, checkpointer, workdir: str, sigterm: _SigtermFlag) -> TrainState:
  """The training loop, from the newest checkpoint (if any) to `config.total_steps`."""
  config = experiment.config
  train_iterator = experiment.train_iterator()
  latest = checkpointer.latest_step()
  if latest is None and config.get("init_from"):
    state = initialized_from(experiment.init_state(), config.init_from)
  elif latest is None:
    state = experiment.init_state()
    logging.info("Starting from scratch in %s.", workdir)
  else:
    state = checkpointer.restore(experiment.abstract_state(), train_iterator)
    logging.info("Resumed from the checkpoint of step %d in %s.", latest, workdir)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("Model %s: %s parameters; mesh %s.", config.model.name, f"{num_params:,}",
               dict(experiment.mesh.shape))

  train_writer = MetricWriter(workdir, "train")
  eval_writer = MetricWriter(workdir, "eval")
  step = first_step = int(state.step)
  total = config.total_steps
  pending = []  # The metrics of steps step - len(pending) + 1 .. step.
  interval_start, interval_first_step = time.perf_counter(), step
  try:
    while step < total:
      batch = next(train_iterator)
      if step == first_step:
        experiment.task.check_batch(batch)
      state, metrics = experiment.train_step(state, batch)
      step += 1
      pending.append(metrics)
      if step == first_step + 1:
        # The first step compiles: rates and ETAs are timed from its end.
        jax.block_until_ready(metrics)
        logging.info("Step %d took %.1f s (compilation included); step rates are timed from "
                     "here.", step, time.perf_counter() - interval_start)
        interval_start, interval_first_step = time.perf_counter(), step
      log_due = step % config.log_every == 0 or step == total
      save_due = checkpointer.is_due(step, force=step == total)
      eval_due = config.eval_every and step % config.eval_every == 0 and step < total
      if log_due or save_due or eval_due:
        pending = _finite_metrics(pending, step, checkpointer, config)
      if log_due:
        means = {k: np.mean([m[k] for m in pending]) for k in pending[0]}
        suffix = ""
        if step > interval_first_step:
          rate = (step - interval_first_step) / (time.perf_counter() - interval_start)
          means["steps_per_second"] = rate
          suffix = f" (ETA {(total - step) / rate / 60:.1f} min)"
        train_writer.write_scalars(step, means, console_suffix=suffix)
        pending, interval_start, interval_first_step = [], time.perf_counter(), step
      if save_due:
        _check_finite_state(state, step, checkpointer, config)
        checkpointer.save(step, state, train_iterator, force=step == total)
      if eval_due:
        eval_writer.write_scalars(step, _prefixed(experiment.evaluate(state, config.eval_split),
                                                  config.eval_split))
        interval_start, interval_first_step = time.perf_counter(), step
      if step < total and _preemption_requested(sigterm, step):
        pending = _finite_metrics(pending, step, checkpointer, config)
        _check_finite_state(state, step, checkpointer, config)
        checkpointer.save(step, state, train_iterator, force=True)
        checkpointer.wait()
        raise Preempted(f"Stopped at step {step} after SIGTERM; the checkpoint is in {workdir}. "
                        "Run the same command again to resume.")
    checkpointer.wait()
  finally:
    train_writer.close()
    eval_writer.close()
  return state


def _finite_metrics(pending: list, step: int, checkpointer, config) -> list:
  """The metrics of steps step - len(pending) + 1 .. step on the host; raises Diverged at the
  first step whose loss or gradient norm is not finite."""
  pending = jax.device_get(pending)
  for offset, metrics in enumerate(pending):
    for name in ("loss", "grad_norm"):
      if name in metrics and not math.isfinite(float(metrics[name])):
        raise _diverged(step - len(pending) + 1 + offset, f"{name}={float(metrics[name])}",
                        checkpointer, config)
  return pending


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _check_finite_state(state: TrainState, step: int, checkpointer, config):
  """Raises Diverged if the parameters or model state of `step` are not all finite, so that
  no checkpoint holds them."""
  if not bool(_all_finite((state.params, state.model_state))):
    raise _diverged(step, "the parameters (or model state) hold non-finite values", checkpointer,
                    config)


def _diverged(step: int, what: str, checkpointer, config) -> Diverged:
  checkpointer.wait()
  latest = checkpointer.latest_step()
  kept = ("no checkpoint was written before it" if latest is None else
          f"the newest checkpoint, step {latest} in {checkpointer.directory}, holds the last "
          "finite state")
  return Diverged(
      f"Training diverged at step {step}: {what}; stopped ({kept}). Lower "
      f"optimizer.learning_rate (now {config.optimizer.learning_rate}) or use "
      "optimizer.warmup_steps / optimizer.grad_clip_norm; resuming that checkpoint with changed "
      "settings needs --allow_config_change.")


def _prefixed(metrics: dict, split: str) -> dict:
  return {f"{split}/{k}": v for k, v in metrics.items()}
