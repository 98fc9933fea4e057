"""float64 NumPy brute force of the fully connected CRF's mean field (Krähenbühl and Koltun 2011,
as DeepLab's and CRF-as-RNN's `dense_crf` use it, exact: every pair of pixels), and central finite
differences of it for the gradient tests.

Written from the equations in kernels/crf/api.py's docstring (the issue's statement), with full
(N, N) kernel matrices, so it only suits small images.
"""

import numpy as np


def softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=-1, keepdims=True)


def kernel_matrices(image, pos_xy_std, bi_xy_std, bi_rgb_std):
  """(N, N) spatial and bilateral kernels of one (H, W, C) image, diagonal (j == i) zeroed."""
  h, w, c = image.shape
  rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
  p = np.stack([rows.ravel(), cols.ravel()], axis=1)                     # (N, 2)
  colour = np.asarray(image, np.float64).reshape(-1, c)                  # (N, C)
  dp2 = ((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)
  dc2 = ((colour[:, None, :] - colour[None, :, :]) ** 2).sum(-1)
  k_pos = np.exp(-dp2 / (2 * pos_xy_std ** 2))
  k_bi = np.exp(-dp2 / (2 * bi_xy_std ** 2) - dc2 / (2 * bi_rgb_std ** 2))
  np.fill_diagonal(k_pos, 0.0)
  np.fill_diagonal(k_bi, 0.0)
  return k_pos, k_bi


def bilateral_filter(q, image, bi_xy_std, bi_rgb_std):
  """(B, H, W, L) float64 m_bi of kernels.dense_crf.bilateral_filter."""
  q = np.asarray(q, np.float64)
  b, h, w, l = q.shape
  out = np.empty_like(q)
  for n in range(b):
    _, k_bi = kernel_matrices(image[n], 1.0, bi_xy_std, bi_rgb_std)
    out[n] = (k_bi @ q[n].reshape(-1, l)).reshape(h, w, l)
  return out


def dense_crf(logits, image, iterations=10, pos_w=3.0, pos_xy_std=1.0, bi_w=4.0, bi_xy_std=67.0,
              bi_rgb_std=3.0, compatibility=None):
  """(B, H, W, L) float64 Q after `iterations` mean-field steps, loops over images and steps."""
  logits = np.asarray(logits, np.float64)
  b, h, w, l = logits.shape
  mu = 1.0 - np.eye(l) if compatibility is None else np.asarray(compatibility, np.float64)
  out = np.empty_like(logits)
  for n in range(b):
    k_pos, k_bi = kernel_matrices(image[n], pos_xy_std, bi_xy_std, bi_rgb_std)
    unary = logits[n].reshape(-1, l)
    q = softmax(unary)
    for _ in range(iterations):
      message = bi_w * (k_bi @ q) + pos_w * (k_pos @ q)      # (N, L)
      q = softmax(unary - message @ mu.T)
    out[n] = q.reshape(h, w, l)
  return out


def finite_difference(fn, x, step=1e-6):
  """d fn / d x (x's shape) by central differences, fn: float64 array -> float."""
  x = np.asarray(x, np.float64)
  grad = np.empty_like(x)
  flat, out = x.reshape(-1), grad.reshape(-1)
  for k in range(flat.size):
    plus, minus = flat.copy(), flat.copy()
    plus[k] += step
    minus[k] -= step
    out[k] = (fn(plus.reshape(x.shape)) - fn(minus.reshape(x.shape))) / (2 * step)
  return grad
