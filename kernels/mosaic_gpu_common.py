"""What the Pallas Mosaic GPU kernels share: interpreter parameters, register-layout helpers and
float32-accurate wgmma through bfloat16 splits. Only the `pallas_mosaic_gpu` backend modules
import this (it loads Pallas' Mosaic GPU module).

Lessons these helpers encode (each cost time to find):
- Mosaic GPU has no `jnp.dot`: matmuls are `plgpu.wgmma` on swizzled SMEM. wgmma multiplies
  16-bit inputs; float32 inputs would run as TF32 (~1e-3 off torchvision's float32), so float32
  operands are split into bfloat16 parts (`parts`) and the leading products accumulate in float32
  (`mma`).
- Register arrays need layouts on hardware, but the GPU interpreter has none: `iota` and `zeros`
  switch on `interpret`. The interpreter also needs wgmma operands in SMEM.
- `plgpu.load(..., layout=WGMMA)` from an untransformed float32 SMEM ref fails lowering ("Failed
  to synthesize a transfer pattern that avoids bank conflicts"): give the ref an (8, 32) tiling
  and 128-byte swizzle (`smem_transforms`), or load with `optimized=False`.
- TMA through a tiled SMEM ref tiles the GMEM width too, so map widths are padded to 8; a TMA
  load must move a multiple of 128 bytes.
"""

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

# Shared memory one thread block may use on Hopper (227 KiB, opt-in maximum of sm_90); the
# Mosaic GPU lowering rejects kernels whose scratch exceeds it.
SMEM_BYTES = 232448

try:  # public from jax 0.11 on
  InterpretParams = plgpu.InterpretParams
except AttributeError:  # jax 0.10: only under a private path
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as InterpretParams

_SWIZZLE_BYTES = 128


def smem_transforms(dtype):
  """(8, 128 bytes) tiling and 128-byte swizzle of an SMEM wgmma operand of `dtype`."""
  elements = _SWIZZLE_BYTES // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, elements)), plgpu.SwizzleTransform(_SWIZZLE_BYTES))


def iota(shape, dimension, interpret):
  """int32 iota; on hardware in the wgmma register layout (the interpreter has no layouts)."""
  if interpret:
    return lax.broadcasted_iota(jnp.int32, shape, dimension)
  return plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=plgpu.Layout.WGMMA)


def zeros(shape, interpret):
  """float32 zeros; on hardware in the wgmma register layout."""
  values = jnp.zeros(shape, jnp.float32)
  return values if interpret else plgpu.layout_cast(values, plgpu.Layout.WGMMA)


def parts(values, num_parts):
  """bfloat16 operands for wgmma whose sum is `values`: 1 part (a rounding) or 3 (hi, mid, lo)."""
  result, rest = [], values.astype(jnp.float32)
  for _ in range(num_parts):
    result.append(rest.astype(jnp.bfloat16))
    rest = rest - result[-1].astype(jnp.float32)
  return result


def mma(acc_ref, lhs_parts, rhs_parts):
  """acc += sum of lhs_i @ rhs_j over i + j < number of parts (SMEM refs), then waits.

  With 3-part splits the dropped products are ~2^-27 of the result: float32 accuracy.
  """
  for i, lhs in enumerate(lhs_parts):
    for j, rhs in enumerate(rhs_parts):
      if i + j < len(lhs_parts):
        plgpu.wgmma(acc_ref, lhs, rhs)
  plgpu.wgmma_wait(0)
