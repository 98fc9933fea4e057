"""mIoU against a float64 NumPy reference that counts pixel by pixel."""

import jax
import numpy as np
import pytest

from zoo import metrics


def reference_confusion(predictions, targets, num_classes, ignore_label):
  confusion = np.zeros((num_classes, num_classes), np.float64)
  for p, t in zip(predictions.ravel(), targets.ravel()):
    if p == ignore_label or t == ignore_label or not (0 <= p < num_classes and 0 <= t < num_classes):
      continue
    confusion[t, p] += 1
  return confusion


def reference_miou(confusion):
  ious = []
  for c in range(confusion.shape[0]):
    tp = confusion[c, c]
    union = confusion[c, :].sum() + confusion[:, c].sum() - tp
    if union > 0:
      ious.append(tp / union)
  return np.mean(ious)


@pytest.mark.parametrize("num_classes,shape,seed", [(11, (4, 17, 13), 0), (3, (2, 5, 5), 1),
                                                    (21, (1, 32, 32), 2)])
def test_confusion_and_miou_match_reference(num_classes, shape, seed):
  rng = np.random.default_rng(seed)
  predictions = rng.integers(0, num_classes, shape)
  targets = rng.integers(0, num_classes, shape)
  # Ignore labels in both, on different pixels, and some agreement so IoUs are not tiny.
  targets[rng.random(shape) < 0.1] = 255
  predictions[rng.random(shape) < 0.1] = 255
  agree = rng.random(shape) < 0.5
  predictions[agree] = np.where(targets[agree] == 255, predictions[agree], targets[agree])
  confusion = jax.jit(lambda p, t: metrics.confusion_matrix(p, t, num_classes=num_classes))(
      predictions, targets)
  expected = reference_confusion(predictions, targets, num_classes, 255)
  np.testing.assert_array_equal(np.asarray(confusion), expected)
  result = metrics.mean_iou(confusion)
  np.testing.assert_allclose(result["miou"], reference_miou(expected), rtol=1e-12)
  np.testing.assert_allclose(result["pixel_accuracy"], np.trace(expected) / expected.sum(), rtol=1e-12)


def test_accumulating_batches_equals_one_big_batch():
  rng = np.random.default_rng(3)
  predictions = rng.integers(0, 5, (6, 8, 8))
  targets = rng.integers(0, 5, (6, 8, 8))
  whole = metrics.confusion_matrix(predictions, targets, num_classes=5)
  parts = sum(metrics.confusion_matrix(predictions[i:i + 2], targets[i:i + 2], num_classes=5)
              for i in range(0, 6, 2))
  np.testing.assert_array_equal(whole, parts)
  # mIoU of the total differs from the mean of per-batch mIoUs: the split must be summed first.
  per_batch = np.mean([metrics.mean_iou(metrics.confusion_matrix(
      predictions[i:i + 2], targets[i:i + 2], num_classes=5))["miou"] for i in range(0, 6, 2)])
  assert metrics.mean_iou(whole)["miou"] != pytest.approx(per_batch, abs=1e-9)


def test_absent_class_is_left_out_of_the_mean():
  targets = np.array([[0, 0, 1, 1]])
  predictions = np.array([[0, 1, 1, 1]])
  result = metrics.mean_iou(metrics.confusion_matrix(predictions, targets, num_classes=4))
  assert np.isnan(result["iou"][2]) and np.isnan(result["iou"][3])
  np.testing.assert_allclose(result["iou"][:2], [1 / 2, 2 / 3])
  np.testing.assert_allclose(result["miou"], (1 / 2 + 2 / 3) / 2)


def test_all_ignored_gives_nan_not_an_error():
  targets = np.full((2, 3), 255)
  result = metrics.mean_iou(metrics.confusion_matrix(targets, targets, num_classes=3))
  assert np.isnan(result["miou"]) and np.isnan(result["pixel_accuracy"])


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match="same shape"):
    metrics.confusion_matrix(np.zeros((2, 4, 4)), np.zeros((2, 5, 5)), num_classes=3)
  with pytest.raises(ValueError, match="square"):
    metrics.mean_iou(np.zeros((3, 4)))
