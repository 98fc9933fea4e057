"""DeepLab v3 (ResNet, ASPP with image pooling, output stride 8) on the embedded digit canvases,
with DeepLab's CRF post-processing and the CRF-as-RNN layer fine-tuned end to end.

    python -m experiments.train --config=experiments/configs/deeplab.py --workdir=/tmp/runs/deeplab
    # The same trained weights, evaluated with the fixed fully connected CRF (no new parameters):
    python -m experiments.eval --workdir=/tmp/runs/deeplab --split=test \\
        --config=experiments/configs/deeplab.py:postprocess

Variants (`--config=experiments/configs/deeplab.py:VARIANT`; they combine with commas, e.g.
`:voc,postprocess` or `:crf_trainable,smoke`, experiments/configs/common.py):
  ''            deeplab_v3_resnet50 narrowed (stem width 16, one bottleneck per layer, ASPP 64
                wide, rates 1, 2, 3 at stride 16 = 2, 4, 6 at stride 8: the feature map is only
                8x8) with BatchNorm, trained from scratch on 64x64 canvases, 11 classes.
  postprocess   the same model with crf="postprocess": the CRF runs at evaluation only.
  crf_trainable the same model with crf="trainable" (CRF-as-RNN: learnable kernel weights and
                compatibility, 3 mean-field iterations in training and evaluation), fine-tuned from
                the plain run's weights (see below), batch 2, 200 steps at learning rate 1e-4.
  largefov / v2 the other registered DeepLabs (deeplab_largefov_vgg16, deeplab_v2_resnet50),
                narrowed the same way (without the CRF settings: they combine with smoke only).
  smoke         a few steps, for tests.
  voc / pet     the papers' sizes (ResNet-50, frozen BN, SGD momentum 0.9, poly-like cosine) on
                real data named by TFDS: see experiments/configs/fcn.py's header for which
                TFDS datasets carry segmentation masks.

CRF settings for the digits (fields crf_*): 64x64 canvases with flat backgrounds and strokes
a few pixels wide, so the bilateral kernel's position width is 8 pixels (DeepLab's 67 is for
500x375 photographs), colour width 20 on 0..255 colours, weights DeepLab v2's 4 and 3.

The trainable CRF is fine-tuned from the plain run (`init_from` copies every parameter and
batch statistic whose name and shape agree; the CRF's own parameters keep their
initialisation):

    python -m experiments.train --config=experiments/configs/deeplab.py:crf_trainable \
        --config.init_from=/tmp/runs/deeplab --workdir=/tmp/runs/deeplab_crf

(The result below was measured before `init_from` existed, with an Experiment-API snippet that
does the same merge: the plain run's params and batch statistics plus the CRF's initial ones.)

Results, 2-core CPU shared with ~5 other jobs (load average 8-12; no GPU), jax 0.10.2,
2026-11-25, kernels.dense_crf's xla implementation; test split (512 canvases), 11 classes:
  plain (the first command; 800 steps, batch 16, 1.6-2.5 steps/s, 7.3 min wall clock):
    test mIoU 0.346 (pixel accuracy 0.917), validation 0.346.
  + CRF post-processing (the second command; 10 mean-field iterations, exact all-pairs,
    11.6 min for the 512 test canvases on the shared CPU):
    test mIoU 0.441 (pixel accuracy 0.938): +9.5 points.
  + CRF-as-RNN fine-tuned end to end (crf_trainable, from the plain run):
    test mIoU 0.471 (pixel accuracy 0.948) after 200 steps of batch 2 at learning rate 1e-4,
    3 mean-field iterations in training and evaluation (7.1 min including the evaluation).
    The CRF's own parameters barely moved (pos_w 3.00 -> 2.94, bi_w 4.00 -> 3.98,
    compatibility within 0.004 of Potts): at this learning rate the gain comes from the CNN
    adapting to the CRF in front of the loss. Controls: the same 200 steps without the CRF
    give 0.353; post-processing with 3 iterations (as the fine-tuned layer uses) gives 0.436
    (`--config.model.crf_iterations=3` on the second command, 2.3 min). Per-step losses swing
    (0.05 to 12): the mean field saturates Q to 0/1 on these flat canvases, so a wrong pixel
    costs up to -log(float32 tiny) = 87.
"""

import ml_collections

from experiments.configs import common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  arg = common.parse_variant(variant, largefov=False, v2=False, postprocess=False,
                             crf_trainable=False, voc=False, pet=False, smoke=False)
  # The other DeepLabs are set up for the digits only, without the CRF settings.
  common.check_exclusive(arg, "largefov", "v2", "postprocess", "crf_trainable")
  common.check_exclusive(arg, "largefov", "v2", "voc", "pet")
  num_classes = ml_collections.FieldReference(11)  # the model's and the task's
  config = common.trainer_config(batch_size=16, total_steps=800, checkpoint_every=500,
                                 eval_every=0, keep_checkpoints=2)
  config.model = ml_collections.ConfigDict(dict(
      name="deeplab_v3_r50", num_classes=num_classes, output_stride=8,
      blocks=(1, 1, 1, 1), width=16, norm="batch", aspp_rates=(1, 2, 3),
      aspp_width=64, dropout_rate=0.1, crf=ml_collections.FieldReference(None, field_type=str),
      crf_iterations=10, crf_pos_w=3.0, crf_pos_xy_std=1.0, crf_bi_w=4.0, crf_bi_xy_std=8.0,
      crf_bi_rgb_std=20.0, crf_image_scale=255.0, crf_implementation="auto"))
  config.task = ml_collections.ConfigDict(dict(name="semantic_segmentation",
                                               num_classes=num_classes))
  config.data = common.digit_canvases()
  config.optimizer = common.optimizer(name="adam", learning_rate=2e-3)
  smoke_model = dict(width=2, aspp_width=4)  # what :smoke narrows

  if arg.largefov:
    config.model = ml_collections.ConfigDict(dict(
        name="deeplab_largefov_vgg16", num_classes=num_classes, widths=(16, 32, 64, 96, 96),
        fc_width=128, norm="batch", dropout_rate=0.1))
    smoke_model = dict(widths=(2, 2, 4, 4, 4), fc_width=4)
  if arg.v2:
    config.model = ml_collections.ConfigDict(dict(
        name="deeplab_v2_r50", num_classes=num_classes, output_stride=8,
        blocks=(1, 1, 1, 1), width=16, norm="batch"))
    smoke_model = dict(width=2)
  if arg.voc or arg.pet:
    config.model.update(output_stride=16, blocks=(3, 4, 6, 3), width=64,
                        norm="frozen", aspp_width=256, dropout_rate=0.5, crf_iterations=10,
                        crf_bi_xy_std=67.0, crf_bi_rgb_std=3.0)
    config.optimizer = common.optimizer(name="momentum", learning_rate=0.01, momentum=0.9,
                                        warmup_steps=0, weight_decay=1e-4, grad_clip_norm=0.0)
    config.update(batch_size=8, eval_batch_size=8, total_steps=30_000, checkpoint_every=2000,
                  eval_every=5000)
    config.data.augment = ()
  if arg.voc or arg.pet:
    common.real_segmentation_data(config, num_classes, "voc" if arg.voc else "pet")
  if arg.postprocess:
    config.model.crf = "postprocess"
  if arg.crf_trainable:
    config.model.update(crf="trainable", crf_iterations=3)
    config.update(batch_size=2, eval_batch_size=16, total_steps=200, eval_every=0)
    config.optimizer.update(learning_rate=1e-4, warmup_steps=20)
  if arg.smoke:
    config.model.update(smoke_model)
    common.smoke(config)
  return config
