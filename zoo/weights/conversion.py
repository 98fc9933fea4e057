"""What every checkpoint format shares: renaming a state dict into our parameter tree.

`convert_state` maps a checkpoint's names and layouts to our parameters and names everything
that does not fit; `swin_official_name` is the official Swin release's renaming (timm's Swin
uses it too).
"""

import re
from typing import Any

import flax
import jax.numpy as jnp


def swin_official_name(name: str) -> tuple[tuple[str, ...], Any] | None:
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
  if leaf == "weight" and path:
    if path[-1].startswith("norm") or path[-1] == "patch_embed_norm":
      return (*path, "scale"), lambda a: a
    if path[-1] == "patch_embed_proj":
      return (*path, "kernel"), lambda a: a.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
    return (*path, "kernel"), lambda a: a.T                        # Linear (out, in) -> (in, out)
  return ("unknown", name), lambda a: a  # not a path of ours: convert_state names it


def convert_state(state, rename, expected, fmt, hints=None):
  """Our parameter tree from a checkpoint, or a ValueError listing everything that does not fit.

  Args:
    state: checkpoint name -> NumPy array.
    rename: name -> None (a buffer we recompute: skipped), one (path, convert) pair or a list of
      them (one checkpoint tensor feeding several of ours, e.g. timm's fused qkv); path is a
      tuple of our names, convert maps the checkpoint's array to our layout.
    expected: our parameter tree of shapes (jax.eval_shape of init).
    fmt: the format's name, for the message.
    hints: our path -> a sentence appended to that parameter's shape mismatch.
  """
  flat_expected = flax.traverse_util.flatten_dict(expected)
  converted, source, unexpected = {}, {}, []
  for name, array in state.items():
    targets = rename(name)
    if targets is None:
      continue
    for path, convert in targets if isinstance(targets, list) else [targets]:
      if path not in flat_expected:
        unexpected.append(name)
        continue
      converted[path], source[path] = convert(array), (name, array.shape)

  def mismatch(p):
    name, shape = source[p]
    where = "" if name == "/".join(p) else f" (from {name} {tuple(shape)})"
    hint = f" {hints[p]}" if hints and p in hints else ""
    return (f"{'/'.join(p)}: checkpoint {converted[p].shape} vs model {flat_expected[p].shape}"
            f"{where}{hint}")

  problems = []
  if unexpected:
    problems.append(f"names the model does not have: {', '.join(sorted(set(unexpected)))}")
  missing = sorted("/".join(p) for p in flat_expected if p not in converted)
  if missing:
    problems.append(f"parameters the checkpoint lacks: {', '.join(missing)}")
  mismatched = [mismatch(p) for p in flat_expected
                if p in converted and converted[p].shape != flat_expected[p].shape]
  if mismatched:
    problems.append("shapes that disagree with the hyper-parameters: " + "; ".join(mismatched))
  if problems:
    raise ValueError(f"{fmt} checkpoint does not fit the model: " + " | ".join(problems))
  return flax.traverse_util.unflatten_dict(
      {p: jnp.asarray(converted[p], flat_expected[p].dtype) for p in flat_expected})
