"""Run a per-slot computation only on the chunks of slots that hold something.

A detector's mask head runs on a fixed number of slots (static shapes), most of which may be
empty: the RoI sampler puts the positives first and NMS the valid detections, so the slots that
matter come first. `skip_inactive_chunks` splits the slots into chunks and runs the head on a
chunk (under `nn.cond`) only when some image has an active slot in it; the others get zeros.
The cost then follows the number of positives / detections, as torchvision's (which runs its
mask head on those only). Exact for the active slots; only inactive slots' outputs differ.

Measured (commit 550f2b6, BENCHMARKS.md "Faster / Mask R-CNN", `python -m
experiments.bench_detection --quick --models=mask_rcnn_r50_fpn`, 2-core CPU): with 35-41
positives per image, 48 of the 128 mask slots run, and the Mask R-CNN training step takes
2767 ms per image (torchvision 2728-5265 ms in the same runs). On the CPU it needs the mask
head's convolution gradient of `zoo.layers.cpu_conv_gradient` (XLA:CPU's convolution gradients
inside a conditional are ~80x slower). XLA's cost analysis counts a skipped branch as if it ran.
"""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def skip_inactive_chunks(fn: Callable, module: nn.Module, slots: jax.Array, active: jax.Array, *,
                         chunk: int, output: Callable[[int, int], jax.ShapeDtypeStruct],
                         operands: tuple = ()) -> jax.Array:
  """fn on chunks of `chunk` slots along axis 1, skipping chunks without an active slot.

  Args:
    fn: fn(module, slots_chunk (B, c, ...), *operands) -> (B, c, ...) array.
    module: the (bound) module fn's variables belong to; flax lifts the conditional over it.
    slots: (B, K, ...) the per-slot inputs.
    active: (B, K) bool; a chunk where no image has an active slot is skipped.
    chunk: slots per chunk (static); a speed knob, results do not depend on it.
    output: output(B, c) -> the ShapeDtypeStruct of fn's output for c slots (the zeros of a
      skipped chunk).
    operands: inputs every chunk shares (e.g. feature maps).

  Returns:
    (B, K, ...) fn's outputs, zeros in skipped chunks.
  """
  if module.is_initializing():
    # nn.cond needs the branches' variables to exist already (the skipped branch creates none).
    return fn(module, slots, *operands)
  b, k = slots.shape[:2]
  chunk = max(1, min(chunk, k))
  outputs = []
  for start in range(0, k, chunk):
    part = slots[:, start:start + chunk]
    skipped = output(b, part.shape[1])
    outputs.append(nn.cond(jnp.any(active[:, start:start + chunk]),
                           fn,
                           lambda module, *_: jnp.zeros(skipped.shape, skipped.dtype),
                           module, part, *operands))
  return jnp.concatenate(outputs, axis=1)
