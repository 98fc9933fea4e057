"""``zoo.create(name, **overrides)``: builds any registered model, checking its overrides.

The families are imported here, lazily (so ``import zoo`` stays light); importing one
registers its models in `zoo.registry`.
"""

import inspect
from typing import Callable

import flax.linen as nn

from zoo import registry


def _models() -> dict[str, Callable[..., nn.Module]]:
  from zoo import detection, segmentation, transformers  # noqa: F401  (register the models)
  return registry.registered()


def _constructor(name: str) -> Callable[..., nn.Module]:
  models = _models()
  if name not in models:
    raise ValueError(f"Unknown model {name!r}. Known models: {', '.join(sorted(models))}.")
  return models[name]


def list_models() -> list[str]:
  """The registered model names, sorted."""
  return sorted(_models())


def hyperparameters(name: str) -> list[str]:
  """The keyword arguments that ``create(name, ...)`` accepts."""
  signature = inspect.signature(_constructor(name))
  return [p.name for p in signature.parameters.values()
          if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


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
