"""Real segmentation datasets through TFDS (offline, `tfds.testing.mock_data`): Oxford-IIIT Pet's
trimaps and Cityscapes' labelIds as class ids, resized and cropped to a fixed size, batched by
the ordinary pipeline; and the label mappings and resizing on hand-made examples."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

import zoo.data
from zoo.data import IGNORE_LABEL, pipeline
from zoo.data.segmentation_sources import SegmentationSource, _resize_shorter_and_crop


def test_pet_trimap_and_cityscapes_label_ids_map_to_class_ids():
  trimap = np.array([[1, 2, 3], [2, 1, 0]], np.uint8)[..., None]
  image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  pet = SegmentationSource([{"image": image, "segmentation_mask": trimap}], "oxford_iiit_pet", size=2)
  example = pet[0]
  # Shorter side 2 already: the centre 2x2 crop of columns 0..1 (offset (3 - 2) // 2 = 0).
  np.testing.assert_array_equal(example["segmentation"], [[1, 0], [0, 1]])
  np.testing.assert_array_equal(example["image"], image[:, :2])
  assert example["image"].dtype == np.uint8 and example["id"] == 0
  labels = np.array([[7, 26, 0], [33, 255, 24]], np.uint8)[..., None]
  city = SegmentationSource([{"image": image, "segmentation_label": labels}], "cityscapes", size=2)
  np.testing.assert_array_equal(city[0]["segmentation"], [[0, 13], [18, IGNORE_LABEL]])
  with pytest.raises(ValueError, match="No segmentation mapping for dataset 'voc'"):
    SegmentationSource([], "voc")


def test_resize_shorter_side_and_centre_crop():
  mask = np.repeat(np.arange(8, dtype=np.uint8)[None, :, None], 4, axis=0)  # 4x8, column ids
  out = _resize_shorter_and_crop(mask, 2, nearest=True)
  # 4x8 -> 2x4 (nearest picks columns 1, 3, 5, 7), centre crop columns 1..2 -> 3 and 5.
  np.testing.assert_array_equal(out[..., 0], [[3, 5], [3, 5]])
  image = np.random.default_rng().integers(0, 256, (5, 7, 3), dtype=np.uint8)
  same = _resize_shorter_and_crop(image, 5, nearest=False)
  np.testing.assert_array_equal(same, image[:, 1:6])  # scale 1: a pure centre crop


class _PreparedBuilder:
  """What load_data_source reads of a prepared builder, around a mocked data source
  (mock_data serves examples but reports no prepared files or splits)."""

  def __init__(self, source):
    self.source = source
    self.info = type("Info", (), {"splits": {"train": None}})()

  def is_prepared(self):
    return True

  def as_data_source(self, split):
    return self.source


def test_mocked_oxford_iiit_pet_loads_and_batches(monkeypatch):
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    mocked = tfds.builder("oxford_iiit_pet").as_data_source(split="train")
    # The random mock masks hold any byte and have their own sizes: every value but 1 and 2
    # must become background/ignore, and image and mask are resized independently.
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: _PreparedBuilder(mocked))
    source = zoo.data.load_data_source("oxford_iiit_pet", "train")
    assert isinstance(source, SegmentationSource) and len(source) == 5
    example = source[3]
    assert example["image"].shape == (256, 256, 3) and example["segmentation"].shape == (256, 256)
    assert set(np.unique(example["segmentation"])) <= {0, 1, IGNORE_LABEL}
    batches = pipeline.train_batches(source, global_batch_size=2, seed=0,
                                     features=("image", "segmentation"))
    batch = next(batches)
    assert batch["image"].shape == (2, 256, 256, 3) and batch["image"].dtype == np.float32
    assert batch["segmentation"].shape == (2, 256, 256) and batch["segmentation"].dtype == np.int32
    evaluation = list(pipeline.eval_batches(source, global_batch_size=4,
                                            features=("image", "segmentation")))
    assert len(evaluation) == 2 and evaluation[1]["example_valid"].tolist() == [True, False, False, False]
