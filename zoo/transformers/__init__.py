"""Transformer models: ViT and Swin."""

from zoo.transformers import swin  # noqa: F401  (registers the models)
from zoo.transformers import vit  # noqa: F401
