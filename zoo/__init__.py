"""zoo: a JAX model zoo for deep learning beyond classification.

    import zoo
    model = zoo.create("unet", num_classes=11)
    variables = model.init(rng, images, train=False)
    logits, aux = model.apply(variables, images, train=False)
"""

from zoo.factory import create, hyperparameters, list_models
from zoo.registry import register_model
from zoo.weights import load_checkpoint

__all__ = ["create", "hyperparameters", "list_models", "load_checkpoint", "register_model"]
__version__ = "0.1.0"
