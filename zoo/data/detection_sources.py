"""Real detection datasets from TFDS, seen in the `digit_canvases` layout.

The input pipeline batches fixed-size images; detection datasets have images of every size.
`DetectionSource` wraps a TFDS random-access data source: each image is resized so that its
longer side is `size` (bilinear), padded with zeros at the bottom and right to size x size
(the padded sides are multiples of 32 when `size` is, as an FPN wants), and its boxes follow
(normalised to the padded canvas). Objects that detectors do not train on are dropped: COCO's
crowd regions (`is_crowd`, as detectron2's mapper does) and VOC's `is_difficult` ones (as
py-faster-rcnn's `use_diff=False`). Which TFDS datasets carry what (TFDS 4.9):

- `coco/2017`: boxes and 80 category labels (0..79, TFDS's order = `COCO_CLASSES`); no masks.
- `coco/2017_panoptic`: COCO 2017's panoptic segmentation (the same 118k / 5k images), read
  as boxes, the same 80 labels and instance masks (`objects["mask"]`). Its 133 classes are the
  80 "thing" classes, named exactly as coco/2017's, and 53 "stuff" ones; thing segments
  become objects (labels mapped by name to coco/2017's 0..79), stuff and crowd segments are
  dropped. A segment's mask is (segment id map == its id), the id map being `panoptic_image`
  decoded as R + 256 G + 256^2 B, resized nearest-neighbour to the image's place on the canvas.
  CAUTION: panoptic segments never overlap (every pixel belongs to at most one segment),
  whereas COCO's instance annotations (`instances_*2017.json`, which TFDS does not carry) may
  overlap. The panoptic release derived its thing segments from the instance annotations with
  the overlaps resolved, so an object's mask here may lack pixels its instance mask has, and
  its box is the tight box of that segment. These masks are therefore COCO panoptic's thing
  segments, not COCO's instance masks: mask AP evaluated against them (and box AP against
  their boxes) is comparable to, but NOT, the official COCO instance-segmentation AP.
- `voc/2007`, `voc/2012`: boxes and 20 labels, difficult flags.

Besides `objects`, an example keeps `image/filename` and `image/id` when the raw one has them,
and `proposals` ((n, 4) float32 normalised (ymin, xmin, ymax, xmax), e.g. from
`zoo.data.proposal_files.ProposalSource`) resized with the image as the boxes are.

    source = zoo.data.load_data_source("coco/2017", "train")            # a DetectionSource
    source = zoo.data.load_data_source("coco/2017_panoptic", "train")   # ... with masks
"""

from typing import Sequence

import numpy as np

from zoo.data.segmentation_sources import as_rgb

DEFAULT_SIZE = 800

# dataset name (without config) -> the per-object flag of objects to drop, and the class count
DATASETS = {"coco": ("is_crowd", 80), "voc": ("is_difficult", 20)}

# COCO 2017's 80 detection classes in TFDS coco/2017's label order (the categories of
# instances_train2017.json by id; panoptic_coco_categories.json names its things the same).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
# PASCAL VOC's 20 classes in TFDS voc's label order.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor")


def detector_class_names(name: str) -> tuple[str, ...] | None:
  """Names of a detector's classes 0 (background) .. C for dataset `name` ("coco/2017"), or None."""
  names = {"coco": COCO_CLASSES, "voc": VOC_CLASSES}.get(name.partition("/")[0])
  return None if names is None else ("background",) + names


def _resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
  scale = size / max(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def resize_longer_and_pad(image: np.ndarray, size: int) -> tuple[np.ndarray, float, float]:
  """(h, w, 3) uint8 -> ((size, size, 3) uint8, h' / size, w' / size): longer side to `size`
  (bilinear, half-pixel centres), zero padding at the bottom and right."""
  height, width = image.shape[:2]
  out_h, out_w = _resized_shape(height, width, size)
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


def resize_nearest_and_pad(values: np.ndarray, size: int) -> np.ndarray:
  """(h, w) -> (size, size), same dtype: the canvas placement of `resize_longer_and_pad`
  (longer side to `size`, zeros at the bottom and right), nearest neighbour (half-pixel
  centres: output pixel i reads input floor((i + 0.5) h / h')), for label maps."""
  height, width = values.shape[:2]
  out_h, out_w = _resized_shape(height, width, size)
  rows = np.minimum(((np.arange(out_h) + 0.5) * height / out_h).astype(int), height - 1)
  cols = np.minimum(((np.arange(out_w) + 0.5) * width / out_w).astype(int), width - 1)
  canvas = np.zeros((size, size) + values.shape[2:], values.dtype)
  canvas[:out_h, :out_w] = values[rows][:, cols]
  return canvas


def panoptic_segment_ids(panoptic_image: np.ndarray) -> np.ndarray:
  """COCO panoptic PNG (h, w, 3) uint8 -> (h, w) int64 segment ids R + 256 G + 256^2 B (0 =
  unlabelled), panopticapi's rgb2id."""
  rgb = np.asarray(panoptic_image, np.int64)
  return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def panoptic_thing_labels(panoptic_names: Sequence[str]) -> np.ndarray:
  """(C,) int64: each panoptic class's coco/2017 label (index in `COCO_CLASSES`), -1 for stuff.

  Raises:
    ValueError: if a COCO class is missing from `panoptic_names` (e.g. unnamed labels).
  """
  names = list(panoptic_names)
  missing = [name for name in COCO_CLASSES if name not in names]
  if missing:
    raise ValueError(f"The panoptic class names lack {len(missing)} of COCO's 80 thing classes "
                     f"({', '.join(missing[:5])}, ...); got {names[:5]}...: is this COCO panoptic "
                     "with its category names (TFDS coco/2017_panoptic)?")
  index = {name: label for label, name in enumerate(COCO_CLASSES)}
  return np.array([index.get(name, -1) for name in names], np.int64)


def _source_panoptic_names(source) -> Sequence[str] | None:
  """The panoptic class names a TFDS data source's dataset_info holds, else None."""
  features = getattr(getattr(source, "dataset_info", None), "features", None)
  if features is None or "panoptic_objects" not in features:
    return None
  return features["panoptic_objects"]["label"].names


class DetectionSource:
  """A TFDS data source of a dataset in `DATASETS`, as size x size images with their objects.

  `source[i]` is {"image": (size, size, 3) uint8, "objects": {"bbox": (n, 4) float32
  normalised (ymin, xmin, ymax, xmax) on the padded canvas, "label": (n,) int64}, "id": i},
  plus "objects"["mask"] (n, size, size) bool for COCO panoptic examples (module doc), and
  "proposals" (m, 4) float32 (normalised on the canvas like "bbox"), "image/filename",
  "image/id" when the raw example has them.

  Args:
    source: a random-access source of TFDS examples (`len`, `[i]`).
    dataset: its dataset's name without config, a key of `DATASETS`.
    size: the canvas side, a multiple of 32.
    panoptic_names: the class names of COCO panoptic's labels, for `coco/2017_panoptic`
      examples; default the source's TFDS dataset_info (where TFDS stores the names).
  """

  def __init__(self, source, dataset: str, size: int = DEFAULT_SIZE,
               panoptic_names: Sequence[str] | None = None):
    if dataset not in DATASETS:
      raise ValueError(f"No detection mapping for dataset {dataset!r}; known: "
                       f"{', '.join(sorted(DATASETS))}.")
    if size < 32 or size % 32:
      raise ValueError(f"size must be a positive multiple of 32 (the FPN's coarsest stride), "
                       f"got {size!r}.")
    self.source, self.dataset, self.size = source, dataset, size
    self.drop_flag, self.num_classes = DATASETS[dataset]
    if panoptic_names is None:
      panoptic_names = _source_panoptic_names(source)
    self.thing_labels = None if panoptic_names is None else panoptic_thing_labels(panoptic_names)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    example = self.source[index]
    image = as_rgb(example["image"])
    canvas, fy, fx = resize_longer_and_pad(image, self.size)
    scale = np.array([fy, fx, fy, fx], np.float32)
    if "panoptic_objects" in example:
      objects = self._panoptic_objects(example, image.shape[:2], index)
    else:
      objects = self._objects(example["objects"])
    objects["bbox"] = objects["bbox"] * scale
    out = {"image": canvas, "objects": objects, "id": np.int64(index)}
    if "proposals" in example:
      out["proposals"] = np.asarray(example["proposals"], np.float32).reshape(-1, 4) * scale
    for key in ("image/filename", "image/id"):
      if key in example:
        out[key] = example[key]
    return out

  def _objects(self, objects: dict) -> dict:
    """The kept objects' boxes (normalised on the original image) and labels."""
    boxes = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
    labels = np.asarray(objects["label"], np.int64).reshape(-1)
    drop = np.asarray(objects[self.drop_flag], bool).reshape(-1)
    # Real examples have one entry per object in every field; TFDS's mock data draws each
    # field's length independently, so take the objects all fields describe.
    n = min(len(boxes), len(labels), len(drop))
    keep = ~drop[:n]
    return {"bbox": boxes[:n][keep], "label": labels[:n][keep]}

  def _panoptic_objects(self, example: dict, image_shape: tuple[int, int], index: int) -> dict:
    """The non-crowd thing segments as objects: boxes, coco/2017 labels, canvas masks."""
    if self.thing_labels is None:
      raise ValueError("A COCO panoptic example, but no panoptic class names: pass "
                       "DetectionSource(..., panoptic_names=) or a TFDS source with dataset_info.")
    objects = example["panoptic_objects"]
    boxes = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
    labels = np.asarray(objects["label"], np.int64).reshape(-1)
    crowd = np.asarray(objects["is_crowd"], bool).reshape(-1)
    ids = np.asarray(objects["id"], np.int64).reshape(-1)
    n = min(len(boxes), len(labels), len(crowd), len(ids))  # Mock data: as in _objects.
    labels = self.thing_labels[labels[:n]]
    keep = (labels >= 0) & ~crowd[:n]
    segments = panoptic_segment_ids(example["panoptic_image"])
    if segments.shape != tuple(image_shape):
      raise ValueError(f"Example {index}: panoptic_image is {segments.shape[0]}x{segments.shape[1]}"
                       f" but the image {image_shape[0]}x{image_shape[1]}.")
    # Resizing the id map once and comparing equals resizing each segment's mask (nearest).
    segments = resize_nearest_and_pad(segments, self.size)
    masks = segments[None] == ids[:n][keep][:, None, None]
    return {"bbox": boxes[:n][keep], "label": labels[keep], "mask": masks}
