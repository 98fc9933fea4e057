"""A composite task: one sub-task per head of a multi-head model.

    task:  name="multitask",
           tasks={"segmentation": {name: "semantic_segmentation", num_classes: 11},
                  "classes": {name: "multi_label_classification", num_classes: 10}},
           weights={"segmentation": 1.0, "classes": 0.5}

The model returns {head: that head's outputs}; each head is scored by its own task, the loss
is the weighted sum, and evaluation holds one evaluator per head, so one evaluation pass
reports every head's metrics, prefixed "head/" (e.g. "segmentation/miou",
"classes/exact_accuracy").
"""

from typing import Mapping

import ml_collections

from zoo.training.task import Evaluator, Task, create_task, register_task


class CompositeEvaluator(Evaluator):
  """One evaluator per head; `result` prefixes each head's metrics with "head/"."""

  def __init__(self, evaluators: Mapping[str, Evaluator]):
    self.evaluators = dict(evaluators)

  def update(self, outputs, batch):
    for head, evaluator in self.evaluators.items():
      evaluator.update(outputs[head], batch)

  def result(self) -> dict:
    return {f"{head}/{k}": v for head, evaluator in self.evaluators.items()
            for k, v in evaluator.result().items()}


@register_task("multitask")
class MultiTask(Task):
  """Scores each head of a multi-head model with its own task (module doc).

  Args:
    tasks: {head: task config (a dict with `name` and the task's arguments)}.
    weights: {head: loss weight}; heads not named weigh 1.
  """

  def __init__(self, tasks: Mapping[str, Mapping], weights: Mapping[str, float] | None = None):
    if not tasks:
      raise ValueError("multitask needs at least one head in task.tasks: {head: {name: ...}}.")
    self.tasks = {head: create_task(ml_collections.ConfigDict(dict(config)))
                  for head, config in tasks.items()}
    self.weights = {head: 1.0 for head in self.tasks}
    unknown = set(weights or {}) - set(self.tasks)
    if unknown:
      raise ValueError(f"task.weights names heads {sorted(unknown)} that task.tasks does not have "
                       f"({sorted(self.tasks)}).")
    self.weights.update(weights or {})

  @property
  def features(self):
    return tuple(dict.fromkeys(f for task in self.tasks.values() for f in task.features))

  @property
  def eval_features(self):
    return tuple(dict.fromkeys(f for task in self.tasks.values() for f in task.eval_features
                               if f not in self.features))

  def model_inputs(self, batch, *, train):
    """The union of the heads' model inputs; heads that name the same input must agree."""
    inputs = {}
    for head, task in self.tasks.items():
      for key, value in task.model_inputs(batch, train=train).items():
        if key in inputs and inputs[key] is not value:
          raise ValueError(f"Head {head!r} hands the model a different {key!r} than another head: "
                           "a multi-head model gets one set of inputs.")
        inputs[key] = value
    return inputs

  def check_batch(self, batch):
    for task in self.tasks.values():
      task.check_batch(batch)

  def loss(self, outputs, batch):
    total, metrics = 0.0, {}
    for head, task in self.tasks.items():
      loss, head_metrics = task.loss(outputs[head], batch)
      total = total + self.weights[head] * loss
      metrics.update({f"{head}/{k}": v for k, v in head_metrics.items()})
    return total, dict(metrics, loss=total)

  def eval_outputs(self, outputs, batch):
    return {head: task.eval_outputs(outputs[head], batch) for head, task in self.tasks.items()}

  def evaluator(self):
    return CompositeEvaluator({head: task.evaluator() for head, task in self.tasks.items()})

  def predictions(self, outputs, batch):
    return {head: task.predictions(outputs[head], batch) for head, task in self.tasks.items()}

  def draw(self, batch, predictions, index, class_names=None):
    """Every head's panels, in the order of `tasks`."""
    return [panel for head, task in self.tasks.items()
            for panel in task.draw(batch, predictions[head], index, class_names=class_names)]
