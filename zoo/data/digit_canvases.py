"""`digit_canvases`: real handwritten digits composed onto textured canvases (TFDS builder).

The zoo's embedded dataset: it needs no download, so every model, test and launcher has
data on any machine. Each example is one canvas (default 64x64 RGB) with 1 to 4 real 8x8
handwritten digits, each smoothly upsampled to a random side of 14 to 30 pixels, placed at
a random position (later digits occlude earlier ones) in a colour that contrasts with a
low-frequency textured background, plus mild pixel noise. It carries the labels of three
tasks at once: semantic segmentation (11 classes: background and the ten digits), object
detection (boxes and classes) and instance segmentation (a mask of each digit's visible
pixels, modal like COCO).

Features of one example (H = W = `canvas_size`):
  image:        (H, W, 3) uint8 RGB.
  segmentation: (H, W) uint8; 0 = background, digit d -> d + 1 (see `zoo.data.CLASS_NAMES`).
  objects:      a Sequence, one entry per digit, bottom to top:
    bbox:         tfds BBoxFeature, (ymin, xmin, ymax, xmax) float32 normalised to [0, 1] by
                  H and W; pixel-edge coordinates, tight around the visible mask: a digit whose
                  visible pixels span rows 3..7 has ymin = 3 / H, ymax = 8 / H.
    label:        ClassLabel "0".."9".
    mask:         (H, W) bool, the digit's VISIBLE pixels (the parts not covered by later digits).
    source_index: int32, the digit's row in `digits_8x8.npz` (the 1,797 source digits).
  id:           int64, the example's index within its split (record i of the split).

Every object is real: a digit whose visible area would fall below `min_visible_pixels` or
below `min_visible_fraction` of its own area (because it is small or because a later digit
covers it) is placed again elsewhere, and dropped after a few tries. Where a digit is
visible, `segmentation` is its label + 1: it is non-zero exactly on the union of the
objects' masks.

Splits: train / validation / test draw their digits from DISJOINT subsets of the 1,797
(per class, a fixed permutation split 70% / 15% / 15%: 1,258 / 270 / 269 digits), so the
test canvases show handwriting samples never seen in training (the writers overlap: the
source has 13 of them). Sizes are per config (default 4,096 / 512 / 512).

Determinism: example i of split s is a pure function of (config, s, i): it draws all its
randomness from `np.random.default_rng([config.seed, SPLIT_NUMBERS[s], i])`, so it does not
depend on the order or parallelism of generation, and the records are written unshuffled
(record i of a split is example i). The same version, config and seed give the same data
under the same NumPy (NumPy does not promise that a `Generator`'s stream never changes).

The source digits, `digits_8x8.npz` beside this file
----------------------------------------------------
`images` (1797, 8, 8) uint8 in 0..16 and `labels` (1797,) uint8 in 0..9: scikit-learn's
bundled copy of the test set of the UCI "Optical Recognition of Handwritten Digits" data
set (E. Alpaydin and C. Kaynak, 1998;
https://archive.ics.uci.edu/ml/datasets/Optical+Recognition+of+Handwritten+Digits; licence
CC BY 4.0 as the UCI repository lists it; scikit-learn, which ships the file as
`sklearn/datasets/data/digits.csv.gz`, is BSD-3-Clause): 32x32 bitmaps from 13 writers,
each 4x4 block reduced to its count of ink pixels. It was produced with scikit-learn 1.9.1
and NumPy 2.4 by

    python -c "import numpy as np, sklearn.datasets; d = sklearn.datasets.load_digits();
      np.savez_compressed('zoo/data/digits_8x8.npz', images=d.images.astype(np.uint8),
                          labels=d.target.astype(np.uint8))"

and we embed it so that scikit-learn is not a dependency. `tests/data/test_digit_canvases.py`
compares it with `load_digits()` where scikit-learn is installed, and checks its SHA-256
(`DIGITS_SHA256`, of `images.tobytes() + labels.tobytes()`) everywhere.
"""

import dataclasses
import functools
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from zoo.data.labels import CLASS_NAMES

DIGITS_PATH = os.path.join(os.path.dirname(__file__), "digits_8x8.npz")
DIGITS_SHA256 = "87ff0c9e40dc7e2c0e34e7257799c2e3f3aec1a016363bb11cad869ec428a826"
NUM_DIGITS = 1797
SPLIT_NUMBERS = {"train": 0, "validation": 1, "test": 2}
# Fractions of each class's digits that go to train and validation; test gets the rest.
SPLIT_FRACTIONS = (0.70, 0.15)
# The fixed permutation of the 1,797 digits that assigns them to splits (independent of
# the config's seed, so every config and seed shares one held-out set of handwriting).
_SPLIT_PERMUTATION_SEED = 20240601

# Rendering constants (see `render_canvas`). Intensities are the 8x8 counts / 16, upsampled.
_ALPHA_LOW, _ALPHA_HIGH = 0.2, 0.5  # Opacity ramps from 0 to 1 between these intensities,
MASK_THRESHOLD = 0.35               # and a pixel belongs to the digit at half opacity.
_MIN_CONTRAST = 0.4                 # |luminance(digit) - mean luminance(background under it)|
_ASPECT_JITTER = 0.1                # width / height = exp(U(-0.1, 0.1))
_PLACEMENT_TRIES = 10


@dataclasses.dataclass(eq=False, kw_only=True)
class DigitCanvasesConfig(tfds.core.BuilderConfig):
  """A `digit_canvases` variant.

  Attributes:
    canvas_size: side of the square canvas, pixels.
    min_digits, max_digits: digits per canvas, drawn uniformly (fewer if some cannot be
      placed visibly).
    min_side, max_side: side of an upsampled digit, pixels, drawn uniformly.
    min_visible_pixels: each digit keeps at least this many visible pixels,
    min_visible_fraction: and at least this fraction of its own mask.
    num_train, num_validation, num_test: examples per split.
    seed: the seed of every example's generator.
  """
  canvas_size: int = 64
  min_digits: int = 1
  max_digits: int = 4
  min_side: int = 14
  max_side: int = 30
  min_visible_pixels: int = 20
  min_visible_fraction: float = 0.5
  num_train: int = 4096
  num_validation: int = 512
  num_test: int = 512
  seed: int = 0

  def __post_init__(self):
    if not 1 <= self.min_digits <= self.max_digits:
      raise ValueError(f"Need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}.")
    if not 8 <= self.min_side <= self.max_side <= self.canvas_size:
      raise ValueError(f"Need 8 <= min_side <= max_side <= canvas_size, got {self.min_side}, "
                       f"{self.max_side}, {self.canvas_size}.")

  def num_examples(self, split: str) -> int:
    return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}[split]


class DigitCanvases(tfds.core.GeneratorBasedBuilder):
  """Real 8x8 handwritten digits on textured canvases: segmentation, boxes, instance masks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  # TFDS (4.9.10) finds a builder's file through `importlib_resources`, which it requires only
  # on Python < 3.9, so preparing fails with ModuleNotFoundError on 3.11 unless it is given.
  code_path = epath.Path(__file__)
  BUILDER_CONFIGS = [
      DigitCanvasesConfig(name="canvas64", description="64x64 canvases, 1-4 digits of 14-30 px "
                          "(the default; what the U-Net main job trains on)."),
      DigitCanvasesConfig(name="canvas96", canvas_size=96, min_digits=2, max_digits=6,
                          description="96x96 canvases, 2-6 digits of 14-30 px."),
      DigitCanvasesConfig(name="tiny", num_train=32, num_validation=16, num_test=16,
                          description="64x64 like canvas64, 32/16/16 examples: for tests."),
  ]

  def _log_download_bytes(self) -> None:
    # TFDS prints "Downloading and preparing dataset Unknown size ..." to stdout here;
    # nothing is downloaded, so say what happens, in the log.
    logging.info("Preparing %s in %s (embedded data, no download).", self.info.full_name,
                 self.data_dir)

  def _log_download_done(self) -> None:
    logging.info("Prepared %s.", self.info.full_name)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.canvas_size
    zlib = tfds.features.Encoding.ZLIB
    return self.dataset_info_from_configs(
        description=__doc__.split("\n\n")[1],
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding=zlib),
            "segmentation": tfds.features.Tensor(shape=(size, size), dtype=np.uint8, encoding=zlib),
            "objects": tfds.features.Sequence({
                "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES[1:]),
                "mask": tfds.features.Tensor(shape=(size, size), dtype=np.bool_, encoding=zlib),
                "source_index": np.int32,
            }),
            "id": np.int64,
        }),
        supervised_keys=("image", "segmentation"),
        # Record i of a split is example i: evaluation order and `id` agree.
        disable_shuffling=True,
        homepage="https://archive.ics.uci.edu/ml/datasets/Optical+Recognition+of+Handwritten+Digits",
        license="CC BY 4.0 (the source digits: UCI Optical Recognition of Handwritten Digits)",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is in the package: no network, ever.
    return {split: self._generate_examples(split) for split in SPLIT_NUMBERS}

  def _generate_examples(self, split: str):
    for index in range(self.builder_config.num_examples(split)):
      yield index, canvas_example(self.builder_config, split, index)


@functools.cache
def source_digits() -> tuple[np.ndarray, np.ndarray]:
  """The embedded digits: images (1797, 8, 8) uint8 in 0..16, labels (1797,) uint8 in 0..9."""
  with np.load(DIGITS_PATH) as f:
    images, labels = f["images"], f["labels"]
  images.flags.writeable = labels.flags.writeable = False
  return images, labels


@functools.cache
def split_source_indices(split: str) -> np.ndarray:
  """Sorted rows of `digits_8x8.npz` that `split` draws its digits from; (N,) int64.

  Stratified: each class's digits are permuted once (a fixed seed) and cut 70/15/15, so the
  three splits are disjoint and each holds every class in its source proportion.
  """
  if split not in SPLIT_NUMBERS:
    raise ValueError(f"Unknown split {split!r}; splits: {', '.join(SPLIT_NUMBERS)}.")
  _, labels = source_digits()
  rng = np.random.default_rng(_SPLIT_PERMUTATION_SEED)
  chosen = []
  for digit in range(10):
    members = rng.permutation(np.flatnonzero(labels == digit))
    cuts = np.round(np.cumsum(SPLIT_FRACTIONS) * len(members)).astype(int)
    chosen.append(np.split(members, cuts)[SPLIT_NUMBERS[split]])
  indices = np.sort(np.concatenate(chosen))
  indices.flags.writeable = False
  return indices


def canvas_example(config: DigitCanvasesConfig, split: str, index: int) -> dict:
  """Example `index` of `split`, exactly as the builder writes it (see the module docstring).

  Returns:
    image (H, W, 3) uint8, segmentation (H, W) uint8, id int, objects: dict of
    bbox (K, 4) float32 normalised (ymin, xmin, ymax, xmax), label (K,) int64,
    mask (K, H, W) bool, source_index (K,) int32.
  """
  rng = np.random.default_rng([config.seed, SPLIT_NUMBERS[split], index])
  images, labels = source_digits()
  pool = split_source_indices(split)
  num_digits = int(rng.integers(config.min_digits, config.max_digits + 1))
  chosen = rng.choice(pool, size=num_digits)
  canvas = render_canvas(rng, images[chosen], config)
  kept = canvas.pop("kept")
  canvas["objects"]["label"] = labels[chosen][kept].astype(np.int64)
  canvas["objects"]["source_index"] = chosen[kept].astype(np.int32)
  # Segmentation: class d + 1 where digit d is visible.
  canvas["segmentation"] = np.zeros(canvas["image"].shape[:2], np.uint8)
  for mask, label in zip(canvas["objects"]["mask"], canvas["objects"]["label"]):
    canvas["segmentation"][mask] = label + 1
  canvas["id"] = index
  return canvas


def render_canvas(rng: np.random.Generator, digits: np.ndarray, config: DigitCanvasesConfig) -> dict:
  """Composes `digits` onto a textured canvas, in order (later ones on top).

  Args:
    rng: the example's generator (consumed).
    digits: (K, 8, 8) uint8 in 0..16.
    config: canvas size, digit sizes and visibility limits.

  Returns:
    image (H, W, 3) uint8; kept (K,) bool, which digits were placed; objects: bbox (k, 4)
    float32 normalised (ymin, xmin, ymax, xmax) and mask (k, H, W) bool (visible pixels),
    for the k kept digits.
  """
  size = config.canvas_size
  background = _textured_background(rng, size)
  luminance = background @ _LUMA
  image = background
  masks = []  # Full (not yet occluded) masks of the placed digits, bottom to top.
  kept = np.zeros(len(digits), bool)
  for k, digit in enumerate(digits):
    for _ in range(_PLACEMENT_TRIES):
      alpha, mask = _placed_digit(rng, digit, config)
      if _visible_enough(mask, masks, config):
        break
    else:
      continue  # No visible placement found: drop this digit; every object stays real.
    colour = _contrasting_colour(rng, luminance[mask].mean())
    image = alpha[..., None] * colour + (1 - alpha[..., None]) * image
    masks.append(mask)
    kept[k] = True
  image = image + rng.normal(0.0, rng.uniform(0.01, 0.03), image.shape)
  image = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)

  visible = np.zeros((len(masks), size, size), bool)
  covered = np.zeros((size, size), bool)
  for k in reversed(range(len(masks))):
    visible[k] = masks[k] & ~covered
    covered |= masks[k]
  return {"image": image, "kept": kept,
          "objects": {"mask": visible, "bbox": _tight_boxes(visible)}}


_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma weights.


def bilinear_resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resampling with half-pixel centres (like PIL / jax.image.resize upsampling).

  Args:
    x: (h, w, ...) float.
    height, width: output size, pixels.

  Returns:
    (height, width, ...) float64; edges are clamped (no darkening at the border).
  """
  def weights(n_in, n_out):
    source = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, n_in - 1)
    fraction = source - low
    w = np.zeros((n_out, n_in))
    np.add.at(w, (np.arange(n_out), low), 1 - fraction)
    np.add.at(w, (np.arange(n_out), high), fraction)
    return w

  rows_resized = np.tensordot(weights(x.shape[0], height), x, axes=(1, 0))  # (height, w, ...)
  return np.swapaxes(np.tensordot(weights(x.shape[1], width), rows_resized, axes=(1, 1)), 0, 1)


def _textured_background(rng, size):
  """(size, size, 3) float64 in [0, 1]: a base colour, two octaves of smooth noise, a ramp."""
  base = rng.uniform(0.05, 0.95, 3)
  coarse = rng.integers(2, 6)
  fine = rng.integers(8, 17)
  texture = (bilinear_resize(rng.normal(0.0, rng.uniform(0.04, 0.12), (coarse, coarse, 3)), size, size)
             + bilinear_resize(rng.normal(0.0, rng.uniform(0.0, 0.04), (fine, fine, 3)), size, size))
  angle = rng.uniform(0, 2 * np.pi)
  y, x = (np.mgrid[:size, :size] + 0.5) / size - 0.5
  ramp = rng.uniform(0.0, 0.25) * (np.cos(angle) * x + np.sin(angle) * y)
  return np.clip(base + texture + ramp[..., None], 0.0, 1.0)


def _placed_digit(rng, digit, config):
  """One random size and position of `digit`: canvas-sized opacity (float) and mask (bool)."""
  size = config.canvas_size
  side = rng.uniform(config.min_side, config.max_side)
  aspect = np.exp(rng.uniform(-_ASPECT_JITTER, _ASPECT_JITTER))
  height = int(np.clip(round(side / np.sqrt(aspect)), 8, size))
  width = int(np.clip(round(side * np.sqrt(aspect)), 8, size))
  top = rng.integers(0, size - height + 1)
  left = rng.integers(0, size - width + 1)
  intensity = np.zeros((size, size))
  intensity[top:top + height, left:left + width] = bilinear_resize(digit / 16.0, height, width)
  alpha = np.clip((intensity - _ALPHA_LOW) / (_ALPHA_HIGH - _ALPHA_LOW), 0.0, 1.0)
  return alpha, intensity >= MASK_THRESHOLD


def _visible_enough(new_mask, masks, config):
  """Whether `new_mask` on top of `masks` leaves every digit (and itself) visible enough."""
  def enough(visible, full):
    return visible >= max(config.min_visible_pixels, config.min_visible_fraction * full)

  if not enough(new_mask.sum(), new_mask.sum()):
    return False
  covered = new_mask.copy()
  for mask in reversed(masks):  # Top to bottom: what is still visible of each.
    if not enough((mask & ~covered).sum(), mask.sum()):
      return False
    covered |= mask
  return True


def _contrasting_colour(rng, background_luminance):
  """A random RGB colour whose luminance differs from `background_luminance` by >= 0.4."""
  colour = rng.uniform(0.0, 1.0, 3)
  if background_luminance >= 0.5:
    target = rng.uniform(0.0, background_luminance - _MIN_CONTRAST)
  else:
    target = rng.uniform(background_luminance + _MIN_CONTRAST, 1.0)
  luminance = colour @ _LUMA
  # Luminance is linear: scale towards black (darker) or white (brighter) to hit the target.
  if luminance > target:
    return colour * target / luminance
  return 1 - (1 - colour) * (1 - target) / (1 - luminance)


def _tight_boxes(masks):
  """(K, 4) float32 normalised (ymin, xmin, ymax, xmax) pixel-edge boxes of (K, H, W) masks."""
  height, width = masks.shape[1:]
  boxes = np.zeros((len(masks), 4), np.float32)
  for k, mask in enumerate(masks):
    rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    boxes[k] = (rows[0] / height, columns[0] / width, (rows[-1] + 1) / height, (columns[-1] + 1) / width)
  return boxes
