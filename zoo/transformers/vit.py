"""Vision Transformer: Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image
Recognition at Scale", ICLR 2021 (arXiv:2010.11929).

The layout and parameter names are those of google-research/vision_transformer
(`vit_jax/models_vit.py`), so that its `.npz` checkpoints map name for name:

    embedding/{kernel,bias}                        patch embedding, a PxP conv with stride P
    cls                                            (1, 1, D) class token (classifier="token" only)
    Transformer/posembed_input/pos_embedding       (1, N(+1), D) learned position embeddings
    Transformer/encoderblock_{i}/LayerNorm_0       pre-norm of the attention branch
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value,out}
    Transformer/encoderblock_{i}/LayerNorm_2       pre-norm of the MLP branch
    Transformer/encoderblock_{i}/MlpBlock_3/Dense_{0,1}
    Transformer/encoder_norm                       final LayerNorm
    pre_logits/{kernel,bias}                       only with representation_size (Dense + tanh)
    head/{kernel,bias}                             the classifier (absent when num_classes=0)

As there, by default the class token exists only for classifier="token": with classifier="gap"
(global average pooling of the encoder output) the sequence is the N patch tokens alone and the
position embeddings are (1, N, D). LayerNorms use epsilon 1e-6 and the MLP uses flax's default
`nn.gelu`, i.e. the tanh approximation, both as in the original.

Three module fields (not registry hyper-parameters; `zoo.load_checkpoint(format="timm")` sets
them) cover timm's `VisionTransformer` variants: `gelu_approximate=False` (timm's nn.GELU is the
exact erf form), `class_token=True` with classifier="gap" (a class token that the average
pooling skips, e.g. MAE), and `fc_norm=True` (the final LayerNorm applied to the pooled vector,
as a top-level `fc_norm`, instead of `Transformer/encoder_norm` on every token).

    model = zoo.create("vit_b16", num_classes=10)
    variables = model.init(rng, images, train=False)      # images (B, 224, 224, 3)
    logits, aux = model.apply(variables, images, train=False)

A model runs at the resolution its position embeddings were made for; for another one, resize
them with `resize_position_embeddings` (what vit_jax's checkpoint loader does).
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from zoo.registry import register_model

CLASSIFIERS = ("token", "gap")


def _pair(value) -> tuple[int, int]:
  if isinstance(value, int):
    return (value, value)
  value = tuple(int(v) for v in value)
  if len(value) != 2:
    raise ValueError(f"patch_size must be an int or a pair (h, w), got {value}.")
  return value


def resize_position_embeddings(posemb, new_grid: Sequence[int], *, class_token: bool = True,
                               old_grid: Sequence[int] | None = None) -> np.ndarray:
  """Resizes learned position embeddings to another patch grid, as vit_jax's loader does.

  The class token's embedding (the first one, when `class_token`) is kept unchanged; the
  grid's embeddings are resized bilinearly with `scipy.ndimage.zoom(grid, (gh/gs_h, gw/gs_w, 1),
  order=1)` (vit_jax's `checkpoint.load_pretrained`, generalised to non-square grids).

  Args:
    posemb: (1, T, D) array, T = gs_h * gs_w (+ 1 with a class token), row-major grid.
    new_grid: (gh, gw), the new number of patches down and across.
    class_token: whether posemb[:, 0] belongs to a class token (classifier="token").
    old_grid: (gs_h, gs_w); by default the square grid sqrt(T - class_token).

  Returns:
    (1, gh * gw (+ 1), D) NumPy array of posemb's dtype.
  """
  import scipy.ndimage  # only needed here

  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f"Position embeddings must have shape (1, T, D), got {posemb.shape}.")
  prefix = int(class_token)
  tokens, grid = posemb[:, :prefix], posemb[0, prefix:]
  if old_grid is None:
    side = math.isqrt(grid.shape[0])
    if side * side != grid.shape[0]:
      raise ValueError(f"{grid.shape[0]} grid position embeddings (after {prefix} class token) are "
                       f"not a square grid; pass old_grid=(height, width).")
    old_grid = (side, side)
  old_grid, new_grid = _pair(old_grid), _pair(new_grid)
  if old_grid[0] * old_grid[1] != grid.shape[0]:
    raise ValueError(f"old_grid {old_grid} has {old_grid[0] * old_grid[1]} positions, but the "
                     f"embeddings have {grid.shape[0]} (after {prefix} class token).")
  if old_grid != new_grid:
    grid = grid.reshape(*old_grid, -1)
    zoom = (new_grid[0] / old_grid[0], new_grid[1] / old_grid[1], 1)
    grid = scipy.ndimage.zoom(grid, zoom, order=1)
  grid = grid.reshape(1, new_grid[0] * new_grid[1], -1)
  return np.concatenate([tokens, grid], axis=1)


class AddPositionEmbs(nn.Module):
  """Adds learned position embeddings `pos_embedding` (1, T, D), initialised N(0, 0.02^2)."""
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: (B, T, D) -> (B, T, D)."""
    shape = (1,) + x.shape[1:]
    if self.has_variable("params", "pos_embedding"):
      stored = self.get_variable("params", "pos_embedding").shape
      if tuple(stored) != shape:
        raise ValueError(
            f"ViT position embeddings have shape {tuple(stored)}, but this input gives a sequence "
            f"of shape {shape}: the image size does not match the grid the model was made for. "
            f"Resize Transformer/posembed_input/pos_embedding with "
            f"zoo.transformers.vit.resize_position_embeddings(posemb, (H // patch_h, W // patch_w)) "
            f"or feed images of the original size.")
    posemb = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), shape,
                        self.param_dtype)
    return x + posemb.astype(x.dtype)


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU -> dropout -> Dense(D) -> dropout.

  GELU is the tanh approximation (vit_jax) unless gelu_approximate=False (exact erf, timm)."""
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  gelu_approximate: bool = True

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    """x: (B, T, D) -> (B, T, D)."""
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), name=name)
    out_dim = x.shape[-1]
    x = nn.gelu(dense(self.mlp_dim, "Dense_0")(x), approximate=self.gelu_approximate)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = dense(out_dim, "Dense_1")(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
  """Pre-norm Transformer block: x + MHA(LN(x)), then x + MLP(LN(x)) (paper Eq. 2-3)."""
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  gelu_approximate: bool = True

  @nn.compact
  def __call__(self, inputs, *, deterministic: bool):
    """inputs: (B, T, D) -> (B, T, D)."""
    norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    x = norm("LayerNorm_0")(inputs)
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), broadcast_dropout=False,
        dropout_rate=self.attention_dropout_rate, deterministic=deterministic,
        name="MultiHeadDotProductAttention_1")(x, x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = x + inputs
    y = norm("LayerNorm_2")(x)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, self.param_dtype,
                 self.gelu_approximate, name="MlpBlock_3")(y, deterministic=deterministic)
    return x + y


class Encoder(nn.Module):
  """Position embeddings, `num_layers` blocks and the final LayerNorm (vit_jax's `Transformer`;
  final_norm=False leaves the norm out, for timm's fc_norm)."""
  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  gelu_approximate: bool = True
  final_norm: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool):
    """x: (B, T, D) -> (B, T, D)."""
    x = AddPositionEmbs(self.param_dtype, name="posembed_input")(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    for layer in range(self.num_layers):
      x = Encoder1DBlock(self.mlp_dim, self.num_heads, self.dropout_rate,
                         self.attention_dropout_rate, self.dtype, self.param_dtype,
                         self.gelu_approximate,
                         name=f"encoderblock_{layer}")(x, deterministic=not train)
    if not self.final_norm:
      return x
    return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="encoder_norm")(x)


class VisionTransformer(nn.Module):
  """ViT (Dosovitskiy et al. 2020), google-research/vision_transformer's layout and names.

  Attributes:
    num_classes: logits of the `head` Dense (zero-initialised as in vit_jax); 0 = no head, the
      model then returns the (pre-)logits features.
    patch_size: P, or (P_h, P_w): the patch embedding is a conv with kernel = stride = P.
    hidden_size: D, the token width.
    num_layers: L, encoder blocks.
    num_heads: attention heads (D must be divisible by it).
    mlp_dim: hidden width of each block's MLP.
    classifier: "token" (a class token "cls" is prepended and its output classified) or
      "gap" (no class token; the mean over the patch tokens is classified).
    representation_size: if set, a `pre_logits` Dense of that width + tanh before the head
      (the paper's ImageNet-21k pre-training head); None = identity.
    dropout_rate: dropout after position embeddings, attention and in the MLP (vit_jax: 0.1
      during pre-training; here 0 by default).
    attention_dropout_rate: dropout on the attention weights.
    dtype: compute dtype (e.g. bfloat16 on accelerators); the logits are float32.
    param_dtype: parameter dtype.
    gelu_approximate: the MLP's GELU: True = tanh approximation (vit_jax, flax's default),
      False = exact erf form (timm, torch.nn.GELU's default).
    class_token: whether a class token "cls" is prepended; None = exactly when
      classifier="token". True with classifier="gap" gives a class token that the average
      pooling leaves out (timm's class_token=True, global_pool="avg").
    fc_norm: False = the final LayerNorm `Transformer/encoder_norm` normalises every token
      (vit_jax); True = no encoder_norm, a LayerNorm `fc_norm` on the pooled (B, D) vector
      instead (timm's fc_norm, its default for global_pool="avg").
  """
  num_classes: int
  patch_size: Any = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  classifier: str = "token"
  representation_size: int | None = None
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  gelu_approximate: bool = True
  class_token: bool | None = None
  fc_norm: bool = False

  def __post_init__(self):
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f"ViT classifier must be one of {CLASSIFIERS}, got {self.classifier!r}.")
    if self.classifier == "token" and self.class_token is False:
      raise ValueError('ViT classifier="token" classifies the class token: it needs '
                       'class_token=True (or None); use classifier="gap" without one.')
    _pair(self.patch_size)
    if self.hidden_size % self.num_heads:
      raise ValueError(f"ViT hidden_size {self.hidden_size} is not divisible by num_heads "
                       f"{self.num_heads}.")
    if min(self.hidden_size, self.num_layers, self.num_heads, self.mlp_dim) < 1 or (
        self.num_classes < 0):
      raise ValueError("ViT needs hidden_size, num_layers, num_heads, mlp_dim >= 1 and "
                       f"num_classes >= 0; got {self.hidden_size}, {self.num_layers}, "
                       f"{self.num_heads}, {self.mlp_dim}, {self.num_classes}.")
    super().__post_init__()

  @property
  def has_class_token(self) -> bool:
    """Whether a class token is prepended (class_token, by default classifier == "token")."""
    return self.classifier == "token" if self.class_token is None else bool(self.class_token)

  @property
  def num_prefix_tokens(self) -> int:
    """1 with a class token, else 0."""
    return int(self.has_class_token)

  def grid_size(self, image_shape: Sequence[int]) -> tuple[int, int]:
    """(H/P_h, W/P_w) for images (B, H, W, C); ValueError naming the fix if P does not divide."""
    if len(image_shape) != 4:
      raise ValueError(f"ViT takes images of shape (B, H, W, C) (NHWC), got shape "
                       f"{tuple(image_shape)} of rank {len(image_shape)}.")
    (height, width), (ph, pw) = image_shape[1:3], _pair(self.patch_size)
    if height % ph or width % pw or height < ph or width < pw:
      fix = lambda size, p: max(p, size // p * p)
      raise ValueError(
          f"ViT with {ph}x{pw} patches cannot take {height}x{width} images: height and width must "
          f"be positive multiples of the patch size (e.g. {fix(height, ph)}x{fix(width, pw)}; crop "
          f"or resize the images, then resize the position embeddings to the new grid with "
          f"zoo.transformers.vit.resize_position_embeddings).")
    return height // ph, width // pw

  @nn.compact
  def __call__(self, images, *, train: bool):
    """Class logits.

    Args:
      images: (B, H, W, C) float, H and W multiples of the patch size, and the grid
        (H/P, W/P) the one the position embeddings were made (or resized) for.
      train: dropout on (needs a "dropout" rng) when the rates are non-zero.

    Returns:
      logits: (B, num_classes) float32 (with num_classes=0: (B, representation_size or D)).
      aux: dict in `dtype`: "tokens", the encoder output after `encoder_norm` (before any
        norm with fc_norm=True), (B, N + 1, D) with a class token (first) and (B, N, D)
        without, N = (H/P_h)(W/P_w); "feature_map", its patch tokens as a (B, H/P_h, W/P_w, D)
        grid (row-major, as the patch embedding flattens them) for dense heads.
    """
    gh, gw = self.grid_size(images.shape)
    x = nn.Conv(self.hidden_size, _pair(self.patch_size), strides=_pair(self.patch_size),
                padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype,
                name="embedding")(images.astype(self.dtype))
    batch = x.shape[0]
    x = x.reshape(batch, gh * gw, self.hidden_size)
    if self.has_class_token:
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden_size), self.param_dtype)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (batch, 1, 1)), x], axis=1)
    tokens = Encoder(self.num_layers, self.mlp_dim, self.num_heads, self.dropout_rate,
                     self.attention_dropout_rate, self.dtype, self.param_dtype,
                     self.gelu_approximate, final_norm=not self.fc_norm,
                     name="Transformer")(x, train=train)
    patches = tokens[:, self.num_prefix_tokens:]
    x = tokens[:, 0] if self.classifier == "token" else jnp.mean(patches, axis=1)
    if self.fc_norm:
      x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="fc_norm")(x)
    if self.representation_size is not None:
      x = jnp.tanh(nn.Dense(self.representation_size, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="pre_logits")(x))
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=nn.initializers.zeros, name="head")(x)
    aux = {"tokens": tokens, "feature_map": patches.reshape(batch, gh, gw, self.hidden_size)}
    return x.astype(jnp.float32), aux


def _create(num_classes, patch_size, hidden_size, num_layers, num_heads, mlp_dim, classifier,
            representation_size, dropout_rate, attention_dropout_rate, dtype, param_dtype):
  return VisionTransformer(
      num_classes=num_classes, patch_size=patch_size, hidden_size=hidden_size,
      num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_dim, classifier=classifier,
      representation_size=representation_size, dropout_rate=dropout_rate,
      attention_dropout_rate=attention_dropout_rate, dtype=jnp.dtype(dtype),
      param_dtype=jnp.dtype(param_dtype))


@register_model("vit")
def vit(num_classes: int = 1000, patch_size: Any = 16, hidden_size: int = 768,
        num_layers: int = 12, num_heads: int = 12, mlp_dim: int = 3072, classifier: str = "token",
        representation_size: int | None = None, dropout_rate: float = 0.0,
        attention_dropout_rate: float = 0.0, dtype: Any = "float32",
        param_dtype: Any = "float32") -> VisionTransformer:
  """A ViT of any size (ViT-B/16's by default)."""
  return _create(num_classes, patch_size, hidden_size, num_layers, num_heads, mlp_dim, classifier,
                 representation_size, dropout_rate, attention_dropout_rate, dtype, param_dtype)


# The paper's Table 1 (Base, Large) and DeiT's Tiny / Small (Touvron et al. 2021), as in vit_jax's
# configs (ViT-Ti/16 D192 L12 H3 mlp768, ViT-S/16 D384 L12 H6 mlp1536). Patch 16; the sizes are
# fixed, the head and regularisation can be overridden (`vit` takes custom sizes).


@register_model("vit_ti16")
def vit_ti16(num_classes: int = 1000, classifier: str = "token",
             representation_size: int | None = None, dropout_rate: float = 0.0,
             attention_dropout_rate: float = 0.0, dtype: Any = "float32",
             param_dtype: Any = "float32") -> VisionTransformer:
  """ViT-Ti/16: D=192, 12 layers, 3 heads, MLP 768."""
  return _create(num_classes, 16, 192, 12, 3, 768, classifier, representation_size,
                 dropout_rate, attention_dropout_rate, dtype, param_dtype)


@register_model("vit_s16")
def vit_s16(num_classes: int = 1000, classifier: str = "token",
            representation_size: int | None = None, dropout_rate: float = 0.0,
            attention_dropout_rate: float = 0.0, dtype: Any = "float32",
            param_dtype: Any = "float32") -> VisionTransformer:
  """ViT-S/16: D=384, 12 layers, 6 heads, MLP 1536."""
  return _create(num_classes, 16, 384, 12, 6, 1536, classifier, representation_size,
                 dropout_rate, attention_dropout_rate, dtype, param_dtype)


@register_model("vit_b16")
def vit_b16(num_classes: int = 1000, classifier: str = "token",
            representation_size: int | None = None, dropout_rate: float = 0.0,
            attention_dropout_rate: float = 0.0, dtype: Any = "float32",
            param_dtype: Any = "float32") -> VisionTransformer:
  """ViT-B/16: D=768, 12 layers, 12 heads, MLP 3072; 86,567,656 parameters
  at 224x224 with 1000 classes."""
  return _create(num_classes, 16, 768, 12, 12, 3072, classifier, representation_size,
                 dropout_rate, attention_dropout_rate, dtype, param_dtype)


@register_model("vit_l16")
def vit_l16(num_classes: int = 1000, classifier: str = "token",
            representation_size: int | None = None, dropout_rate: float = 0.0,
            attention_dropout_rate: float = 0.0, dtype: Any = "float32",
            param_dtype: Any = "float32") -> VisionTransformer:
  """ViT-L/16: D=1024, 24 layers, 16 heads, MLP 4096; 304,326,632 parameters
  at 224x224 with 1000 classes."""
  return _create(num_classes, 16, 1024, 24, 16, 4096, classifier, representation_size,
                 dropout_rate, attention_dropout_rate, dtype, param_dtype)
