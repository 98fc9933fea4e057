"""Transformer models: ViT (Swin to follow)."""

from zoo.transformers import vit  # noqa: F401  (registers the models)
