"""What the configs in this folder share: the variant argument, the trainer defaults, the smoke run.

A config file is Python with `get_config(variant="")` returning a `ConfigDict` (big_vision's
way): top-level trainer fields plus the sections `model` (`name` + the model's hyper-parameters),
`task` (`name` + the task's arguments), `data`, `optimizer` and `mesh`. It reads like this:

    def get_config(variant: str = "") -> ml_collections.ConfigDict:
      arg = common.parse_variant(variant, paper=False, smoke=False, res=64)
      num_classes = ml_collections.FieldReference(11)   # the model's and the task's
      config = common.trainer_config(batch_size=16, total_steps=2200, checkpoint_every=250,
                                     eval_every=1100)
      config.model = ml_collections.ConfigDict(dict(name="unet", num_classes=num_classes, ...))
      config.task = ml_collections.ConfigDict(dict(name="semantic_segmentation",
                                                   num_classes=num_classes))
      config.data = common.digit_canvases(res=arg.res)
      config.optimizer = common.optimizer(name="adam", learning_rate=3e-3)
      if arg.paper:
        config.model.update(base_width=64, ...)
      if arg.smoke:            # last: it shrinks whatever the other variants chose
        common.smoke(config)
      return config

The variant argument is what follows the file name (`--config=experiments/configs/FILE.py:ARG`):
comma-separated names that switch options on and `name=value` pairs, in any order
(`:faster,smoke`, `:segmentation,smoke`, `:res=96,smoke`). Each config applies its options in
one fixed order written in its code (the model, then the data, then the rest, smoke last), so
the order in the argument does not matter; options that contradict each other are a ValueError
(`check_exclusive`).

A value that two sections must agree on (the number of classes: the model's output width and
the task's loss and metrics) is one `ml_collections.FieldReference` placed in both, so an
override of either (`--config.model.num_classes=5`) changes both. Assigning a plain value to a
field that holds a reference sets the reference; replacing the whole section drops the tie, so
variants update sections instead of replacing them, or build the new one with the reference.
"""

from typing import Any

import ml_collections

# The embedded dataset's canvas sizes (zoo/data/digit_canvases.py, BUILDER_CONFIGS) -> its TFDS
# name. 64 is the default config, named without the suffix as every result was measured with.
DIGIT_CANVASES = {64: "digit_canvases", 96: "digit_canvases/canvas96"}


def parse_variant(argument: str, **options: Any) -> ml_collections.FrozenConfigDict:
  """The options named in a config's variant argument, the others at their defaults.

  Args:
    argument: the string after `FILE.py:`, comma-separated: `name` for an option whose default
      is False (a switch: naming it sets True), `name=value` for any other option (converted
      to the type of its default: int, float or str). `""` leaves every default.
    **options: each accepted option and its default: False (a switch), or an int, float or str.

  Returns:
    A FrozenConfigDict: option name -> value (`arg.smoke`, `arg.res`).

  Raises:
    ValueError: for an unknown or repeated name, a switch given a value, another option
      without one, or a value its type cannot take; the message lists the accepted options.
  """
  for name, default in options.items():
    if default is not False and type(default) not in (int, float, str):
      raise ValueError(f"Config variant option {name!r} defaults to {default!r}; give a switch "
                       "the default False, any other option an int, float or str default.")
  accepted = ", ".join(name if default is False else f"{name}=<{type(default).__name__}>"
                       for name, default in options.items())
  values = dict(options)
  seen = set()
  for item in filter(None, (item.strip() for item in argument.split(","))):
    name, has_value, text = item.partition("=")
    if name not in options:
      raise ValueError(f"Unknown config variant {name!r} in {argument!r}; choose from: "
                       f"{accepted} (comma-separated switches and name=value pairs).")
    if name in seen:
      raise ValueError(f"Config variant {name!r} is given twice in {argument!r}; give it once.")
    seen.add(name)
    default = options[name]
    if default is False:
      if has_value:
        raise ValueError(f"Config variant {name!r} is a switch: write {name!r} without a value "
                         f"(got {item!r}).")
      values[name] = True
      continue
    if not has_value:
      raise ValueError(f"Config variant {name!r} needs a value: write '{name}=<"
                       f"{type(default).__name__}>' (default {default!r}).")
    try:
      values[name] = type(default)(text)
    except ValueError:
      raise ValueError(f"Config variant {item!r}: {text!r} is not a {type(default).__name__}.") from None
  return ml_collections.FrozenConfigDict(values)


def check_exclusive(arg: ml_collections.FrozenConfigDict, *names: str):
  """Raises ValueError if more than one of the switches `names` is on in `arg`."""
  chosen = [name for name in names if arg[name]]
  if len(chosen) > 1:
    raise ValueError(f"Config variants {' and '.join(chosen)} do not combine: choose one of "
                     f"{', '.join(names)}.")


def trainer_config(*, batch_size: int, total_steps: int, checkpoint_every: int, eval_every: int,
                   **fields: Any) -> ml_collections.ConfigDict:
  """The top-level trainer fields with this folder's defaults, and the default mesh.

  Args:
    batch_size: global training batch size, examples.
    total_steps: training steps.
    checkpoint_every: steps between checkpoints.
    eval_every: steps between evaluations of `eval_split` (0: only the final evaluation).
    **fields: other top-level fields, replacing the defaults: `seed` (0), `init_from` (None: a
      workdir whose parameters to start from), `eval_batch_size` (64), `log_every` (50 steps),
      `keep_checkpoints` (3), `eval_split` ("validation"), `final_eval_splits`
      (("validation", "test"): evaluated at the end).

  Returns:
    A ConfigDict with the trainer fields and `mesh` (every device on the data axis); the
    caller adds `model`, `task`, `data` and `optimizer`.
  """
  config = ml_collections.ConfigDict(dict(
      seed=0, init_from=ml_collections.FieldReference(None, field_type=str),
      batch_size=batch_size, eval_batch_size=64, total_steps=total_steps, log_every=50,
      checkpoint_every=checkpoint_every, keep_checkpoints=3, eval_every=eval_every,
      eval_split="validation", final_eval_splits=("validation", "test")))
  config.update(fields)
  config.mesh = ml_collections.ConfigDict(dict(num_devices=-1, model_axis_size=1))
  return config


def optimizer(*, name: str, learning_rate: float, **fields: Any) -> ml_collections.ConfigDict:
  """`config.optimizer` (zoo/training/optimizer.py): `name` ("adam", "adamw", "momentum", "sgd")
  at peak `learning_rate`, by default a cosine schedule after 100 linear warm-up steps, no
  weight decay, gradients clipped to global norm 1; `fields` replace or add (`momentum`)."""
  config = ml_collections.ConfigDict(dict(
      name=name, learning_rate=learning_rate, schedule="cosine", warmup_steps=100,
      weight_decay=0.0, grad_clip_norm=1.0))
  config.update(fields)
  return config


def digit_canvases(*, res: int = 64, max_objects: int = 8) -> ml_collections.ConfigDict:
  """`config.data` for the embedded digit canvases: `res` x `res` pixels (a key of
  DIGIT_CANVASES), photometric augmentation, `max_objects` object slots per example (at least
  the canvases' largest digit count: 4 at 64, 6 at 96). `data_dir` None: $TFDS_DATA_DIR."""
  if res not in DIGIT_CANVASES:
    raise ValueError(f"The digit canvases come in {', '.join(map(str, DIGIT_CANVASES))} pixels, "
                     f"not {res}; choose res= one of those.")
  return ml_collections.ConfigDict(dict(
      name=DIGIT_CANVASES[res], data_dir=ml_collections.FieldReference(None, field_type=str),
      train_split="train", augment=("photometric",), max_objects=max_objects))


def real_segmentation_data(config: ml_collections.ConfigDict, num_classes, dataset: str):
  """Points a digit-canvas segmentation config at real data: "voc" (VOC 2012 segmentation is not
  in TFDS: Cityscapes' 19 classes instead) or "pet" (Oxford-IIIT Pet, 2 classes). `num_classes`
  is the config's FieldReference shared by model and task."""
  if dataset == "voc":
    num_classes.set(19)
    config.data.name = "cityscapes/semantic_segmentation"
  elif dataset == "pet":
    num_classes.set(2)
    config.data.name = "oxford_iiit_pet"
    config.eval_split = "test"
    config.final_eval_splits = ("test",)
  else:
    raise ValueError(f"Real segmentation data is 'voc' (Cityscapes) or 'pet'; got {dataset!r}.")


def smoke(config: ml_collections.ConfigDict, *, total_steps: int = 4, batch_size: int = 8,
          eval_batch_size: int = 16, warmup_steps: int = 2, log_every: int = 2,
          checkpoint_every: int = 2, eval_every: int = 0):
  """Turns `config` into a run of a few steps with small batches, for tests (in place).

  Only the trainer fields and the warm-up change; each config shrinks its own model.
  """
  config.update(total_steps=total_steps, batch_size=batch_size, eval_batch_size=eval_batch_size,
                log_every=log_every, checkpoint_every=checkpoint_every, eval_every=eval_every)
  config.optimizer.warmup_steps = warmup_steps
