"""Writes the golden files that tests/transformers/test_timm_checkpoint.py reads.

Not run by CI (it needs torch and timm). How the files were produced:

    python -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch torchvision timm
    /tmp/venv-torch/bin/python tests/transformers/golden/make_goldens.py \
        --official /tmp/official_swin/swin_transformer.py

(torch 2.14.1 CPU, timm 1.0.31; the versions are also stored in each file.) For each case it
builds a small model with timm's own classes (`timm.models.swin_transformer.SwinTransformer`,
`timm.models.vision_transformer.VisionTransformer`) under a fixed torch seed, perturbs every
parameter (timm's initialisation leaves LayerNorms at 1/0, biases at 0 and the head at zero,
which would hide a swapped or dropped tensor), and runs it in eval mode in float32 on
a batch of random images. Each `<case>.npz` holds:

    state/<name>   the model's state_dict() (timm names, float32; timm registers the Swin
                   buffers relative_position_index / attn_mask as non-persistent, so they are
                   absent here, as in timm's released checkpoints)
    images         (B, H, W, C) float32, NHWC (timm was given images.transpose(0, 3, 1, 2))
    logits         (B, num_classes) float32, timm's model(images) in eval mode
    cotangent      (B, num_classes) float32, random
    images_grad    (B, H, W, C) float32, d sum(logits * cotangent) / d images by torch autograd
    config         JSON: the model class and its constructor arguments, the versions

`official_swin_w4.npz` is the same for the official release's model class
(microsoft/Swin-Transformer `models/swin_transformer.py`, not on PyPI, and not vendored here):
`--official` names a local copy of that file. The one used for the committed golden holds the
executable code of the file at commit 055c506510dd456f4a5f6cc52655a35ebbb1f87b (docstrings,
flops(), extra_repr() and the optional fused-kernel import left out), written out from a stored
copy of the repository because this machine cannot reach GitHub. Its state dict keeps the
official persistent buffers relative_position_index (int64) and attn_mask.
"""

import argparse
import importlib.util
import json
import os

import numpy as np
import timm
import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

HERE = os.path.dirname(os.path.abspath(__file__))

CASES = {
    # Three stages: stage 0 (16x16 tokens) and 1 (8x8) use window 4 with shift 2, stage 2 (4x4)
    # is not larger than the window (one window, no shift: the clipping rule). mlp_ratio 2.
    "timm_swin_w4": ("swin", dict(img_size=32, patch_size=2, num_classes=7, embed_dim=12,
                                  depths=(2, 2, 2), num_heads=(1, 2, 3), window_size=4,
                                  mlp_ratio=2.0)),
    # Window 7 on 14x14 tokens (shift 3), then 7x7 (one window, no shift).
    "timm_swin_w7": ("swin", dict(img_size=56, patch_size=4, num_classes=7, embed_dim=24,
                                  depths=(2, 2), num_heads=(3, 3), window_size=7)),
    # Class token classified (timm's default, as vit_*_patch16_224).
    "timm_vit_token": ("vit", dict(img_size=32, patch_size=8, num_classes=7, embed_dim=32,
                                   depth=2, num_heads=2, mlp_ratio=4.0)),
    # No class token, average pooling, fc_norm (timm's default with global_pool="avg").
    "timm_vit_gap_fc_norm": ("vit", dict(img_size=32, patch_size=8, num_classes=7, embed_dim=32,
                                         depth=2, num_heads=4, mlp_ratio=3.0, class_token=False,
                                         global_pool="avg")),
    # A class token that the average pooling skips, final norm on the tokens (fc_norm=False).
    "timm_vit_cls_avg": ("vit", dict(img_size=24, patch_size=(8, 4), num_classes=5, embed_dim=24,
                                     depth=2, num_heads=3, mlp_ratio=2.0, class_token=True,
                                     global_pool="avg", fc_norm=False)),
}


def perturb(model: torch.nn.Module, generator: torch.Generator):
  """Adds noise to every parameter: N(0, 0.2^2) to LayerNorm weights and all biases, N(0, 0.3^2)
  to the relative-position tables, class token and position embeddings, and N(0, 1/fan_in) to
  matrices (so that activations stay of order one through the blocks)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if p.ndim >= 2 and not name.endswith(("relative_position_bias_table", "cls_token",
                                            "pos_embed")):
        p.add_(noise / np.sqrt(np.prod(p.shape[1:])))
      elif name.endswith(("relative_position_bias_table", "cls_token", "pos_embed")):
        p.add_(0.3 * noise)
      else:
        p.add_(0.2 * noise)


# The official release, three stages as timm_swin_w4 (the last one clipped to one window).
OFFICIAL_CASE = ("official_swin_w4", dict(img_size=32, patch_size=2, num_classes=7, embed_dim=12,
                                          depths=(2, 2, 2), num_heads=(1, 2, 3), window_size=4,
                                          mlp_ratio=2.0))


def make(case: str, cls: type, kwargs: dict, seed: int):
  torch.manual_seed(seed)
  generator = torch.Generator().manual_seed(seed)
  model = cls(**kwargs, drop_path_rate=0.0)
  perturb(model, generator)
  model.eval()
  size = kwargs["img_size"]
  images = torch.randn((2, 3, size, size), generator=generator, requires_grad=True)
  logits = model(images)
  cotangent = torch.randn(logits.shape, generator=generator)
  (images_grad,) = torch.autograd.grad((logits * cotangent).sum(), images)
  arrays = {f"state/{k}": v.detach().numpy().astype(np.float32) if v.is_floating_point()
            else v.numpy() for k, v in model.state_dict().items()}
  arrays["images"] = images.detach().numpy().transpose(0, 2, 3, 1).copy()
  arrays["logits"] = logits.detach().numpy()
  arrays["cotangent"] = cotangent.numpy()
  arrays["images_grad"] = images_grad.numpy().transpose(0, 2, 3, 1).copy()
  arrays["config"] = np.array(json.dumps(dict(
      model_class=f"{cls.__module__}.{cls.__name__}", kwargs=kwargs, drop_path_rate=0.0, seed=seed,
      torch=torch.__version__, timm=timm.__version__)))
  path = os.path.join(HERE, f"{case}.npz")
  np.savez(path, **arrays)
  print(f"{path}: {os.path.getsize(path) / 1e3:.0f} kB, logits[0] {arrays['logits'][0].round(3)}")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--official", help="path of microsoft/Swin-Transformer's "
                      "models/swin_transformer.py; without it official_swin_w4.npz is not made")
  args = parser.parse_args()
  for seed, (case, (family, kwargs)) in enumerate(CASES.items()):
    make(case, SwinTransformer if family == "swin" else VisionTransformer, kwargs, seed)
  if args.official:
    spec = importlib.util.spec_from_file_location("swin_transformer", args.official)
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)
    make(OFFICIAL_CASE[0], official.SwinTransformer, OFFICIAL_CASE[1], len(CASES))
