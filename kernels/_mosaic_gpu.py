"""What the Pallas Mosaic GPU kernels share: interpreter parameters, register-layout helpers and
float32-accurate wgmma through bfloat16 splits.
"""

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

# Shared memory one thread block may use on Hopper (227 KiB, opt-in maximum of sm_90); the
# Mosaic GPU lowering rejects kernels whose scratch exceeds it.
SMEM_BYTES = 232448

try:  # public from jax 0.11 on
  _InterpretParams = plgpu.InterpretParams
except AttributeError:
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as _InterpretParams

_SWIZZLE_BYTES = 128


def _smem_transforms(dtype):
  elements = _SWIZZLE_BYTES // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, elements)), plgpu.SwizzleTransform(_SWIZZLE_BYTES))


def _iota(shape, dimension, interpret):
  """int32 iota; on hardware in the wgmma register layout (the interpreter has no layouts)."""
  if interpret:
    return lax.broadcasted_iota(jnp.int32, shape, dimension)
  return plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=plgpu.Layout.WGMMA)


def _zeros(shape, interpret):
  zeros = jnp.zeros(shape, jnp.float32)
  return zeros if interpret else plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)


def _parts(values, num_parts):
  """bfloat16 operands for wgmma whose sum is `values`: 1 part (a rounding) or 3 (hi, mid, lo)."""
  parts, rest = [], values.astype(jnp.float32)
  for _ in range(num_parts):
    parts.append(rest.astype(jnp.bfloat16))
    rest = rest - parts[-1].astype(jnp.float32)
  return parts


def _mma(acc_ref, lhs_parts, rhs_parts):
  """acc += sum of lhs_i @ rhs_j over i + j < number of parts (SMEM refs), then waits.

  With 3-part splits the dropped products are ~2^-27 of the result: float32 accuracy.
  """
  for i, lhs in enumerate(lhs_parts):
    for j, rhs in enumerate(rhs_parts):
      if i + j < len(lhs_parts):
        plgpu.wgmma(acc_ref, lhs, rhs)
  plgpu.wgmma_wait(0)
