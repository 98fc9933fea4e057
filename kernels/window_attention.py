"""Shifted-window multi-head self-attention (Liu et al. 2021, Swin Transformer), XLA reference.

The semantics are microsoft/Swin-Transformer's `SwinTransformerBlock` + `WindowAttention`
(models/swin_transformer.py) from the output of the `qkv` Linear to the input of the `proj`
Linear, mapped back to token positions. For a (B, H, W, 3C) map of projected tokens and a
window of M x M tokens (N = M * M):

  1. shift > 0: roll the map by (-shift, -shift) over (H, W) (the cyclic shift);
  2. partition it into nW = (H / M) * (W / M) windows of N tokens (row-major in the window);
  3. per window and head h (channels [q | k | v], each C = heads * head_dim, heads
     contiguous): logits = (q * head_dim**-0.5) @ k^T + bias_h + mask, with
     bias_h[n, m] = table[relative_position_index[n, m], h] and
     relative_position_index[n, m] = (dy + M - 1) * (2M - 1) + (dx + M - 1), (dy, dx) = token n's
     window coordinates minus token m's; mask[n, m] = -100 when n and m lie in different
     regions of the rolled map (region ids from slicing each axis into [0, size - M),
     [size - M, size - shift), [size - shift, size)), 0 otherwise (no mask when shift = 0);
  4. softmax over m in float32, times v, heads concatenated;
  5. windows merged back (window_reverse) and the map rolled by (+shift, +shift).

The mask is computed from region ids of token positions, never stored as an (nW, N, N)
argument. The bias is gathered with two small one-hot (M, M, 2M - 1) factors, one per axis,
instead of a gather through the (N, N) index: its table gradient is then a matrix product,
deterministic on every backend (a gather's gradient is a scatter-add, which uses atomics on
GPU). `relative_position_index` gives the official index for checkpoints and tests.

Only the XLA version exists so far; gradients come from JAX's autodiff.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels import _common

_IMPLEMENTATIONS = ("xla",)

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


def _relative_position_bias(table, window_size):
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


def _region_mask(height, width, window_size, shift):
  """(H/M, W/M, N, N) float32: MASK_VALUE between tokens of different regions of the rolled map."""
  m = window_size

  def region(size):  # 0, 1, 2 along one axis of the rolled map
    position = jnp.arange(size)
    return (position >= size - m).astype(jnp.int32) + (position >= size - shift).astype(jnp.int32)

  ids = region(height)[:, None] * 3 + region(width)[None, :]                     # (H, W)
  ids = ids.reshape(height // m, m, width // m, m).transpose(0, 2, 1, 3)
  ids = ids.reshape(height // m, width // m, m * m)
  return jnp.where(ids[..., :, None] != ids[..., None, :], MASK_VALUE, 0.0).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("num_heads", "window_size", "shift"))
def _xla_window_attention(qkv, table, *, num_heads, window_size, shift):
  b, h, w, c3 = qkv.shape
  m, c = window_size, c3 // 3
  head_dim = c // num_heads
  dtype = qkv.dtype
  if shift:
    qkv = jnp.roll(qkv, (-shift, -shift), axis=(1, 2))
  # (B, H, W, 3C) -> (3, B, H/M, W/M, heads, N, head_dim)
  windows = qkv.reshape(b, h // m, m, w // m, m, 3, num_heads, head_dim)
  windows = windows.transpose(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, b, h // m, w // m, num_heads,
                                                                 m * m, head_dim)
  q, k, v = windows[0], windows[1], windows[2]
  q = q * jnp.asarray(head_dim ** -0.5, dtype)
  logits = jnp.einsum("bxyhnd,bxyhmd->bxyhnm", q, k, preferred_element_type=jnp.float32)
  logits = logits + _relative_position_bias(table, m)
  if shift:
    logits = logits + _region_mask(h, w, m, shift)[None, :, :, None]
  probabilities = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bxyhnm,bxyhmd->bxynhd", probabilities.astype(dtype), v,
                   preferred_element_type=jnp.float32).astype(dtype)
  # (B, H/M, W/M, M, M, heads, head_dim) -> (B, H, W, C), heads concatenated
  out = out.reshape(b, h // m, w // m, m, m, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
  if shift:
    out = jnp.roll(out, (shift, shift), axis=(1, 2))
  return out


def _check_arguments(qkv, table, num_heads, window_size, shift):
  op = "window_attention"
  for name, value in (("num_heads", num_heads), ("window_size", window_size)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"{op}: {name} must be a positive int, got {value!r}.")
  if not isinstance(shift, (int, np.integer)) or isinstance(shift, bool) or not 0 <= shift < window_size:
    raise ValueError(f"{op}: shift must be an int in [0, window_size) = [0, {window_size}), usually "
                     f"window_size // 2 for shifted windows and 0 for regular ones, got {shift!r}.")
  if jnp.ndim(qkv) != 4:
    raise ValueError(f"{op}: qkv must have rank 4, (B, H, W, 3 * C) channels-last, got shape "
                     f"{jnp.shape(qkv)}.")
  if not jnp.issubdtype(jnp.result_type(qkv), jnp.floating):
    raise ValueError(f"{op}: qkv must be floating point, got {jnp.result_type(qkv)}.")
  _, height, width, channels = jnp.shape(qkv)
  if channels == 0 or channels % (3 * num_heads):
    raise ValueError(f"{op}: qkv's last dimension ({channels}) must be 3 * num_heads * head_dim "
                     f"([q | k | v], heads contiguous) with num_heads={num_heads}.")
  if height % window_size or width % window_size:
    raise ValueError(f"{op}: the token map ({height} x {width}) must be a multiple of the window "
                     f"({window_size} x {window_size}); pad it (or clip the window to the "
                     "resolution, as Swin does) before calling.")
  expected = ((2 * window_size - 1) ** 2, num_heads)
  if tuple(jnp.shape(table)) != expected:
    raise ValueError(f"{op}: relative_position_bias_table must have shape ((2M-1)^2, num_heads) = "
                     f"{expected} for window_size={window_size}, got {tuple(jnp.shape(table))}.")
  if not jnp.issubdtype(jnp.result_type(table), jnp.floating):
    raise ValueError(f"{op}: relative_position_bias_table must be floating point, got "
                     f"{jnp.result_type(table)}.")


def window_attention(qkv: jax.Array, relative_position_bias_table: jax.Array, *, num_heads: int,
                     window_size: int, shift: int, implementation: str = "auto") -> jax.Array:
  """Swin's (shifted-)window multi-head self-attention, before the output projection.

  Args:
    qkv: (B, H, W, 3 * C) float32 or bfloat16, the token map after Swin's `qkv` Linear; channels
      [q | k | v], each C = num_heads * head_dim with heads contiguous (the official
      reshape(B_, N, 3, num_heads, head_dim)). H and W must be multiples of window_size.
    relative_position_bias_table: ((2M - 1)^2, num_heads) float, M = window_size, the official
      checkpoint's `relative_position_bias_table` (row (dy + M - 1) * (2M - 1) + dx + M - 1).
    num_heads: attention heads.
    window_size: M, the window side in tokens.
    shift: cyclic shift in tokens, 0 <= shift < M (0: regular windows; Swin uses M // 2).
    implementation: "auto" or "xla" (the only one so far).

  Returns:
    (B, H, W, C) in qkv's dtype: softmax(q * head_dim**-0.5 @ k^T + bias + mask) @ v per window
    and head, heads concatenated, at the tokens' own positions (shift undone). Logits and
    softmax are float32. Differentiable with respect to qkv and the table (JAX autodiff;
    deterministic).
  """
  qkv = jnp.asarray(qkv)
  relative_position_bias_table = jnp.asarray(relative_position_bias_table)
  _check_arguments(qkv, relative_position_bias_table, num_heads, window_size, shift)
  _common.resolve_implementation(implementation, "window_attention", _IMPLEMENTATIONS)
  return _xla_window_attention(qkv, relative_position_bias_table, num_heads=int(num_heads),
                               window_size=int(window_size), shift=int(shift))
