"""The batch features, each described once: how it is read from a source example, padded,
batched, and moved by each geometric augmentation.

`FEATURES[name]` is a `Feature`. `zoo.data.pipeline` reads, pads and batches the features a
task asks for by looping over their specs, and `zoo.data.augment` moves them by calling
their `geometry`; neither names a feature. Registering a new feature is one call, here or
in the module that needs it:

    features.register(features.Feature(   # KITTI's sparse flow: where it was measured
        name="flow_valid", dtype=np.bool_, shape=lambda layout: layout.canvas_shape,
        read=lambda example, layout: np.asarray(example["flow_valid"], bool),
        source=("flow_valid",), padding=False, geometry=features.PixelMap(fill=False)))

after which `pipeline.train_batches(..., features=("flow", "flow_valid"), augment=(...))`
reads, pads, batches, translates, flips and zooms it. A sequence is three features
(`sequence`). A new geometric augmentation adds one method to `Geometry` and to each of its
subclasses.

Conventions: x right, y down; boxes (x1, y1, x2, y2) in pixel-edge coordinates (a box over
pixel columns 3..7 has x1 = 3, x2 = 8). Shapes of one example (a batch adds B in front), with
H, W the source's canvas and M, P, T the `Layout`'s max_objects, max_proposals, max_length:

  image:           (H, W, 3) float32 in [0, 1], from uint8 `image`.
  segmentation:    (H, W) int32 class ids (digit canvases: 0 background, digit d -> d + 1);
                   IGNORE_LABEL (255) on eval padding.
  boxes:           (M, 4) float32 (x1, y1, x2, y2) pixels, from `objects/bbox` normalised
                   (ymin, xmin, ymax, xmax); 0 where not valid.
  labels:          (M,) int32 class 0..C-1 from `objects/label`; -1 where not valid.
  instance_masks:  (M, H, W) bool, each object's visible pixels (`objects/mask`); False where
                   not valid.
  objects_valid:   (M,) bool; added whenever boxes, labels or instance_masks are asked for.
  proposals:       (P, 4) float32 (x1, y1, x2, y2) pixels, the first P of the example's
                   `proposals` (normalised (ymin, xmin, ymax, xmax), listed best first: a source
                   made with `load_data_source(..., proposals=FILE)`); 0 where not valid.
  proposals_valid: (P,) bool; added whenever proposals are asked for.
  id:              () int32, the example's index in its split; -1 on eval padding.
  image2:          (H, W, 3) float32 in [0, 1]: the second image of a pair (optical flow's
                   frame t + 1). Augmentations move both images alike, which is right for
                   flow; a flipped stereo pair would also have to swap its images (not done).
  flow:            (H, W, 2) float32 (u, v) pixels, image -> image2; a flip negates u.
  depth:           (H, W) float32, the source's depth units (metres); 0 = no measurement.
  disparity:       (H, W) float32 pixels; 0 = no measurement.
  normals:         (H, W, 3) float32 unit surface normals (x right, y down, z away from the
                   camera), 0 = unknown; a flip negates x.
  frames:          (T, H, W, 3) float32 in [0, 1], from uint8 `frames` (t, H, W, 3), t <= T;
                   the frames after t are padding (zero, until photometric changes them too).
  frames_lengths:  () int32, t (0 on eval padding).
  frames_mask:     (T,) bool, True on the t real frames.

and for evaluating detections as the benchmarks do (`zoo.detection.task`), from a detection
source's `ignored_objects` and `image/scale` (zoo.data.detection_sources; a source without
them, such as the digit canvases, has no ignored objects and scale 1):

  ignored_boxes:   (M, 4) float32 (x1, y1, x2, y2) pixels of the objects evaluation ignores
                   (COCO's crowd regions, VOC's difficult objects); 0 where not valid.
  ignored_labels:  (M,) int32 their classes; -1 where not valid.
  ignored_masks:   (M, H, W) bool their masks (COCO panoptic's crowd segments); False where
                   not valid.
  ignored_valid:   (M,) bool; added whenever ignored_boxes, _labels or _masks are asked for.
  areas:           (M,) float32 the objects' annotated areas in original-image pixels (COCO's
                   `area`, which its small / medium / large ranges read); -1 where the source
                   has none.
  image_scale:     (2,) float32 canvas pixels per original-image pixel along (y, x).
  Augmentations leave areas and image_scale as they are (evaluation data is not augmented).

Pixels a translation or zoom uncovers: images the mean colour of their border (per frame),
label maps the background class 0, masks False, flow / depth / disparity / normals 0
(unknown). A zoom by s resamples images, image2, frames and flow bilinearly and the rest by
nearest neighbour (label maps, masks, sparse depth and disparity, unit normals), and
multiplies flow and disparity (lengths in pixels) by s; depth and normals keep their values
(a zoom stands for a longer focal length: the scene's distances and orientations stay).
"""

import dataclasses
from typing import Any, Callable, ClassVar

import numpy as np

from zoo.data.labels import IGNORE_LABEL

# `PixelMap.fill` for images: the mean colour of the map's border pixels (background-like).
BORDER_MEAN = "border_mean"


@dataclasses.dataclass(frozen=True)
class Layout:
  """The sizes that fix a batch's shapes (module doc)."""
  canvas_shape: tuple[int, int]   # (H, W) pixels
  max_objects: int = 8            # M
  max_proposals: int = 2000       # P
  max_length: int = 16            # T


@dataclasses.dataclass(frozen=True)
class Geometry:
  """How a feature moves with the canvas. This base: it does not (labels, ids, lengths)."""

  # Whether its moves need the canvas size (read from a PixelMap feature of the example).
  needs_canvas: ClassVar[bool] = False

  def translated(self, x: np.ndarray, dy: int, dx: int,
                 canvas_shape: tuple[int, int]) -> np.ndarray:
    """`x` after the canvas content moved down dy and right dx pixels (pad, crop to size)."""
    return x

  def flipped(self, x: np.ndarray, canvas_shape: tuple[int, int]) -> np.ndarray:
    """`x` after a left-right mirror of the canvas (pixel column c -> W - 1 - c)."""
    return x

  def scaled(self, x: np.ndarray, scale: float, offset: tuple[int, int],
             canvas_shape: tuple[int, int]) -> np.ndarray:
    """`x` after the canvas was zoomed by `scale` and the H x W window at `offset` (oy, ox)
    pixels of the zoomed canvas kept: a canvas point (y, x) goes to (y, x) * scale - offset
    (pixel-edge coordinates; negative offsets pad)."""
    return x

  def revalidated(self, x: np.ndarray, moved: dict) -> np.ndarray:
    """`x` once a move that can push things off the canvas has moved `moved` (all features)."""
    return x

  def on_canvas(self, x: np.ndarray) -> np.ndarray | None:
    """(slots,) bool: which of `x`'s slots still show something; None if it cannot tell."""
    return None

  def canvas_shape(self, x: np.ndarray) -> tuple[int, int] | None:
    """(H, W) of the canvas `x` covers, or None if it does not say."""
    return None


@dataclasses.dataclass(frozen=True)
class PixelMap(Geometry):
  """A per-pixel map (image, label map, masks, flow, depth, normals, frames).

  Attributes:
    axes: its (y, x) axes: (0, 1) for (H, W, ...), (1, 2) for (M, H, W) or (T, H, W, C).
    fill: the value of pixels a translation uncovers, or BORDER_MEAN (per channel, and per
      slot or frame, the mean of the map's border pixels).
    negated_on_flip: channels (last axis) whose sign a left-right flip reverses: flow's u,
      a normal's x.
    interpolation: how a zoom resamples it: "nearest" (labels, masks, sparse measurements
      where 0 means none, unit vectors) or "bilinear" (images, dense flow); pixel centres
      at half-integers, edges replicated.
    in_pixels: whether its values are lengths on the canvas (flow, disparity): a zoom by s
      multiplies them by s.
  """
  axes: tuple[int, int] = (0, 1)
  fill: Any = 0
  negated_on_flip: tuple[int, ...] = ()
  interpolation: str = "nearest"
  in_pixels: bool = False

  def __post_init__(self):
    if self.interpolation not in ("nearest", "bilinear"):
      raise ValueError(f"PixelMap interpolation must be 'nearest' or 'bilinear', got "
                       f"{self.interpolation!r}.")

  def translated(self, x, dy, dx, canvas_shape):
    fill = _border_mean(x, self.axes) if self.fill == BORDER_MEAN else self.fill
    return _translated(x, dy, dx, fill, axes=self.axes)

  def flipped(self, x, canvas_shape):
    x = np.flip(x, self.axes[1])
    if self.negated_on_flip:
      x = x.copy()
      x[..., list(self.negated_on_flip)] *= -1
    return x

  def scaled(self, x, scale, offset, canvas_shape):
    fill = _border_mean(x, self.axes) if self.fill == BORDER_MEAN else self.fill
    inside = True
    for axis, shift in zip(self.axes, offset):
      size = x.shape[axis]
      # Output pixel i's centre i + 0.5 comes from canvas point (i + 0.5 + shift) / scale.
      source = (np.arange(size) + 0.5 + shift) / scale - 0.5
      x = _resampled(x, np.clip(source, 0, size - 1), axis, self.interpolation)
      inside = inside & np.expand_dims((source >= -0.5) & (source <= size - 0.5),
                                       [a for a in range(x.ndim) if a != axis])
    if self.in_pixels:
      x = x * np.asarray(scale, x.dtype)
    return np.where(inside, x, np.asarray(fill, x.dtype))

  def on_canvas(self, x):
    return x.any(axis=self.axes)

  def canvas_shape(self, x):
    return tuple(x.shape[a] for a in self.axes)


@dataclasses.dataclass(frozen=True)
class Boxes(Geometry):
  """(..., 4) float32 (x1, y1, x2, y2) pixels: moved with the pixels, clipped to the canvas
  (so a box cut by the border may be looser than its mask)."""

  needs_canvas: ClassVar[bool] = True

  def translated(self, x, dy, dx, canvas_shape):
    height, width = canvas_shape
    x = x + np.array([dx, dy, dx, dy], np.float32)
    return np.clip(x, 0, np.array([width, height, width, height], np.float32)).astype(np.float32)

  def flipped(self, x, canvas_shape):
    width = canvas_shape[1]
    return np.stack([width - x[..., 2], x[..., 1], width - x[..., 0], x[..., 3]],
                    -1).astype(np.float32)

  def scaled(self, x, scale, offset, canvas_shape):
    height, width = canvas_shape
    oy, ox = offset
    x = x * np.float32(scale) - np.array([ox, oy, ox, oy], np.float32)
    return np.clip(x, 0, np.array([width, height, width, height], np.float32)).astype(np.float32)

  def on_canvas(self, x):
    return (x[..., 2] > x[..., 0]) & (x[..., 3] > x[..., 1])


@dataclasses.dataclass(frozen=True)
class Validity(Geometry):
  """A (slots,) bool mask. After a move that can push things off the canvas (a translation,
  a zoom), a slot stays valid only if the first of `evidence` present still shows it (`on_canvas`:
  an object with an empty mask, or a box of zero area when masks are not present)."""
  evidence: tuple[str, ...] = ()

  def revalidated(self, x, moved):
    for name in self.evidence:
      if name in moved:
        return x & feature(name).geometry.on_canvas(moved[name])
    return x


@dataclasses.dataclass(frozen=True)
class Feature:
  """One batch feature (module doc).

  Attributes:
    name: its batch key.
    dtype: its batched dtype.
    shape: layout -> its padded shape, one example.
    read: (source example, layout) -> its array. A feature with slots (objects, proposals,
      frames) may return fewer along axis 0 than `shape`; the pipeline pads them with
      `padding`. Raises ValueError for data the layout cannot hold, naming the config field.
    source: the path of the example entry it reads (("objects", "bbox")); an example without
      it is a clear error.
    padding: the value of padded slots and of the rows padding an eval batch.
    geometry: how geometric augmentations move it.
    photometric: whether the photometric augmentation changes it ((..., H, W, 3) colours).
    companions: features always returned with it (its slots' validity, lengths, mask).
    decode_lazily: a TFDS source leaves `source` undecoded unless a requested feature reads
      it (zlib-compressed images and masks cost more to decode than the rest).
    absent: what to tell the user when an example lacks `source`.
  """
  name: str
  dtype: type
  shape: Callable[[Layout], tuple[int, ...]]
  read: Callable[[dict, Layout], np.ndarray]
  source: tuple[str, ...]
  padding: Any = 0
  geometry: Geometry = Geometry()
  photometric: bool = False
  companions: tuple[str, ...] = ()
  decode_lazily: bool = False
  absent: str = ""


FEATURES: dict[str, Feature] = {}


def register(*features: Feature) -> None:
  """Adds `features` to `FEATURES`: the pipeline and the augmentations then handle them.

  Raises:
    ValueError: for a name registered already.
  """
  for spec in features:
    if spec.name in FEATURES:
      raise ValueError(f"A feature named {spec.name!r} is registered already; choose another "
                       "name.")
    FEATURES[spec.name] = spec


def feature(name: str) -> Feature:
  """`FEATURES[name]`, or a ValueError listing the registered names."""
  if name not in FEATURES:
    raise ValueError(f"No feature {name!r}; registered features: {', '.join(FEATURES)} "
                     "(add one with zoo.data.features.register).")
  return FEATURES[name]


def sequence(name: str, *, dtype: type, item_shape: Callable[[Layout], tuple[int, ...]],
             read: Callable[[np.ndarray], np.ndarray], source: tuple[str, ...] | None = None,
             padding: Any = 0, geometry: Geometry = Geometry(), photometric: bool = False,
             decode_lazily: bool = False) -> tuple[Feature, Feature, Feature]:
  """A sequence: `name` (T, *item_shape) from the example's (t, ...) `source` (default
  (name,)), t <= T = layout.max_length, padded with `padding`; `<name>_lengths` () int32 t;
  `<name>_mask` (T,) bool. `read` converts the (t, ...) entry; `geometry` sees (T, ...)
  arrays (a PixelMap's axes are (1, 2)). Register all three: `register(*sequence(...))`."""
  source = source or (name,)

  def length(example, layout):
    t = len(_entry(example, source))
    if t > layout.max_length:
      raise ValueError(f"Example {_example_id(example)} has a {name} sequence of length {t}, "
                       f"more than max_length={layout.max_length}; raise it "
                       f"(--config.data.max_length={t} or more).")
    return t

  def items(example, layout):
    length(example, layout)
    return read(_entry(example, source))

  lengths, mask = f"{name}_lengths", f"{name}_mask"
  return (
      Feature(name, dtype, lambda layout: (layout.max_length, *item_shape(layout)), items,
              source, padding=padding, geometry=geometry, photometric=photometric,
              companions=(lengths, mask), decode_lazily=decode_lazily),
      Feature(lengths, np.int32, lambda layout: (),
              lambda example, layout: np.int32(length(example, layout)), source),
      Feature(mask, np.bool_, lambda layout: (layout.max_length,),
              lambda example, layout: np.arange(layout.max_length) < length(example, layout),
              source, padding=False))


def has_source(example: dict, spec: Feature) -> bool:
  """Whether `example` holds the entry `spec` reads."""
  entry = example
  for key in spec.source:
    if not (isinstance(entry, dict) and key in entry):
      return False
    entry = entry[key]
  return True


def _entry(example: dict, path: tuple[str, ...]):
  for key in path:
    example = example[key]
  return example


def _example_id(example: dict):
  return example.get("id", "?")


def _image(key: str):
  def read(example, layout):
    return np.asarray(example[key], np.float32) / 255.0
  return read


def _map(key: str):
  def read(example, layout):
    return np.asarray(example[key], np.float32)
  return read


def _num_objects(example: dict, layout: Layout) -> int:
  num = len(example["objects"]["label"])
  if num > layout.max_objects:
    raise ValueError(f"Example {_example_id(example)} has {num} objects, more than max_objects="
                     f"{layout.max_objects}; raise it (--config.data.max_objects={num} or more).")
  return num


def _boxes(example, layout):
  objects, num = example["objects"], _num_objects(example, layout)
  height, width = layout.canvas_shape
  ymin, xmin, ymax, xmax = np.asarray(objects["bbox"][:num], np.float32).reshape(num, 4).T
  if np.any(xmax < xmin) or np.any(ymax < ymin):
    raise ValueError(f"Example {_example_id(example)} has a box with x2 < x1 or y2 < y1 "
                     f"(normalised ymin, xmin, ymax, xmax: {objects['bbox']}); fix the data.")
  return np.stack([xmin * width, ymin * height, xmax * width, ymax * height], -1)


def _labels(example, layout):
  num = _num_objects(example, layout)
  return np.asarray(example["objects"]["label"][:num], np.int32).reshape(num)


def _instance_masks(example, layout):
  num = _num_objects(example, layout)
  return np.asarray(example["objects"]["mask"][:num], bool).reshape(num, *layout.canvas_shape)


def _objects_valid(example, layout):
  return np.arange(layout.max_objects) < _num_objects(example, layout)


def _all_proposals(example):
  return np.asarray(example["proposals"], np.float32).reshape(-1, 4)


def _proposals(example, layout):
  height, width = layout.canvas_shape
  found = _all_proposals(example)[:layout.max_proposals]
  return found[:, [1, 0, 3, 2]] * np.array([width, height, width, height], np.float32)


def _proposals_valid(example, layout):
  return np.arange(layout.max_proposals) < len(_all_proposals(example))


def _canvas(*channels: int):
  return lambda layout: (*layout.canvas_shape, *channels)


_OBJECTS = ("objects_valid",)
_NO_PROPOSALS = ("load the source with a proposal file (--config.data.proposals=FILE, "
                 "zoo.data.proposal_files)")
_IMAGE = PixelMap(fill=BORDER_MEAN, interpolation="bilinear")

register(
    Feature("image", np.float32, _canvas(3), _image("image"), ("image",), geometry=_IMAGE,
            photometric=True, decode_lazily=True),
    Feature("segmentation", np.int32, _canvas(),
            lambda example, layout: np.asarray(example["segmentation"], np.int32),
            ("segmentation",), padding=IGNORE_LABEL, geometry=PixelMap(fill=0),
            decode_lazily=True),
    Feature("boxes", np.float32, lambda layout: (layout.max_objects, 4), _boxes,
            ("objects", "bbox"), geometry=Boxes(), companions=_OBJECTS),
    Feature("labels", np.int32, lambda layout: (layout.max_objects,), _labels,
            ("objects", "label"), padding=-1, companions=_OBJECTS),
    Feature("instance_masks", np.bool_, lambda layout: (layout.max_objects, *layout.canvas_shape),
            _instance_masks, ("objects", "mask"), padding=False,
            geometry=PixelMap(axes=(1, 2), fill=False), companions=_OBJECTS,
            decode_lazily=True),
    Feature("objects_valid", np.bool_, lambda layout: (layout.max_objects,), _objects_valid,
            ("objects", "label"), padding=False,
            geometry=Validity(evidence=("instance_masks", "boxes"))),
    Feature("proposals", np.float32, lambda layout: (layout.max_proposals, 4), _proposals,
            ("proposals",), geometry=Boxes(), companions=("proposals_valid",),
            absent=_NO_PROPOSALS),
    Feature("proposals_valid", np.bool_, lambda layout: (layout.max_proposals,),
            _proposals_valid, ("proposals",), padding=False,
            geometry=Validity(evidence=("proposals",)), absent=_NO_PROPOSALS),
    Feature("id", np.int32, lambda layout: (), lambda example, layout: np.int32(example["id"]),
            ("id",), padding=-1),
    Feature("image2", np.float32, _canvas(3), _image("image2"), ("image2",), geometry=_IMAGE,
            photometric=True, decode_lazily=True),
    Feature("flow", np.float32, _canvas(2), _map("flow"), ("flow",),
            geometry=PixelMap(fill=0, negated_on_flip=(0,), interpolation="bilinear",
                              in_pixels=True), decode_lazily=True),
    Feature("depth", np.float32, _canvas(), _map("depth"), ("depth",),
            geometry=PixelMap(fill=0), decode_lazily=True),
    Feature("disparity", np.float32, _canvas(), _map("disparity"), ("disparity",),
            geometry=PixelMap(fill=0, in_pixels=True), decode_lazily=True),
    Feature("normals", np.float32, _canvas(3), _map("normals"), ("normals",),
            geometry=PixelMap(fill=0, negated_on_flip=(0,)), decode_lazily=True),
    *sequence("frames", dtype=np.float32, item_shape=_canvas(3),
              read=lambda frames: np.asarray(frames, np.float32) / 255.0,
              geometry=PixelMap(axes=(1, 2), fill=BORDER_MEAN, interpolation="bilinear"),
              photometric=True,
              decode_lazily=True),
)


def _ignored_objects(example: dict, layout: Layout) -> dict:
  """The example's `ignored_objects` (none when it has no such entry), at most max_objects."""
  ignored = example.get("ignored_objects", {"label": np.zeros(0, np.int64)})
  num = len(ignored["label"])
  if num > layout.max_objects:
    raise ValueError(f"Example {_example_id(example)} has {num} ignored objects (crowd or "
                     f"difficult), more than max_objects={layout.max_objects}; raise it "
                     f"(--config.data.max_objects={num} or more).")
  return ignored


def _ignored_boxes(example, layout):
  ignored = _ignored_objects(example, layout)
  if not len(ignored["label"]):
    return np.zeros((0, 4), np.float32)
  height, width = layout.canvas_shape
  ymin, xmin, ymax, xmax = np.asarray(ignored["bbox"], np.float32).reshape(-1, 4).T
  return np.stack([xmin * width, ymin * height, xmax * width, ymax * height], -1)


def _ignored_labels(example, layout):
  return np.asarray(_ignored_objects(example, layout)["label"], np.int32).reshape(-1)


def _ignored_masks(example, layout):
  ignored = _ignored_objects(example, layout)
  num = len(ignored["label"])
  if num and "mask" not in ignored:
    raise ValueError(f"Example {_example_id(example)} has ignored objects without masks; mask "
                     "evaluation needs a source with instance masks (coco/2017_panoptic).")
  if not num:
    return np.zeros((0, *layout.canvas_shape), bool)
  return np.asarray(ignored["mask"], bool).reshape(num, *layout.canvas_shape)


def _ignored_valid(example, layout):
  return np.arange(layout.max_objects) < len(_ignored_objects(example, layout)["label"])


def _areas(example, layout):
  objects, num = example["objects"], _num_objects(example, layout)
  if "area" not in objects:
    return np.full(num, -1, np.float32)
  return np.asarray(objects["area"][:num], np.float32).reshape(num)


def _image_scale(example, layout):
  return np.asarray(example.get("image/scale", (1.0, 1.0)), np.float32).reshape(2)


_IGNORED = ("ignored_valid",)
# Sources without ignored objects, areas or a scale (the digit canvases) have none, -1 and 1:
# these features read an entry every detection example has, and the optional ones beside it.
register(
    Feature("ignored_boxes", np.float32, lambda layout: (layout.max_objects, 4), _ignored_boxes,
            ("objects", "label"), geometry=Boxes(), companions=_IGNORED),
    Feature("ignored_labels", np.int32, lambda layout: (layout.max_objects,), _ignored_labels,
            ("objects", "label"), padding=-1, companions=_IGNORED),
    Feature("ignored_masks", np.bool_, lambda layout: (layout.max_objects, *layout.canvas_shape),
            _ignored_masks, ("objects", "label"), padding=False,
            geometry=PixelMap(axes=(1, 2), fill=False), companions=_IGNORED),
    Feature("ignored_valid", np.bool_, lambda layout: (layout.max_objects,), _ignored_valid,
            ("objects", "label"), padding=False,
            geometry=Validity(evidence=("ignored_masks", "ignored_boxes"))),
    Feature("areas", np.float32, lambda layout: (layout.max_objects,), _areas,
            ("objects", "label"), padding=-1, companions=_OBJECTS),
    Feature("image_scale", np.float32, lambda layout: (2,), _image_scale, ("image",),
            padding=1),
)

def _border_mean(x: np.ndarray, axes: tuple[int, int]) -> np.ndarray:
  """The mean of `x`'s border pixels over `axes`, shaped to broadcast against `x`."""
  moved = np.moveaxis(x, axes, (0, 1))
  border = np.concatenate([moved[0], moved[-1], moved[:, 0], moved[:, -1]])
  return np.expand_dims(border.mean(0), axes)


def _resampled(x: np.ndarray, source: np.ndarray, axis: int, interpolation: str) -> np.ndarray:
  """`x` sampled along `axis` at the (n,) coordinates `source` (in [0, size - 1])."""
  if interpolation == "nearest":
    return np.take(x, np.floor(source + 0.5).astype(int), axis=axis)
  low = np.floor(source).astype(int)
  high = np.minimum(low + 1, x.shape[axis] - 1)
  weight = np.expand_dims((source - low).astype(x.dtype), [a for a in range(x.ndim) if a != axis])
  return np.take(x, low, axis=axis) * (1 - weight) + np.take(x, high, axis=axis) * weight


def _translated(x: np.ndarray, dy: int, dx: int, fill, *, axes: tuple[int, int]) -> np.ndarray:
  """`x` moved by (dy, dx) along `axes`: out[y + dy, x + dx] = x[y, x]; `fill` elsewhere."""
  out = np.empty_like(x)
  out[...] = np.asarray(fill, x.dtype)
  target = [slice(None)] * x.ndim
  source = [slice(None)] * x.ndim
  for axis, shift in zip(axes, (dy, dx)):
    size = x.shape[axis]
    target[axis] = slice(max(shift, 0), size + min(shift, 0))
    source[axis] = slice(max(-shift, 0), size - max(shift, 0))
  out[tuple(target)] = x[tuple(source)]
  return out
