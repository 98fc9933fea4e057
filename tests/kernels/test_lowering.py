"""Lowers the Pallas kernels for real TPUs on the CPU (DESIGN.md, "Kernels").

`jax.export` with platforms=["tpu"] runs the Mosaic TPU lowering without the hardware, which
catches what interpret mode accepts but Mosaic rejects (unsupported ops, layouts, memory
spaces). Pallas asks the device for its TPU generation, so the export runs under an abstract
mesh that names one (a v5e).
"""

import jax
import jax.numpy as jnp
import pytest

import kernels

_TPU_V5E = jax.sharding.AbstractMesh(
    (1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
        device_kind="TPU v5 lite", num_cores=1, platform="tpu"))


def _export_for_tpu(fn, *args):
  with kernels.lowering_for("tpu"), jax.sharding.use_abstract_mesh(_TPU_V5E):
    return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape, output_size, sampling_ratio", [
    ((2, 200, 272, 256), 7, 0),      # Mask R-CNN's box head on P2
    ((2, 50, 68, 256), 14, 2),       # mask head
    ((1, 5, 6, 8), (2, 3), 1),       # a map smaller than one tile, channels below 128
])
def test_roi_align_lowers_for_tpu_forward_and_backward(dtype, shape, output_size, sampling_ratio):
  features = jax.ShapeDtypeStruct(shape, dtype)
  boxes = jax.ShapeDtypeStruct((100, 4), jnp.float32)
  box_indices = jax.ShapeDtypeStruct((100,), jnp.int32)

  def loss_and_grad(features, boxes, box_indices):
    def loss(features):
      out = kernels.roi_align(features, boxes, box_indices, output_size,
                              sampling_ratio=sampling_ratio, implementation="pallas_tpu")
      return out.astype(jnp.float32).sum()
    return jax.value_and_grad(loss)(features)

  exported = _export_for_tpu(loss_and_grad, features, boxes, box_indices)
  module = exported.mlir_module()
  assert module.count("tpu_custom_call") == 2, "expected one forward and one backward kernel"
  assert exported.platforms == ("tpu",)


def test_multilevel_roi_align_lowers_for_tpu():
  levels = [jax.ShapeDtypeStruct((2, 256 // s, 256 // s, 128), jnp.float32) for s in (4, 8, 16, 32)]
  boxes = jax.ShapeDtypeStruct((64, 4), jnp.float32)
  box_indices = jax.ShapeDtypeStruct((64,), jnp.int32)
  fn = lambda levels, boxes, box_indices: kernels.multilevel_roi_align(
      levels, boxes, box_indices, 7, strides=(4, 8, 16, 32), implementation="pallas_tpu")
  module = _export_for_tpu(fn, levels, boxes, box_indices).mlir_module()
  assert module.count("tpu_custom_call") == 4


def test_auto_picks_pallas_when_lowering_for_tpu_and_xla_on_cpu():
  features = jnp.ones((1, 8, 8, 4))
  boxes, box_indices = jnp.array([[0.0, 0.0, 4.0, 4.0]]), jnp.array([0], jnp.int32)
  module = _export_for_tpu(lambda f, b, i: kernels.roi_align(f, b, i, 2), features, boxes,
                           box_indices).mlir_module()
  assert "tpu_custom_call" in module
  cpu = jax.jit(lambda f, b, i: kernels.roi_align(f, b, i, 2)).lower(features, boxes, box_indices)
  assert "tpu_custom_call" not in cpu.as_text()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_roi_pool_and_spp_lower_for_tpu(dtype):
  features = jax.ShapeDtypeStruct((2, 50, 68, 256), dtype)
  boxes = jax.ShapeDtypeStruct((32, 4), jnp.float32)
  box_indices = jax.ShapeDtypeStruct((32,), jnp.int32)

  def loss_and_grad(features, boxes, box_indices):
    def loss(features):
      pooled = kernels.roi_pool(features, boxes, box_indices, 7, spatial_scale=0.25,
                                implementation="pallas_tpu")
      pyramid = kernels.spatial_pyramid_pool(features, boxes, box_indices, (1, 2, 4),
                                             implementation="pallas_tpu")
      return pooled.astype(jnp.float32).sum() + pyramid.astype(jnp.float32).sum()
    return jax.value_and_grad(loss)(features)

  module = _export_for_tpu(loss_and_grad, features, boxes, box_indices).mlir_module()
  assert module.count("tpu_custom_call") == 4  # forward kernels; the backward is a scatter-add


def _export_for_cuda(fn, *args):
  with kernels.lowering_for("gpu"):
    return jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape, output_size, sampling_ratio", [
    ((2, 200, 272, 256), 7, 0),      # Mask R-CNN's box head on P2
    ((2, 50, 68, 256), 14, 2),       # mask head on P4: width not a multiple of 8
    ((1, 5, 6, 8), (2, 3), 1),       # a map smaller than one tile, channels below 64
])
def test_roi_align_lowers_for_mosaic_gpu_forward_and_backward(dtype, shape, output_size,
                                                              sampling_ratio):
  features = jax.ShapeDtypeStruct(shape, dtype)
  boxes = jax.ShapeDtypeStruct((100, 4), jnp.float32)
  box_indices = jax.ShapeDtypeStruct((100,), jnp.int32)

  def loss_and_grad(features, boxes, box_indices):
    def loss(features):
      out = kernels.roi_align(features, boxes, box_indices, output_size,
                              sampling_ratio=sampling_ratio, implementation="pallas_gpu")
      return out.astype(jnp.float32).sum()
    return jax.value_and_grad(loss)(features)

  exported = _export_for_cuda(loss_and_grad, features, boxes, box_indices)
  module = exported.mlir_module()
  assert module.count("custom_call @mosaic_gpu") == 2, "expected one forward and one backward kernel"
  assert "triton" not in module


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_roi_pool_and_spp_lower_for_mosaic_gpu(dtype):
  features = jax.ShapeDtypeStruct((2, 50, 68, 256), dtype)
  boxes = jax.ShapeDtypeStruct((32, 4), jnp.float32)
  box_indices = jax.ShapeDtypeStruct((32,), jnp.int32)

  def loss_and_grad(features, boxes, box_indices):
    def loss(features):
      pooled = kernels.roi_pool(features, boxes, box_indices, 7, spatial_scale=0.25,
                                implementation="pallas_gpu")
      pyramid = kernels.spatial_pyramid_pool(features, boxes, box_indices, (1, 2, 4),
                                             implementation="pallas_gpu")
      return pooled.astype(jnp.float32).sum() + pyramid.astype(jnp.float32).sum()
    return jax.value_and_grad(loss)(features)

  module = _export_for_cuda(loss_and_grad, features, boxes, box_indices).mlir_module()
  assert module.count("custom_call @mosaic_gpu") == 8  # a forward and a backward kernel per pooling
