"""2x2 stride-2 max pooling, the U-Net's downsampling step."""


def max_pool_2x2(x):
  """Max over non-overlapping 2x2 windows; an odd last row or column is dropped.

  The same values as `flax.linen.max_pool(x, (2, 2), (2, 2))`, written as a reshape and a
  max: its gradient is then an elementwise mask, where `reduce_window`'s gradient on
  XLA:CPU builds four int32 iota index arrays, a variadic reduce_window and a scatter
  (~15% of a small U-Net's training step). Only at exact ties within a window do the
  gradients differ (this one splits the gradient among the tied inputs, reduce_window
  gives it to one); after a ReLU, ties are zeros whose gradient the ReLU zeroes anyway.

  Args:
    x: (B, H, W, C).

  Returns:
    (B, H // 2, W // 2, C), same dtype.
  """
  batch, height, width, channels = x.shape
  x = x[:, :height // 2 * 2, :width // 2 * 2]
  return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))
