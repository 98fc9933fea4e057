"""Importing public checkpoints: `zoo.load_checkpoint(source, format=..., **hyperparameters)`.

    model, variables = zoo.load_checkpoint("swin_tiny_patch4_window7_224.pth", format="swin_official")
    logits, aux = model.apply(variables, images_nhwc, train=False)

`source` is a path (.npz; .pth/.pt/.bin needs torch, .safetensors the safetensors package)
or a mapping of parameter names to arrays.
Formats so far:
  swin_official  the `model` state dict of microsoft/Swin-Transformer (models/swin_transformer.py);
                 its buffers relative_position_index and attn_mask are recomputed, not read.
                 Hyper-parameters: those of the `swin` registry constructor (the official
                 names, but in_channels for in_chans).
  vit_jax        the .npz checkpoints of google-research/vision_transformer ('/'-joined flax
                 names, which `zoo.transformers.vit` keeps). Hyper-parameters: image_size,
                 patch_size (int or (h, w)), hidden_size, mlp_dim, num_heads, num_layers,
                 num_classes, classifier, representation_size; position embeddings are resized
                 (vit_jax's scipy zoom) when image_size gives another grid than the checkpoint's.
  timm           timm's SwinTransformer and VisionTransformer state dicts (`zoo.weights.timm`
                 says which variants and hyper-parameters: timm's names, timm's defaults).
  torchvision    torchvision's resnet50, vgg16, fasterrcnn_resnet50_fpn and maskrcnn_resnet50_fpn
                 state dicts (`zoo.weights.torchvision`: model= or told from the names; sizes
                 read from the shapes).
"""

import os
from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from zoo import factory
from zoo.weights.conversion import convert_state, swin_official_name

FORMATS = ("swin_official", "vit_jax", "timm", "torchvision")


def _read(source) -> dict[str, np.ndarray]:
  if isinstance(source, Mapping):
    state = dict(source)
  elif isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if path.endswith(".npz"):
      with np.load(path) as archive:
        state = dict(archive)
    elif path.endswith((".pth", ".pt", ".bin")):
      try:
        import torch  # only for PyTorch files
      except ImportError:
        raise ValueError(f"{path} is a PyTorch file and torch is not installed; install torch, or "
                         "pass a mapping of names to NumPy arrays instead.") from None
      state = torch.load(path, map_location="cpu", weights_only=True)
      state = {name: value.float() if getattr(value, "dtype", None) == torch.bfloat16 else value
               for name, value in state.items()}  # NumPy has no bfloat16
    elif path.endswith(".safetensors"):  # timm's releases on the Hugging Face hub
      try:
        import safetensors.numpy
      except ImportError:
        raise ValueError(f"{path} is a safetensors file and the safetensors package is not "
                         "installed; pip install safetensors (torch is not needed).") from None
      state = safetensors.numpy.load_file(path)
    else:
      raise ValueError(f"Cannot read {path}: pass a .npz, .pth/.pt/.bin or .safetensors file or a "
                       "mapping of arrays.")
  else:
    raise ValueError(f"source must be a path or a mapping of names to arrays, got {type(source).__name__}.")
  for wrapper in ("model", "state_dict"):  # official / timm training checkpoints
    if wrapper in state and isinstance(state[wrapper], Mapping):
      state = dict(state[wrapper])
  return {name: np.asarray(value.numpy() if hasattr(value, "numpy") else value)
          for name, value in state.items()}


def load_checkpoint(source, *, format: str, **hyperparameters):
  """(model, variables) with a public checkpoint's weights.

  Args:
    source: a path (.npz; .pth/.pt/.bin with torch installed; .safetensors with the
      safetensors package) or a mapping name -> array (NumPy arrays or anything with .numpy()).
    format: one of FORMATS.
    **hyperparameters: the model's, e.g. embed_dim=96, depths=(2, 2, 6, 2) for Swin (its
      registry constructor `swin` names them; format="timm" takes timm's names, see
      `zoo.weights.timm`; format="torchvision" reads sizes from the shapes and takes the zoo
      model's names as overrides, see `zoo.weights.torchvision`); they must match the shapes.

  Raises:
    ValueError naming unknown, missing and mis-shaped parameters.
  """
  if format not in FORMATS:
    raise ValueError(f"format={format!r} is not one of {FORMATS}.")
  state = _read(source)
  if format == "vit_jax":
    return _load_vit_jax(state, **hyperparameters)
  if format == "timm":
    from zoo.weights import timm  # noqa: PLC0415 (it imports this module's helpers)
    return timm.load(state, **hyperparameters)
  if format == "torchvision":
    from zoo.weights import torchvision  # noqa: PLC0415 (it imports this module's helpers)
    return torchvision.load(state, **hyperparameters)
  model = factory.create("swin", **hyperparameters)
  size = model.img_size
  expected = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, model.in_channels)), train=False))["params"]
  params = convert_state(state, swin_official_name, flax.core.unfreeze(expected), format)
  return model, {"params": params}


_POSEMB = "Transformer/posembed_input/pos_embedding"


def _load_vit_jax(state, *, image_size, patch_size, hidden_size, mlp_dim, num_heads, num_layers,
                  num_classes, classifier="token", representation_size=None, **model_options):
  from zoo.transformers import vit  # the model family this format feeds

  model = factory.create("vit", num_classes=num_classes, patch_size=patch_size,
                          hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                          mlp_dim=mlp_dim, classifier=classifier,
                          representation_size=representation_size, **model_options)
  height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  patch_h, patch_w = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
  expected = flax.core.unfreeze(jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, height, width, 3)), train=False))["params"])
  want = flax.traverse_util.flatten_dict(expected)[tuple(_POSEMB.split("/"))].shape
  if _POSEMB in state and state[_POSEMB].shape != want and state[_POSEMB].shape[-1] == want[-1]:
    state = {**state, _POSEMB: vit.resize_position_embeddings(
        state[_POSEMB], (height // patch_h, width // patch_w), class_token=classifier == "token")}
  params = convert_state(state, lambda name: (tuple(name.split("/")), lambda a: a), expected, "vit_jax")
  return model, {"params": params}
