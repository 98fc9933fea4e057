"""The configs' models with kernels (Swin's window attention, DeepLab's dense CRF) export for
CUDA and TPU with the kernels lowered for real (tests/lowering.py): the training step's loss
gradient and inference, at the configs' own sizes. The detectors' are in tests/detection."""

import jax
import jax.numpy as jnp
import pytest

from experiments.configs import deeplab, swin
from tests.lowering import export, kernel_calls
from zoo.training.trainer import create_model


@pytest.mark.parametrize("implementation", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("module, variant, train_calls, infer_calls", [
    (swin, "", 8, 4),                    # 4 stages x (forward + backward)
    (swin, "segmentation", 8, 4),
    (deeplab, "crf_trainable", 2, 1),    # the CRF-as-RNN layer: filter forward + backward
    (deeplab, "postprocess", 0, 1),      # the CRF runs at inference only
], ids=lambda x: getattr(x, "__name__", x))
def test_training_step_and_inference_lower(implementation, module, variant, train_calls,
                                           infer_calls):
  model = create_model(module.get_config(variant).model)
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(lambda key: model.init(
      {"params": key, "dropout": key}, jnp.zeros((1, 64, 64, 3)), train=False), jax.random.key(0))

  def step(variables, images):
    def loss(params):
      (outputs, _), _ = model.apply({**variables, "params": params}, images, train=True,
                                    rngs={"dropout": jax.random.key(1),
                                          "drop_path": jax.random.key(2)},
                                    mutable=["batch_stats"])
      return jnp.sum(outputs.astype(jnp.float32))
    return jax.value_and_grad(loss)(variables["params"])

  infer = lambda variables, images: model.apply(variables, images, train=False)[0]
  assert kernel_calls(implementation, export(implementation, step, variables, images)
                      .mlir_module()) == train_calls
  assert kernel_calls(implementation, export(implementation, infer, variables, images)
                      .mlir_module()) == infer_calls
