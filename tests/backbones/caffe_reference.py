"""Float64 NumPy transcriptions of Caffe's layers and of the VGG-16 / FCN nets built from them.

Written from Caffe's layer definitions (conv_layer, pooling_layer.cpp, deconv_layer = the
convolution's backward scatter, crop_layer) and fcn.berkeleyvision.org's net.py / surgery.py,
independently of the zoo's JAX code (which uses lax convolutions and reduce_window). Imported
by tests/backbones and tests/segmentation.
"""

import numpy as np


def conv(x, kernel, bias=None, pad=0, dilation=1, stride=1):
  """Cross-correlation as a sum over taps. x (B, H, W, C), kernel (k, k, C, O) HWIO."""
  k = kernel.shape[0]
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  extent = dilation * (k - 1) + 1
  height = (x.shape[1] - extent) // stride + 1
  width = (x.shape[2] - extent) // stride + 1
  out = np.zeros((x.shape[0], height, width, kernel.shape[3]))
  for a in range(k):
    for b in range(k):
      window = x[:, a * dilation:a * dilation + (height - 1) * stride + 1:stride,
                 b * dilation:b * dilation + (width - 1) * stride + 1:stride]
      out += window @ kernel[a, b]
  return out if bias is None else out + bias


def pool(x, kind, kernel, stride, pad=0):
  """Caffe PoolingLayer: ceil-rounded size, last window not starting in the padding; MAX over
  the window inside the input, AVE dividing by the window clipped to [-pad, size + pad)."""

  def size(n):
    out = int(np.ceil((n + 2 * pad - kernel) / stride)) + 1
    if pad and (out - 1) * stride >= n + pad:
      out -= 1
    return out

  batch, height, width, channels = x.shape
  out = np.zeros((batch, size(height), size(width), channels))
  for i in range(out.shape[1]):
    for j in range(out.shape[2]):
      h0, w0 = i * stride - pad, j * stride - pad
      h1, w1 = min(h0 + kernel, height + pad), min(w0 + kernel, width + pad)
      area = (h1 - h0) * (w1 - w0)
      window = x[:, max(h0, 0):min(h1, height), max(w0, 0):min(w1, width)]
      if kind == "max":
        out[:, i, j] = window.max(axis=(1, 2))
      else:
        out[:, i, j] = window.sum(axis=(1, 2)) / area
  return out


def deconvolution(x, kernel, stride, pad=0):
  """Caffe Deconvolution as its scatter: input pixel (i, j) adds x[i, j] @ kernel[a, b] at output
  (stride i + a - pad, stride j + b - pad). kernel (k, k, C_in, C_out)."""
  batch, height, width, _ = x.shape
  k = kernel.shape[0]
  full = np.zeros((batch, (height - 1) * stride + k, (width - 1) * stride + k, kernel.shape[3]))
  for i in range(height):
    for j in range(width):
      for a in range(k):
        for b in range(k):
          full[:, i * stride + a, j * stride + b] += x[:, i, j] @ kernel[a, b]
  return full[:, pad:full.shape[1] - pad, pad:full.shape[2] - pad]


def deconvolution_input_gradient(g, kernel, stride, input_shape, pad=0):
  """d(sum(g * deconvolution(x)))/dx: the scatter read backwards as a gather."""
  _, height, width, _ = input_shape
  k = kernel.shape[0]
  g = np.pad(g, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.zeros(input_shape)
  for i in range(height):
    for j in range(width):
      for a in range(k):
        for b in range(k):
          out[:, i, j] += g[:, i * stride + a, j * stride + b] @ kernel[a, b].T
  return out


def crop(x, offset, size):
  """Caffe Crop (axis 2 of NCHW = axis 1 of NHWC) with one offset for both spatial axes."""
  return x[:, offset:offset + size[0], offset:offset + size[1]]


def upsample_filt(size):
  """fcn.berkeleyvision.org surgery.upsample_filt, transcribed."""
  factor = (size + 1) // 2
  if size % 2 == 1:
    center = factor - 1
  else:
    center = factor - 0.5
  og = np.ogrid[:size, :size]
  return (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)


def relu(x):
  return np.maximum(x, 0)


def vgg16(params, x, *, pad100=False, dilated=False):
  """VGG-16 (configuration D) with Caffe pooling, fc6/fc7 as convolutions; no dropout, no BN.
  Returns the dict of pool1..pool5 (pool5a), fc6, fc7 maps."""
  depths = (2, 2, 3, 3, 3)
  features = {}
  for stage, depth in enumerate(depths, start=1):
    for index in range(1, depth + 1):
      layer = params[f"conv{stage}_{index}"]
      dilation = 2 if (dilated and stage == 5) else 1
      pad = 100 if (pad100 and stage == index == 1) else dilation
      x = relu(conv(x, layer["kernel"], layer["bias"], pad, dilation))
    if dilated:
      x = pool(x, "max", 3, 2 if stage <= 3 else 1, 1)
    else:
      x = pool(x, "max", 2, 2)
    features[f"pool{stage}"] = x
  if dilated:
    x = features["pool5a"] = pool(x, "avg", 3, 1, 1)
  if "fc6" in params:
    fc6 = params["fc6"]
    k = fc6["kernel"].shape[0]
    dilation = 12 if dilated else 1
    pad = 0 if pad100 else dilation * (k - 1) // 2
    x = features["fc6"] = relu(conv(x, fc6["kernel"], fc6["bias"], pad, dilation))
    x = features["fc7"] = relu(conv(x, params["fc7"]["kernel"], params["fc7"]["bias"]))
  return features


def fcn(params, x, *, variant, pad100, skip_scaling, kernels=None):
  """FCN-32s/16s/8s as voc-fcn{32s,16s,8s,8s-atonce}/net.py builds it (pad100) or with "same"
  padding and the crop offsets f / 2 (zoo.segmentation.fcn's module doc). `kernels` gives the
  deconvolution kernels by layer name (default: the fixed diagonal bilinear ones)."""
  features = vgg16(params["backbone"], x, pad100=pad100)
  num_classes = params["score_fr"]["kernel"].shape[-1]

  def score(y, name):
    return conv(y, params[name]["kernel"], params[name]["bias"])

  def upscore(y, factor, name):
    if kernels and name in kernels:
      kernel = kernels[name]
    else:
      kernel = np.zeros((2 * factor, 2 * factor, num_classes, num_classes))
      for c in range(num_classes):
        kernel[:, :, c, c] = upsample_filt(2 * factor)
    return deconvolution(y, kernel, factor)

  def fuse(up, skip, name, offset):
    scale = {"pool4": 0.01, "pool3": 0.0001}[name] if skip_scaling else 1.0
    s = score(skip * scale, f"score_{name}")
    if pad100:
      return up + crop(s, offset, up.shape[1:3])
    return crop(up, 1, s.shape[1:3]) + s

  y = score(features["fc7"], "score_fr")
  if variant == "32s":
    return crop(upscore(y, 32, "upscore"), 19 if pad100 else 16, x.shape[1:3])
  y = fuse(upscore(y, 2, "upscore2"), features["pool4"], "pool4", 5)
  if variant == "16s":
    return crop(upscore(y, 16, "upscore16"), 27 if pad100 else 8, x.shape[1:3])
  y = fuse(upscore(y, 2, "upscore_pool4"), features["pool3"], "pool3", 9)
  return crop(upscore(y, 8, "upscore8"), 31 if pad100 else 4, x.shape[1:3])
