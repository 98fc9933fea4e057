"""Augmentations: photometric changes only colours (an affine map per channel, channels
permuted), random_translate, horizontal_flip and random_scale_crop move every label with
the pixels; all
deterministic per rng. (The features of the families to come: tests/data/test_features.py.)"""

import numpy as np
import pytest

from zoo.data import augment, features, pipeline
from zoo.data import digit_canvases as dc

M = 6


def fresh_example(seed: int) -> dict:
  """A freshly generated canvas (random config seed) in the pipeline's per-example layout."""
  config = dc.DigitCanvasesConfig(name="fresh", seed=seed)
  example = dc.canvas_example(config, "train", 0)
  objects = example["objects"]
  tfds_like = {**example, "objects": {"bbox": list(objects["bbox"]), "label": list(objects["label"]),
                                      "mask": list(objects["mask"])}}
  return pipeline._example_arrays(
      tfds_like, features=("image", "segmentation", "boxes", "labels", "instance_masks",
                           "objects_valid", "id"), layout=features.Layout((64, 64), max_objects=M))


def seeds(n):
  return np.random.SeedSequence().generate_state(n)


@pytest.mark.parametrize("seed", seeds(4))
def test_photometric_is_a_per_channel_affine_map_with_permuted_channels(seed):
  example = fresh_example(seed)
  out = augment.photometric(example, np.random.default_rng(seed))
  for key in example.keys() - {"image"}:
    np.testing.assert_array_equal(out[key], example[key])
  image, result = example["image"], out["image"]
  assert result.dtype == np.float32 and 0 <= result.min() and result.max() <= 1
  unclipped = (result > 0) & (result < 1)
  matched = []
  for j in range(3):  # Output channel j is a*input channel k + b, for one k.
    keep = unclipped[..., j]
    fits = []
    for k in range(3):
      a, b = np.polyfit(image[..., k][keep], result[..., j][keep], 1)
      fits.append(np.abs(a * image[..., k][keep] + b - result[..., j][keep]).max())
    matched.append(int(np.argmin(fits)))
    assert min(fits) < 1e-5, (seed, j, fits)
  assert sorted(matched) == [0, 1, 2]


@pytest.mark.parametrize("seed", seeds(2))
def test_augmentations_draw_what_they_always_drew(seed):
  """Training runs reproduce their numbers: photometric draws contrast, brightness, then the
  channel order; random_translate one (dy, dx) pair; exactly, so the outputs are bit-equal."""
  example = fresh_example(seed)
  draws = np.random.default_rng(seed)
  contrast, brightness = draws.uniform(0.75, 1.25), draws.uniform(-0.1, 0.1)
  permutation, (dy, dx) = draws.permutation(3), draws.integers(-4, 5, size=2)
  image = example["image"]
  expected = ((image - image.mean()) * contrast + image.mean() + brightness)[..., permutation]
  rng = np.random.default_rng(seed)
  out = augment.photometric(example, rng)
  np.testing.assert_array_equal(out["image"], np.clip(expected, 0.0, 1.0).astype(np.float32))
  moved = augment.random_translate(example, rng)
  np.testing.assert_array_equal(moved["boxes"][0], np.clip(example["boxes"][0] + [dx, dy, dx, dy],
                                                           0, 64))


@pytest.mark.parametrize("seed", seeds(6))
def test_random_translate_moves_everything_together(seed):
  example = fresh_example(seed)
  out = augment.random_translate(example, np.random.default_rng(seed), max_shift=4)
  segmentation, moved = example["segmentation"], out["segmentation"]
  # Find the shift from the segmentation (a shift leaves the overlap identical).
  matches = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
             if np.array_equal(moved[max(dy, 0):64 + min(dy, 0), max(dx, 0):64 + min(dx, 0)],
                               segmentation[max(-dy, 0):64 - max(dy, 0), max(-dx, 0):64 - max(dx, 0)])
             and np.array_equal(out["image"][max(dy, 0):64 + min(dy, 0), max(dx, 0):64 + min(dx, 0)],
                                example["image"][max(-dy, 0):64 - max(dy, 0), max(-dx, 0):64 - max(dx, 0)])]
  assert len(matches) == 1, (seed, matches)
  dy, dx = matches[0]
  uncovered = np.ones((64, 64), bool)
  uncovered[max(dy, 0):64 + min(dy, 0), max(dx, 0):64 + min(dx, 0)] = False
  assert (moved[uncovered] == 0).all()
  if uncovered.any():  # One fill colour: the mean of the input's border.
    border = np.concatenate([example["image"][0], example["image"][-1], example["image"][:, 0],
                             example["image"][:, -1]])
    np.testing.assert_allclose(out["image"][uncovered], np.broadcast_to(border.mean(0), (uncovered.sum(), 3)), rtol=1e-6)
  for k in range(M):
    expected_mask = np.zeros((64, 64), bool)
    expected_mask[max(dy, 0):64 + min(dy, 0), max(dx, 0):64 + min(dx, 0)] = (
        example["instance_masks"][k][max(-dy, 0):64 - max(dy, 0), max(-dx, 0):64 - max(dx, 0)])
    np.testing.assert_array_equal(out["instance_masks"][k], expected_mask)
    expected_box = np.clip(example["boxes"][k] + [dx, dy, dx, dy], 0, 64)
    np.testing.assert_array_equal(out["boxes"][k], expected_box)
    assert out["objects_valid"][k] == (example["objects_valid"][k] and expected_mask.any())
  np.testing.assert_array_equal(out["labels"], example["labels"])
  # Labels still agree with each other.
  np.testing.assert_array_equal(moved > 0, (out["instance_masks"] & out["objects_valid"][:, None, None]).any(0))


def test_random_translate_invalidates_objects_pushed_off_the_canvas():
  example = {"segmentation": np.zeros((16, 16), np.int32),
             "instance_masks": np.zeros((2, 16, 16), bool),
             "boxes": np.array([[14, 5, 16, 9], [4, 4, 8, 8]], np.float32),
             "objects_valid": np.array([True, True])}
  example["instance_masks"][0, 5:9, 14:16] = True
  example["instance_masks"][1, 4:8, 4:8] = True
  example["segmentation"][example["instance_masks"].any(0)] = 1
  for seed in range(100):
    out = augment.random_translate(example, np.random.default_rng(seed), max_shift=3)
    dx = np.flatnonzero(out["instance_masks"][1].any(0))[0] - 4  # Object 1 always stays.
    assert out["objects_valid"][0] == (dx < 2)  # Its columns 14, 15 leave at dx >= 2.
    assert out["objects_valid"][1]
    if dx >= 2:
      np.testing.assert_array_equal(out["boxes"][0][[0, 2]], [16, 16])


@pytest.mark.parametrize("seed", seeds(3))
def test_horizontal_flip_mirrors_everything_together(seed):
  example = fresh_example(seed)
  out = augment.horizontal_flip(example, np.random.default_rng(seed), probability=1.0)
  np.testing.assert_array_equal(out["image"], example["image"][:, ::-1])
  np.testing.assert_array_equal(out["segmentation"], example["segmentation"][:, ::-1])
  np.testing.assert_array_equal(out["instance_masks"], example["instance_masks"][:, :, ::-1])
  for key in ("labels", "objects_valid", "id"):
    np.testing.assert_array_equal(out[key], example[key])
  for k in np.flatnonzero(out["objects_valid"]):  # Boxes stay tight around the visible masks.
    rows, columns = np.nonzero(out["instance_masks"][k])
    np.testing.assert_array_equal(out["boxes"][k], [columns.min(), rows.min(),
                                                    columns.max() + 1, rows.max() + 1])


@pytest.mark.parametrize("seed", seeds(4))
def test_random_scale_crop_keeps_the_labels_consistent(seed):
  example = fresh_example(seed)
  out = augment.random_scale_crop(example, np.random.default_rng(seed), min_scale=0.7,
                                  max_scale=1.5)
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
      k: (v.shape, v.dtype) for k, v in example.items()}
  masks = out["instance_masks"] & out["objects_valid"][:, None, None]
  np.testing.assert_array_equal(out["segmentation"] > 0, masks.any(0))
  np.testing.assert_array_equal(out["labels"], example["labels"])
  assert not (out["objects_valid"] & ~example["objects_valid"]).any()
  for k in np.flatnonzero(out["objects_valid"]):
    assert (out["segmentation"][masks[k]] == out["labels"][k] + 1).all()
    # Boxes are scaled exactly; a mask pixel is kept when its centre lies in the box.
    rows, columns = np.nonzero(masks[k])
    x1, y1, x2, y2 = out["boxes"][k]
    assert x1 <= columns.min() + 0.5 and columns.max() + 0.5 <= x2
    assert y1 <= rows.min() + 0.5 and rows.max() + 0.5 <= y2


def test_compose_applies_in_order_and_is_deterministic():
  example = fresh_example(int(seeds(1)[0]))
  both = augment.compose(["random_translate", "photometric"])
  a = both(example, np.random.default_rng(7))
  b = both(example, np.random.default_rng(7))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  rng = np.random.default_rng(7)
  by_hand = augment.photometric(augment.random_translate(example, rng), rng)
  for key in a:
    np.testing.assert_array_equal(a[key], by_hand[key])
  assert augment.compose([])(example, rng) is example


def test_unknown_augmentations_are_reported():
  with pytest.raises(ValueError, match="Unknown augmentation.*'mixup'.*known: photometric, random_translate"):
    augment.compose(["photometric", "mixup"])
  with pytest.raises(ValueError, match="not the string"):
    augment.compose("photometric")
