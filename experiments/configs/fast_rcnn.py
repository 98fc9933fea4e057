"""Fast R-CNN (VGG-16, external proposals) on the embedded digit canvases' boxes.

    python -m experiments.train --config=experiments/configs/fast_rcnn.py --workdir=runs/fast_rcnn

Variants: '' RoI pooling 7x7 (Fast R-CNN), `:spp` an SPPnet head (pyramid levels 1, 2, 4 of
each region on the 8 x 8 conv5_3 map), `:roi_align` RoIAlign 7x7, `:faster` Faster R-CNN
(faster_rcnn_vgg16: an RPN with 9 anchors of 16..64 pixels, stride 16 on the 2x image = 8 input
pixels, instead of external proposals), `:smoke` a few steps for tests.

A narrow VGG-16 (stage widths 8, 16, 32, 64, 64, BatchNorm to train from scratch; fc6/fc7 256
wide, no dropout for this short run) so it trains on a CPU. The 64 x 64 canvases hold 1-4 digits
of 14-30 pixels; Fast R-CNN rescales its inputs (shorter side 600), and here `image_scale=2`
does the same inside the model, so conv5_3 is 8 x 8 cells. At scale 1 it is 4 x 4, a digit
covers one or two cells and RoI pooling gives the jittered copies of a digit identical
features: 600 steps at scale 1 (stage widths 16, 32, 64, 64, 64) reached test box AP 0.021.

Proposals: the embedded data has no Selective Search file, so the model generates 128 per image
from the ground truth (zoo.detection.proposals: 16 jittered copies of each digit's box, centre
+-15% of its side, sides x exp(+-0.25), random boxes for the rest), keyed by the example id: the
same ones in every epoch and in evaluation. Because they come from the ground truth, the box AP
below rates the RoI head (classification and refinement of given regions), not a full detector;
`:faster` is the full detector. RoI heads sample 64 RoIs per image at 25% positives
(torchvision's rules).

`:file` reads the same proposals from files through the data pipeline instead (the path a
dataset with Selective Search files takes): write them once with
`python -m experiments.make_proposals` (runs/proposals/digit_canvases_{split}.npz), then train
with `--config=experiments/configs/fast_rcnn.py:file`. `:voc` is Fast R-CNN as published on
`voc/2007` (prepared with `tfds build voc/2007 --file_format=array_record`) with Selective Search
proposals from py-faster-rcnn's files (`--config.data.proposals=.../voc_2007_{split}.mat`; TFDS
splits are train/validation/test, so name or link the files accordingly): full VGG-16, 2000
proposals, 64 RoIs per image, SGD 1e-3; start from ImageNet VGG-16 weights (zoo.load_checkpoint
with format="torchvision", or --config.init_from). Not run here (no accelerator).

Results, 800 steps of batch 8, Adam 1e-3 cosine, on a 2-core CPU shared with other jobs
(2026-11-25), COCO box AP on the 512-image test split (COCO-style AP over IoU 0.5:0.95):

  variant    box AP  AP50   AP75   AR100  wall time (train + eval, incl. compile)
  ''         0.107   0.214  0.071  0.399  8.7 min (~2 steps/s once compiled)
  :spp       0.097   0.190  0.067  0.388  8.2 min
  :roi_align 0.180   0.279  0.214  0.528  3.9 min
  :faster    0.076   0.158  0.059  0.373  6.0 min (RPN: 64 proposals per image, none from gt)
  :file      0.107   0.214  0.071  0.399  3 min (the '' proposals read from files; load ~3,
                                         `--config.data.proposals=/tmp/runs/proposals/digit_canvases_{split}.npz`)

RoIAlign's bilinear sampling tells apart boxes that RoI pooling's rounding to cells merges, which
is what box refinement needs on an 8 x 8 map (AP75 0.214 vs 0.071). Times vary with the load.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict(dict(
      name="fast_rcnn_vgg16", num_classes=10, widths=(8, 16, 32, 64, 64), norm="batch",
      image_scale=2.0, pooling="roi_pool", representation_size=256, dropout_rate=0.0,
      num_proposals=128, proposal_copies=16, box_batch_size_per_image=64,
      detections_per_image=16, detection_candidates=256))
  config.task = ml_collections.ConfigDict(dict(name="detection", num_classes=10,
                                               proposals="generated"))
  config.data = ml_collections.ConfigDict(dict(
      name="digit_canvases", data_dir=ml_collections.FieldReference(None, field_type=str),
      train_split="train", augment=("photometric",), max_objects=4))

  config.batch_size = 8
  config.eval_batch_size = 32
  config.total_steps = 800
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-3, schedule="cosine", warmup_steps=50, weight_decay=0.0,
      grad_clip_norm=10.0))

  config.log_every = 50
  config.checkpoint_every = 200
  config.keep_checkpoints = 2
  config.eval_every = 800
  config.eval_split = "validation"
  config.final_eval_splits = ("test",)
  config.mesh = ml_collections.ConfigDict(dict(num_devices=-1, model_axis_size=1))

  if variant in ("", "smoke"):
    pass
  elif variant == "spp":
    config.model.pooling = "spp"
    config.model.spp_levels = (1, 2, 4)
  elif variant == "roi_align":
    config.model.pooling = "roi_align"
  elif variant == "file":
    config.task.proposals = "data"
    config.data.proposals = "runs/proposals/digit_canvases_{split}.npz"
    config.data.max_proposals = 128
  elif variant == "voc":
    config.model = ml_collections.ConfigDict(dict(
        name="fast_rcnn_vgg16", num_classes=20, frozen_stages=2, pooling="roi_pool",
        box_batch_size_per_image=64, detections_per_image=100))
    config.task = ml_collections.ConfigDict(dict(name="detection", num_classes=20,
                                                 proposals="data"))
    config.data.update(name="voc/2007", augment=(), max_objects=64,
                       proposals="voc_2007_{split}.mat", max_proposals=2000)
    config.batch_size = 2
    config.eval_batch_size = 2
    config.total_steps = 40000
    config.optimizer.update(name="momentum", learning_rate=1e-3, schedule="cosine",
                            warmup_steps=0, weight_decay=5e-4)
    config.eval_every = 10000
    config.eval_split = "test"
    config.final_eval_splits = ("test",)
  elif variant == "faster":
    config.model = ml_collections.ConfigDict(dict(
        name="faster_rcnn_vgg16", num_classes=10, widths=(8, 16, 32, 64, 64), norm="batch",
        image_scale=2.0, representation_size=256, dropout_rate=0.0, anchor_sizes=(16, 32, 64),
        rpn_channels=64,
        rpn_pre_nms_top_n_train=576, rpn_post_nms_top_n_train=64, rpn_pre_nms_top_n_test=576,
        rpn_post_nms_top_n_test=64, rpn_batch_size_per_image=64, box_batch_size_per_image=64,
        detections_per_image=16, detection_candidates=256))
    config.task = ml_collections.ConfigDict(dict(name="detection", num_classes=10,
                                                 rpn_batch_size_per_image=64))
  else:
    raise ValueError(f"Unknown fast_rcnn config variant {variant!r}; choose '', 'spp', "
                     "'roi_align', 'file', 'voc', 'faster' or 'smoke'.")
  if variant == "smoke":
    config.batch_size = 2
    config.eval_batch_size = 8
    config.total_steps = 2
    config.optimizer.warmup_steps = 1
    config.log_every = 1
    config.checkpoint_every = 2
    config.eval_every = 2
    config.final_eval_splits = ("validation",)
  return config
