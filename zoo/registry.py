"""The model registry: where model files register their named variants.

A model file registers each named variant with ``@register_model("name")`` on a thin function
whose keyword arguments are exactly the variant's hyper-parameters. Names follow one scheme,
family_variant_backbone (``deeplab_v3_r50``, ``fcn_8s_vgg16``, ``mask_rcnn_r50_fpn``), leaving
out the parts a model does not have (``unet``, ``vit_b16``). This module imports no model
file; `zoo.factory` (``zoo.create``) imports the families and builds from here.
"""

from typing import Callable

import flax.linen as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
  """Decorator: registers ``constructor`` under ``name`` (names are unique)."""

  def decorator(constructor):
    if name in _MODELS:
      raise ValueError(f"Model name {name!r} is registered twice: for {_MODELS[name]} and "
                       f"{constructor}.")
    _MODELS[name] = constructor
    return constructor

  return decorator


def registered() -> dict[str, Callable[..., nn.Module]]:
  """{name: constructor} of every model registered so far (a copy)."""
  return dict(_MODELS)
