"""FCN-8s (Long et al. 2015) on VGG-16, trained from scratch on the embedded digit canvases.

    python -m experiments.train --config=experiments/configs/fcn.py --workdir=/tmp/runs/fcn8s

Variants (`--config=experiments/configs/fcn.py:VARIANT`; they combine with commas, e.g.
`:fcn32s,voc` or `:pet,smoke`, experiments/configs/common.py):
  ''        FCN-8s with narrow VGG-16 widths and BatchNorm, 64x64 canvases, 11 classes (CPU, ~10 min).
  fcn32s / fcn16s   the same with the other heads.
  smoke     a few steps, for tests.
  voc       the paper's FCN-8s (VGG-16 widths, pad100, at-once skip scaling, SGD momentum 0.99)
            on real street scenes: TFDS has no PASCAL VOC 2012 segmentation (its `voc/2012`
            carries boxes and image labels only; SBD is not in the catalogue), so this variant
            reads `cityscapes/semantic_segmentation` (19 classes; manual download, then
            `tfds build cityscapes/semantic_segmentation --file_format=array_record`).
  pet       Oxford-IIIT Pet's trimaps (`oxford_iiit_pet`: pet / background, the border ignored).
  Real images are resized (shorter side 256) and centre-cropped by zoo/data/segmentation_sources.py.

Deviations from the release on the digits (each a config field): BatchNorm in the VGG stages and
Adam instead of SGD with momentum 0.99 on an unnormalised loss, so that a from-scratch net
trains in minutes; skip_scaling=False, because the at-once net's 0.01 / 0.0001 scales (made for
that SGD) leave the skips unused under Adam's bounded steps; learn_upsampling=False (the release).

Result, 2-core CPU shared with ~5 other jobs (load average 8-12; no GPU), jax 0.10.2,
2026-11-25, the command above (1,200 steps, batch 16, 0.9-2.2 steps/s, 18 min wall clock
because of the sharing; an idle machine would take a fraction of that):
  test mIoU 0.499 (pixel accuracy 0.935), validation mIoU 0.500, over the 11 classes.
  (The U-Net of unet.py reaches 0.708 on the same data: FCN-8s's finest skip is at stride 8,
  and 5-pixel-wide strokes of 14-30 pixel digits are hard to resolve from there.)
"""

import ml_collections

from experiments.configs import common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  arg = common.parse_variant(variant, fcn32s=False, fcn16s=False, voc=False, pet=False,
                             smoke=False)
  common.check_exclusive(arg, "fcn32s", "fcn16s")
  common.check_exclusive(arg, "voc", "pet")
  num_classes = ml_collections.FieldReference(11)  # the model's and the task's
  config = common.trainer_config(batch_size=16, total_steps=1200, checkpoint_every=500,
                                 eval_every=600, keep_checkpoints=2)
  config.model = ml_collections.ConfigDict(dict(
      name="fcn_8s_vgg16", num_classes=num_classes, widths=(16, 32, 64, 96, 96), fc_width=192,
      norm="batch", dropout_rate=0.1, pad100=False, learn_upsampling=False, skip_scaling=False))
  config.task = ml_collections.ConfigDict(dict(name="semantic_segmentation",
                                               num_classes=num_classes))
  config.data = common.digit_canvases()
  config.optimizer = common.optimizer(name="adam", learning_rate=2e-3)

  if arg.fcn32s or arg.fcn16s:
    config.model.name = "fcn_32s_vgg16" if arg.fcn32s else "fcn_16s_vgg16"
  if arg.voc or arg.pet:
    config.model.update(widths=(64, 128, 256, 512, 512), fc_width=4096, norm="none",
                        dropout_rate=0.5, pad100=True, skip_scaling=True)
    config.optimizer = common.optimizer(name="momentum", learning_rate=1e-4, momentum=0.99,
                                        schedule="constant", warmup_steps=0,
                                        weight_decay=5e-4, grad_clip_norm=0.0)
    config.update(batch_size=1, eval_batch_size=1, total_steps=100_000, checkpoint_every=4000,
                  eval_every=4000)
    config.data.augment = ()
  if arg.voc or arg.pet:
    common.real_segmentation_data(config, num_classes, "voc" if arg.voc else "pet")
  if arg.smoke:
    config.model.update(widths=(2, 2, 4, 4, 4), fc_width=4)
    common.smoke(config)
  return config
