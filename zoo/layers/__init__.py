"""Shared building blocks: conv-norm-act, up-convolution and bilinear upsampling, pooling, crops,
and two CPU-measured helpers (a convolution with a hand-written gradient, chunk skipping)."""

from zoo.layers.chunk_skip import skip_inactive_chunks
from zoo.layers.conv import ConvNormAct, conv_norm_act
from zoo.layers.cpu_conv_gradient import cpu_gradient_conv_general_dilated, same_convolution
from zoo.layers.crop import center_crop
from zoo.layers.pool import max_pool_2x2
from zoo.layers.upsample import UpConvolution, upsample_bilinear_2x

__all__ = ["ConvNormAct", "UpConvolution", "center_crop", "conv_norm_act",
           "cpu_gradient_conv_general_dilated", "max_pool_2x2", "same_convolution",
           "skip_inactive_chunks", "upsample_bilinear_2x"]
