"""Per-example augmentations, by name: `AUGMENTATIONS[name](example, rng) -> example`.

The pipeline (`zoo.data.pipeline.train_batches(..., augment=names)`) applies the named
functions in order through one grain `random_map`, whose generator is seeded by the
pipeline seed and the example's position in the (repeated, shuffled) stream, so training
batches are reproducible and resumable with augmentation on.

An example here is one unbatched element: any subset of the features of `zoo.data.features`,
in their shapes and dtypes there. The augmentations never name a feature: a geometric one
moves every present feature by its spec's `geometry` (maps move with the pixels, boxes with
them and are clipped, slot validity follows, flow's u and normals' x change sign under a
flip, flow and disparity scale with a zoom), and `photometric` changes the features whose
spec says `photometric` (colour images).
"""

from typing import Callable, Sequence

import numpy as np

from zoo.data import features

Augmentation = Callable[[dict, np.random.Generator], dict]


def photometric(example: dict, rng: np.random.Generator, *, max_brightness: float = 0.1,
                max_contrast: float = 0.25) -> dict:
  """Random brightness, contrast and RGB channel order of the colour images (`image`,
  `image2`, `frames`: the photometric features); labels are untouched.

  brightness: adds U(-max_brightness, max_brightness); contrast: scales the deviation from
  the image's mean by U(1 - max_contrast, 1 + max_contrast); then a random permutation of
  the three channels (a digit's colour carries no class information). Clipped to [0, 1].
  One draw serves every colour image of the example (an image pair changes alike); the
  mean is each image's (each frame's) own. Draws nothing when there is no colour image.
  """
  names = [name for name in example if features.feature(name).photometric]
  if not names:
    return example
  contrast = rng.uniform(1 - max_contrast, 1 + max_contrast)
  brightness = rng.uniform(-max_brightness, max_brightness)
  permutation = rng.permutation(3)
  out = dict(example)
  for name in names:
    images = example[name]
    frames = images.reshape((-1,) + images.shape[-3:])
    mean = np.stack([frame.mean() for frame in frames]).reshape(images.shape[:-3] + (1, 1, 1))
    images = (images - mean) * contrast + mean + brightness
    out[name] = np.clip(images[..., permutation], 0.0, 1.0).astype(np.float32)
  return out


def random_translate(example: dict, rng: np.random.Generator, *, max_shift: int = 4) -> dict:
  """Shifts the canvas by up to `max_shift` pixels in x and y (pad, then crop to size).

  Every feature moves by its `geometry.translated` (`zoo.data.features`): maps move with the
  pixels, uncovered pixels get their `fill` (`image` the mean colour of its border,
  `segmentation` the background class 0, `instance_masks` False, flow / depth / normals 0);
  boxes and proposals move and are clipped to the canvas (so a box cut by the border may be
  looser than its mask). An object with nothing left on the canvas (an empty mask, or a box
  of zero area when masks are not present) is marked invalid in `objects_valid`, and a
  proposal left with zero area in `proposals_valid` (`geometry.revalidated`).
  """
  dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
  canvas_shape = _canvas_shape(example, "random_translate")
  return _moved(example, lambda geometry, x: geometry.translated(x, dy, dx, canvas_shape),
                off_canvas=True)


def horizontal_flip(example: dict, rng: np.random.Generator, *,
                    probability: float = 0.5) -> dict:
  """With `probability`, mirrors the canvas left-right (`geometry.flipped` of each feature).

  Maps are mirrored (pixel column c -> W - 1 - c), boxes and proposals too (x1, x2 ->
  W - x2, W - x1), and the signs of the channels that point along x are reversed: flow's u,
  a normal's x. Nothing leaves the canvas, so validity is unchanged. Draws one uniform.
  """
  if rng.uniform() >= probability:
    return example
  canvas_shape = _canvas_shape(example, "horizontal_flip")
  return _moved(example, lambda geometry, x: geometry.flipped(x, canvas_shape),
                off_canvas=False)


def random_scale_crop(example: dict, rng: np.random.Generator, *, min_scale: float = 0.8,
                      max_scale: float = 1.25) -> dict:
  """Zooms the canvas by s ~ U(min_scale, max_scale) and keeps an H x W window of the zoomed
  canvas at a uniformly random integer offset (s > 1 crops, s < 1 pads).

  Every feature moves by its `geometry.scaled` (`zoo.data.features`): maps are resampled
  (bilinear or nearest, per feature) with uncovered pixels filled as by `random_translate`;
  flow and disparity are multiplied by s; boxes and proposals are scaled, shifted and
  clipped, and validity follows as in `random_translate`. Draws s, then the offsets (oy, ox).
  """
  if not 0 < min_scale <= max_scale:
    raise ValueError(f"Need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}.")
  scale = rng.uniform(min_scale, max_scale)
  canvas_shape = _canvas_shape(example, "random_scale_crop")
  # The zoomed canvas spans size * s pixels; the window's offset ranges over its overhang.
  overhang = [round(size * scale) - size for size in canvas_shape]
  offset = tuple(int(v) for v in rng.integers([min(o, 0) for o in overhang],
                                              [max(o, 0) + 1 for o in overhang]))
  return _moved(example, lambda geometry, x: geometry.scaled(x, scale, offset, canvas_shape),
                off_canvas=True)


AUGMENTATIONS: dict[str, Augmentation] = {
    "photometric": photometric,
    "random_translate": random_translate,
    "horizontal_flip": horizontal_flip,
    "random_scale_crop": random_scale_crop,
}


def compose(names: Sequence[str]) -> Augmentation:
  """One function applying `AUGMENTATIONS[name]` for each of `names`, in order, with one rng.

  Raises:
    ValueError: for a name not in `AUGMENTATIONS`, listing the known ones.
  """
  if isinstance(names, str):
    raise ValueError(f"augment must be a sequence of names, not the string {names!r}; "
                     f"e.g. ({names!r},).")
  unknown = [n for n in names if n not in AUGMENTATIONS]
  if unknown:
    raise ValueError(f"Unknown augmentation(s) {', '.join(map(repr, unknown))}; known: "
                     f"{', '.join(AUGMENTATIONS)}.")
  functions = [AUGMENTATIONS[n] for n in names]

  def augmented(example: dict, rng: np.random.Generator) -> dict:
    for function in functions:
      example = function(example, rng)
    return example

  return augmented


def _moved(example: dict, move: Callable, *, off_canvas: bool) -> dict:
  """`example` with `move(geometry, array)` applied to every feature; then, if the move can
  push things off the canvas, each feature's `geometry.revalidated` against the moved ones."""
  geometries = {name: features.feature(name).geometry for name in example}
  out = {name: move(geometries[name], value) for name, value in example.items()}
  if off_canvas:
    out = {name: geometries[name].revalidated(value, out) for name, value in out.items()}
  return out


def _canvas_shape(example: dict, augmentation: str) -> tuple[int, int]:
  """(H, W) from the example's first map; (0, 0) if no feature needs it."""
  geometries = {name: features.feature(name).geometry for name in example}
  for name, geometry in geometries.items():
    shape = geometry.canvas_shape(example[name])
    if shape is not None:
      return shape
  needing = [name for name, geometry in geometries.items() if geometry.needs_canvas]
  if needing:
    raise ValueError(f"{augmentation} needs the canvas size to move {', '.join(needing)}: "
                     "request a map with them (`image`, `segmentation`, `instance_masks`, ...).")
  return (0, 0)
