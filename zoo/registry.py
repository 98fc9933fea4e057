"""The model registry: ``zoo.create(name, **overrides)`` builds any registered model.

A model file registers its named variants with ``@register_model("name")`` on a function
whose keyword arguments are the variant's hyper-parameters; ``create`` calls it with the
user's overrides, after checking that each override names one of those arguments.
"""

import inspect
from typing import Callable

import flax.linen as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
  """Decorator: registers ``constructor`` under ``name`` (names are unique)."""

  def decorator(constructor):
    if name in _MODELS:
      raise ValueError(f"Model {name!r} is registered twice: {_MODELS[name]} and {constructor}.")
    _MODELS[name] = constructor
    return constructor

  return decorator


def list_models() -> list[str]:
  """The registered model names, sorted."""
  _import_model_files()
  return sorted(_MODELS)


def create(name: str, **overrides) -> nn.Module:
  """Builds the registered model ``name`` with hyper-parameter ``overrides``.

  Raises:
    ValueError: for an unknown name (listing the known ones) or an override that the
      model does not take (listing the ones it does).
  """
  _import_model_files()
  if name not in _MODELS:
    raise ValueError(f"Unknown model {name!r}. Known models: {', '.join(sorted(_MODELS))}.")
  constructor = _MODELS[name]
  accepted = hyperparameters(name)
  unknown = sorted(set(overrides) - set(accepted))
  if unknown:
    raise ValueError(
        f"Model {name!r} has no hyper-parameter {', '.join(map(repr, unknown))}. "
        f"It takes: {', '.join(accepted)}.")
  return constructor(**overrides)


def hyperparameters(name: str) -> list[str]:
  """The keyword arguments that ``create(name, ...)`` accepts."""
  _import_model_files()
  signature = inspect.signature(_MODELS[name])
  return [p.name for p in signature.parameters.values()
          if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _import_model_files():
  # Importing the families registers their models; done lazily so `import zoo` stays light.
  from zoo import segmentation  # noqa: F401
  from zoo.detection import rcnn  # noqa: F401
  from zoo.detection import fast_rcnn  # noqa: F401
  from zoo import transformers  # noqa: F401
