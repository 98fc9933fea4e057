"""Real semantic-segmentation datasets from TFDS, seen in the `digit_canvases` layout.

The input pipeline (`zoo.data.pipeline`) batches fixed-size `image` (H, W, 3) uint8 and
`segmentation` (H, W) class ids; real datasets have images of every size and their own label
encodings. `SegmentationSource` wraps a TFDS random-access data source: each example is
resized so that its shorter side is `size` (image bilinear, mask nearest), centre-cropped to
size x size, and its mask mapped to class ids with IGNORE_LABEL (255) for pixels that count
for nothing. Which TFDS datasets carry segmentation masks (TFDS 4.9):

- `oxford_iiit_pet`: `segmentation_mask`, the trimap 1 = pet, 2 = background, 3 = border
  ("not classified"): classes 0 background, 1 pet, border ignored (2 classes).
- `cityscapes/semantic_segmentation` (manual download): `segmentation_label`, Cityscapes'
  labelIds, mapped to the 19 evaluation trainIds (cityscapesScripts' labels.py), others ignored.
- PASCAL VOC 2012 segmentation is NOT in TFDS: its `voc/2012` carries boxes and image labels
  only (no `SegmentationClass` masks), and SBD is not in the catalogue. Cityscapes is the closest
  real benchmark TFDS prepares with masks; VOC needs a builder of its own (future work).

    source = zoo.data.load_data_source("oxford_iiit_pet", "train")   # a SegmentationSource
"""

import numpy as np

from zoo.data.labels import IGNORE_LABEL

DEFAULT_SIZE = 256

# Cityscapes labelId -> trainId for the 19 evaluated classes (road .. bicycle).
_CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                         23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _lookup(table: dict[int, int]) -> np.ndarray:
  lut = np.full(256, IGNORE_LABEL, np.uint8)
  for source, target in table.items():
    lut[source] = target
  return lut


# dataset name (without config) -> (mask feature, 256-entry lookup table from stored value to class id)
DATASETS = {
    "oxford_iiit_pet": ("segmentation_mask", _lookup({1: 1, 2: 0})),
    "cityscapes": ("segmentation_label", _lookup(_CITYSCAPES_TRAIN_IDS)),
}
NUM_CLASSES = {"oxford_iiit_pet": 2, "cityscapes": 19}


def as_rgb(image) -> np.ndarray:
  """(h, w, 3) from an (h, w), (h, w, 1) or (h, w, >= 3) image (grey repeated, alpha dropped)."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image[..., :3]


def _resize_shorter_and_crop(array: np.ndarray, size: int, nearest: bool) -> np.ndarray:
  """(h, w, C) -> (size, size, C): shorter side to `size` (half-pixel centres, clamped), then
  the centre crop. Bilinear, or nearest (for masks)."""
  height, width = array.shape[:2]
  scale = size / min(height, width)
  out_h, out_w = max(size, round(height * scale)), max(size, round(width * scale))
  top, left = (out_h - size) // 2, (out_w - size) // 2

  def coordinates(n_in, n_out, offset):
    return (np.arange(offset, offset + size) + 0.5) * n_in / n_out - 0.5

  rows, cols = coordinates(height, out_h, top), coordinates(width, out_w, left)
  if nearest:
    r = np.clip(np.floor(rows + 0.5).astype(int), 0, height - 1)
    c = np.clip(np.floor(cols + 0.5).astype(int), 0, width - 1)
    return array[r][:, c]
  array = array.astype(np.float32)
  r0 = np.clip(np.floor(rows).astype(int), 0, height - 1)
  c0 = np.clip(np.floor(cols).astype(int), 0, width - 1)
  r1, c1 = np.minimum(r0 + 1, height - 1), np.minimum(c0 + 1, width - 1)
  fr = np.clip(rows - r0, 0, 1)[:, None, None]
  fc = np.clip(cols - c0, 0, 1)[None, :, None]
  top_row = array[r0][:, c0] * (1 - fc) + array[r0][:, c1] * fc
  bottom_row = array[r1][:, c0] * (1 - fc) + array[r1][:, c1] * fc
  return np.clip(np.round(top_row * (1 - fr) + bottom_row * fr), 0, 255).astype(np.uint8)


class SegmentationSource:
  """A TFDS data source of a dataset in `DATASETS`, as size x size (image, segmentation) examples.

  `source[i]` is {"image": (size, size, 3) uint8, "segmentation": (size, size) uint8 class ids
  with IGNORE_LABEL where unlabelled, "id": i}. Random access, so grain shuffles and resumes
  it like any data source.
  """

  def __init__(self, source, dataset: str, size: int = DEFAULT_SIZE):
    if dataset not in DATASETS:
      raise ValueError(f"No segmentation mapping for dataset {dataset!r}; known: "
                       f"{', '.join(sorted(DATASETS))}.")
    if size < 1:
      raise ValueError(f"size must be a positive number of pixels, got {size!r}.")
    self.source, self.dataset, self.size = source, dataset, size
    self.mask_feature, self.lookup = DATASETS[dataset]

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    example = self.source[index]
    image = as_rgb(example["image"])
    mask = np.asarray(example[self.mask_feature])
    mask = mask.reshape(mask.shape[:2] + (-1,))[..., :1]
    return {"image": _resize_shorter_and_crop(image, self.size, nearest=False),
            "segmentation": self.lookup[_resize_shorter_and_crop(mask, self.size, nearest=True)[..., 0]],
            "id": np.int64(index)}
