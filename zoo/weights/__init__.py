"""Importing public checkpoints: `zoo.load_checkpoint(source, format=..., **hyperparameters)`.

    model, variables = zoo.load_checkpoint("swin_tiny_patch4_window7_224.pth", format="swin_official")
    logits, aux = model.apply(variables, images_nhwc, train=False)

`source` is a path (.npz; .pth/.pt needs torch) or a mapping of parameter names to arrays.
Formats so far:
  swin_official  the `model` state dict of microsoft/Swin-Transformer (models/swin_transformer.py);
                 its buffers relative_position_index and attn_mask are recomputed, not read.
                 Hyper-parameters: those of the `swin` registry constructor (official names).
  vit_jax        the .npz checkpoints of google-research/vision_transformer ('/'-joined flax
                 names, which `zoo.transformers.vit` keeps). Hyper-parameters: image_size,
                 patch_size (int or (h, w)), hidden_size, mlp_dim, num_heads, num_layers,
                 num_classes, classifier, representation_size; position embeddings are resized
                 (vit_jax's scipy zoom) when image_size gives another grid than the checkpoint's.
"""

import os
import re
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from zoo import registry

FORMATS = ("swin_official", "vit_jax")


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
    else:
      raise ValueError(f"Cannot read {path}: pass a .npz, a .pth/.pt file or a mapping of arrays.")
  else:
    raise ValueError(f"source must be a path or a mapping of names to arrays, got {type(source).__name__}.")
  if "model" in state and isinstance(state["model"], Mapping):  # the official training checkpoint
    state = dict(state["model"])
  return {name: np.asarray(value.numpy() if hasattr(value, "numpy") else value)
          for name, value in state.items()}


def _swin_official_name(name: str) -> tuple[tuple[str, ...], Any] | None:
  """Official state-dict name -> (our parameter path, converter), or None for a buffer."""
  if name.endswith(("relative_position_index", "attn_mask")):
    return None
  name = re.sub(r"^layers\.(\d+)\.blocks\.(\d+)\.", r"layers_\1_blocks_\2.", name)
  name = re.sub(r"^layers\.(\d+)\.downsample\.", r"layers_\1_downsample.", name)
  name = name.replace("patch_embed.proj.", "patch_embed_proj.").replace("patch_embed.norm.", "patch_embed_norm.")
  *path, leaf = name.split(".")
  if leaf == "relative_position_bias_table":
    return (*path, leaf), lambda a: a
  if leaf == "bias":
    return (*path, "bias"), lambda a: a
  if leaf == "weight":
    if path[-1].startswith("norm") or path[-1] == "patch_embed_norm":
      return (*path, "scale"), lambda a: a
    if path[-1] == "patch_embed_proj":
      return (*path, "kernel"), lambda a: a.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
    return (*path, "kernel"), lambda a: a.T                        # Linear (out, in) -> (in, out)
  raise ValueError(f"swin_official: unknown parameter name {name!r}.")


def _convert(state, rename, expected, fmt):
  flat_expected = flax.traverse_util.flatten_dict(expected)
  converted, unexpected = {}, []
  for name, array in state.items():
    target = rename(name)
    if target is None:
      continue
    path, convert = target
    if path not in flat_expected:
      unexpected.append(name)
      continue
    converted[path] = convert(array)
  problems = []
  if unexpected:
    problems.append(f"names the model does not have: {', '.join(sorted(unexpected))}")
  missing = sorted("/".join(p) for p in flat_expected if p not in converted)
  if missing:
    problems.append(f"parameters the checkpoint lacks: {', '.join(missing)}")
  mismatched = [f"{'/'.join(p)}: checkpoint {converted[p].shape} vs model {flat_expected[p].shape}"
                for p in flat_expected if p in converted and converted[p].shape != flat_expected[p].shape]
  if mismatched:
    problems.append("shapes that disagree with the hyper-parameters: " + "; ".join(mismatched))
  if problems:
    raise ValueError(f"{fmt} checkpoint does not fit the model: " + " | ".join(problems))
  return flax.traverse_util.unflatten_dict(
      {p: jnp.asarray(converted[p], flat_expected[p].dtype) for p in flat_expected})


def load_checkpoint(source, *, format: str, **hyperparameters):
  """(model, variables) with a public checkpoint's weights.

  Args:
    source: a path (.npz, or .pth/.pt with torch installed) or a mapping name -> array.
    format: one of FORMATS.
    **hyperparameters: the model's, e.g. embed_dim=96, depths=(2, 2, 6, 2) for Swin (its
      registry constructor `swin` names them); they must match the checkpoint's shapes.

  Raises:
    ValueError naming unknown, missing and mis-shaped parameters.
  """
  if format not in FORMATS:
    raise ValueError(f"format={format!r} is not one of {FORMATS}.")
  state = _read(source)
  if format == "vit_jax":
    return _load_vit_jax(state, **hyperparameters)
  model = registry.create("swin", **hyperparameters)
  size = model.img_size
  expected = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, model.in_chans)), train=False))["params"]
  params = _convert(state, _swin_official_name, flax.core.unfreeze(expected), format)
  return model, {"params": params}


_POSEMB = "Transformer/posembed_input/pos_embedding"


def _load_vit_jax(state, *, image_size, patch_size, hidden_size, mlp_dim, num_heads, num_layers,
                  num_classes, classifier="token", representation_size=None, **model_options):
  from zoo.transformers import vit  # the model family this format feeds

  model = registry.create("vit", num_classes=num_classes, patch_size=patch_size,
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
  params = _convert(state, lambda name: (tuple(name.split("/")), lambda a: a), expected, "vit_jax")
  return model, {"params": params}
