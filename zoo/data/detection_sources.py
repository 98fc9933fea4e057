"""Real detection datasets from TFDS, seen in the `digit_canvases` layout.

The input pipeline batches fixed-size images; detection datasets have images of every size.
`DetectionSource` wraps a TFDS random-access data source: each image is resized so that its
longer side is `size` (bilinear), padded with zeros at the bottom and right to size x size
(the padded sides are multiples of 32 when `size` is, as an FPN wants), and its boxes follow
(normalised to the padded canvas). Objects that detectors do not train on, COCO's crowd
regions (`is_crowd`: detectron2's mapper drops them) and VOC's `is_difficult` ones (as
py-faster-rcnn's `use_diff=False`), are not in `objects` but in `ignored_objects`: the
benchmarks' evaluations ignore them (COCOeval's iscrowd regions, the VOC devkit's difficult
objects; `zoo.detection.task`). Each example says how it was resized (`image/scale`) and the
objects keep their annotated areas in original-image pixels (`area`: COCO's small / medium /
large ranges are defined on them, not on the resized boxes).

VOC's boxes are 1-based pixel indices that include both ends (the devkit's xmin..xmax, which
TFDS divides by the image size unchanged); they become pixel-edge boxes here, (xmin - 1,
ymin - 1, xmax, ymax), as detectron2's VOC loader makes them, so that a box's width is the
devkit's xmax - xmin + 1 and IoUs on the canvas are the devkit's. Which TFDS datasets carry
what (TFDS 4.9):

- `coco/2017`: boxes and 80 category labels (0..79, TFDS's order = `COCO_CLASSES`), areas; no
  masks. TFDS stores `area` as int64 (the annotation files' are floats, so an area within 1 of
  32^2 or 96^2 may fall on the other side of a range boundary than in COCOeval).
- `coco/2017_panoptic`: COCO 2017's panoptic segmentation (the same 118k / 5k images), read
  as boxes, the same 80 labels and instance masks (`objects["mask"]`). Its 133 classes are the
  80 "thing" classes, named exactly as coco/2017's, and 53 "stuff" ones; thing segments
  become objects (labels mapped by name to coco/2017's 0..79), crowd thing segments ignored
  objects, stuff segments are dropped. A segment's mask is (segment id map == its id), the id
  map being `panoptic_image` decoded as R + 256 G + 256^2 B, resized nearest-neighbour to the
  image's place on the canvas.
  CAUTION: panoptic segments never overlap (every pixel belongs to at most one segment),
  whereas COCO's instance annotations (`instances_*2017.json`, which TFDS does not carry) may
  overlap. The panoptic release derived its thing segments from the instance annotations with
  the overlaps resolved, so an object's mask here may lack pixels its instance mask has, and
  its box is the tight box of that segment. These masks are therefore COCO panoptic's thing
  segments, not COCO's instance masks: mask AP evaluated against them (and box AP against
  their boxes) is comparable to, but NOT, the official COCO instance-segmentation AP.
- `voc/2007`, `voc/2012`: boxes and 20 labels, difficult flags; no areas.

Besides `objects`, `ignored_objects` and `image/scale`, an example keeps `image/filename` and
`image/id` when the raw one has them, and `proposals` ((n, 4) float32 normalised (ymin, xmin,
ymax, xmax), e.g. from `zoo.data.proposal_files.ProposalSource`) resized with the image as the
boxes are.

    source = zoo.data.load_data_source("coco/2017", "train")            # a DetectionSource
    source = zoo.data.load_data_source("coco/2017_panoptic", "train")   # ... with masks
"""

from typing import Sequence

import numpy as np

from zoo.data.segmentation_sources import as_rgb

DEFAULT_SIZE = 800

# dataset name (without config) -> the per-object flag of the objects evaluation ignores, and
# the class count
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
  normalised (ymin, xmin, ymax, xmax) on the padded canvas, "label": (n,) int64},
  "ignored_objects": the same for the crowd (COCO) or difficult (VOC) objects, "image/scale":
  (2,) float32 canvas pixels per original-image pixel along (y, x), "id": i}, plus
  "objects"["area"] (n,) float32 annotated areas in original-image pixels when the raw
  example has them (COCO), ["mask"] (n, size, size) bool in both object sets for COCO
  panoptic examples (module doc), and "proposals" (m, 4) float32 (normalised on the canvas
  like "bbox"), "image/filename", "image/id" when the raw example has them.

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
    self.ignore_flag, self.num_classes = DATASETS[dataset]
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
      objects, ignored = self._panoptic_objects(example, image.shape[:2], index)
    else:
      objects, ignored = self._objects(example["objects"], image.shape[:2])
    objects["bbox"] = objects["bbox"] * scale
    ignored["bbox"] = ignored["bbox"] * scale
    # Canvas pixels per original pixel: the normalised scale times size / original side.
    pixels = np.array([fy * self.size / image.shape[0], fx * self.size / image.shape[1]],
                      np.float32)
    out = {"image": canvas, "objects": objects, "ignored_objects": ignored,
           "image/scale": pixels, "id": np.int64(index)}
    if "proposals" in example:
      out["proposals"] = np.asarray(example["proposals"], np.float32).reshape(-1, 4) * scale
    for key in ("image/filename", "image/id"):
      if key in example:
        out[key] = example[key]
    return out

  def _objects(self, objects: dict, image_shape: tuple[int, int]) -> tuple[dict, dict]:
    """The objects and the ignored objects: boxes (normalised on the original image), labels,
    and the objects' areas where the dataset has them."""
    boxes = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
    labels = np.asarray(objects["label"], np.int64).reshape(-1)
    ignore = np.asarray(objects[self.ignore_flag], bool).reshape(-1)
    fields = {"bbox": boxes, "label": labels}
    if "area" in objects:
      fields["area"] = np.asarray(objects["area"], np.float32).reshape(-1)
    # Real examples have one entry per object in every field; TFDS's mock data draws each
    # field's length independently, so take the objects all fields describe.
    n = min(len(ignore), *(len(v) for v in fields.values()))
    fields, ignore = {k: v[:n] for k, v in fields.items()}, ignore[:n]
    if self.dataset == "voc":  # 1-based, both ends included -> pixel edges (module doc)
      height, width = image_shape
      corner = np.maximum(fields["bbox"][:, :2] - np.array([1 / height, 1 / width], np.float32), 0)
      fields["bbox"] = np.concatenate([corner, fields["bbox"][:, 2:]], 1)
    ignored = {"bbox": fields["bbox"][ignore], "label": fields["label"][ignore]}
    return {k: v[~ignore] for k, v in fields.items()}, ignored

  def _panoptic_objects(self, example: dict, image_shape: tuple[int, int],
                        index: int) -> tuple[dict, dict]:
    """The thing segments as objects (non-crowd, with their areas) and ignored objects
    (crowd): boxes, coco/2017 labels, canvas masks."""
    if self.thing_labels is None:
      raise ValueError("A COCO panoptic example, but no panoptic class names: pass "
                       "DetectionSource(..., panoptic_names=) or a TFDS source with dataset_info.")
    objects = example["panoptic_objects"]
    boxes = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
    labels = np.asarray(objects["label"], np.int64).reshape(-1)
    crowd = np.asarray(objects["is_crowd"], bool).reshape(-1)
    ids = np.asarray(objects["id"], np.int64).reshape(-1)
    areas = np.asarray(objects.get("area", np.zeros(len(ids))), np.float32).reshape(-1)
    n = min(len(boxes), len(labels), len(crowd), len(ids), len(areas))  # Mock data: as in _objects.
    labels = self.thing_labels[labels[:n]]
    segments = panoptic_segment_ids(example["panoptic_image"])
    if segments.shape != tuple(image_shape):
      raise ValueError(f"Example {index}: panoptic_image is {segments.shape[0]}x{segments.shape[1]}"
                       f" but the image {image_shape[0]}x{image_shape[1]}.")
    # Resizing the id map once and comparing equals resizing each segment's mask (nearest).
    segments = resize_nearest_and_pad(segments, self.size)

    def select(keep):
      return {"bbox": boxes[:n][keep], "label": labels[keep],
              "mask": segments[None] == ids[:n][keep][:, None, None]}

    things, ignored = select((labels >= 0) & ~crowd[:n]), select((labels >= 0) & crowd[:n])
    if "area" in objects:
      things["area"] = areas[:n][(labels >= 0) & ~crowd[:n]]
    return things, ignored
