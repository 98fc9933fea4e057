"""Window attention in plain jax.numpy: the readable specification (roll, partition, einsums;
JAX autodiff for gradients) and the fallback on every backend."""

import functools

import jax
import jax.numpy as jnp

from kernels.attention.geometry import region_mask, relative_position_bias


@functools.partial(jax.jit, static_argnames=("num_heads", "window_size", "shift"))
def window_attention(qkv, table, *, num_heads, window_size, shift):
  """(B, H, W, C) attention output for qkv (B, H, W, 3C) and the ((2M-1)^2, heads) table."""
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
  logits = logits + relative_position_bias(table, m)
  if shift:
    logits = logits + region_mask(h, w, m, shift)[None, :, :, None]
  probabilities = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bxyhnm,bxyhmd->bxynhd", probabilities.astype(dtype), v,
                   preferred_element_type=jnp.float32).astype(dtype)
  # (B, H/M, W/M, M, M, heads, head_dim) -> (B, H, W, C), heads concatenated
  out = out.reshape(b, h // m, w // m, m, m, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
  if shift:
    out = jnp.roll(out, (shift, shift), axis=(1, 2))
  return out
