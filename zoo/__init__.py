"""zoo: a JAX model zoo for deep learning beyond classification.

    import zoo
    model = zoo.create("unet", num_classes=11)
    variables = model.init(rng, images, train=False)
    logits, aux = model.apply(variables, images, train=False)

The subpackages (SUBPACKAGES: zoo.metrics, zoo.data, zoo.detection, ...) are attributes of
`zoo`, each imported on its first use (PEP 562), so `import zoo` loads none of them and stays
fast.
"""

import importlib

from zoo.factory import create, hyperparameters, list_models
from zoo.registry import register_model
from zoo.weights import load_checkpoint

__all__ = ["create", "hyperparameters", "list_models", "load_checkpoint", "register_model"]
__version__ = "0.1.0"

SUBPACKAGES = ("backbones", "classification", "data", "detection", "layers", "metrics",
               "multitask", "segmentation", "training", "transformers", "visualization", "weights")


def __getattr__(name: str):
  """zoo.<name> for a name of SUBPACKAGES, imported now (importing sets it on `zoo`, so this
  runs once per subpackage)."""
  if name not in SUBPACKAGES:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return importlib.import_module(f"{__name__}.{name}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(SUBPACKAGES))
