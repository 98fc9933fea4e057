"""Per-example augmentations, by name: `AUGMENTATIONS[name](example, rng) -> example`.

The pipeline (`zoo.data.pipeline.train_batches(..., augment=names)`) applies the named
functions in order through one grain `random_map`, whose generator is seeded by the
pipeline seed and the example's position in the (repeated, shuffled) stream, so training
batches are reproducible and resumable with augmentation on.

An example here is one unbatched element in the pipeline's conventions (any subset of):
  image:           (H, W, 3) float32 in [0, 1].
  segmentation:    (H, W) int32 class ids.
  boxes:           (M, 4) float32 (x1, y1, x2, y2) pixels.
  labels:          (M,) int32.
  instance_masks:  (M, H, W) bool.
  objects_valid:   (M,) bool.
  proposals:       (P, 4) float32 (x1, y1, x2, y2) pixels; proposals_valid: (P,) bool.
  id:              () int32.
A geometric augmentation moves every present key the same way.
"""

from typing import Callable, Sequence

import numpy as np

Augmentation = Callable[[dict, np.random.Generator], dict]


def photometric(example: dict, rng: np.random.Generator, *, max_brightness: float = 0.1,
                max_contrast: float = 0.25) -> dict:
  """Random brightness, contrast and RGB channel order of `image`; labels are untouched.

  brightness: adds U(-max_brightness, max_brightness); contrast: scales the deviation from
  the image's mean by U(1 - max_contrast, 1 + max_contrast); then a random permutation of
  the three channels (a digit's colour carries no class information). Clipped to [0, 1].
  """
  if "image" not in example:
    return example
  image = example["image"]
  mean = image.mean()
  contrast = rng.uniform(1 - max_contrast, 1 + max_contrast)
  brightness = rng.uniform(-max_brightness, max_brightness)
  image = (image - mean) * contrast + mean + brightness
  image = image[..., rng.permutation(3)]
  return {**example, "image": np.clip(image, 0.0, 1.0).astype(np.float32)}


def random_translate(example: dict, rng: np.random.Generator, *, max_shift: int = 4) -> dict:
  """Shifts the canvas by up to `max_shift` pixels in x and y (pad, then crop to size).

  Uncovered pixels: `image` gets the mean colour of the image's border (background-like),
  `segmentation` the background class 0, `instance_masks` False. Boxes move with the
  pixels and are clipped to the canvas (so a box cut by the border may be looser than its
  mask). An object with nothing left on the canvas (an empty mask, or a box of zero area
  when masks are not present) is marked invalid in `objects_valid`; proposals move and are
  clipped the same way, and one left with zero area is marked invalid in `proposals_valid`.
  """
  dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
  out = dict(example)
  if "image" in example:
    image = example["image"]
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    out["image"] = _translated(image, dy, dx, border.mean(0), axes=(0, 1))
  if "segmentation" in example:
    out["segmentation"] = _translated(example["segmentation"], dy, dx, 0, axes=(0, 1))
  if "instance_masks" in example:
    out["instance_masks"] = _translated(example["instance_masks"], dy, dx, False, axes=(1, 2))
  height, width = _canvas_shape(example)

  def moved(boxes):
    boxes = boxes + np.array([dx, dy, dx, dy], np.float32)
    return np.clip(boxes, 0, np.array([width, height, width, height], np.float32)).astype(np.float32)

  if "boxes" in example:
    out["boxes"] = moved(example["boxes"])
  if "proposals" in example:
    out["proposals"] = moved(example["proposals"])
    p = out["proposals"]
    out["proposals_valid"] = example["proposals_valid"] & (p[:, 2] > p[:, 0]) & (p[:, 3] > p[:, 1])
  if "objects_valid" in example:
    if "instance_masks" in out:
      on_canvas = out["instance_masks"].any((1, 2))
    elif "boxes" in out:
      on_canvas = (out["boxes"][:, 2] > out["boxes"][:, 0]) & (out["boxes"][:, 3] > out["boxes"][:, 1])
    else:
      on_canvas = True
    out["objects_valid"] = example["objects_valid"] & on_canvas
  return out


AUGMENTATIONS: dict[str, Augmentation] = {
    "photometric": photometric,
    "random_translate": random_translate,
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


def _canvas_shape(example: dict) -> tuple[int, int]:
  for key, axes in (("image", (0, 1)), ("segmentation", (0, 1)), ("instance_masks", (1, 2))):
    if key in example:
      return tuple(example[key].shape[a] for a in axes)
  if "boxes" in example or "proposals" in example:
    raise ValueError("random_translate needs the canvas size to clip boxes: request `image`, "
                     "`segmentation` or `instance_masks` with `boxes`.")
  return (0, 0)
