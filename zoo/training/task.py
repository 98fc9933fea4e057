"""The task contract: what the generic trainer asks of every problem.

A task turns a batch (a dict of arrays, keys as in `zoo.data.pipeline`) into the model's
inputs, scores the model's raw outputs, and evaluates and draws them. It never calls the
model. Methods that the trainer jits (`model_inputs`, `loss`, `eval_outputs`, `predictions`)
are pure jax.numpy on static shapes; evaluators and drawing run on the host in NumPy.

    features                          the batch keys the task needs (the pipeline decodes only these)
    eval_features                     keys only evaluation reads (default none)
    check_batch(batch)                raises ValueError if a host batch cannot be this task's data
                                         (labels outside the classes): the trainer asks before
                                         the first step, since such labels train on silently
    model_inputs(batch, train=)       -> {keyword: array} for model.apply: one image, an image
                                         pair, an exemplar and a search frame, a sequence and
                                         its mask, ground truth a detector samples against ...
    loss(outputs, batch)              -> (scalar loss, {name: scalar metric})
    eval_outputs(outputs, batch)      -> what leaves the device for evaluation (jitted; e.g. a
                                         batch's confusion matrix instead of its logits)
    evaluator()                       -> a fresh Evaluator: update(eval_outputs, batch) per batch
                                         on the host, result() -> {metric: float} once per split
    predictions(outputs, batch)       -> what predict.py draws (jitted)
    draw(batch, predictions, index, class_names=None)
                                      -> image panels (H, W, 3) uint8 for one example

Parameters are initialised from the shapes of the first batch (`model_inputs(batch,
train=False)`), so a model needs no init-only branch. Evaluators cover the three kinds of
evaluation the zoo has: additive totals (`SumEvaluator`: mIoU from summed confusion
matrices), concatenated per-example outputs (`ConcatenatingEvaluator`: COCO AP over a split),
and anything else a task writes itself (per-sequence tracking scores). A composite task
(zoo/multitask) holds one evaluator per head.

Tasks register by name with `register_task`; `create_task(config.task)` builds one. Each
family's task lives with the family (zoo/segmentation/task.py, zoo/classification/task.py,
zoo/detection/task.py); TASK_MODULES names where each registered task is defined so a
config imports only its own family.
"""

import abc
import importlib
import inspect
from typing import Any, Callable, Sequence

import jax
import numpy as np


class Evaluator(abc.ABC):
  """Accumulates a split's evaluation outputs on the host and summarises them once."""

  @abc.abstractmethod
  def update(self, outputs: Any, batch: dict) -> None:
    """Takes one batch's `task.eval_outputs` (NumPy, on the host) and the batch itself."""

  @abc.abstractmethod
  def result(self) -> dict:
    """{metric: float} over every batch given to `update`."""


class SumEvaluator(Evaluator):
  """Adds every batch's outputs (a pytree of totals) and summarises the sum."""

  def __init__(self, summarize: Callable[[Any], dict]):
    self._summarize = summarize
    self._sums = None

  def update(self, outputs, batch):
    del batch
    outputs = jax.tree.map(np.asarray, outputs)
    self._sums = outputs if self._sums is None else jax.tree.map(np.add, self._sums, outputs)

  def result(self) -> dict:
    if self._sums is None:
      raise ValueError("The evaluation split gave no batch: check the split name and its size.")
    return self._summarize(self._sums)


class ConcatenatingEvaluator(Evaluator):
  """Concatenates every batch's outputs along the batch axis and summarises them.

  `compact(outputs) -> outputs` is applied to each batch first, to keep a split's outputs
  small (detection masks as run-length codes: a split of full-image masks would not fit in
  memory).
  """

  def __init__(self, summarize: Callable[[Any], dict], compact: Callable[[Any], Any] = None):
    self._summarize = summarize
    self._compact = compact or (lambda outputs: outputs)
    self._gathered = []

  def update(self, outputs, batch):
    del batch
    self._gathered.append(self._compact(jax.tree.map(np.asarray, outputs)))

  def result(self) -> dict:
    if not self._gathered:
      raise ValueError("The evaluation split gave no batch: check the split name and its size.")
    return self._summarize(jax.tree.map(lambda *xs: np.concatenate(xs), *self._gathered))


class Task(abc.ABC):
  """The contract between a problem and the generic trainer (module doc)."""

  @property
  @abc.abstractmethod
  def features(self) -> tuple[str, ...]:
    """The batch keys this task (and the model's inputs) need, in training and evaluation."""

  @property
  def eval_features(self) -> tuple[str, ...]:
    """Batch keys that only evaluation reads (e.g. the regions an AP protocol ignores), so
    training batches do not carry them. Default: none."""
    return ()

  @abc.abstractmethod
  def model_inputs(self, batch: dict, *, train: bool) -> dict:
    """The keyword arguments of `model.apply` (besides variables, `train` and rngs)."""

  @abc.abstractmethod
  def loss(self, outputs, batch: dict) -> tuple[jax.Array, dict]:
    """(scalar loss, {name: scalar metric}) of one batch, in training."""

  @abc.abstractmethod
  def evaluator(self) -> Evaluator:
    """A fresh evaluator for one pass over a split."""

  @abc.abstractmethod
  def draw(self, batch: dict, predictions, index: int,
           class_names: Sequence[str] | None = None) -> list[np.ndarray]:
    """Equally tall panels (H, W, 3) uint8 for example `index` of a host batch, at display
    size: the image, ground truth, prediction. `class_names` are indexed by the model's
    class ids (None: the ids)."""

  def check_batch(self, batch: dict) -> None:
    """Raises ValueError, naming the data's values and the config field to change, if a host
    batch (NumPy, as the pipeline gives it) holds what this task cannot train on, e.g. labels
    outside [0, num_classes): under jit those give a NaN loss or a silently wrong one-hot
    target instead of an error. The trainer calls it on the first training batch. Default:
    no check."""
    del batch

  def eval_outputs(self, outputs, batch: dict):
    """What leaves the device for `evaluator().update` (jitted). Default: the outputs."""
    del batch
    return outputs

  def predictions(self, outputs, batch: dict):
    """What `draw` draws (jitted). Default: the outputs."""
    del batch
    return outputs


def check_labels(labels, num_classes: int, what: str = "object labels"):
  """Raises ValueError unless every one of `labels` (NumPy, any shape, only the labels that
  count: valid objects, pixels not ignored) lies in [0, num_classes); the message names the
  data's label range and the config field to change. `what` names the labels in it."""
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
        f"The data's {what} range over [{labels.min()}, {labels.max()}], but num_classes="
        f"{num_classes} takes labels in [0, {num_classes}): set --config.model.num_classes (and "
        f"task.num_classes) to the data's number of classes ({labels.max() + 1} or more here).")


def check_class_count(logits, num_classes: int):
  """Raises ValueError unless `logits` (..., C) has C == `num_classes` (the task's). Runs on
  static shapes, so inside jit it raises while the first step is traced: a model and a task
  built with different class counts would otherwise train with out-of-range targets."""
  if logits.shape[-1] != num_classes:
    raise ValueError(f"The model outputs {logits.shape[-1]} classes but task.num_classes="
                     f"{num_classes}: give model.num_classes and task.num_classes the same value.")


# name -> the module whose import registers it (imported only when a config names it).
TASK_MODULES = {
    "semantic_segmentation": "zoo.segmentation.task",
    "multi_label_classification": "zoo.classification.task",
    "detection": "zoo.detection.task",
    "multitask": "zoo.multitask.task",
}
_TASKS: dict[str, type] = {}


def register_task(name: str):
  """Class decorator: `create_task` builds `name` with this class."""
  def register(cls):
    if name in _TASKS and _TASKS[name] is not cls:
      raise ValueError(f"Task {name!r} is registered twice ({_TASKS[name]} and {cls}).")
    _TASKS[name] = cls
    return cls
  return register


def task_class(name: str) -> type:
  """The class registered as `name`, importing its family's module if needed."""
  if name not in _TASKS and name in TASK_MODULES:
    importlib.import_module(TASK_MODULES[name])
  if name not in _TASKS:
    raise ValueError(f"Unknown task.name {name!r}; choose one of "
                     f"{', '.join(sorted(set(TASK_MODULES) | set(_TASKS)))}.")
  return _TASKS[name]


def create_task(task_config) -> Task:
  """Builds the task named by `task_config.name` with the config's other fields.

  Raises:
    ValueError: for an unknown task, a field the task's constructor does not take, or one it
      needs and the config lacks; the message lists the accepted fields.
  """
  cls = task_class(task_config.name)
  kwargs = {k: v for k, v in task_config.items() if k != "name"}
  parameters = inspect.signature(cls).parameters
  accepted = ", ".join(parameters) or "none besides name"
  unknown = sorted(set(kwargs) - set(parameters))
  if unknown:
    raise ValueError(f"task.{unknown[0]} is not a field of task {task_config.name!r}; it takes: "
                     f"{accepted}.")
  missing = [name for name, p in parameters.items()
             if p.default is inspect.Parameter.empty and name not in kwargs]
  if missing:
    raise ValueError(f"Task {task_config.name!r} needs task.{missing[0]}; it takes: {accepted}.")
  return cls(**kwargs)
