"""jax.export for real TPUs and GPUs on the CPU (DESIGN.md, "Kernels"), shared by the kernel
and model lowering tests: `export(implementation, fn, *args)` lowers `fn` with the Pallas
kernels traced for "pallas_tpu" (an abstract TPU v5e) or "pallas_gpu" (CUDA, Hopper), and
`kernel_calls` counts the kernels in the module."""

import contextlib
import re

import jax

import kernels

TPU_V5E = jax.sharding.AbstractMesh(
    (1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
        device_kind="TPU v5 lite", num_cores=1, platform="tpu"))

# implementation -> (jax platform, export platform, the kernel's custom call target)
TARGETS = {"pallas_tpu": ("tpu", "tpu", "tpu_custom_call"),
            "pallas_gpu": ("gpu", "cuda", "mosaic_gpu_v2")}


def export(implementation, fn, *args) -> jax.export.Exported:
  """jax.jit(fn) exported for `implementation`'s platform, its kernels lowered for real."""
  platform, export_platform, _ = TARGETS[implementation]
  mesh = jax.sharding.use_abstract_mesh(TPU_V5E) if platform == "tpu" else contextlib.nullcontext()
  with kernels.lowering_for(platform), mesh:
    return jax.export.export(jax.jit(fn), platforms=[export_platform])(*args)


def kernel_calls(implementation, module: str) -> int:
  """How many `implementation` kernels the MLIR `module` calls."""
  target = TARGETS[implementation][2]
  return len(re.findall(rf"custom_call @{target}\b", module))
