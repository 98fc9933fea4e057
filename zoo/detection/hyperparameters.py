"""`override`: a stage's hyper-parameter dataclass (RPNConfig, ROIHeadsConfig) with overrides.

The detectors' registered functions take each stage's hyper-parameters as one argument
(`rpn=`, `roi_heads=`): None for the variant's defaults, an instance of the dataclass, or a
dict of the fields to change, which is what `zoo.create(name, rpn=dict(nms_threshold=0.6))`
and a config's `config.model.rpn = dict(...)` (`--config.model.rpn.nms_threshold=0.6`) pass.
"""

import dataclasses


def _frozen(value):
  """Lists (a ConfigDict's sequences may be lists) as tuples, recursively: module fields hash."""
  if isinstance(value, (list, tuple)):
    return tuple(_frozen(v) for v in value)
  return value


def override(default, overrides, argument: str):
  """`default` (a frozen dataclass instance) with `overrides` applied.

  Args:
    default: the variant's settings.
    overrides: None (keep `default`), an instance of its class (used as is), or a mapping
      (dict, ml_collections.ConfigDict) of field -> value (those fields replaced).
    argument: the argument's name, for errors.

  Raises:
    ValueError naming unknown fields and the accepted ones.
  """
  cls = type(default)
  if overrides is None:
    return default
  if isinstance(overrides, cls):
    return overrides
  try:
    items = dict(overrides)
  except (TypeError, ValueError):
    raise ValueError(f"{argument} must be a {cls.__name__} or a dict of its fields, got "
                     f"{overrides!r}.") from None
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(items) - set(names))
  if unknown:
    raise ValueError(f"{argument} has no field {', '.join(map(repr, unknown))}; "
                     f"{cls.__name__} takes {', '.join(names)}.")
  return dataclasses.replace(default, **{k: _frozen(v) for k, v in items.items()})
