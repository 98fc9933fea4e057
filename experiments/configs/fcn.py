"""FCN-8s (Long et al. 2015) on VGG-16, trained from scratch on the embedded digit canvases.

    python -m experiments.train --config=experiments/configs/fcn.py --workdir=/tmp/runs/fcn8s

Variants (`--config=experiments/configs/fcn.py:VARIANT`):
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


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict(dict(
      name="fcn8s_vgg16", num_classes=11, widths=(16, 32, 64, 96, 96), fc_width=192, norm="batch",
      dropout_rate=0.1, pad100=False, learn_upsampling=False, skip_scaling=False))
  config.task = ml_collections.ConfigDict(dict(name="semantic_segmentation", num_classes=11))
  config.data = ml_collections.ConfigDict(dict(
      name="digit_canvases", data_dir=ml_collections.FieldReference(None, field_type=str),
      train_split="train", augment=("photometric",), max_objects=8))

  config.batch_size = 16
  config.eval_batch_size = 64
  config.total_steps = 1200
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=2e-3, schedule="cosine", warmup_steps=100, weight_decay=0.0,
      grad_clip_norm=1.0))

  config.log_every = 50
  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  config.eval_every = 600
  config.eval_split = "validation"
  config.final_eval_splits = ("validation", "test")
  config.mesh = ml_collections.ConfigDict(dict(num_devices=-1, model_axis_size=1))

  if variant in ("fcn32s", "fcn16s"):
    config.model.name = f"{variant}_vgg16"
  elif variant == "smoke":
    config.model.update(widths=(2, 2, 4, 4, 4), fc_width=4)
    config.batch_size = 8
    config.eval_batch_size = 16
    config.total_steps = 4
    config.optimizer.warmup_steps = 2
    config.log_every = 2
    config.checkpoint_every = 2
    config.eval_every = 0
  elif variant in ("voc", "pet"):
    config.model.update(widths=(64, 128, 256, 512, 512), fc_width=4096, norm="none",
                        dropout_rate=0.5, pad100=True, skip_scaling=True)
    config.optimizer = ml_collections.ConfigDict(dict(
        name="momentum", learning_rate=1e-4, momentum=0.99, schedule="constant", warmup_steps=0,
        weight_decay=5e-4, grad_clip_norm=0.0))
    config.batch_size = 1
    config.eval_batch_size = 1
    config.total_steps = 100_000
    config.checkpoint_every = 4000
    config.eval_every = 4000
    if variant == "voc":
      # VOC 2012 segmentation is not in TFDS (module doc): Cityscapes, 19 classes, instead.
      config.model.num_classes = config.task.num_classes = 19
      config.data.update(name="cityscapes/semantic_segmentation", augment=(), train_split="train")
    else:
      config.model.num_classes = config.task.num_classes = 2
      config.data.update(name="oxford_iiit_pet", augment=(), train_split="train")
      config.final_eval_splits = ("test",)
      config.eval_split = "test"
  elif variant:
    raise ValueError(f"Unknown fcn config variant {variant!r}; choose '', 'fcn32s', 'fcn16s', "
                     "'smoke', 'voc' or 'pet'.")
  return config
