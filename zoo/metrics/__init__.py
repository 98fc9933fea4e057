"""Evaluation metrics: kept apart from models, which return raw outputs."""

from zoo.metrics.coco import coco_evaluate, coco_evaluate_padded, voc_ap, voc_evaluate
from zoo.metrics.segmentation import confusion_matrix, mean_iou

__all__ = ["coco_evaluate", "coco_evaluate_padded", "confusion_matrix", "mean_iou", "voc_ap",
           "voc_evaluate"]
