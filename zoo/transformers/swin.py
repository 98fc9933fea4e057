"""Swin Transformer (Liu et al. 2021): hierarchical vision transformer with shifted windows.

Mirrors microsoft/Swin-Transformer `models/swin_transformer.py` (v1): the hyper-parameter
names are the official ones (but `in_channels`, the zoo's word for the official `in_channels`)
and the parameter tree follows its state-dict names
(patch_embed/proj, layers_{i}/blocks_{j}/attn/qkv, ...), so its checkpoints map name for name.
Channels-last throughout: tokens are kept as a (B, H, W, C) map.

Attention is `kernels.window_attention` (cyclic shift, window partition, relative position
bias and the -100 region mask in one call); as in the official code, a stage whose resolution
is not larger than the window uses one window of the whole resolution and no shift.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import kernels
from zoo.registry import register_model

_LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, as the official model uses
_dense_init = nn.initializers.truncated_normal(0.02)


def _layer_norm(name, dtype, param_dtype):
  return nn.LayerNorm(epsilon=_LAYER_NORM_EPS, dtype=dtype, param_dtype=param_dtype, name=name)


def _dense(features, name, dtype, param_dtype, use_bias=True):
  return nn.Dense(features, use_bias=use_bias, kernel_init=_dense_init, dtype=dtype,
                  param_dtype=param_dtype, name=name)


class DropPath(nn.Module):
  """Stochastic depth (Huang et al. 2016): drops the whole residual branch per example."""
  rate: float

  @nn.compact
  def __call__(self, x, *, train: bool):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class WindowAttention(nn.Module):
  """Multi-head self-attention inside (shifted) windows, with relative position bias.

  (B, H, W, C) -> (B, H, W, C). Parameters as the official WindowAttention: qkv, proj,
  relative_position_bias_table ((2M - 1)^2, heads).
  """
  dim: int
  num_heads: int
  window_size: int
  shift: int
  qkv_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    table = self.param("relative_position_bias_table", _dense_init,
                       ((2 * self.window_size - 1) ** 2, self.num_heads), self.param_dtype)
    qkv = _dense(3 * self.dim, "qkv", self.dtype, self.param_dtype, self.qkv_bias)(x)
    out = kernels.window_attention(qkv, table, num_heads=self.num_heads,
                                   window_size=self.window_size, shift=self.shift)
    return _dense(self.dim, "proj", self.dtype, self.param_dtype)(out)


class Mlp(nn.Module):
  """fc1 -> GELU (exact erf, torch.nn.GELU's default) -> fc2."""
  hidden: int
  out: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _dense(self.hidden, "fc1", self.dtype, self.param_dtype)(x)
    return _dense(self.out, "fc2", self.dtype, self.param_dtype)(nn.gelu(x, approximate=False))


class SwinTransformerBlock(nn.Module):
  """x + DropPath(attention(norm1(x))), then x + DropPath(mlp(norm2(x)))."""
  dim: int
  num_heads: int
  window_size: int
  shift: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    dt, pdt = self.dtype, self.param_dtype
    y = _layer_norm("norm1", dt, pdt)(x)
    y = WindowAttention(self.dim, self.num_heads, self.window_size, self.shift, self.qkv_bias,
                        dt, pdt, name="attn")(y)
    x = x + DropPath(self.drop_path)(y, train=train)
    y = Mlp(int(self.dim * self.mlp_ratio), self.dim, dt, pdt, name="mlp")(_layer_norm("norm2", dt, pdt)(x))
    return x + DropPath(self.drop_path)(y, train=train)


class PatchMerging(nn.Module):
  """2x2 neighbourhood concatenation (x0, x1, x2, x3 order of the official code), LayerNorm,
  then a linear reduction 4C -> 2C: (B, H, W, C) -> (B, H/2, W/2, 2C)."""
  dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    x = _layer_norm("norm", self.dtype, self.param_dtype)(x)
    return _dense(2 * self.dim, "reduction", self.dtype, self.param_dtype, use_bias=False)(x)


class SwinTransformer(nn.Module):
  """Swin classifier and backbone.

  __call__(images (B, img_size, img_size, in_channels), train) -> (logits (B, num_classes),
  aux) with aux["stages"] the stage outputs (B, H/4, W/4, C), (B, H/8, W/8, 2C), ... at
  strides 4, 8, 16, 32 (after each stage's blocks, before merging) and aux["features"] the
  pooled (B, 8C) representation. num_classes=0 gives no head (logits are the features).
  global_pool: "avg" (the official mean over the last stage's tokens) or "max" (the maximum per
  channel, as timm's `global_pool="max"`: suits multi-label "is it anywhere" questions, where
  the mean dilutes a small object among the background tokens).
  """
  img_size: int = 224
  patch_size: int = 4
  in_channels: int = 3
  num_classes: int = 1000
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path_rate: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  global_pool: str = "avg"

  def stage_geometry(self):
    """Per stage (resolution, window, shift), with the official clipping rule."""
    resolution = self.img_size // self.patch_size
    geometry = []
    for i in range(len(self.depths)):
      r = resolution // 2 ** i
      window = min(self.window_size, r)
      geometry.append((r, window, 0 if r <= self.window_size else self.window_size // 2))
    return geometry

  def _check(self, images):
    if images.ndim != 4 or images.shape[-1] != self.in_channels:
      raise ValueError(f"Swin takes images (B, H, W, {self.in_channels}) NHWC, got shape {images.shape}.")
    if images.shape[1:3] != (self.img_size, self.img_size):
      raise ValueError(f"Swin was built for {self.img_size}x{self.img_size} images, got "
                       f"{images.shape[1]}x{images.shape[2]}; create it with img_size="
                       f"{images.shape[1]} (square images whose size / patch_size / 2**(stages-1) "
                       f"is a multiple of the window size).")
    if self.global_pool not in ("avg", "max"):
      raise ValueError(f"Swin global_pool must be 'avg' or 'max', got {self.global_pool!r}.")
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f"depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} must "
                       f"have one entry per stage.")
    for i, (r, window, _) in enumerate(self.stage_geometry()):
      if r % 2 and i < len(self.depths) - 1:
        raise ValueError(f"Swin stage {i} has an odd resolution {r}x{r}, which patch merging cannot "
                         f"halve; pick img_size so that img_size / patch_size / 2**stage stays even "
                         f"up to the last stage.")
      if r % window:
        raise ValueError(f"Swin stage {i} has resolution {r}x{r}, not a multiple of window_size="
                         f"{window}; pick img_size so that img_size / patch_size / 2**stage is "
                         f"a multiple of the window size (e.g. 224 with patch 4 and window 7).")

  @nn.compact
  def __call__(self, images, *, train: bool):
    self._check(images)
    dt, pdt = self.dtype, self.param_dtype
    x = nn.Conv(self.embed_dim, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding="VALID", dtype=dt, param_dtype=pdt, name="patch_embed_proj")(images.astype(dt))
    x = _layer_norm("patch_embed_norm", dt, pdt)(x)
    total = sum(self.depths)  # stochastic depth grows linearly over the blocks, as official
    rates = [self.drop_path_rate * b / max(total - 1, 1) for b in range(total)]
    stages, block = [], 0
    for i, ((_, window, shift), depth, heads) in enumerate(
        zip(self.stage_geometry(), self.depths, self.num_heads)):
      dim = self.embed_dim * 2 ** i
      for j in range(depth):
        x = SwinTransformerBlock(dim, heads, window, 0 if j % 2 == 0 else shift, self.mlp_ratio,
                                 self.qkv_bias, rates[block], dt, pdt,
                                 name=f"layers_{i}_blocks_{j}")(x, train=train)
        block += 1
      stages.append(x)
      if i < len(self.depths) - 1:
        x = PatchMerging(dim, dt, pdt, name=f"layers_{i}_downsample")(x)
    x = _layer_norm("norm", dt, pdt)(x)
    features = (jnp.mean if self.global_pool == "avg" else jnp.max)(x, axis=(1, 2))
    aux = {"stages": stages, "features": features}
    if self.num_classes == 0:
      return features, aux
    logits = _dense(self.num_classes, "head", dt, pdt)(features)
    return logits.astype(jnp.float32), aux


@register_model("swin")
def swin(img_size: int = 224, patch_size: int = 4, in_channels: int = 3, num_classes: int = 1000,
         embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
         num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
         qkv_bias: bool = True, drop_path_rate: float = 0.1, dtype: Any = "float32",
         param_dtype: Any = "float32", global_pool: str = "avg") -> SwinTransformer:
  """Swin of any size; the official hyper-parameter names (+ timm's global_pool, "avg" or "max")."""
  return SwinTransformer(img_size, patch_size, in_channels, num_classes, embed_dim, tuple(depths),
                         tuple(num_heads), window_size, mlp_ratio, qkv_bias, drop_path_rate,
                         jnp.dtype(dtype), jnp.dtype(param_dtype), global_pool)


@register_model("swin_t")
def swin_t(img_size: int = 224, num_classes: int = 1000, window_size: int = 7,
           drop_path_rate: float = 0.2, dtype: Any = "float32") -> SwinTransformer:
  """Swin-T: C=96, depths (2, 2, 6, 2), heads (3, 6, 12, 24) (the official swin_tiny_patch4_window7_224)."""
  return swin(img_size=img_size, num_classes=num_classes, window_size=window_size,
              drop_path_rate=drop_path_rate, dtype=dtype)


@register_model("swin_s")
def swin_s(img_size: int = 224, num_classes: int = 1000, window_size: int = 7,
           drop_path_rate: float = 0.3, dtype: Any = "float32") -> SwinTransformer:
  """Swin-S: C=96, depths (2, 2, 18, 2), heads (3, 6, 12, 24)."""
  return swin(img_size=img_size, num_classes=num_classes, depths=(2, 2, 18, 2),
              window_size=window_size, drop_path_rate=drop_path_rate, dtype=dtype)


@register_model("swin_b")
def swin_b(img_size: int = 224, num_classes: int = 1000, window_size: int = 7,
           drop_path_rate: float = 0.5, dtype: Any = "float32") -> SwinTransformer:
  """Swin-B: C=128, depths (2, 2, 18, 2), heads (4, 8, 16, 32)."""
  return swin(img_size=img_size, num_classes=num_classes, embed_dim=128, depths=(2, 2, 18, 2),
              num_heads=(4, 8, 16, 32), window_size=window_size, drop_path_rate=drop_path_rate,
              dtype=dtype)


class SwinSegmenter(nn.Module):
  """Swin backbone with a light feature-pyramid head for semantic segmentation: Semantic FPN's
  merge (Kirillov et al., "Panoptic Feature Pyramid Networks", CVPR 2019, Sec. 3: every level
  brought to stride 4 and summed, a 1x1 classifier, upsampling to the input) with one 1x1
  projection per stage in place of its FPN and convolution stages.

  Every stage output (strides 4, 8, ...) is projected to `head_width` channels (1x1), resized
  bilinearly to the stride-4 grid and summed; a GELU and a 1x1 classifier give per-cell logits,
  resized bilinearly to the input. (B, H, W, in_channels) -> (B, H, W, num_classes), aux as
  SwinTransformer's.
  """
  backbone: SwinTransformer
  num_classes: int
  head_width: int = 64

  @nn.compact
  def __call__(self, images, *, train: bool):
    _, aux = self.backbone(images, train=train)
    stages = aux["stages"]
    size = stages[0].shape[1:3]
    fused = 0.0
    for i, stage in enumerate(stages):
      x = nn.Dense(self.head_width, name=f"lateral_{i}")(stage)
      fused = fused + jax.image.resize(x, x.shape[:1] + size + x.shape[-1:], "bilinear")
    logits = nn.Dense(self.num_classes, name="classifier")(nn.gelu(fused, approximate=False))
    logits = jax.image.resize(logits, logits.shape[:1] + images.shape[1:3] + logits.shape[-1:], "bilinear")
    return logits.astype(jnp.float32), aux


@register_model("semantic_fpn_swin")
def semantic_fpn_swin(num_classes: int = 11, head_width: int = 64, img_size: int = 224,
                      patch_size: int = 4, in_channels: int = 3, embed_dim: int = 96,
                      depths: Sequence[int] = (2, 2, 6, 2),
                      num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
                      mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.1,
                      dtype: Any = "float32") -> SwinSegmenter:
  """Swin backbone (official hyper-parameter names; Swin-T's sizes by default) + the light
  Semantic FPN head (`SwinSegmenter`)."""
  backbone = swin(img_size=img_size, patch_size=patch_size, in_channels=in_channels,
                  num_classes=0, embed_dim=embed_dim, depths=depths, num_heads=num_heads,
                  window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  drop_path_rate=drop_path_rate, dtype=dtype)
  return SwinSegmenter(backbone, num_classes, head_width)
