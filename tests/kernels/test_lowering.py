"""Lowers the Pallas kernels for real TPUs and GPUs on the CPU (DESIGN.md, "Kernels").

`jax.export` with platforms=["tpu"] or ["cuda"] runs the Mosaic TPU / Mosaic GPU lowering
without the hardware, which catches what interpret mode accepts but Mosaic rejects
(unsupported ops, layouts, memory spaces, TMA and wgmma shapes). `kernels.lowering_for`
makes the kernels lower for real instead of interpreting. Pallas asks the device for its TPU
generation, so the TPU export runs under an abstract mesh that names one (a v5e). The
Mosaic compilers' own passes run only on the hardware and are not covered here.
"""

import jax
import jax.numpy as jnp
import pytest

import kernels
from tests.lowering import export as _export, kernel_calls as _kernel_calls


@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape, output_size, sampling_ratio", [
    ((2, 200, 272, 256), 7, 0),      # Mask R-CNN's box head on P2
    ((2, 50, 68, 256), 14, 2),       # mask head on P4: width not a multiple of 8
    ((1, 5, 6, 8), (2, 3), 1),       # a map smaller than one tile, few channels
])
def test_roi_align_lowers_forward_and_backward(implementation, dtype, shape, output_size,
                                              sampling_ratio):
  features = jax.ShapeDtypeStruct(shape, dtype)
  boxes = jax.ShapeDtypeStruct((100, 4), jnp.float32)
  box_indices = jax.ShapeDtypeStruct((100,), jnp.int32)

  def loss_and_grad(features, boxes, box_indices):
    def loss(features):
      out = kernels.roi_align(features, boxes, box_indices, output_size,
                              sampling_ratio=sampling_ratio, implementation=implementation)
      return out.astype(jnp.float32).sum()
    return jax.value_and_grad(loss)(features)

  exported = _export(implementation, loss_and_grad, features, boxes, box_indices)
  module = exported.mlir_module()
  assert _kernel_calls(implementation, module) == 2, "expected a forward and a backward kernel"
  assert "triton" not in module


@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_roi_pool_and_spp_lower(implementation, dtype):
  features = jax.ShapeDtypeStruct((2, 50, 68, 256), dtype)
  boxes = jax.ShapeDtypeStruct((32, 4), jnp.float32)
  box_indices = jax.ShapeDtypeStruct((32,), jnp.int32)

  def loss_and_grad(features, boxes, box_indices):
    def loss(features):
      pooled = kernels.roi_pool(features, boxes, box_indices, 7, spatial_scale=0.25,
                                implementation=implementation)
      pyramid = kernels.spatial_pyramid_pool(features, boxes, box_indices, (1, 2, 4),
                                             implementation=implementation)
      return pooled.astype(jnp.float32).sum() + pyramid.astype(jnp.float32).sum()
    return jax.value_and_grad(loss)(features)

  module = _export(implementation, loss_and_grad, features, boxes, box_indices).mlir_module()
  # Four poolings: forward kernels on both; the GPU also has backward kernels (the TPU
  # backward is XLA's scatter-add, deterministic there).
  expected = 8 if implementation == "pallas_gpu" else 4
  assert _kernel_calls(implementation, module) == expected


@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_gpu"])
def test_multilevel_roi_align_lowers(implementation):
  levels = [jax.ShapeDtypeStruct((2, 256 // s, 256 // s, 128), jnp.float32) for s in (4, 8, 16, 32)]
  boxes = jax.ShapeDtypeStruct((64, 4), jnp.float32)
  box_indices = jax.ShapeDtypeStruct((64,), jnp.int32)
  fn = lambda levels, boxes, box_indices: kernels.multilevel_roi_align(
      levels, boxes, box_indices, 7, strides=(4, 8, 16, 32), implementation=implementation)
  module = _export(implementation, fn, levels, boxes, box_indices).mlir_module()
  assert _kernel_calls(implementation, module) == 4


@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_gpu"])
def test_auto_picks_the_pallas_kernel_on_its_platform_and_xla_on_cpu(implementation):
  features = jnp.ones((1, 8, 8, 4))
  boxes, box_indices = jnp.array([[0.0, 0.0, 4.0, 4.0]]), jnp.array([0], jnp.int32)
  module = _export(implementation, lambda f, b, i: kernels.roi_align(f, b, i, 2), features,
                   boxes, box_indices).mlir_module()
  assert _kernel_calls(implementation, module) == 1
  # A function of its own: jit's trace cache does not know about lowering_for.
  cpu = jax.jit(lambda f, b, i: kernels.roi_align(f, b, i, 2)).lower(features, boxes, box_indices).as_text()
  assert "custom_call" not in cpu


@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape, window, shift, heads", [
    ((64, 56, 56), 7, 3, 3),      # Swin-T stage 1, shifted
    ((64, 14, 14), 7, 0, 12),     # stage 3, regular windows
    ((2, 7, 7), 7, 0, 24),        # stage 4: window clipped to the resolution
])
def test_window_attention_lowers_forward_and_backward(implementation, dtype, shape, window, shift,
                                                      heads):
  qkv = jax.ShapeDtypeStruct(shape + (3 * heads * 32,), dtype)
  table = jax.ShapeDtypeStruct(((2 * window - 1) ** 2, heads), jnp.float32)

  def loss_and_grad(qkv, table):
    def loss(qkv, table):
      out = kernels.window_attention(qkv, table, num_heads=heads, window_size=window, shift=shift,
                                     implementation=implementation)
      return out.astype(jnp.float32).sum()
    return jax.value_and_grad(loss, argnums=(0, 1))(qkv, table)

  module = _export(implementation, loss_and_grad, qkv, table).mlir_module()
  assert _kernel_calls(implementation, module) == 2, "expected a forward and a backward kernel"


@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_gpu"])
def test_window_attention_auto_picks_the_pallas_kernel(implementation):
  qkv = jax.ShapeDtypeStruct((2, 14, 14, 3 * 2 * 32), jnp.bfloat16)
  table = jax.ShapeDtypeStruct((169, 2), jnp.float32)
  fn = lambda qkv, table: kernels.window_attention(qkv, table, num_heads=2, window_size=7, shift=3)
  assert _kernel_calls(implementation, _export(implementation, fn, qkv, table).mlir_module()) == 1


@pytest.mark.parametrize("op, output_size, channels, dtype, fits", [
    ("roi_align", 16, 8, jnp.float32, True),      # 256 bins: the largest the GPU kernel takes
    ("roi_align", 16, 256, jnp.bfloat16, True),
    ("roi_align", 20, 8, jnp.float32, False),     # 400 bins: more than its register accumulator
    ("roi_align", 28, 1, jnp.float32, False),     # Mask R-CNN's mask targets
    ("roi_pool", 7, 8, jnp.float32, True),        # channels padded to 128 (Mosaic's row minimum)
    ("roi_pool", 7, 64, jnp.bfloat16, True),
    ("roi_pool", 9, 256, jnp.float32, True),      # 214,152 bytes of shared memory
    ("roi_pool", 10, 256, jnp.float32, False),    # 233,600 bytes
    ("roi_pool", 14, 64, jnp.bfloat16, False),
])
def test_gpu_support_check_agrees_with_the_mosaic_lowering(op, output_size, channels, dtype, fits):
  """An explicit "pallas_gpu" either lowers for CUDA or gets our ValueError naming why, never
  Mosaic's own error; "auto" then falls back to xla (no kernel call) and lowers."""
  features = jax.ShapeDtypeStruct((2, 64, 64, channels), dtype)
  boxes = jax.ShapeDtypeStruct((16, 4), jnp.float32)
  box_indices = jax.ShapeDtypeStruct((16,), jnp.int32)

  def loss_and_grad(implementation):
    pool = getattr(kernels, op)
    def run(features, boxes, box_indices):
      loss = lambda f: pool(f, boxes, box_indices, output_size,
                            implementation=implementation).astype(jnp.float32).sum()
      return jax.value_and_grad(loss)(features)
    return run

  if fits:
    module = _export("pallas_gpu", loss_and_grad("pallas_gpu"), features, boxes, box_indices)
    assert _kernel_calls("pallas_gpu", module.mlir_module()) == 2
    return
  with pytest.raises(ValueError, match="implementation='pallas_gpu' cannot take this call"):
    _export("pallas_gpu", loss_and_grad("pallas_gpu"), features, boxes, box_indices)
  module = _export("pallas_gpu", loss_and_grad("auto"), features, boxes, box_indices)
  assert _kernel_calls("pallas_gpu", module.mlir_module()) == 0
