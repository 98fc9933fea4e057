"""Real detection datasets through TFDS (offline, `tfds.testing.mock_data`): VOC 2007 and 2012,
COCO 2017 and COCO 2017 panoptic resized and padded to a fixed size, difficult / crowd objects
kept apart as ignored objects, stuff dropped, VOC's 1-based boxes as pixel edges, batched by the
ordinary pipeline with boxes in pixels (and instance masks from the panoptic segments); the
mappings, the resizing and the panoptic masks on hand-made examples.

TFDS's `coco` builder names `tf.int64` in `_info` (its only TensorFlow use when constructed,
TFDS 4.9), and the zoo does not install TensorFlow: the `coco_without_tensorflow` fixture puts
a stand-in with just `int64` in the builder module so that COCO can be mocked."""

import types

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.object_detection import coco as tfds_coco

import zoo.data
from zoo.data import pipeline
from zoo.data.detection_sources import (COCO_CLASSES, DetectionSource, panoptic_segment_ids,
                                        resize_longer_and_pad, resize_nearest_and_pad)

# 133 panoptic class names in a shuffled order, the 80 things among 53 stuff names, so that the
# mapping by name is not the identity.
_STUFF = tuple(f"stuff-{i}" for i in range(53))
PANOPTIC_NAMES = tuple(np.random.default_rng(0).permutation(COCO_CLASSES + _STUFF))


@pytest.fixture
def coco_without_tensorflow(monkeypatch):
  monkeypatch.setattr(tfds_coco, "tf", types.SimpleNamespace(int64=np.int64))


def test_longer_side_is_resized_and_boxes_follow():
  image = np.full((48, 96, 3), 200, np.uint8)
  example = {"image": image, "objects": {
      "bbox": np.array([[0.0, 0.0, 1.0, 0.5], [0.25, 0.5, 0.75, 1.0]], np.float32),
      "label": np.array([3, 7]), "is_crowd": np.array([False, True]),
      "area": np.array([1500, 700])}}
  source = DetectionSource([example], "coco", size=64)
  out = source[0]
  assert out["image"].shape == (64, 64, 3)
  # 48x96 -> 32x64, padded below with zeros
  assert (out["image"][:32] == 200).all() and (out["image"][32:] == 0).all()
  np.testing.assert_allclose(out["objects"]["bbox"], [[0.0, 0.0, 0.5, 0.5]])
  np.testing.assert_array_equal(out["objects"]["label"], [3])
  # The crowd region is an ignored object; areas stay the annotations' (original pixels).
  np.testing.assert_allclose(out["ignored_objects"]["bbox"], [[0.125, 0.5, 0.375, 1.0]])
  np.testing.assert_array_equal(out["ignored_objects"]["label"], [7])
  np.testing.assert_array_equal(out["objects"]["area"], [1500.0])
  np.testing.assert_array_equal(out["image/scale"], np.float32([2 / 3, 2 / 3]))
  with pytest.raises(ValueError, match="multiple of 32"):
    DetectionSource([example], "coco", size=50)
  with pytest.raises(ValueError, match="No detection mapping for dataset 'kitti'"):
    DetectionSource([example], "kitti")


def test_voc_boxes_become_pixel_edges_and_difficult_objects_ignored():
  # The devkit's 1-based boxes, both ends included: columns 1..10 and 31..50 of a 60 x 40 image.
  height, width = 40, 60
  devkit = np.array([[1, 1, 10, 20], [31, 11, 50, 40]], np.float32)   # xmin ymin xmax ymax
  example = {"image": np.zeros((height, width, 3), np.uint8), "objects": {
      "bbox": devkit[:, [1, 0, 3, 2]] / [height, width, height, width],  # as TFDS stores them
      "label": np.array([4, 9]), "is_difficult": np.array([False, True])}}
  out = DetectionSource([example], "voc", size=96)[0]            # 60x40 -> 96x64 canvas pixels
  assert "area" not in out["objects"]
  np.testing.assert_allclose(out["image/scale"], [1.6, 1.6], rtol=1e-6)
  for objects, k in ((out["objects"], 0), (out["ignored_objects"], 1)):
    ymin, xmin, ymax, xmax = objects["bbox"][0] * 96 / 1.6        # back to original pixels
    # Pixel edges: x1 = xmin - 1, x2 = xmax, so the width is the devkit's xmax - xmin + 1.
    np.testing.assert_allclose([xmin, ymin, xmax, ymax], devkit[k] - [1, 1, 0, 0], atol=1e-4)
  np.testing.assert_array_equal(out["objects"]["label"], [4])
  np.testing.assert_array_equal(out["ignored_objects"]["label"], [9])


def test_resize_is_identity_at_scale_one():
  image = np.random.default_rng().integers(0, 256, (32, 20, 3), dtype=np.uint8)
  out, fy, fx = resize_longer_and_pad(image, 32)
  np.testing.assert_array_equal(out[:, :20], image)
  assert (fy, fx) == (1.0, 20 / 32) and not out[:, 20:].any()


@pytest.mark.parametrize("shape, size", [((37, 53), 64), ((53, 37), 64), ((100, 30), 32),
                                         ((20, 20), 96)])
def test_nearest_resize_matches_pil(shape, size):
  values = np.random.default_rng().integers(0, 2**24, shape).astype(np.int64)
  out = resize_nearest_and_pad(values, size)
  _, fy, fx = resize_longer_and_pad(np.zeros(shape + (3,), np.uint8), size)
  out_h, out_w = round(fy * size), round(fx * size)
  expected = np.asarray(PIL.Image.fromarray(values.astype(np.int32), mode="I").resize(
      (out_w, out_h), PIL.Image.NEAREST))
  assert out.dtype == values.dtype and out.shape == (size, size)
  np.testing.assert_array_equal(out[:out_h, :out_w], expected)
  assert not out[out_h:].any() and not out[:, out_w:].any()


def _panoptic_rgb(segments: np.ndarray) -> np.ndarray:
  """(h, w) segment ids -> the COCO panoptic PNG's (h, w, 3) uint8 (id = R + 256 G + 256^2 B)."""
  return np.stack([segments % 256, segments // 256 % 256, segments // 65536], -1).astype(np.uint8)


def test_panoptic_thing_segments_become_objects_with_masks():
  stuff, car, dog, crowd = 2 * 65536 + 5, 7, 300, 9    # 300 = (44, 1, 0) in RGB
  segments = np.zeros((128, 64), np.int64)
  segments[:, 30:] = stuff
  segments[:40, :30] = car
  segments[50:99, 11:64] = dog
  segments[100:, :20] = crowd
  rgb = _panoptic_rgb(segments)
  np.testing.assert_array_equal(panoptic_segment_ids(rgb), segments)
  boxes = np.array([[0, 30, 128, 64], [0, 0, 40, 30], [50, 11, 99, 64], [100, 0, 128, 20]],
                   np.float32) / [128, 64, 128, 64]
  example = {"image": np.full((128, 64, 3), 9, np.uint8), "panoptic_image": rgb,
             "panoptic_objects": {
                 "id": np.array([stuff, car, dog, crowd]),
                 "label": np.array([PANOPTIC_NAMES.index(n) for n in
                                    ("stuff-3", "car", "dog", "person")]),
                 "bbox": boxes, "is_crowd": np.array([False, False, False, True])}}
  out = DetectionSource([example], "coco", size=64, panoptic_names=PANOPTIC_NAMES)[0]
  objects = out["objects"]
  # Stuff dropped, crowd ignored; labels are coco/2017's (car 2, dog 16, person 0).
  np.testing.assert_array_equal(objects["label"], [2, 16])
  np.testing.assert_array_equal(out["ignored_objects"]["label"], [0])
  expected = np.zeros((64, 64), bool)
  expected[:, :32] = (segments == crowd)[1::2, 1::2]
  np.testing.assert_array_equal(out["ignored_objects"]["mask"], expected[None])
  np.testing.assert_allclose(out["ignored_objects"]["bbox"], boxes[3:] * [1, 0.5, 1, 0.5])
  assert (COCO_CLASSES[2], COCO_CLASSES[16]) == ("car", "dog")
  # 128x64 -> 64x32: boxes' x halved on the 64-wide canvas, y unchanged.
  np.testing.assert_allclose(objects["bbox"], boxes[1:3] * [1, 0.5, 1, 0.5])
  # Halving by nearest neighbour with half-pixel centres reads input pixel 2i + 1.
  assert objects["mask"].dtype == bool and objects["mask"].shape == (2, 64, 64)
  for mask, segment in zip(objects["mask"], (car, dog)):
    expected = np.zeros((64, 64), bool)
    expected[:, :32] = (segments == segment)[1::2, 1::2]
    np.testing.assert_array_equal(mask, expected)
  assert objects["mask"][0].sum() == 20 * 15 and objects["mask"][1].sum() == 24 * 27
  assert out["image"].shape == (64, 64, 3) and not out["image"][:, 32:].any()

  with pytest.raises(ValueError, match="no panoptic class names"):
    DetectionSource([example], "coco", size=64)[0]
  with pytest.raises(ValueError, match="lack 1 of COCO's 80 thing classes \\(tv"):
    DetectionSource([example], "coco", panoptic_names=[n for n in PANOPTIC_NAMES if n != "tv"])
  bad = dict(example, panoptic_image=rgb[:, :63])
  with pytest.raises(ValueError, match="panoptic_image is 128x63 but the image 128x64"):
    DetectionSource([bad], "coco", size=64, panoptic_names=PANOPTIC_NAMES)[0]


def test_proposals_follow_the_boxes_and_image_keys_pass_through():
  example = {"image": np.zeros((48, 96, 3), np.uint8), "image/filename": "000000000139.jpg",
             "image/id": np.int64(139),
             "proposals": np.array([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0]], np.float32),
             "objects": {"bbox": np.array([[0.1, 0.2, 0.5, 0.9]], np.float32),
                         "label": np.array([1]), "is_crowd": np.array([False])}}
  out = DetectionSource([example], "coco", size=64)[0]
  # 48x96 -> 32x64 on a 64x64 canvas: y halved, x unchanged; proposals exactly as the boxes.
  np.testing.assert_allclose(out["proposals"], [[0.05, 0.2, 0.25, 0.9], [0.0, 0.0, 0.5, 1.0]])
  np.testing.assert_array_equal(out["proposals"][:1], out["objects"]["bbox"])
  assert out["proposals"].dtype == np.float32
  assert out["image/filename"] == "000000000139.jpg" and out["image/id"] == 139
  without = {k: v for k, v in example.items() if k not in ("proposals", "image/filename")}
  out = DetectionSource([without], "coco", size=64)[0]
  assert "proposals" not in out and "image/filename" not in out and out["image/id"] == 139


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


@pytest.mark.parametrize("name, flag", [("voc/2007", "is_difficult"), ("voc/2012", "is_difficult"),
                                        ("coco/2017", "is_crowd")])
def test_mocked_tfds_detection_data_loads_and_batches(monkeypatch, coco_without_tensorflow, name,
                                                      flag):
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
      n = min(len(objects[key]) for key in ("bbox", "label", flag, "area") if key in objects)
      ignored = np.asarray(objects[flag], bool).reshape(-1)[:n]
      assert len(example["objects"]["label"]) == (~ignored).sum()
      assert len(example["ignored_objects"]["label"]) == ignored.sum()
      if "area" in objects:
        np.testing.assert_array_equal(example["objects"]["area"], objects["area"][:n][~ignored])
    most = max(max(len(source[i]["objects"]["label"]), len(source[i]["ignored_objects"]["label"]))
               for i in range(3))
    batch = next(pipeline.train_batches(
        source, global_batch_size=2, seed=0, max_objects=max(most, 1),
        features=("image", "boxes", "labels", "ignored_boxes", "ignored_labels", "areas",
                  "image_scale")))
    assert batch["image"].shape == (2, 800, 800, 3) and batch["boxes"].shape[-1] == 4
    assert batch["image_scale"].shape == (2, 2) and (batch["image_scale"] > 0).all()
    for boxes, valid in (("boxes", "objects_valid"), ("ignored_boxes", "ignored_valid")):
      boxes = batch[boxes][batch[valid]]
      assert ((boxes >= 0) & (boxes <= 800)).all()
      assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    areas = batch["areas"][batch["objects_valid"]]
    assert (areas >= 0).all() if name == "coco/2017" else (areas == -1).all()


class _PaintedPanoptic:
  """The mocked coco/2017_panoptic source made consistent: mock data draws the panoptic image,
  the segment ids and each field's length at random. Here every segment gets id k + 1, its box
  in order, and is painted into a panoptic image of the image's size (later segments over
  earlier ones, so segments do not overlap)."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    example = dict(self.source[index])
    objects = example["panoptic_objects"]
    n = min(len(objects[key]) for key in ("id", "bbox", "label", "is_crowd", "area"))
    bbox = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)[:n]
    ys, xs = np.sort(bbox[:, 0::2], axis=1), np.sort(bbox[:, 1::2], axis=1)
    bbox = np.stack([ys[:, 0], xs[:, 0], ys[:, 1], xs[:, 1]], axis=1)
    height, width = example["image"].shape[:2]
    segments = np.zeros((height, width), np.int64)
    for k, (y0, x0, y1, x1) in enumerate(bbox):
      segments[int(y0 * height):int(np.ceil(y1 * height)),
               int(x0 * width):int(np.ceil(x1 * width))] = k + 1
    example["panoptic_image"] = _panoptic_rgb(segments)
    example["panoptic_objects"] = dict(objects, id=np.arange(1, n + 1), bbox=bbox,
                                       label=np.asarray(objects["label"])[:n],
                                       is_crowd=np.asarray(objects["is_crowd"])[:n],
                                       area=np.asarray(objects["area"])[:n])
    return example


def test_mocked_coco_panoptic_loads_with_instance_masks(monkeypatch, coco_without_tensorflow):
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    builder = tfds.builder("coco/2017_panoptic")
    with pytest.raises(ValueError, match="lack 80 of COCO's 80 thing classes"):
      DetectionSource(builder.as_data_source(split="train"), "coco")  # Mock labels are unnamed.
    # TFDS names the labels when it prepares the data (from the annotation file's categories).
    builder.info.features["panoptic_objects"]["label"].names = list(PANOPTIC_NAMES)
    raw = builder.as_data_source(split="train")
    mocked = _PaintedPanoptic(raw)
    mocked.dataset_info = raw.dataset_info
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: _PreparedBuilder(mocked))
    source = zoo.data.load_data_source("coco/2017_panoptic", "train")
    assert isinstance(source, DetectionSource) and len(source) == 3
    thing = {i: COCO_CLASSES.index(n) for i, n in enumerate(PANOPTIC_NAMES) if n in COCO_CLASSES}
    for i in range(3):
      raw_objects, example = mocked[i]["panoptic_objects"], source[i]
      kept = [k for k, (label, crowd) in enumerate(zip(raw_objects["label"],
                                                       raw_objects["is_crowd"]))
              if label in thing and not crowd]
      objects = example["objects"]
      np.testing.assert_array_equal(objects["label"],
                                    [thing[raw_objects["label"][k]] for k in kept])
      np.testing.assert_array_equal(objects["area"], raw_objects["area"][kept])
      crowds = [k for k, (label, crowd) in enumerate(zip(raw_objects["label"],
                                                         raw_objects["is_crowd"]))
                if label in thing and crowd]
      np.testing.assert_array_equal(example["ignored_objects"]["label"],
                                    [thing[raw_objects["label"][k]] for k in crowds])
      assert objects["mask"].shape == (len(kept), 800, 800) and objects["mask"].dtype == bool
      assert example["image/filename"] == mocked[i]["image/filename"]
      # Each mask lies in its box, give or take one original pixel (the painting rounds out).
      pixel = 800 / max(mocked[i]["image"].shape[:2]) + 1
      for mask, (y1, x1, y2, x2) in zip(objects["mask"], objects["bbox"] * 800):
        ys, xs = np.nonzero(mask)
        if len(ys):
          assert y1 - pixel <= ys.min() <= ys.max() <= y2 + pixel
          assert x1 - pixel <= xs.min() <= xs.max() <= x2 + pixel
    most = max(max(len(source[i]["objects"]["label"]), len(source[i]["ignored_objects"]["label"]))
               for i in range(3))
    batch = next(pipeline.train_batches(
        source, global_batch_size=2, seed=0, max_objects=max(most, 1),
        features=("image", "boxes", "labels", "instance_masks", "ignored_masks")))
  assert batch["image"].shape == (2, 800, 800, 3)
  assert batch["instance_masks"].shape == (2, max(most, 1), 800, 800)
  # Panoptic segments do not overlap; padded object slots have empty masks.
  masks, valid = batch["instance_masks"], batch["objects_valid"]
  ignored, ignored_valid = batch["ignored_masks"], batch["ignored_valid"]
  assert (masks.sum(1) + ignored.sum(1) <= 1).all() and not masks[~valid].any()
  assert masks[valid].any(axis=(1, 2)).sum() > 0 and not ignored[~ignored_valid].any()


def test_detector_class_names_follow_tfds_label_order():
  from tensorflow_datasets.object_detection import voc
  from zoo.data.detection_sources import detector_class_names
  assert detector_class_names("voc/2007") == ("background",) + tuple(voc._VOC_LABELS)
  assert detector_class_names("coco/2017_panoptic")[1] == "person"
  assert len(detector_class_names("coco/2017")) == 81
  assert detector_class_names("cityscapes") is None
