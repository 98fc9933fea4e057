"""Semantic segmentation models: U-Net, FCN-32s/16s/8s, DeepLab (LargeFOV, v2, v3) and the
CRF-as-RNN layer."""

from zoo.segmentation import deeplab  # noqa: F401  (registers the models)
from zoo.segmentation import fcn  # noqa: F401
from zoo.segmentation import unet  # noqa: F401
