"""Detection, by stage as detectron2 (zoo/backbones has the backbones and the FPN):

  boxes.py          the box toolkit: IoU, BoxCoder, anchors, Matcher, balanced sampler, NMS
  rpn.py            the region proposal network (RPNConfig)
  roi_heads.py      RoI sampling, pooling, box head, mask head, post-processing, mask pasting
                    (ROIHeadsConfig)
  fast_rcnn.py      Fast R-CNN on external proposals: `fast_rcnn_vgg16`
  two_stage.py      Faster / Mask R-CNN: `faster_rcnn_r50_fpn`, `mask_rcnn_r50_fpn`,
                    `faster_rcnn_vgg16`
  losses.py         the stages' losses (detectron2's)
  task.py           the `detection` task: the training loss, COCO / VOC evaluation

Importing the family registers its models.
"""

from zoo.detection.boxes import (
    BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, AnchorGenerator, BoxCoder, Kept, Matcher, Matches,
    Sample, batched_nms, box_area, box_iou, cell_anchors, clip_boxes, generalized_box_iou,
    grid_anchors, nms, sample_balanced)
from zoo.detection import fast_rcnn, two_stage  # noqa: F401  (registers the models)

__all__ = [
    "BELOW_LOW_THRESHOLD", "BETWEEN_THRESHOLDS", "AnchorGenerator", "BoxCoder", "Kept", "Matcher",
    "Matches", "Sample", "batched_nms", "box_area", "box_iou", "cell_anchors", "clip_boxes",
    "generalized_box_iou", "grid_anchors", "nms", "sample_balanced"]
