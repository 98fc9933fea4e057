"""The model registry: ``zoo.create(name, **overrides)`` builds any registered model.

A model file registers each named variant with ``@register_model("name")`` on a thin function
whose keyword arguments are exactly the variant's hyper-parameters; ``create`` calls it with
the user's overrides, after checking that each override names one of those arguments.
Names follow one scheme, family_variant_backbone (``deeplab_v3_r50``, ``fcn_8s_vgg16``,
``mask_rcnn_r50_fpn``), leaving out the parts a model does not have (``unet``, ``vit_b16``).
Each family's ``__init__`` imports its model files; this module lists the families.
"""

import inspect
from typing import Callable

import flax.linen as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: dict[str, str] = {}  # an older name -> the registered name


def register_model(name: str, *, aliases: tuple[str, ...] = ()):
  """Decorator: registers ``constructor`` under ``name`` (names are unique); ``aliases`` are
  older names that ``create`` still accepts (``list_models`` does not list them)."""

  def decorator(constructor):
    for taken in (name, *aliases):
      if taken in _MODELS or taken in _ALIASES:
        raise ValueError(f"Model name {taken!r} is registered twice: for "
                         f"{_MODELS.get(taken) or _MODELS[_ALIASES[taken]]} and {constructor}.")
    _MODELS[name] = constructor
    _ALIASES.update(dict.fromkeys(aliases, name))
    return constructor

  return decorator


def list_models() -> list[str]:
  """The registered model names, sorted (aliases left out)."""
  _import_families()
  return sorted(_MODELS)


def _constructor(name: str) -> Callable[..., nn.Module]:
  _import_families()
  name = _ALIASES.get(name, name)
  if name not in _MODELS:
    raise ValueError(f"Unknown model {name!r}. Known models: {', '.join(sorted(_MODELS))}.")
  return _MODELS[name]


def create(name: str, **overrides) -> nn.Module:
  """Builds the registered model ``name`` with hyper-parameter ``overrides``.

  Raises:
    ValueError: for an unknown name (listing the known ones) or an override that the
      model does not take (listing the ones it does).
  """
  constructor = _constructor(name)
  accepted = hyperparameters(name)
  unknown = sorted(set(overrides) - set(accepted))
  if unknown:
    raise ValueError(
        f"Model {name!r} has no hyper-parameter {', '.join(map(repr, unknown))}. "
        f"It takes: {', '.join(accepted)}.")
  return constructor(**overrides)


def hyperparameters(name: str) -> list[str]:
  """The keyword arguments that ``create(name, ...)`` accepts."""
  signature = inspect.signature(_constructor(name))
  return [p.name for p in signature.parameters.values()
          if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _import_families():
  # The model families: importing one registers its models (lazily, so `import zoo` stays light).
  from zoo import detection, segmentation, transformers  # noqa: F401
