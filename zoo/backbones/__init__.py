"""Backbones shared by the families: VGG-16 (FCN, DeepLab-LargeFOV) and ResNet-50/101
(DeepLab v2/v3; later the detectors). Each is a Flax module whose `__call__(images, *,
train)` returns a dict of named feature maps, with a `strides` property giving their strides."""

from zoo.backbones.resnet import RESNET_BLOCKS, ResNet
from zoo.backbones.vgg import VGG16, caffe_pool

__all__ = ["RESNET_BLOCKS", "ResNet", "VGG16", "caffe_pool"]
