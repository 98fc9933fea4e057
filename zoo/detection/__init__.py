"""Detection: the box toolkit now; Fast/Faster/Mask R-CNN will build on it (issue 6)."""

from zoo.detection.boxes import (
    BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, AnchorGenerator, BoxCoder, Kept, Matcher, Matches,
    Sample, batched_nms, box_area, box_iou, cell_anchors, clip_boxes, generalized_box_iou,
    grid_anchors, nms, sample_balanced)

__all__ = [
    "BELOW_LOW_THRESHOLD", "BETWEEN_THRESHOLDS", "AnchorGenerator", "BoxCoder", "Kept", "Matcher",
    "Matches", "Sample", "batched_nms", "box_area", "box_iou", "cell_anchors", "clip_boxes",
    "generalized_box_iou", "grid_anchors", "nms", "sample_balanced"]
