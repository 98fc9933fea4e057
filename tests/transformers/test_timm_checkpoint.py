"""zoo.load_checkpoint(format="timm") against timm itself (and format="swin_official" against
the official Swin code).

The reference outputs are golden files made by the source models, not by us:
`golden/make_goldens.py` (run with torch 2.14.1 + timm 1.0.31 on a CPU; not run by CI, its
docstring says how) builds small models with timm's own SwinTransformer / VisionTransformer
classes (timm_*.npz) and with the official microsoft/Swin-Transformer SwinTransformer class
(official_swin_w4.npz; the docstring says which copy of that file) under fixed seeds, perturbs
every parameter, and stores the state dict (the source's names, float32, with whatever buffers
its state_dict() holds), a batch of random images, the model's eval-mode logits and torch
autograd's gradient of sum(logits * cotangent) with respect to the images. Here the state dict
is converted and our model must give the same logits (1e-4 relative, float32) and the same
input gradients. No torch is needed to run these tests.
"""

import json
import os

import jax
import numpy as np
import pytest

import zoo

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
CASES = ("timm_swin_w4", "timm_swin_w7", "timm_vit_token", "timm_vit_gap_fc_norm",
         "timm_vit_cls_avg", "official_swin_w4")


def _golden(case):
  """(state dict, timm constructor kwargs, arrays) of a golden file."""
  with np.load(os.path.join(GOLDEN, f"{case}.npz")) as archive:
    arrays = dict(archive)
  state = {k.removeprefix("state/"): v for k, v in arrays.items() if k.startswith("state/")}
  return state, json.loads(str(arrays["config"]))["kwargs"], arrays


def _logits(model, variables, images):
  return np.asarray(model.apply(variables, images, train=False)[0])


def _close(actual, expected, rtol=1e-4):
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=1e-5 * np.abs(expected).max())


def test_golden_files_are_small():
  sizes = [os.path.getsize(os.path.join(GOLDEN, f"{case}.npz")) for case in CASES]
  assert max(sizes) < 1_000_000 and sum(sizes) < 3_000_000


@pytest.mark.parametrize("case", CASES)
def test_converted_model_reproduces_the_source_logits_and_input_gradients(case):
  state, kwargs, arrays = _golden(case)
  fmt = "swin_official" if case.startswith("official_swin") else "timm"
  model, variables = zoo.load_checkpoint(state, format=fmt, **kwargs)

  @jax.jit
  def logits_and_images_grad(images, cotangent):
    logits, vjp = jax.vjp(lambda x: model.apply(variables, x, train=False)[0], images)
    return logits, vjp(cotangent)[0]

  logits, images_grad = logits_and_images_grad(arrays["images"], arrays["cotangent"])
  _close(np.asarray(logits), arrays["logits"])
  _close(np.asarray(images_grad), arrays["images_grad"])


def test_timm_vit_needs_the_exact_gelu():
  """timm's nn.GELU is the erf form; with vit_jax's tanh approximation the logits miss timm's by
  more than the tolerance, so the golden does check which GELU the converted model uses."""
  state, kwargs, arrays = _golden("timm_vit_token")
  model, variables = zoo.load_checkpoint(state, format="timm", **kwargs)
  assert not model.gelu_approximate
  tanh = _logits(model.clone(gelu_approximate=True), variables, arrays["images"])
  assert np.abs(tanh - arrays["logits"]).max() > 1e-4 * np.abs(arrays["logits"]).max()


def test_swin_buffers_are_recomputed_and_both_layouts_load():
  """timm's released checkpoints may carry relative_position_index / attn_mask (older timm kept
  them persistent): they are ignored. The official layout (merging at the end of a stage,
  `head.*`) converts to the same parameters, as timm's own loader accepts it."""
  state, kwargs, arrays = _golden("timm_swin_w4")
  _, reference = zoo.load_checkpoint(state, format="timm", **kwargs)
  garbage = dict(state)
  for name in state:
    if name.endswith("attn.relative_position_bias_table"):
      block = name.removesuffix("attn.relative_position_bias_table")
      garbage[block + "attn.relative_position_index"] = np.zeros((16, 16), np.int64)
      garbage[block + "attn_mask"] = np.full((4, 16, 16), 7.0, np.float32)
  official = {}
  for name, array in state.items():
    if name.startswith("layers.") and ".downsample." in name:
      stage, rest = name.removeprefix("layers.").split(".", 1)
      name = f"layers.{int(stage) - 1}.{rest}"
    official[name.replace("head.fc.", "head.")] = array
  for source in (garbage, official, {"state_dict": {f"module.{k}": v for k, v in state.items()}}):
    _, variables = zoo.load_checkpoint(source, format="timm", **kwargs)
    jax.tree.map(np.testing.assert_array_equal, variables, reference)
  # The official release's own state dict (buffers included) reads the same under both formats.
  official_state, official_kwargs, _ = _golden("official_swin_w4")
  _, as_official = zoo.load_checkpoint(official_state, format="swin_official", **official_kwargs)
  _, as_timm = zoo.load_checkpoint(official_state, format="timm", **official_kwargs)
  jax.tree.map(np.testing.assert_array_equal, as_timm, as_official)
  # The timm layout is not the official one: format="swin_official" names what differs.
  with pytest.raises(ValueError, match=r"does not have: head\.fc\.bias, head\.fc\.weight, "
                                       r"layers\.2\.downsample"):
    zoo.load_checkpoint(state, format="swin_official", **kwargs)


def test_files_on_disk(tmp_path):
  state, kwargs, arrays = _golden("timm_vit_gap_fc_norm")
  np.savez(tmp_path / "vit.npz", **state)
  _, reference = zoo.load_checkpoint(state, format="timm", **kwargs)
  _, variables = zoo.load_checkpoint(tmp_path / "vit.npz", format="timm", **kwargs)
  jax.tree.map(np.testing.assert_array_equal, variables, reference)


def test_torch_files(tmp_path):
  torch = pytest.importorskip("torch", reason="reading .pth needs torch, which is optional")
  state, kwargs, _ = _golden("timm_vit_token")
  _, reference = zoo.load_checkpoint(state, format="timm", **kwargs)
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state.items()}}, tmp_path / "v.pth")
  _, variables = zoo.load_checkpoint(tmp_path / "v.pth", format="timm", **kwargs)
  jax.tree.map(np.testing.assert_array_equal, variables, reference)


def test_safetensors_files(tmp_path):
  safetensors_numpy = pytest.importorskip(
      "safetensors.numpy", reason="reading .safetensors needs the optional safetensors package")
  state, kwargs, _ = _golden("timm_vit_token")
  _, reference = zoo.load_checkpoint(state, format="timm", **kwargs)
  safetensors_numpy.save_file(state, str(tmp_path / "model.safetensors"))
  _, variables = zoo.load_checkpoint(tmp_path / "model.safetensors", format="timm", **kwargs)
  jax.tree.map(np.testing.assert_array_equal, variables, reference)


def test_vit_mismatches_are_named():
  state, kwargs, _ = _golden("timm_vit_token")  # embed_dim 32, 2 heads, patch 8 on 32x32
  with pytest.raises(ValueError, match=r"head/kernel: checkpoint \(32, 7\) vs model \(32, 9\) "
                                       r"\(from head\.weight \(7, 32\)\)"):
    zoo.load_checkpoint(state, format="timm", **{**kwargs, "num_classes": 9})
  with pytest.raises(ValueError, match=r"pos_embedding: checkpoint \(1, 17, 32\) vs model "
                                       r"\(1, 37, 32\) \(from pos_embed .*img_size"):
    zoo.load_checkpoint(state, format="timm", **{**kwargs, "img_size": 48})
  with pytest.raises(ValueError, match=r"encoderblock_0/MultiHeadDotProductAttention_1/query/"
                                       r"kernel: checkpoint \(32, 32\) vs model \(48, 2, 24\) "
                                       r"\(from blocks\.0\.attn\.qkv\.weight \(96, 32\)\)"):
    zoo.load_checkpoint(state, format="timm", **{**kwargs, "embed_dim": 48})
  # Tensors of timm options the model lacks (here layer scale) are named, missing ones too.
  extra = {**state, "blocks.1.ls1.gamma": np.ones(32, np.float32)}
  del extra["norm.weight"]
  with pytest.raises(ValueError, match=r"does not have: blocks\.1\.ls1\.gamma .*"
                                       r"lacks: Transformer/encoder_norm/scale"):
    zoo.load_checkpoint(extra, format="timm", **kwargs)
  # A gap model's fc_norm checkpoint read as fc_norm=False: both norms named.
  gap_state, gap_kwargs, _ = _golden("timm_vit_gap_fc_norm")
  with pytest.raises(ValueError, match=r"does not have: fc_norm\.bias, fc_norm\.weight .*"
                                       r"lacks: Transformer/encoder_norm/bias"):
    zoo.load_checkpoint(gap_state, format="timm", **{**gap_kwargs, "fc_norm": False})


def test_swin_mismatches_are_named():
  state, kwargs, _ = _golden("timm_swin_w4")
  with pytest.raises(ValueError, match=r"layers_0_blocks_0/attn/relative_position_bias_table: "
                                       r"checkpoint \(49, 1\) vs model \(25, 1\)"):
    zoo.load_checkpoint(state, format="timm", **{**kwargs, "window_size": 3, "img_size": 24})
  with pytest.raises(ValueError, match=r"head/kernel: checkpoint \(48, 7\) vs model \(48, 4\) "
                                       r"\(from head\.fc\.weight \(7, 48\)\)"):
    zoo.load_checkpoint(state, format="timm", **{**kwargs, "num_classes": 4})


def test_bad_requests_are_named():
  state, kwargs, _ = _golden("timm_vit_token")
  with pytest.raises(ValueError, match=r"no hyper-parameter 'reg_tokens'.*It takes: img_size"):
    zoo.load_checkpoint(state, format="timm", reg_tokens=4, **kwargs)
  with pytest.raises(ValueError, match=r"global_pool='map' is not supported"):
    zoo.load_checkpoint(state, format="timm", **{**kwargs, "global_pool": "map"})
  with pytest.raises(ValueError, match=r"classifier=\"token\".*class_token=True"):
    zoo.load_checkpoint(state, format="timm", **{**kwargs, "class_token": False})
  with pytest.raises(ValueError, match=r"cannot tell a Swin from a ViT.*model='swin'"):
    zoo.load_checkpoint({"encoder.weight": np.zeros(3)}, format="timm")
  with pytest.raises(ValueError, match=r"model='resnet' is not one of \('swin', 'vit'\)"):
    zoo.load_checkpoint(state, format="timm", model="resnet", **kwargs)
  # The hint overrides detection: this ViT state dict read as a Swin names what it lacks.
  with pytest.raises(ValueError, match=r"timm \(Swin\) checkpoint does not fit.*does not have: "
                                       r"blocks\.0\.attn\.proj\.bias"):
    zoo.load_checkpoint(state, format="timm", model="swin", img_size=32, patch_size=8,
                        num_classes=7, embed_dim=32, depths=(2,), num_heads=(2,), window_size=4)
