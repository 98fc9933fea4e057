"""The dense CRF's bilateral filter in plain jax.numpy: the readable specification and the fallback.

It maps over chunks of query pixels, so memory is O(B N chunk), never N x N; it computes
|f_i - f_j|^2 as a sum of squared differences (no cancellation: each kernel value has a
relative error of a few float32 ulps times (1 + |f_i - f_j|^2 / 2)) and drops j == i exactly.
"""

import jax.numpy as jnp
from jax import lax

from kernels.common import local_platform, round_up

# The xla filter's working set: one (B, chunk, N) float32 kernel block of at most this many
# elements: 64 MiB on accelerators (parallelism), 512 KiB on a CPU, where a block that stays in
# the L2 cache between the exponentials and the product ran 2-3x faster (96x128 image, L = 21).
BLOCK_ELEMENTS = 1 << 24
BLOCK_ELEMENTS_CPU = 1 << 17


def chunk_size(n, batch):
  """Query pixels per chunk: the largest multiple of 8 whose kernel block fits the budget."""
  budget = BLOCK_ELEMENTS_CPU if local_platform() == "cpu" else BLOCK_ELEMENTS
  chunk = budget // max(n * batch, 1)
  return max(8, min(round_up(n, 8), chunk // 8 * 8))


def bilateral(features, q):
  """(B, N, L) float32: sum over j != i of exp(-|f_i - f_j|^2 / 2) q[j], for features (B, N, D)."""
  b, n, d = features.shape
  chunk = chunk_size(n, b)
  padded = round_up(n, chunk)
  queries = jnp.pad(features, ((0, 0), (0, padded - n), (0, 0)))
  queries = queries.reshape(b, padded // chunk, chunk, d).transpose(1, 0, 2, 3)
  key_index = jnp.arange(n, dtype=jnp.int32)

  def one_chunk(args):
    start, f_query = args                                 # (), (B, chunk, D)
    distance2 = sum(jnp.square(f_query[:, :, None, k] - features[:, None, :, k]) for k in range(d))
    kernel = jnp.exp(-0.5 * distance2)                    # (B, chunk, N)
    query_index = start + jnp.arange(chunk, dtype=jnp.int32)
    kernel = jnp.where(query_index[:, None] == key_index[None, :], 0.0, kernel)   # j != i
    return jnp.einsum("bcn,bnl->bcl", kernel, q, precision=lax.Precision.HIGHEST)

  starts = jnp.arange(0, padded, chunk, dtype=jnp.int32)
  out = lax.map(one_chunk, (starts, queries))             # (chunks, B, chunk, L)
  return out.transpose(1, 0, 2, 3).reshape(b, padded, -1)[:, :n]
