"""The optax optimizer and learning-rate schedule described by a config.

    config.optimizer = dict(name="adam", learning_rate=1e-3, schedule="cosine",
                            warmup_steps=100, weight_decay=0.0, momentum=0.9,
                            grad_clip_norm=1.0)

`name` and `learning_rate` are required; the other fields default as in
`zoo.training.run_config.FIELDS["optimizer"]`, and any other field is a ValueError.
"""

import optax

from zoo.training import run_config

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "linear")


def make_schedule(optimizer_config, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 over `warmup_steps`, then the named decay to 0 at `total_steps`."""
  fields = run_config.section(optimizer_config, "optimizer")
  peak, warmup, name = fields["learning_rate"], fields["warmup_steps"], fields["schedule"]
  decay_steps = max(total_steps - warmup, 1)
  if name == "constant":
    decay = optax.constant_schedule(peak)
  elif name == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps)
  elif name == "linear":
    decay = optax.linear_schedule(peak, 0.0, decay_steps)
  else:
    raise ValueError(f"Unknown optimizer.schedule {name!r}; choose one of {', '.join(SCHEDULES)}.")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(optimizer_config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, learning-rate schedule) with optional global-norm gradient clipping."""
  schedule = make_schedule(optimizer_config, total_steps)
  fields = run_config.section(optimizer_config, "optimizer")
  name, weight_decay = fields["name"], fields["weight_decay"]
  if name == "sgd":
    optimizer = optax.sgd(schedule)
  elif name == "momentum":
    optimizer = optax.sgd(schedule, momentum=fields["momentum"], nesterov=False)
  elif name == "adam":
    optimizer = optax.adam(schedule)
  elif name == "adamw":
    optimizer = optax.adamw(schedule, weight_decay=weight_decay)
  else:
    raise ValueError(f"Unknown optimizer.name {name!r}; choose one of {', '.join(OPTIMIZERS)}.")
  if name != "adamw" and weight_decay:
    # Coupled L2 decay, as in the SGD recipes of the detection and segmentation papers.
    optimizer = optax.chain(optax.add_decayed_weights(weight_decay), optimizer)
  clip = fields["grad_clip_norm"]
  if clip:
    optimizer = optax.chain(optax.clip_by_global_norm(clip), optimizer)
  return optimizer, schedule
