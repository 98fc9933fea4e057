"""What the window-attention backends share: Swin's relative position bias, the shifted windows'
region mask and the static geometry of a call.

The mask is computed from region ids of token positions, never stored as an (nW, N, N)
argument: region ids come from slicing each axis of the rolled map into [0, size - M),
[size - M, size - shift), [size - shift, size), and tokens of different regions get MASK_VALUE.
The bias is gathered with two small one-hot (M, M, 2M - 1) factors, one per axis, instead of a
gather through the (N, N) index: its table gradient is then a matrix product, deterministic on
every backend (a gather's gradient is a scatter-add, which uses atomics on GPU).
`relative_position_index` gives the official index for checkpoints and tests.
"""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

MASK_VALUE = -100.0  # the official attention mask between tokens of different regions


def relative_position_index(window_size: int) -> np.ndarray:
  """(N, N) int64 index into the ((2M-1)^2, heads) bias table, N = M * M, as the official code.

  Entry [n, m] is (dy + M - 1) * (2M - 1) + (dx + M - 1) with (dy, dx) the window coordinates
  of token n minus those of token m (tokens row-major in the window).
  """
  m = window_size
  coords = np.stack(np.meshgrid(np.arange(m), np.arange(m), indexing="ij")).reshape(2, -1)
  relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (m - 1)
  return relative[:, :, 0] * (2 * m - 1) + relative[:, :, 1]


def relative_position_bias(table, window_size):
  """(heads, N, N) float32 bias: table[relative_position_index[n, m], h], via one-hot factors."""
  m = window_size
  offsets = np.arange(m)[:, None] - np.arange(m)[None, :] + (m - 1)        # (M, M) in [0, 2M-2]
  one_hot = jnp.asarray(offsets[:, :, None] == np.arange(2 * m - 1), jnp.float32)  # (M, M, 2M-1)
  table = table.astype(jnp.float32).reshape(2 * m - 1, 2 * m - 1, -1)      # (dy, dx, heads)
  # bias[h, (i, j), (k, l)] = table[i - k + M - 1, j - l + M - 1, h]; HIGHEST keeps the table
  # values exact (no bfloat16 / TF32 rounding of the one-hot products).
  bias = jnp.einsum("ika,jlb,abh->hijkl", one_hot, one_hot, table,
                    precision=lax.Precision.HIGHEST)
  return bias.reshape(-1, m * m, m * m)


def region_mask(height, width, window_size, shift):
  """(H/M, W/M, N, N) float32: MASK_VALUE between tokens of different regions of the rolled map."""
  m = window_size

  def region(size):  # 0, 1, 2 along one axis of the rolled map
    position = jnp.arange(size)
    return (position >= size - m).astype(jnp.int32) + (position >= size - shift).astype(jnp.int32)

  ids = region(height)[:, None] * 3 + region(width)[None, :]                     # (H, W)
  ids = ids.reshape(height // m, m, width // m, m).transpose(0, 2, 1, 3)
  ids = ids.reshape(height // m, width // m, m * m)
  return jnp.where(ids[..., :, None] != ids[..., None, :], MASK_VALUE, 0.0).astype(jnp.float32)


class WindowGeometry(NamedTuple):
  """The static shape of one call: the token map, the window, the shift and the heads."""
  height: int
  width: int
  window: int       # M
  shift: int
  num_heads: int
  head_dim: int

  @property
  def tokens(self):  # N, tokens per window
    return self.window * self.window

  @property
  def windows_per_band(self):
    return self.width // self.window

  @property
  def bands(self):
    return self.height // self.window
