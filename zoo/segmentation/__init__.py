"""Semantic segmentation models: U-Net (later FCN, DeepLab)."""

from zoo.segmentation import unet  # noqa: F401  (registers the models)
