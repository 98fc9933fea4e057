"""Float64 NumPy transcriptions of the layers' definitions, independent of the zoo's JAX code.

Each function follows the textbook (or the library) definition literally: convolution as a
sum over kernel taps, transposed convolution as lax.conv_transpose defines it (dilate the
input by the stride, pad, correlate), PyTorch's ConvTranspose2d as its scatter, bilinear
interpolation from source coordinates. Imported by tests/layers and tests/segmentation.
"""

import numpy as np


def conv2d(x, kernel, bias=None, padding="SAME"):
  """Cross-correlation, as lax.conv / nn.Conv. x (B, H, W, C), kernel (kh, kw, C, O) HWIO."""
  kh, kw = kernel.shape[:2]
  if padding == "SAME":
    top, left = (kh - 1) // 2, (kw - 1) // 2
    x = np.pad(x, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0)))
  height, width = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  out = np.zeros(x.shape[:1] + (height, width, kernel.shape[3]))
  for a in range(kh):
    for b in range(kw):
      out += x[:, a:a + height, b:b + width] @ kernel[a, b]
  return out if bias is None else out + bias


def conv2d_strided(x, kernel, *, stride=1, dilation=1, pad=0):
  """Cross-correlation with PyTorch's Conv2d arguments: out[i, j] = sum over taps (a, b) of
  x_padded[stride i + dilation a, stride j + dilation b] @ kernel[a, b]; x (B, H, W, C)
  padded by `pad` on every side, kernel (kh, kw, C, O) HWIO."""
  kh, kw = kernel.shape[:2]
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  height = (x.shape[1] - dilation * (kh - 1) - 1) // stride + 1
  width = (x.shape[2] - dilation * (kw - 1) - 1) // stride + 1
  out = np.zeros(x.shape[:1] + (height, width, kernel.shape[3]))
  for a in range(kh):
    for b in range(kw):
      rows = slice(dilation * a, dilation * a + stride * (height - 1) + 1, stride)
      cols = slice(dilation * b, dilation * b + stride * (width - 1) + 1, stride)
      out += x[:, rows, cols] @ kernel[a, b]
  return out


def conv_transpose_flax(x, kernel, bias, stride=2):
  """nn.ConvTranspose(padding="VALID", transpose_kernel=False) by lax.conv_transpose's
  definition: dilate x by `stride`, pad k - 1 before and the rest of k + s - 2 + max(k - s, 0)
  after, then correlate with the (unflipped) kernel."""
  batch, height, width, channels = x.shape
  k = kernel.shape[0]
  dilated = np.zeros((batch, (height - 1) * stride + 1, (width - 1) * stride + 1, channels))
  dilated[:, ::stride, ::stride] = x
  before = k - 1
  after = k + stride - 2 + max(k - stride, 0) - before
  dilated = np.pad(dilated, ((0, 0), (before, after), (before, after), (0, 0)))
  return conv2d(dilated, kernel, bias, "VALID")


def conv_transpose_torch(x, weight, bias, stride=2):
  """PyTorch ConvTranspose2d (padding 0) as its scatter: input pixel (i, j) adds
  x[i, j] @ weight[:, :, a, b] at output (i * stride + a, j * stride + b).
  x (B, H, W, C_in) NHWC, weight (C_in, C_out, k, k) as PyTorch stores it."""
  batch, height, width, _ = x.shape
  k = weight.shape[2]
  out = np.zeros((batch, (height - 1) * stride + k, (width - 1) * stride + k, weight.shape[1]))
  for i in range(height):
    for j in range(width):
      for a in range(k):
        for b in range(k):
          out[:, i * stride + a, j * stride + b] += x[:, i, j] @ weight[:, :, a, b]
  return out + bias


def max_pool_2x2(x):
  """Max over non-overlapping 2x2 windows (odd last row/column dropped)."""
  height, width = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
  x = x[:, :height, :width]
  return np.maximum.reduce([x[:, a::2, b::2] for a in (0, 1) for b in (0, 1)])


def center_crop(x, size):
  top, left = (x.shape[1] - size[0]) // 2, (x.shape[2] - size[1]) // 2
  return x[:, top:top + size[0], left:left + size[1]]


def upsample_bilinear_2x(x):
  """Bilinear x2, half-pixel centres (align_corners=False), clamped at the borders."""
  for axis in (1, 2):
    n = x.shape[axis]
    source = (np.arange(2 * n) + 0.5) / 2 - 0.5
    low = np.floor(source).astype(int)
    frac = source - low
    shape = [1] * x.ndim
    shape[axis] = 2 * n
    frac = frac.reshape(shape)
    x = ((1 - frac) * np.take(x, low.clip(0, n - 1), axis=axis)
         + frac * np.take(x, (low + 1).clip(0, n - 1), axis=axis))
  return x


def batch_norm(x, params, stats, *, train, epsilon=1e-5):
  """Returns (normalised x, the batch's (mean, biased variance) when training)."""
  if train:
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  else:
    mean, var = stats["mean"], stats["var"]
  return (x - mean) / np.sqrt(var + epsilon) * params["scale"] + params["bias"], (mean, var)


def relu(x):
  return np.maximum(x, 0)


def conv_norm_act(x, params, stats, *, padding, norm, train):
  x = conv2d(x, params["conv"]["kernel"], params["conv"].get("bias"), padding)
  if norm == "batch":
    x, _ = batch_norm(x, params["norm"], stats and stats["norm"], train=train)
  return relu(x)


def unet(params, images, *, depth, padding="VALID", norm="none", upsample="transpose",
         batch_stats=None, train=False):
  """Ronneberger et al.'s U-Net from its description (paper Fig. 1 and Sec. 2), on a params
  tree with the zoo's names. Returns logits (B, H', W', num_classes) float64."""

  def stage(x, name):
    for conv in ("conv1", "conv2"):
      x = conv_norm_act(x, params[name][conv], batch_stats and batch_stats[name][conv],
                        padding=padding, norm=norm, train=train)
    return x

  x = images.astype(np.float64)
  skips = []
  for level in range(depth):
    x = stage(x, f"encoder_{level}")
    skips.append(x)
    x = max_pool_2x2(x)
  x = stage(x, "bottleneck")
  for level in reversed(range(depth)):
    up = params[f"up_{level}"]
    if upsample == "transpose":
      x = conv_transpose_flax(x, up["kernel"], up["bias"])
    else:
      x = conv2d(upsample_bilinear_2x(x), up["kernel"], up["bias"], "VALID")
    x = np.concatenate([center_crop(skips[level], x.shape[1:3]), x], axis=-1)
    x = stage(x, f"decoder_{level}")
  return conv2d(x, params["head"]["kernel"], params["head"]["bias"], "VALID")


def unit_directions(rng, arrays):
  """Random directions, one per array, of total Euclidean length 1."""
  directions = [rng.standard_normal(np.shape(a)) for a in arrays]
  length = np.sqrt(sum(np.sum(d**2) for d in directions))
  return [d / length for d in directions]


def directional_derivative(f, arrays, directions, epsilon=1e-7):
  """Central difference of scalar f(*arrays) along `directions` (same structure), float64.

  With unit directions a step of 1e-7 moves each ReLU input by ~1e-7: it crosses a kink with
  probability ~1e-7 per unit, and float64 round-off stays ~1e-9 relative."""
  plus = [a + epsilon * d for a, d in zip(arrays, directions)]
  minus = [a - epsilon * d for a, d in zip(arrays, directions)]
  return (f(*plus) - f(*minus)) / (2 * epsilon)
