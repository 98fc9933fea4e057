"""Real detection datasets through TFDS (offline, `tfds.testing.mock_data`): VOC 2007 and 2012
resized and padded to a fixed size, difficult objects dropped, batched by the ordinary pipeline
with boxes in pixels; COCO's mapping (crowd regions dropped) and the resizing on hand-made
examples. TFDS's `coco` builder imports TensorFlow to construct itself, which the zoo does not
install, so COCO cannot be mocked here."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

import zoo.data
from zoo.data import pipeline
from zoo.data.detection_sources import DetectionSource, resize_longer_and_pad


def test_longer_side_is_resized_and_boxes_follow():
  image = np.full((48, 96, 3), 200, np.uint8)
  example = {"image": image, "objects": {
      "bbox": np.array([[0.0, 0.0, 1.0, 0.5], [0.25, 0.5, 0.75, 1.0]], np.float32),
      "label": np.array([3, 7]), "is_crowd": np.array([False, True])}}
  source = DetectionSource([example], "coco", size=64)
  out = source[0]
  assert out["image"].shape == (64, 64, 3)
  # 48x96 -> 32x64, padded below with zeros
  assert (out["image"][:32] == 200).all() and (out["image"][32:] == 0).all()
  np.testing.assert_allclose(out["objects"]["bbox"], [[0.0, 0.0, 0.5, 0.5]])   # crowd dropped
  np.testing.assert_array_equal(out["objects"]["label"], [3])
  with pytest.raises(ValueError, match="multiple of 32"):
    DetectionSource([example], "coco", size=50)
  with pytest.raises(ValueError, match="No detection mapping for dataset 'kitti'"):
    DetectionSource([example], "kitti")


def test_resize_is_identity_at_scale_one():
  image = np.random.default_rng().integers(0, 256, (32, 20, 3), dtype=np.uint8)
  out, fy, fx = resize_longer_and_pad(image, 32)
  np.testing.assert_array_equal(out[:, :20], image)
  assert (fy, fx) == (1.0, 20 / 32) and not out[:, 20:].any()


class _OrderedBoxes:
  """The mocked source with each box's coordinates put in order (mock data draws them at random,
  and the pipeline rejects boxes with x2 < x1 or y2 < y1)."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    example = dict(self.source[index])
    bbox = np.asarray(example["objects"]["bbox"], np.float32).reshape(-1, 4)
    ys, xs = np.sort(bbox[:, 0::2], axis=1), np.sort(bbox[:, 1::2], axis=1)
    example["objects"] = dict(example["objects"], bbox=np.stack(
        [ys[:, 0], xs[:, 0], ys[:, 1], xs[:, 1]], axis=1))
    return example


class _PreparedBuilder:
  """What load_data_source reads of a prepared builder, around a mocked data source."""

  def __init__(self, source):
    self.source = source
    self.info = type("Info", (), {"splits": {"train": None}})()

  def is_prepared(self):
    return True

  def as_data_source(self, split):
    return self.source


@pytest.mark.parametrize("name, flag", [("voc/2007", "is_difficult"), ("voc/2012", "is_difficult")])
def test_mocked_tfds_detection_data_loads_and_batches(monkeypatch, name, flag):
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    raw_mock = tfds.builder(name).as_data_source(split="train")
    with pytest.raises(ValueError, match="has a box with x2 < x1 or y2 < y1"):
      next(pipeline.train_batches(DetectionSource(raw_mock, name.split("/")[0]), global_batch_size=3,
                                  seed=0, max_objects=100, features=("boxes",)))
    mocked = _OrderedBoxes(raw_mock)
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: _PreparedBuilder(mocked))
    source = zoo.data.load_data_source(name, "train")
    assert isinstance(source, DetectionSource) and len(source) == 3
    for i in range(3):
      raw, example = mocked[i], source[i]
      assert example["image"].shape == (800, 800, 3)
      objects = raw["objects"]
      n = min(len(objects["bbox"]), len(objects["label"]), len(objects[flag]))
      kept = ~np.asarray(objects[flag], bool).reshape(-1)[:n]
      assert len(example["objects"]["label"]) == kept.sum()
    most = max(len(source[i]["objects"]["label"]) for i in range(3))
    batch = next(pipeline.train_batches(source, global_batch_size=2, seed=0, max_objects=max(most, 1),
                                        features=("image", "boxes", "labels")))
    assert batch["image"].shape == (2, 800, 800, 3) and batch["boxes"].shape[-1] == 4
    boxes = batch["boxes"][batch["objects_valid"]]
    assert ((boxes >= 0) & (boxes <= 800)).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
