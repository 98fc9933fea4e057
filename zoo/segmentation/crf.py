"""The fully connected CRF's mean-field inference as a layer: CRF-as-RNN (Zheng et al.,
"Conditional Random Fields as Recurrent Neural Networks", ICCV 2015) over DeepLab's dense CRF
(Krähenbühl and Koltun 2011; Chen et al. 2015).

Each of `iterations` mean-field steps filters the current label distribution Q with an
appearance (bilateral: position and colour) and a smoothness (spatial) Gaussian kernel over
all pixel pairs, weights the two messages (bi_w, pos_w), maps them through the label
compatibility matrix mu and subtracts them from the unary logits before a softmax. The exact
all-pairs computation, forward and backward, is `kernels.dense_crf` (its docstring states
the semantics); this layer owns the learnable parts:

- pos_w, bi_w: the kernel weights, kept positive as softplus(raw) (CRF-as-RNN learns them
  unconstrained; positivity keeps the Potts prior a penalty), initialised to the given values;
- compatibility: an L x L matrix initialised to Potts, 1 - identity (CRF-as-RNN's
  "compatibility transform", learned freely, so it can become asymmetric or reward pairs).

The Gaussian widths (pos_xy_std, bi_xy_std in pixels, bi_rgb_std in colour units) are fixed
hyper-parameters, as in CRF-as-RNN. With `trainable=False` nothing is learned: the same
layer is DeepLab's CRF post-processing with fixed weights and Potts compatibility.

The layer returns log Q (clamped at the smallest normal float32, so a label with Q = 0 costs
a large finite loss instead of infinity): log-probabilities are logits whose softmax is Q
itself, so the segmentation task's softmax cross-entropy and argmax apply unchanged.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "xla", "pallas_gpu", "pallas_tpu")


def _inverse_softplus(y: float) -> float:
  return float(y + np.log(-np.expm1(-y)))


def potts_compatibility(num_classes: int) -> jax.Array:
  """(L, L) float32: 1 - identity (a penalty of 1 for every pair of different labels)."""
  return 1.0 - jnp.eye(num_classes, dtype=jnp.float32)


class DenseCRF(nn.Module):
  """Mean-field inference of the fully connected CRF, optionally learnable (CRF-as-RNN).

  Attributes:
    iterations: mean-field steps (CRF-as-RNN trains with 5 and tests with 10; DeepLab 10).
    pos_w, pos_xy_std: the spatial kernel's weight and width (pixels): DeepLab v2's 3, 1 (w2, sigma_gamma).
    bi_w, bi_xy_std, bi_rgb_std: the bilateral kernel's weight, width in pixels and width in
      colour units: DeepLab v2's 4, 67, 3 (w1, sigma_alpha, sigma_beta) on 0..255 colours.
    trainable: learn pos_w, bi_w (through softplus) and the compatibility matrix; otherwise
      fixed weights and Potts compatibility (post-processing), no parameters.
    image_scale: multiplies the images into the colour units of bi_rgb_std (255 for images in
      [0, 1] and DeepLab's 0..255 widths).
    implementation: passed to `kernels.dense_crf` ("auto", "xla", "pallas_gpu", "pallas_tpu").
  """
  iterations: int = 10
  pos_w: float = 3.0
  pos_xy_std: float = 1.0
  bi_w: float = 4.0
  bi_xy_std: float = 67.0
  bi_rgb_std: float = 3.0
  trainable: bool = True
  image_scale: float = 255.0
  implementation: str = "auto"

  def __post_init__(self):
    if self.iterations < 1:
      raise ValueError(f"DenseCRF needs iterations >= 1, got {self.iterations}.")
    for name in ("pos_w", "bi_w", "pos_xy_std", "bi_xy_std", "bi_rgb_std", "image_scale"):
      if not getattr(self, name) > 0:
        raise ValueError(f"DenseCRF {name} must be positive, got {getattr(self, name)!r}.")
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(f"DenseCRF implementation must be one of {IMPLEMENTATIONS}, got "
                       f"{self.implementation!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, logits, images):
    """Mean-field marginals, as log-probabilities.

    Args:
      logits: (B, H, W, L) float, the unary potentials (negated energies), e.g. a network's
        scores upsampled to the image.
      images: (B, H, W, C) float, the same pixels' colours in [0, 1] (times image_scale gives
        the units of bi_rgb_std).

    Returns:
      (B, H, W, L) float32 log Q, Q the marginals after `iterations` steps (rows sum to 1).
    """
    import kernels  # The layer's only use of kernels; imported here to keep `import zoo` light.

    if logits.ndim != 4 or images.ndim != 4 or logits.shape[:3] != images.shape[:3]:
      raise ValueError(f"DenseCRF takes logits (B, H, W, L) and images (B, H, W, C) of the same "
                       f"B, H, W; got {logits.shape} and {images.shape} (upsample the logits to "
                       "the image first).")
    num_classes = logits.shape[-1]
    if self.trainable:
      pos_w = nn.softplus(self.param("pos_w", nn.initializers.constant(_inverse_softplus(self.pos_w)),
                                     (), jnp.float32))
      bi_w = nn.softplus(self.param("bi_w", nn.initializers.constant(_inverse_softplus(self.bi_w)),
                                    (), jnp.float32))
      compatibility = self.param("compatibility", lambda rng, n: potts_compatibility(n), num_classes)
    else:
      pos_w, bi_w = self.pos_w, self.bi_w
      compatibility = potts_compatibility(num_classes)
    q = kernels.dense_crf(
        logits.astype(jnp.float32), images.astype(jnp.float32) * self.image_scale,
        iterations=self.iterations, pos_w=pos_w, pos_xy_std=self.pos_xy_std, bi_w=bi_w,
        bi_xy_std=self.bi_xy_std, bi_rgb_std=self.bi_rgb_std, compatibility=compatibility,
        implementation=self.implementation)
    return jnp.log(jnp.maximum(q, jnp.finfo(jnp.float32).tiny))
