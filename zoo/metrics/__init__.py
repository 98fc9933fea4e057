"""Evaluation metrics: kept apart from models, which return raw outputs."""

from zoo.metrics.segmentation import confusion_matrix, mean_iou

__all__ = ["confusion_matrix", "mean_iou"]
