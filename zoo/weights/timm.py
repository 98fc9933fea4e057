"""`zoo.load_checkpoint(source, format="timm", **hyperparameters)`: timm's Swin and ViT weights.

    model, variables = zoo.load_checkpoint("model.safetensors", format="timm", model="vit",
                                           img_size=224, patch_size=16, embed_dim=768, depth=12,
                                           num_heads=12, num_classes=1000)
    logits, aux = model.apply(variables, images_nhwc, train=False)

The family is told from the names (`layers.{i}.blocks.{j}.` = Swin, `blocks.{i}.` = ViT) or by
`model="swin" | "vit"`. Hyper-parameters are timm's constructor arguments, with timm's defaults
(which are its `*_224` ImageNet models'); they must agree with the checkpoint's shapes.

Swin (`timm.models.swin_transformer.SwinTransformer`) -> `zoo.transformers.swin` ("swin"):
  img_size (int), patch_size, in_chans, num_classes, embed_dim, depths, num_heads, window_size
  (int), mlp_ratio, qkv_bias, drop_path_rate, dtype: the same names as the official release
  (in_chans is the zoo's in_channels).
  timm's state dict is the official one but for two renamings: each stage's patch merging sits
  at the start of the next stage (`layers.{i}.downsample` for i >= 1, = official
  `layers.{i-1}.downsample`) and the classifier is `head.fc`. The buffers
  relative_position_index and attn_mask, if present, are recomputed, not read. Official-layout
  state dicts (`layers.0.downsample.*`, `head.*`) are accepted too, as timm's own loader does.
  As in timm (without always_partition), a stage not larger than the window is one window
  with no shift; timm's padding of resolutions that are not multiples of the window is not
  supported (the model raises a ValueError naming the sizes that work).

ViT (`timm.models.vision_transformer.VisionTransformer`) -> `zoo.transformers.vit`:
  img_size (int or (h, w)) = 224, patch_size (int or (h, w)) = 16, in_chans = 3,
  num_classes = 1000, global_pool = "token" | "avg", embed_dim = 768, depth = 12,
  num_heads = 12, mlp_ratio = 4.0, class_token = True, fc_norm = None (= global_pool == "avg",
  timm's rule), dtype, param_dtype.
  Names: cls_token -> cls; pos_embed -> Transformer/posembed_input/pos_embedding (same layout:
  class token first, timm's no_embed_class=False); patch_embed.proj (O, I, kh, kw) -> embedding
  (kh, kw, I, O); blocks.{i}.norm1 / norm2 -> encoderblock_{i}/LayerNorm_0 / LayerNorm_2;
  blocks.{i}.attn.qkv (3D, D), fused, rows q | k | v, each head-major -> query / key / value
  (D, heads, D/heads); blocks.{i}.attn.proj -> out (heads, D/heads, D); blocks.{i}.mlp.fc1 /
  fc2 -> MlpBlock_3/Dense_0 / Dense_1; norm -> Transformer/encoder_norm; fc_norm -> fc_norm;
  head -> head. The model is built with gelu_approximate=False: timm's MLP uses nn.GELU, the
  exact erf form, where vit_jax (and our default) uses the tanh approximation; the two differ by
  up to ~1e-3 per activation, more than the 1e-4 the conversion must keep. LayerNorm epsilon
  1e-6 in both. timm's other options (register tokens, layer scale, qk-norm, pre-norm,
  no_embed_class, attention pooling, qkv_bias=False) are not supported: their hyper-parameters
  are rejected and their tensors are named as ones the model does not have.
"""

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np

from zoo import factory
from zoo.weights.conversion import convert_state, swin_official_name

MODELS = ("swin", "vit")
VIT_HYPERPARAMETERS = dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000,
                           global_pool="token", embed_dim=768, depth=12, num_heads=12,
                           mlp_ratio=4.0, class_token=True, fc_norm=None, dtype="float32",
                           param_dtype="float32")
_POOLING = {"token": "token", "avg": "gap"}  # timm's global_pool -> our classifier


def _which_model(state) -> str:
  if any(re.match(r"layers\.\d+\.blocks\.\d+\.", name) for name in state):
    return "swin"
  if "pos_embed" in state or any(re.match(r"blocks\.\d+\.", name) for name in state):
    return "vit"
  raise ValueError("timm: cannot tell a Swin from a ViT state dict (no layers.{i}.blocks.{j}.* "
                   "nor blocks.{i}.* / pos_embed names); pass model='swin' or model='vit'.")


def load(state, *, model: str | None = None, **hyperparameters):
  """(model, variables) from a timm state dict (name -> array, `module.` prefixes allowed)."""
  state = {name.removeprefix("module."): array for name, array in state.items()}  # DDP-saved
  model = model or _which_model(state)
  if model not in MODELS:
    raise ValueError(f"timm: model={model!r} is not one of {MODELS}.")
  return (_load_swin if model == "swin" else _load_vit)(state, **hyperparameters)


def _load_swin(state, **hyperparameters):
  if "in_chans" in hyperparameters:  # timm's name for the zoo's in_channels
    hyperparameters["in_channels"] = hyperparameters.pop("in_chans")
  module = factory.create("swin", **hyperparameters)
  size = module.img_size
  expected = flax.core.unfreeze(jax.eval_shape(lambda: module.init(
      jax.random.key(0), jnp.zeros((1, size, size, module.in_channels)), train=False))["params"])
  official_layout = any(name.startswith("layers.0.downsample.") for name in state)

  def rename(name):
    if not official_layout:  # timm: stage i >= 1 starts with the merging that ends stage i - 1
      name = re.sub(r"^layers\.(\d+)\.downsample\.",
                    lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", name)
    name = re.sub(r"^head\.fc\.", "head.", name)
    return swin_official_name(name)

  return module, {"params": convert_state(state, rename, expected, "timm (Swin)")}


def _heads_in(want):
  """(D_in, D_out) -> (D_in, heads, head_dim) = want, if the sizes agree; else unchanged."""
  return lambda a: a.reshape(want) if a.shape == (want[0], int(np.prod(want[1:]))) else a


def _qkv(part, want):
  """One of q, k, v (part 0, 1, 2) from timm's fused qkv: weight (3D, D) -> kernel (D, H, D/H),
  bias (3D,) -> (H, D/H); rows are q | k | v, each head-major (timm reshapes to (3, H, D/H))."""
  def convert(a):
    if a.shape[0] % 3:
      return a
    a = a.reshape(3, a.shape[0] // 3, *a.shape[1:])[part]
    if a.ndim == 1:
      return a.reshape(want) if a.size == np.prod(want) and len(want) == 2 else a
    return _heads_in(want)(a.T)
  return convert


def _load_vit(state, **hyperparameters):
  from zoo.transformers import vit  # noqa: PLC0415 (the family this feeds; imported lazily)

  unknown = sorted(set(hyperparameters) - set(VIT_HYPERPARAMETERS))
  if unknown:
    raise ValueError(f"timm ViT: no hyper-parameter {', '.join(map(repr, unknown))} (timm options "
                     f"the zoo's ViT lacks are not supported). It takes: "
                     f"{', '.join(VIT_HYPERPARAMETERS)}.")
  h = {**VIT_HYPERPARAMETERS, **hyperparameters}
  if h["global_pool"] not in _POOLING:
    raise ValueError(f"timm ViT: global_pool={h['global_pool']!r} is not supported; use one of "
                     f"{tuple(_POOLING)}.")
  fc_norm = h["global_pool"] == "avg" if h["fc_norm"] is None else bool(h["fc_norm"])
  module = vit.VisionTransformer(
      num_classes=h["num_classes"], patch_size=h["patch_size"], hidden_size=h["embed_dim"],
      num_layers=h["depth"], num_heads=h["num_heads"],
      mlp_dim=int(h["embed_dim"] * h["mlp_ratio"]), classifier=_POOLING[h["global_pool"]],
      gelu_approximate=False, class_token=bool(h["class_token"]), fc_norm=fc_norm,
      dtype=jnp.dtype(h["dtype"]), param_dtype=jnp.dtype(h["param_dtype"]))
  size = h["img_size"]
  height, width = (size, size) if isinstance(size, int) else tuple(size)
  module.grid_size((1, height, width, h["in_chans"]))  # a clear error for a bad img_size
  expected = flax.core.unfreeze(jax.eval_shape(lambda: module.init(
      jax.random.key(0), jnp.zeros((1, height, width, h["in_chans"])), train=False))["params"])
  flat_expected = flax.traverse_util.flatten_dict(expected)
  shape = lambda *path: flat_expected[path].shape if path in flat_expected else (0, 0, 0)
  same, transpose = (lambda a: a), (lambda a: a.T)
  posemb = ("Transformer", "posembed_input", "pos_embedding")

  def rename(name):
    if name == "cls_token":
      return ("cls",), same
    if name == "pos_embed":
      return posemb, same
    if name == "patch_embed.proj.weight":
      return ("embedding", "kernel"), lambda a: a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if name == "patch_embed.proj.bias":
      return ("embedding", "bias"), same
    match = re.fullmatch(r"(norm|fc_norm|head)\.(weight|bias)", name)
    if match:
      layer, leaf = match.groups()
      path = {"norm": ("Transformer", "encoder_norm")}.get(layer, (layer,))
      if layer == "head":  # nn.Linear (out, in) -> Dense (in, out)
        return ((*path, "kernel"), transpose) if leaf == "weight" else ((*path, "bias"), same)
      return (*path, "scale" if leaf == "weight" else "bias"), same
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
    if not match:
      return ("timm", name), same  # not ours: reported by name
    block, layer, leaf = match.groups()
    p = ("Transformer", f"encoderblock_{block}")
    attention = (*p, "MultiHeadDotProductAttention_1")
    if layer in ("norm1", "norm2"):
      norm = "LayerNorm_0" if layer == "norm1" else "LayerNorm_2"
      return (*p, norm, "scale" if leaf == "weight" else "bias"), same
    if layer in ("mlp.fc1", "mlp.fc2"):
      dense = (*p, "MlpBlock_3", "Dense_0" if layer == "mlp.fc1" else "Dense_1")
      return ((*dense, "kernel"), transpose) if leaf == "weight" else ((*dense, "bias"), same)
    if layer == "attn.qkv":
      key = "kernel" if leaf == "weight" else "bias"
      return [((*attention, part, key), _qkv(i, shape(*attention, part, key)))
              for i, part in enumerate(("query", "key", "value"))]
    if layer == "attn.proj":
      if leaf == "bias":
        return (*attention, "out", "bias"), same
      want = shape(*attention, "out", "kernel")  # (heads, head_dim, D)
      return (*attention, "out", "kernel"), lambda a: (
          a.T.reshape(want) if a.shape == (want[-1], want[0] * want[1]) else a.T)
    return ("timm", name), same

  hints = {posemb: "The position embeddings were made for another patch grid (or another "
                   "class_token setting): give the checkpoint's img_size and patch_size."}
  params = convert_state(state, rename, expected, "timm (ViT)", hints)
  return module, {"params": params}
