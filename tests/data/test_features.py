"""The feature registry: the features of the families to come (image pairs, flow, depth,
disparity, normals, sequences) read, padded, batched and augmented on synthetic examples;
a feature registered in one call runs through the pipeline and the augmentations."""

import numpy as np
import pytest

from zoo.data import augment, features, pipeline

H, W, T = 12, 16, 4
DENSE = ("image", "image2", "flow", "depth", "disparity", "normals", "frames")


def synthetic_example(rng: np.random.Generator, index: int, length: int) -> dict:
  """A source example with every registered feature's entry, in source conventions."""
  normals = rng.normal(size=(H, W, 3)).astype(np.float32)
  masks = np.zeros((2, H, W), bool)
  masks[0, 2:5, 3:9] = True
  masks[1, 6:11, 10:13] = True
  return {
      "id": np.int64(index),
      "image": rng.integers(0, 256, (H, W, 3), np.uint8),
      "image2": rng.integers(0, 256, (H, W, 3), np.uint8),
      "flow": rng.normal(scale=3, size=(H, W, 2)).astype(np.float32),
      "depth": rng.uniform(0.5, 80, (H, W)).astype(np.float32),
      "disparity": rng.uniform(0, 60, (H, W)).astype(np.float32),
      "normals": normals / np.linalg.norm(normals, axis=-1, keepdims=True),
      "frames": rng.integers(0, 256, (length, H, W, 3), np.uint8),
      "segmentation": (masks * np.array([3, 7])[:, None, None]).max(0).astype(np.uint8),
      "objects": {"label": np.array([2, 6]), "mask": masks,
                  "bbox": np.array([[2 / H, 3 / W, 5 / H, 9 / W], [6 / H, 10 / W, 11 / H, 13 / W]],
                                   np.float32)},
      "proposals": np.array([[0.1, 0.2, 0.5, 0.9]], np.float32),
  }


@pytest.fixture
def source(rng):
  return [synthetic_example(rng, i, length=1 + i % T) for i in range(6)]


def decoded(example: dict, names=DENSE + ("segmentation", "boxes", "labels", "instance_masks",
                                          "proposals", "id")) -> dict:
  """The pipeline's unbatched arrays of `example` (companions included)."""
  return pipeline._example_arrays(example, features=pipeline._checked_features(names),
                                  layout=features.Layout((H, W), max_objects=3, max_proposals=2,
                                                         max_length=T))


def test_new_features_are_read_padded_and_batched(source):
  batches = list(pipeline.eval_batches(source, global_batch_size=4, features=DENSE + ("id",),
                                       max_length=T, process_index=0, process_count=1))
  batch = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
  expected = {"image": ((8, H, W, 3), np.float32), "image2": ((8, H, W, 3), np.float32),
              "flow": ((8, H, W, 2), np.float32), "depth": ((8, H, W), np.float32),
              "disparity": ((8, H, W), np.float32), "normals": ((8, H, W, 3), np.float32),
              "frames": ((8, T, H, W, 3), np.float32), "frames_lengths": ((8,), np.int32),
              "frames_mask": ((8, T), np.bool_), "id": ((8,), np.int32),
              "example_valid": ((8,), np.bool_)}
  assert {key: (value.shape, value.dtype) for key, value in batch.items()} == expected
  for i, example in enumerate(source):
    np.testing.assert_array_equal(batch["image2"][i], example["image2"] / np.float32(255))
    for key in ("flow", "depth", "disparity", "normals"):
      np.testing.assert_array_equal(batch[key][i], example[key], err_msg=key)
    t = len(example["frames"])
    assert batch["frames_lengths"][i] == t
    np.testing.assert_array_equal(batch["frames_mask"][i], np.arange(T) < t)
    np.testing.assert_array_equal(batch["frames"][i, :t], example["frames"] / np.float32(255))
    assert not batch["frames"][i, t:].any()
  padding = ~batch["example_valid"]
  assert padding.sum() == 2 and not batch["frames_mask"][padding].any()
  assert (batch["frames_lengths"][padding] == 0).all() and not batch["flow"][padding].any()
  # Training batches and example_batch: the same keys, shapes and dtypes (less example_valid).
  train = next(pipeline.train_batches(
      source, global_batch_size=4, seed=0, features=DENSE, max_length=T,
      augment=("photometric", "random_translate", "horizontal_flip", "random_scale_crop"),
      process_index=0,
      process_count=1))
  one = pipeline.example_batch(source, features=DENSE, max_length=T)
  for key in expected.keys() - {"id", "example_valid"}:
    assert (train[key].shape, train[key].dtype) == ((4,) + expected[key][0][1:], expected[key][1])
    assert (one[key].shape, one[key].dtype) == ((1,) + expected[key][0][1:], expected[key][1])


def test_a_sequence_longer_than_max_length_is_a_clear_error(rng):
  example = synthetic_example(rng, 3, length=T + 2)
  with pytest.raises(ValueError, match=rf"Example 3 has a frames sequence of length {T + 2}, "
                                       rf"more than max_length={T}; raise it \(--config"):
    next(iter(pipeline.eval_batches([example], global_batch_size=1, features=("frames",),
                                    max_length=T, process_index=0, process_count=1)))


@pytest.mark.parametrize("length", [1, T])
def test_horizontal_flip_mirrors_every_feature(rng, length):
  example = decoded(synthetic_example(rng, 0, length))
  out = augment.horizontal_flip(example, rng, probability=1.0)
  assert out.keys() == example.keys()
  for key in ("image", "image2", "depth", "disparity", "segmentation"):
    np.testing.assert_array_equal(out[key], example[key][:, ::-1], err_msg=key)
  np.testing.assert_array_equal(out["instance_masks"], example["instance_masks"][:, :, ::-1])
  np.testing.assert_array_equal(out["frames"], example["frames"][:, :, ::-1])
  # Flow's u and a normal's x point along x: they change sign.
  np.testing.assert_array_equal(out["flow"], example["flow"][:, ::-1] * [-1, 1])
  np.testing.assert_array_equal(out["normals"], example["normals"][:, ::-1] * [-1, 1, 1])
  # The synthetic boxes are tight around the masks, and stay so.
  for k in np.flatnonzero(out["objects_valid"]):
    rows, columns = np.nonzero(out["instance_masks"][k])
    np.testing.assert_array_equal(out["boxes"][k], [columns.min(), rows.min(),
                                                    columns.max() + 1, rows.max() + 1])
  x1, y1, x2, y2 = example["proposals"][0]
  np.testing.assert_allclose(out["proposals"][0], [W - x2, y1, W - x1, y2], rtol=1e-6)
  for key in ("labels", "objects_valid", "proposals_valid", "frames_lengths", "frames_mask", "id"):
    np.testing.assert_array_equal(out[key], example[key], err_msg=key)
  # Twice is the identity; probability 0 is a no-op that still draws once.
  again = augment.horizontal_flip(out, rng, probability=1.0)
  for key in example:
    np.testing.assert_allclose(again[key], example[key], rtol=1e-6, err_msg=key)
  draws = np.random.default_rng(5)
  assert augment.horizontal_flip(example, draws, probability=0.0) is example
  assert draws.uniform() == np.random.default_rng(5).uniform(size=2)[1]


def test_random_translate_moves_the_new_features_with_the_pixels(rng, seed):
  example = decoded(synthetic_example(rng, 0, length=2))
  out = augment.random_translate(example, np.random.default_rng(seed), max_shift=3)
  # The shift is the generator's first draw (as before the features were described once).
  dy, dx = np.random.default_rng(seed).integers(-3, 4, size=2)
  target = (slice(max(dy, 0), H + min(dy, 0)), slice(max(dx, 0), W + min(dx, 0)))
  origin = (slice(max(-dy, 0), H - max(dy, 0)), slice(max(-dx, 0), W - max(dx, 0)))
  uncovered = np.ones((H, W), bool)
  uncovered[target] = False
  for key in ("flow", "depth", "disparity", "normals", "image2"):
    np.testing.assert_array_equal(out[key][target], example[key][origin], err_msg=key)
  for key in ("flow", "depth", "disparity", "normals"):
    assert not out[key][uncovered].any(), key  # 0: unknown.
  image2 = example["image2"]
  border = np.concatenate([image2[0], image2[-1], image2[:, 0], image2[:, -1]]).mean(0)
  np.testing.assert_allclose(out["image2"][uncovered],
                             np.broadcast_to(border, (uncovered.sum(), 3)))
  for f in range(T):  # Each frame moves alike and fills with its own border's mean.
    frame = example["frames"][f]
    np.testing.assert_array_equal(out["frames"][f][target], frame[origin])
    border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]]).mean(0)
    np.testing.assert_allclose(out["frames"][f][uncovered],
                               np.broadcast_to(border, (uncovered.sum(), 3)), rtol=1e-6)
  assert not out["frames"][2:].any()  # Padding frames stay zero.
  np.testing.assert_array_equal(out["frames_mask"], example["frames_mask"])


def scale_and_offset(seed: int, scale: float) -> tuple[int, int]:
  """random_scale_crop's draws: the scale, then the window's offset over the overhang."""
  draws = np.random.default_rng(seed)
  assert draws.uniform(scale, scale) == scale
  overhang = np.array([round(H * scale) - H, round(W * scale) - W])
  return tuple(draws.integers(np.minimum(overhang, 0), np.maximum(overhang, 0) + 1))


def test_random_scale_crop_by_2_replicates_pixels_and_doubles_pixel_lengths(rng, seed):
  example = decoded(synthetic_example(rng, 0, length=2))
  out = augment.random_scale_crop(example, np.random.default_rng(seed), min_scale=2.0,
                                  max_scale=2.0)
  oy, ox = scale_and_offset(seed, 2.0)

  def zoomed(x, axes=(0, 1)):  # Nearest-neighbour x2: every pixel becomes 2 x 2, then the window.
    x = np.repeat(np.repeat(x, 2, axes[0]), 2, axes[1])
    window = [slice(None)] * x.ndim
    window[axes[0]], window[axes[1]] = slice(oy, oy + H), slice(ox, ox + W)
    return x[tuple(window)]

  for key, factor in (("depth", 1), ("normals", 1), ("disparity", 2), ("segmentation", 1)):
    np.testing.assert_allclose(out[key], zoomed(example[key]) * factor, rtol=1e-6, err_msg=key)
  np.testing.assert_array_equal(out["instance_masks"], zoomed(example["instance_masks"], (1, 2)))
  for k in range(3):  # Boxes scale exactly with the replicated masks; emptied ones are invalid.
    mask = out["instance_masks"][k]
    assert out["objects_valid"][k] == (example["objects_valid"][k] and mask.any())
    if out["objects_valid"][k]:
      rows, columns = np.nonzero(mask)
      np.testing.assert_array_equal(out["boxes"][k], [columns.min(), rows.min(),
                                                      columns.max() + 1, rows.max() + 1])
  # Bilinear maps: a pixel of the zoomed canvas interpolates between its two nearest source
  # pixels (a quarter and three quarters) along each axis, edges replicated; flow doubles.
  def bilinear_x2(x):
    for axis in (0, 1):
      padded = np.concatenate([np.take(x, [0], axis), x, np.take(x, [-1], axis)], axis)
      n = x.shape[axis]
      middle = np.take(x, np.arange(n), axis) * 0.75
      left = np.take(padded, np.arange(n), axis) * 0.25 + middle
      right = middle + np.take(padded, np.arange(2, n + 2), axis) * 0.25
      x = np.stack([left, right], axis + 1).reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1:])
    return x[oy:oy + H, ox:ox + W]

  np.testing.assert_allclose(out["image2"], bilinear_x2(example["image2"]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["flow"], bilinear_x2(example["flow"]) * 2, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["frames"][1], bilinear_x2(example["frames"][1]), rtol=1e-5,
                             atol=1e-6)


def test_random_scale_crop_by_half_averages_and_pads(rng, seed):
  example = decoded(synthetic_example(rng, 0, length=1), ("image", "flow", "depth"))
  out = augment.random_scale_crop(example, np.random.default_rng(seed), min_scale=0.5,
                                  max_scale=0.5)
  oy, ox = scale_and_offset(seed, 0.5)
  inside = (slice(-oy, -oy + H // 2), slice(-ox, -ox + W // 2))
  uncovered = np.ones((H, W), bool)
  uncovered[inside] = False

  def pooled(x):  # Bilinear at half size: the mean of each 2 x 2 block.
    return x.reshape(H // 2, 2, W // 2, 2, -1).mean((1, 3)).reshape((H // 2, W // 2) + x.shape[2:])

  np.testing.assert_allclose(out["image"][inside], pooled(example["image"]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["flow"][inside], pooled(example["flow"]) / 2, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(out["depth"][inside], example["depth"][1::2, 1::2])  # Nearest.
  image = example["image"]
  border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).mean(0)
  np.testing.assert_allclose(out["image"][uncovered], np.broadcast_to(border, (uncovered.sum(), 3)),
                             rtol=1e-6)
  assert not out["flow"][uncovered].any() and not out["depth"][uncovered].any()


def test_random_scale_crop_by_1_changes_nothing(rng):
  example = decoded(synthetic_example(rng, 0, length=2))
  out = augment.random_scale_crop(example, rng, min_scale=1.0, max_scale=1.0)
  for key in example:
    np.testing.assert_array_equal(out[key], example[key], err_msg=key)
  with pytest.raises(ValueError, match="Need 0 < min_scale <= max_scale"):
    augment.random_scale_crop(example, rng, min_scale=1.5, max_scale=1.0)


def test_photometric_changes_image_pairs_alike_and_each_frame_by_its_own_mean(rng, seed):
  example = decoded(synthetic_example(rng, 0, length=3))
  example["image2"] = example["image"].copy()
  out = augment.photometric(example, np.random.default_rng(seed))
  np.testing.assert_array_equal(out["image2"], out["image"])
  for f in range(3):
    alone = augment.photometric({"image": example["frames"][f]}, np.random.default_rng(seed))
    np.testing.assert_allclose(out["frames"][f], alone["image"], rtol=1e-6, atol=1e-7)
  for key in example.keys() - {"image", "image2", "frames"}:
    np.testing.assert_array_equal(out[key], example[key], err_msg=key)
  assert augment.photometric({"flow": example["flow"]}, rng)["flow"] is example["flow"]


@pytest.fixture
def registry(monkeypatch):
  """FEATURES restored after the test: registration is process-wide."""
  monkeypatch.setattr(features, "FEATURES", dict(features.FEATURES))
  return features


def test_a_feature_registered_in_one_call_runs_through_the_pipeline(registry, tiny_sources):
  # A toy vector field: its v component is the image's green channel + 1 (so > 0 wherever
  # it was not uncovered), its u component the red channel + 1, negated by a flip.
  registry.register(features.Feature(
      "wind", np.float32, lambda layout: (*layout.canvas_shape, 2),
      lambda example, layout: np.asarray(example["image"][..., :2], np.float32) / 255 + 1,
      ("image",), padding=-1, geometry=features.PixelMap(fill=0, negated_on_flip=(0,))))
  source = [tiny_sources["train"][i] for i in range(16)]
  batch = next(pipeline.train_batches(source, global_batch_size=16, seed=1,
                                      features=("image", "wind"),
                                      augment=("horizontal_flip", "random_translate"),
                                      process_index=0, process_count=1))
  assert batch["wind"].shape == (16, 64, 64, 2) and batch["wind"].dtype == np.float32
  signs = []
  for image, wind in zip(batch["image"], batch["wind"]):
    covered = wind[..., 1] > 0
    np.testing.assert_allclose(wind[..., 1][covered], image[..., 1][covered] + 1, rtol=1e-6)
    np.testing.assert_allclose(np.abs(wind[..., 0][covered]), image[..., 0][covered] + 1,
                               rtol=1e-6)
    sign = np.unique(np.sign(wind[..., 0][covered]))
    assert len(sign) == 1
    signs.append(sign[0])
    assert not wind[~covered].any()
  assert set(signs) == {-1.0, 1.0}
  evaluation = list(pipeline.eval_batches(source[:3], global_batch_size=2, features=("wind",),
                                          process_index=0, process_count=1))
  np.testing.assert_allclose(evaluation[0]["wind"][0],
                             source[0]["image"][..., :2] / np.float32(255) + 1, rtol=1e-6)
  assert (evaluation[1]["wind"][1] == -1).all()  # Eval padding.
  assert pipeline.example_batch(source, features=("wind",))["wind"].shape == (1, 64, 64, 2)


def test_registering_a_name_twice_or_augmenting_an_unknown_key_is_a_clear_error(registry):
  with pytest.raises(ValueError, match="'flow' is registered already"):
    registry.register(features.FEATURES["flow"])
  with pytest.raises(ValueError, match="No feature 'heat'; registered features: image, "):
    augment.random_translate({"heat": np.zeros((4, 4))}, np.random.default_rng(0))
  with pytest.raises(ValueError, match="random_translate needs the canvas size to move boxes"):
    augment.random_translate({"boxes": np.zeros((2, 4), np.float32)}, np.random.default_rng(0))


def test_every_registered_feature_is_complete():
  layout = features.Layout((H, W), max_objects=3, max_proposals=2, max_length=T)
  for name, spec in features.FEATURES.items():
    assert spec.name == name
    assert all(c in features.FEATURES for c in spec.companions), name
    padding = np.full(spec.shape(layout), spec.padding, spec.dtype)
    assert (padding == spec.padding).all(), name  # Representable in its dtype.
