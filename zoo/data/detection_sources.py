"""Real detection datasets from TFDS, seen in the `digit_canvases` layout.

The input pipeline batches fixed-size images; detection datasets have images of every size.
`DetectionSource` wraps a TFDS random-access data source: each image is resized so that its
longer side is `size` (bilinear), padded with zeros at the bottom and right to size x size
(the padded sides are multiples of 32 when `size` is, as an FPN wants), and its boxes follow
(normalised to the padded canvas). Objects that detectors do not train on are dropped: COCO's
crowd regions (`is_crowd`, as detectron2's mapper does) and VOC's `is_difficult` ones (as
py-faster-rcnn's `use_diff=False`). Which TFDS datasets carry what (TFDS 4.9):

- `coco/2017`: boxes and 80 category labels (0..79 in TFDS's order); NO instance masks (TFDS
  has no COCO instance segmentation: Mask R-CNN on COCO needs a builder of its own).
- `voc/2007`, `voc/2012`: boxes and 20 labels, difficult flags.

    source = zoo.data.load_data_source("coco/2017", "train")   # a DetectionSource
"""

import numpy as np

from zoo.data.segmentation_sources import as_rgb

DEFAULT_SIZE = 800

# dataset name (without config) -> the per-object flag of objects to drop, and the class count
DATASETS = {"coco": ("is_crowd", 80), "voc": ("is_difficult", 20)}


def resize_longer_and_pad(image: np.ndarray, size: int) -> tuple[np.ndarray, float, float]:
  """(h, w, 3) uint8 -> ((size, size, 3) uint8, h' / size, w' / size): longer side to `size`
  (bilinear, half-pixel centres), zero padding at the bottom and right."""
  height, width = image.shape[:2]
  scale = size / max(height, width)
  out_h, out_w = max(1, round(height * scale)), max(1, round(width * scale))
  rows = np.clip((np.arange(out_h) + 0.5) * height / out_h - 0.5, 0, height - 1)
  cols = np.clip((np.arange(out_w) + 0.5) * width / out_w - 0.5, 0, width - 1)
  r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
  r1, c1 = np.minimum(r0 + 1, height - 1), np.minimum(c0 + 1, width - 1)
  fr, fc = (rows - r0)[:, None, None], (cols - c0)[None, :, None]
  x = image.astype(np.float32)
  top = x[r0][:, c0] * (1 - fc) + x[r0][:, c1] * fc
  bottom = x[r1][:, c0] * (1 - fc) + x[r1][:, c1] * fc
  canvas = np.zeros((size, size, image.shape[2]), np.uint8)
  canvas[:out_h, :out_w] = np.clip(np.round(top * (1 - fr) + bottom * fr), 0, 255)
  return canvas, out_h / size, out_w / size


class DetectionSource:
  """A TFDS data source of a dataset in `DATASETS`, as size x size images with their objects.

  `source[i]` is {"image": (size, size, 3) uint8, "objects": {"bbox": (n, 4) float32
  normalised (ymin, xmin, ymax, xmax) on the padded canvas, "label": (n,) int64}, "id": i}.
  """

  def __init__(self, source, dataset: str, size: int = DEFAULT_SIZE):
    if dataset not in DATASETS:
      raise ValueError(f"No detection mapping for dataset {dataset!r}; known: "
                       f"{', '.join(sorted(DATASETS))}.")
    if size < 32 or size % 32:
      raise ValueError(f"size must be a positive multiple of 32 (the FPN's coarsest stride), "
                       f"got {size!r}.")
    self.source, self.dataset, self.size = source, dataset, size
    self.drop_flag, self.num_classes = DATASETS[dataset]

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    example = self.source[index]
    canvas, fy, fx = resize_longer_and_pad(as_rgb(example["image"]), self.size)
    objects = example["objects"]
    boxes = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
    labels = np.asarray(objects["label"], np.int64).reshape(-1)
    drop = np.asarray(objects[self.drop_flag], bool).reshape(-1)
    # Real examples have one entry per object in every field; TFDS's mock data draws each
    # field's length independently, so take the objects all fields describe.
    n = min(len(boxes), len(labels), len(drop))
    keep = ~drop[:n]
    boxes = boxes[:n][keep] * np.array([fy, fx, fy, fx], np.float32)
    labels = labels[:n][keep]
    return {"image": canvas, "objects": {"bbox": boxes, "label": labels}, "id": np.int64(index)}
