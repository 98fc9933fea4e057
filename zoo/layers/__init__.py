"""Shared building blocks: conv-norm-act, up-convolution and bilinear upsampling, pooling, crops."""

from zoo.layers.conv import ConvNormAct, conv_norm_act
from zoo.layers.crop import center_crop
from zoo.layers.pool import max_pool_2x2
from zoo.layers.upsample import UpConvolution, upsample_bilinear_2x

__all__ = ["ConvNormAct", "UpConvolution", "center_crop", "conv_norm_act", "max_pool_2x2",
           "upsample_bilinear_2x"]
