"""A small ViT (Dosovitskiy et al. 2020) classifying which digits a 64x64 canvas holds (10 sigmoids).

    python -m experiments.train --config=experiments/configs/vit.py --workdir=runs/vit

A small ViT for the CPU: patch 8 (8x8 = 64 tokens + the class token; a digit of 14-30 px spans
2-4 patches), D=128, 4 layers, 4 heads, MLP 512, classifier "token" (the class token's attention
can single out the digits, where "gap" would average them away), no dropout, AdamW 1e-3.
`vit.py:smoke` is for tests; `:res=96` trains on the 96x96 canvases (12x12 patches; variants
combine with commas: `:res=96,smoke`).

Result, 2-core CPU shared with ~5 other jobs, jax 0.10.2, 2026-11-25, the command above (1000
steps, 827,786 parameters, ~16 min wall under that load): NOT LEARNED. Train loss 0.517 (base
rate 0.546), test decision accuracy 0.773 = always "absent", exact-set accuracy 0, F1 0. The
Swin in swin.py needed ~500 steps with max pooling to leave the base rate; ViT has neither
windows nor max pooling, and 1000 steps were all the shared machine allowed. Longer schedules
(3000+ steps) are the next thing to try.
"""

import ml_collections

from experiments.configs import common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  arg = common.parse_variant(variant, smoke=False, res=64)
  num_classes = ml_collections.FieldReference(10)  # the model's and the task's
  config = common.trainer_config(batch_size=32, total_steps=1000, checkpoint_every=500,
                                 eval_every=500)
  config.model = ml_collections.ConfigDict(dict(
      name="vit", num_classes=num_classes, patch_size=8, hidden_size=128, num_layers=4,
      num_heads=4, mlp_dim=512, classifier="token", representation_size=None, dropout_rate=0.0,
      attention_dropout_rate=0.0))
  config.task = ml_collections.ConfigDict(dict(name="multi_label_classification",
                                               num_classes=num_classes))
  config.data = common.digit_canvases(res=arg.res)
  config.optimizer = common.optimizer(name="adamw", learning_rate=1e-3, weight_decay=0.05)

  if arg.smoke:
    config.model.update(hidden_size=8, num_layers=1, num_heads=2, mlp_dim=16)
    common.smoke(config, eval_every=4)
  return config
