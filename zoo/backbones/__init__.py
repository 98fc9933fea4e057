"""Backbones shared by the families: VGG-16 (FCN, DeepLab-LargeFOV, Fast / Faster R-CNN's
conv5_3), ResNet-50/101 (DeepLab v2/v3, the R-CNNs) and the FPN over a ResNet (the R-CNNs).
Each is a Flax module whose `__call__(images, *, train)` returns a dict of named feature maps,
with a `strides` property giving their strides (`FPN` alone maps C2..C5 to P2..P6)."""

from zoo.backbones.fpn import FPN, ResNetFPN
from zoo.backbones.resnet import RESNET_BLOCKS, ResNet
from zoo.backbones.vgg import VGG16, caffe_pool

__all__ = ["FPN", "RESNET_BLOCKS", "ResNet", "ResNetFPN", "VGG16", "caffe_pool"]
