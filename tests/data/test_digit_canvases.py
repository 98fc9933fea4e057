"""The embedded digits and the `digit_canvases` TFDS builder: provenance, splits,
determinism, label consistency, preparation (errors, concurrency)."""

import hashlib
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import scipy.ndimage

from zoo.data import CLASS_NAMES, NUM_SEGMENTATION_CLASSES, load_data_source
from zoo.data import digit_canvases as dc

SPLITS = ("train", "validation", "test")
TINY = next(c for c in dc.DigitCanvases.BUILDER_CONFIGS if c.name == "tiny")


def fresh_seed() -> int:
  return int(np.random.SeedSequence().entropy % 2**32)


def test_embedded_digits_checksum_shape_and_counts():
  images, labels = dc.source_digits()
  assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
  assert labels.shape == (1797,) and labels.dtype == np.uint8
  assert images.max() == 16 and labels.max() == 9
  assert hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest() == dc.DIGITS_SHA256
  np.testing.assert_array_equal(np.bincount(labels), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])


def test_embedded_digits_equal_scikit_learn():
  datasets = pytest.importorskip(
      "sklearn.datasets", reason="scikit-learn is not a dependency; install it to compare "
      "digits_8x8.npz with the copy it ships (the checksum test runs regardless)")
  reference = datasets.load_digits()
  images, labels = dc.source_digits()
  np.testing.assert_array_equal(images, reference.images)
  np.testing.assert_array_equal(labels, reference.target)


def test_constants():
  assert NUM_SEGMENTATION_CLASSES == 11 == len(CLASS_NAMES)
  assert CLASS_NAMES[0] == "background" and CLASS_NAMES[1:] == tuple("0123456789")


def test_split_sources_are_disjoint_complete_and_stratified():
  pools = {s: dc.split_source_indices(s) for s in SPLITS}
  assert sum(len(p) for p in pools.values()) == dc.NUM_DIGITS
  np.testing.assert_array_equal(np.sort(np.concatenate(list(pools.values()))), np.arange(dc.NUM_DIGITS))
  _, labels = dc.source_digits()
  totals = np.bincount(labels, minlength=10)
  for split, fraction in zip(SPLITS, (0.70, 0.15, 0.15)):
    counts = np.bincount(labels[pools[split]], minlength=10)
    np.testing.assert_allclose(counts / totals, fraction, atol=0.01)
  with pytest.raises(ValueError, match="train, validation, test"):
    dc.split_source_indices("dev")


@pytest.mark.parametrize("split", SPLITS)
def test_prepared_records_are_the_generated_examples(tiny_sources, split):
  """Record i is example i, whatever order it is generated in (here: backwards)."""
  source = tiny_sources[split]
  assert len(source) == TINY.num_examples(split)
  for index in reversed(range(len(source))):
    record, expected = source[index], dc.canvas_example(TINY, split, index)
    assert record["id"] == index
    np.testing.assert_array_equal(record["image"], expected["image"])
    np.testing.assert_array_equal(record["segmentation"], expected["segmentation"])
    objects = expected["objects"]
    np.testing.assert_array_equal(np.stack(record["objects"]["mask"]), objects["mask"])
    np.testing.assert_array_equal(np.stack(record["objects"]["bbox"]), objects["bbox"])
    np.testing.assert_array_equal(record["objects"]["label"], objects["label"])
    np.testing.assert_array_equal(record["objects"]["source_index"], objects["source_index"])


def test_two_preparations_are_identical(tiny_sources, tmp_path):
  other = {s: load_data_source("digit_canvases/tiny", s, data_dir=str(tmp_path)) for s in SPLITS}
  for split in SPLITS:
    assert len(other[split]) == len(tiny_sources[split])
    for a, b in zip(tiny_sources[split], other[split]):
      assert jax.tree.structure(a) == jax.tree.structure(b)
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_seed_and_split_change_the_data():
  a = dc.canvas_example(TINY, "train", 0)["image"]
  assert not np.array_equal(a, dc.canvas_example(TINY, "validation", 0)["image"])
  other_seed = dc.DigitCanvasesConfig(name="other", seed=1)
  assert not np.array_equal(a, dc.canvas_example(other_seed, "train", 0)["image"])


def check_objects(example: dict, split: str, config: dc.DigitCanvasesConfig):
  """Every object is real and its mask, box, label and the segmentation agree."""
  objects = example["objects"]
  masks, boxes = np.asarray(objects["mask"]), np.asarray(objects["bbox"])
  labels, sources = np.asarray(objects["label"]), np.asarray(objects["source_index"])
  size = config.canvas_size
  assert 1 <= len(labels) <= config.max_digits
  _, source_labels = dc.source_digits()
  np.testing.assert_array_equal(labels, source_labels[sources])
  assert np.isin(sources, dc.split_source_indices(split)).all()
  assert (masks.sum((1, 2)) >= config.min_visible_pixels).all()
  assert (masks.sum(0) <= 1).all(), "visible masks overlap"
  segmentation = example["segmentation"]
  np.testing.assert_array_equal(segmentation > 0, masks.any(0))
  for mask, box, label in zip(masks, boxes, labels):
    assert (segmentation[mask] == label + 1).all()
    rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    tight = [rows[0], columns[0], rows[-1] + 1, columns[-1] + 1]  # Pixel edges.
    np.testing.assert_array_equal(box * size, tight)


@pytest.mark.parametrize("split", SPLITS)
def test_prepared_objects_are_consistent(tiny_sources, split):
  for example in tiny_sources[split]:
    check_objects(example, split, TINY)


def test_fresh_canvases_are_consistent_and_contrasted():
  seed = fresh_seed()
  config = dc.DigitCanvasesConfig(name="fresh", seed=seed, canvas_size=48, max_digits=5)
  luma = np.array([0.299, 0.587, 0.114])
  contrasts = []
  for index in range(60):
    example = dc.canvas_example(config, "test", index)
    try:
      check_objects(example, "test", config)
    except AssertionError as e:
      raise AssertionError(f"seed {seed}, example {index}: {e}") from e
    luminance = example["image"] / 255.0 @ luma
    background = example["segmentation"] == 0
    for mask in example["objects"]["mask"]:
      ring = scipy.ndimage.binary_dilation(mask, iterations=2) & background
      if ring.any():
        contrasts.append(abs(luminance[mask].mean() - luminance[ring].mean()))
  # Digits are drawn >= 0.4 luminance away from the mean background under them; texture
  # and noise blur that, but a digit should still stand out from its surroundings.
  assert np.percentile(contrasts, 5) > 0.25, (seed, np.percentile(contrasts, [1, 5, 50]))


@pytest.mark.parametrize("shape,size", [((8, 8), (23, 17)), ((3, 5, 3), (64, 64)), ((2, 2), (9, 9))])
def test_bilinear_resize_matches_jax_image_resize(shape, size):
  x = np.random.default_rng(fresh_seed()).uniform(size=shape)
  expected = jax.image.resize(x.astype(np.float32), size + shape[2:], method="linear")
  np.testing.assert_allclose(dc.bilinear_resize(x, *size), expected, atol=1e-5)


def test_config_validation():
  with pytest.raises(ValueError, match="min_digits"):
    dc.DigitCanvasesConfig(name="bad", min_digits=3, max_digits=2)
  with pytest.raises(ValueError, match="max_side"):
    dc.DigitCanvasesConfig(name="bad", canvas_size=24, max_side=30)


def test_load_data_source_errors(tiny_data_dir):
  with pytest.raises(ValueError, match="no split 'dev'; available splits: test, train, validation"):
    load_data_source("digit_canvases/tiny", "dev", data_dir=tiny_data_dir)
  with pytest.raises(ValueError, match="no config 'huge'; available configs: canvas64, canvas96, tiny"):
    load_data_source("digit_canvases/huge", "train", data_dir=tiny_data_dir)
  with pytest.raises(ValueError, match="Unknown dataset 'no_such_dataset'"):
    load_data_source("no_such_dataset", "train", data_dir=tiny_data_dir)
  # A real TFDS dataset is never downloaded here: the error says how to prepare it.
  with pytest.raises(ValueError, match="mnist' is not prepared .*tfds build mnist --file_format=array_record"):
    load_data_source("mnist", "train", data_dir=tiny_data_dir)
  assert not os.path.exists(os.path.join(tiny_data_dir, "mnist"))
  assert len(load_data_source("digit_canvases/tiny", "train[:5]", data_dir=tiny_data_dir)) == 5


def test_concurrent_preparation(tmp_path):
  """Two processes preparing one data dir at once both succeed (TFDS alone would make the
  second fail renaming its finished directory onto the first one's)."""
  script = textwrap.dedent(f"""
      import numpy as np
      from zoo.data import load_data_source
      source = load_data_source("digit_canvases/tiny", "validation", data_dir={str(tmp_path)!r})
      print(len(source), int(np.asarray(source[7]["image"], np.int64).sum()))
  """)
  processes = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outputs = [p.communicate(timeout=120) for p in processes]
  for process, (stdout, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-2000:]
  assert outputs[0][0].split()[-2:] == outputs[1][0].split()[-2:]
  assert outputs[0][0].split()[-2] == "16"
  leftovers = [name for name in os.listdir(tmp_path / "digit_canvases" / "tiny") if "incomplete" in name]
  assert not leftovers
