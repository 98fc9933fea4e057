"""2x2 stride-2 max pooling, the U-Net's downsampling step."""

import jax
import jax.numpy as jnp


@jax.custom_vjp
def max_pool_2x2(x):
  """Max over non-overlapping 2x2 windows; an odd last row or column is dropped.

  Values and gradients equal `flax.linen.max_pool(x, (2, 2), (2, 2))`'s, ties included: the
  gradient goes to the first maximum of each window in row-major order, as reduce_window's
  select-and-scatter does. Written as a reshape and a max with a hand-written backward
  pass, because on XLA:CPU reduce_window's gradient builds four int32 iota index arrays, a
  variadic reduce_window and a scatter (~15% of a small U-Net's training step), and
  jnp.max's own gradient divides among ties with a reduction; this backward is one
  elementwise fusion.

  Args:
    x: (B, H, W, C).

  Returns:
    (B, H // 2, W // 2, C), same dtype.
  """
  return _windows(x).max(axis=(2, 4))


def _windows(x):
  batch, height, width, channels = x.shape
  x = x[:, :height // 2 * 2, :width // 2 * 2]
  return x.reshape(batch, height // 2, 2, width // 2, 2, channels)


def _forward(x):
  y = max_pool_2x2(x)
  return y, (x, y)


def _backward(residuals, g):
  x, y = residuals
  windows = _windows(x)
  is_max = windows == y[:, :, None, :, None]
  taken = jnp.zeros_like(y, dtype=bool)
  rows = []
  for a in (0, 1):
    columns = []
    for b in (0, 1):
      first = is_max[:, :, a, :, b] & ~taken
      taken = taken | first
      columns.append(jnp.where(first, g, jnp.zeros_like(g)))
    rows.append(jnp.stack(columns, axis=3))
  grad = jnp.stack(rows, axis=2).reshape(windows.shape[0], 2 * y.shape[1], 2 * y.shape[2], -1)
  # Rows and columns dropped by an odd size get no gradient.
  return (jnp.pad(grad, ((0, 0), (0, x.shape[1] - grad.shape[1]),
                         (0, x.shape[2] - grad.shape[2]), (0, 0))),)


max_pool_2x2.defvjp(_forward, _backward)
