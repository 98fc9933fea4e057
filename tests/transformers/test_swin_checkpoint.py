"""zoo.load_checkpoint(format="swin_official") against the official model's arithmetic.

No PyTorch here, so the reference logits come from a float64 NumPy transcription of
microsoft/Swin-Transformer's forward that reads the official state dict directly, with
PyTorch's conventions (nn.Linear: x @ W.T + b; Conv2d weight (out, in, kh, kw); LayerNorm
weight/bias). The state dict is random, with the official names and shapes and the buffers
(relative_position_index, attn_mask) present, as in a released checkpoint.
"""

import numpy as np
import pytest
import scipy.special

import zoo
from tests.transformers.test_swin import _region_mask, _relative_position_index, _unwindows, _windows

CONFIG = dict(img_size=32, patch_size=2, num_classes=5, embed_dim=12, depths=(2, 2),
              num_heads=(3, 3), window_size=4, drop_path_rate=0.0)


def official_state_dict(rng, img_size, patch_size, num_classes, embed_dim, depths, num_heads,
                        window_size, **_):
  state = {}
  normal = lambda *shape: rng.normal(scale=0.3, size=shape).astype(np.float32)
  state["patch_embed.proj.weight"] = normal(embed_dim, 3, patch_size, patch_size)
  state["patch_embed.proj.bias"] = normal(embed_dim)
  state["patch_embed.norm.weight"], state["patch_embed.norm.bias"] = 1 + normal(embed_dim), normal(embed_dim)
  resolution = img_size // patch_size
  for i, (depth, heads) in enumerate(zip(depths, num_heads)):
    c, r = embed_dim * 2 ** i, resolution // 2 ** i
    m = min(window_size, r)
    for j in range(depth):
      p = f"layers.{i}.blocks.{j}."
      state[p + "norm1.weight"], state[p + "norm1.bias"] = 1 + normal(c), normal(c)
      state[p + "attn.relative_position_bias_table"] = normal((2 * m - 1) ** 2, heads)
      state[p + "attn.relative_position_index"] = _relative_position_index(m)
      state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"] = normal(3 * c, c), normal(3 * c)
      state[p + "attn.proj.weight"], state[p + "attn.proj.bias"] = normal(c, c), normal(c)
      state[p + "norm2.weight"], state[p + "norm2.bias"] = 1 + normal(c), normal(c)
      state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"] = normal(4 * c, c), normal(4 * c)
      state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"] = normal(c, 4 * c), normal(c)
      if j % 2 and r > window_size:
        state[p + "attn_mask"] = _region_mask(r, r, m, m // 2).astype(np.float32)
    if i < len(depths) - 1:
      p = f"layers.{i}.downsample."
      state[p + "norm.weight"], state[p + "norm.bias"] = 1 + normal(4 * c), normal(4 * c)
      state[p + "reduction.weight"] = normal(2 * c, 4 * c)
  features = embed_dim * 2 ** (len(depths) - 1)
  state["norm.weight"], state["norm.bias"] = 1 + normal(features), normal(features)
  state["head.weight"], state["head.bias"] = normal(num_classes, features), normal(num_classes)
  return state


def official_forward(s, image, img_size, patch_size, embed_dim, depths, num_heads, window_size, **_):
  """Logits of one (H, W, 3) image, float64, reading the state dict as the official code does."""
  linear = lambda x, name: x @ s[name + ".weight"].T + (s[name + ".bias"] if name + ".bias" in s else 0)

  def norm(x, name, eps=1e-5):
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return x * s[name + ".weight"] + s[name + ".bias"]

  w = s["patch_embed.proj.weight"]                                    # (D, 3, P, P)
  g = img_size // patch_size
  patches = image.reshape(g, patch_size, g, patch_size, 3).transpose(0, 2, 4, 1, 3)  # (g, g, 3, P, P)
  x = np.einsum("yxcij,dcij->yxd", patches, w) + s["patch_embed.proj.bias"]
  x = norm(x, "patch_embed.norm")
  for i, (depth, heads) in enumerate(zip(depths, num_heads)):
    r = g // 2 ** i
    m = min(window_size, r)
    for j in range(depth):
      p = f"layers.{i}.blocks.{j}."
      shift = m // 2 if (j % 2 and r > window_size) else 0
      c = x.shape[-1]
      y = np.roll(norm(x, p + "norm1"), (-shift, -shift), (0, 1))
      windows = _windows(y, m)
      qkv = linear(windows, p + "attn.qkv").reshape(len(windows), m * m, 3, heads, c // heads)
      q, k, v = qkv.transpose(2, 0, 3, 1, 4)
      logits = (q * (c // heads) ** -0.5) @ k.transpose(0, 1, 3, 2)
      table = s[p + "attn.relative_position_bias_table"]
      logits = logits + table[s[p + "attn.relative_position_index"]].transpose(2, 0, 1)[None]
      if shift:
        logits = logits + s[p + "attn_mask"][:, None]
      out = (scipy.special.softmax(logits, -1) @ v).transpose(0, 2, 1, 3).reshape(len(windows), m * m, c)
      x = x + np.roll(_unwindows(linear(out, p + "attn.proj"), r, r, m), (shift, shift), (0, 1))
      h = linear(norm(x, p + "norm2"), p + "mlp.fc1")
      x = x + linear(0.5 * h * (1 + scipy.special.erf(h / np.sqrt(2))), p + "mlp.fc2")
    if i < len(depths) - 1:
      x = np.concatenate([x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]], -1)
      x = linear(norm(x, f"layers.{i}.downsample.norm"), f"layers.{i}.downsample.reduction")
  return linear(norm(x, "norm").mean((0, 1)), "head")


def test_converted_swin_reproduces_the_official_logits(tmp_path):
  rng = np.random.default_rng()
  state = official_state_dict(rng, **CONFIG)
  np.savez(tmp_path / "swin.npz", **state)
  model, variables = zoo.load_checkpoint(tmp_path / "swin.npz", format="swin_official", **CONFIG)
  images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  logits, _ = model.apply(variables, images, train=False)
  state64 = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in state.items()}
  expected = np.stack([official_forward(state64, im.astype(np.float64), **CONFIG) for im in images])
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_the_official_training_checkpoint_layout_is_unwrapped():
  state = official_state_dict(np.random.default_rng(0), **CONFIG)
  model, variables = zoo.load_checkpoint({"model": state, "epoch": 300}, format="swin_official", **CONFIG)
  assert variables["params"]["head"]["kernel"].shape == (24, 5)


def test_mismatches_are_named():
  state = official_state_dict(np.random.default_rng(0), **CONFIG)
  with pytest.raises(ValueError, match=r"head/kernel: checkpoint \(24, 5\) vs model \(24, 7\)"):
    zoo.load_checkpoint(state, format="swin_official", **{**CONFIG, "num_classes": 7})
  del state["norm.weight"]
  state["layers.9.blocks.0.norm1.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r"does not have: layers\.9.*lacks: norm/scale"):
    zoo.load_checkpoint(state, format="swin_official", **CONFIG)
  with pytest.raises(ValueError, match="format"):
    zoo.load_checkpoint(state, format="caffe", **CONFIG)
