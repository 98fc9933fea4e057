"""Mask R-CNN (ResNet + FPN) on the embedded digit canvases: boxes and instance masks of digits.

    python -m experiments.train --config=experiments/configs/mask_rcnn.py --workdir=runs/mask_rcnn

Variants (comma-separated, e.g. `:faster,smoke`; experiments/configs/common.py): `:faster` drops
the mask head (Faster R-CNN), `:smoke` a few steps for tests;
torchvision-sized R50-FPN detectors on real data prepared by the user through TFDS
(`tfds build NAME --file_format=array_record`; COCO's builder needs TensorFlow to build),
images resized to a longer side of 800 and padded to 800 x 800 (zoo/data/detection_sources.py):
`:voc` Faster R-CNN on `voc/2007` (20 classes); `:coco` Mask R-CNN on `coco/2017_panoptic` (80
classes, coco/2017's labels), whose instance masks are COCO panoptic's non-crowd thing segments:
panoptic segments never overlap, unlike COCO's instance annotations (which TFDS does not carry),
so its mask AP (and box AP, on the segments' boxes) is close to but NOT the official COCO
instance AP; `:coco_boxes` Faster R-CNN on `coco/2017` (the official boxes). Not run here (no
accelerator).

A narrow ResNet-50 (width 8) and FPN (32 channels) so it trains on a CPU; anchors 8..128
pixels for 8..30-pixel digits on 64 x 64 canvases; everything else is torchvision's / detectron2's
defaults scaled down (RPN 64 anchors and RoI heads 64 RoIs per image).

Result, 2-core CPU (load ~1.5), jax 0.10.2, 2026-11-25, the command above at commit 8e0b19f:
1500 steps in 5.4 min wall including compilation and three evaluations (median 5.5 steps/s,
batch 8) -> test box AP 0.233 (AP50 0.415, AP75 0.240), mask AP 0.159 (AP50 0.372, AP75
0.102); validation box AP 0.215, mask AP 0.147. Every digit is a COCO "small" object (< 32^2
pixels), so APm/APl are -1. (Before the CPU speed-ups of the same day, under load 10-15: 48
min, test box AP 0.199, mask AP 0.133; the runs differ in float rounding, not in the model.)
"""

import ml_collections

from experiments.configs import common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  arg = common.parse_variant(variant, faster=False, voc=False, coco=False, coco_boxes=False,
                             smoke=False)
  common.check_exclusive(arg, "voc", "coco", "coco_boxes")
  num_classes = ml_collections.FieldReference(10)  # the model's and the task's
  config = common.trainer_config(batch_size=8, total_steps=1500, checkpoint_every=250,
                                 eval_every=750, eval_batch_size=32)
  config.model = ml_collections.ConfigDict(dict(
      name="mask_rcnn_r50_fpn", num_classes=num_classes, width=8, norm="batch", frozen_stages=-1,
      fpn_width=32, representation_size=128, mask_width=32,
      rpn=dict(anchor_sizes=((8,), (16,), (32,), (64,), (128,)), pre_nms_topk_train=256,
               post_nms_topk_train=128, pre_nms_topk_test=256, post_nms_topk_test=64,
               batch_size_per_image=64),
      roi_heads=dict(batch_size_per_image=64, detections_per_image=16, detection_candidates=256)))
  config.task = ml_collections.ConfigDict(dict(
      name="detection", num_classes=num_classes, masks=True))
  config.data = common.digit_canvases()
  config.optimizer = common.optimizer(name="adam", learning_rate=1e-3, grad_clip_norm=10.0)

  if arg.voc or arg.coco or arg.coco_boxes:  # torchvision's R50-FPN detectors on real data
    num_classes.set(20 if arg.voc else 80)
    config.model = ml_collections.ConfigDict(dict(
        name="mask_rcnn_r50_fpn", num_classes=num_classes, norm="frozen", frozen_stages=1,
        rpn=dict(batch_size_per_image=256)))
    config.data.update(name="voc/2007" if arg.voc else "coco/2017_panoptic" if arg.coco else
                       "coco/2017", augment=(), max_objects=100)
    config.eval_split = "test" if arg.voc else "validation"
    config.final_eval_splits = (config.eval_split,)
    config.update(batch_size=16, eval_batch_size=16, total_steps=18000 if arg.voc else 90000)
    config.optimizer.update(name="momentum", learning_rate=0.02, warmup_steps=1000,
                            weight_decay=1e-4)
    if arg.voc:
      config.task.evaluation = "voc2007"  # VOC2007 test: the devkit's 11-point AP
  if arg.faster or arg.voc or arg.coco_boxes:  # no mask head
    config.model.name = "faster_rcnn_r50_fpn"
    if "mask_width" in config.model:
      del config.model["mask_width"]
    config.task.masks = False
  if arg.smoke:
    common.smoke(config, total_steps=2, batch_size=2, eval_batch_size=8, warmup_steps=1,
                 log_every=1, eval_every=2)
    config.final_eval_splits = ("validation",)
  return config
