"""Pictures a person can check: segmentation masks blended over images, side by side.

All functions take and return numpy uint8 RGB arrays (H, W, 3).
"""

import numpy as np

# Background black, then ten well-separated hues for the digit classes (class d+1 = digit d).
SEGMENTATION_PALETTE = np.array([
    [0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 190],
], np.uint8)
IGNORE_COLOR = np.array([128, 128, 128], np.uint8)


def colorize(segmentation, palette=SEGMENTATION_PALETTE):
  """(H, W) class ids -> (H, W, 3) uint8; ids outside the palette are grey."""
  segmentation = np.asarray(segmentation)
  known = (segmentation >= 0) & (segmentation < len(palette))
  colors = palette[np.where(known, segmentation, 0)]
  colors[~known] = IGNORE_COLOR
  return colors


def overlay(image, segmentation, alpha: float = 0.6):
  """Blends the colorized segmentation over `image` (float in [0, 1] or uint8), background untouched."""
  image = to_uint8(image)
  colors = colorize(segmentation).astype(np.float32)
  blended = np.where(np.asarray(segmentation)[..., None] > 0,
                     (1 - alpha) * image + alpha * colors, image)
  return blended.round().astype(np.uint8)


def pad_to_center(segmentation, shape, fill: int = 255):
  """Places an (h, w) segmentation at the centre of an `shape` (H, W) canvas of `fill`."""
  segmentation = np.asarray(segmentation)
  canvas = np.full(shape, fill, segmentation.dtype)
  top = (shape[0] - segmentation.shape[0]) // 2
  left = (shape[1] - segmentation.shape[1]) // 2
  canvas[top:top + segmentation.shape[0], left:left + segmentation.shape[1]] = segmentation
  return canvas


def side_by_side(panels, scale: int = 4, gap: int = 4):
  """Concatenates equally tall (H, W, 3) uint8 panels horizontally, each enlarged `scale`x
  (nearest neighbour, so pixels stay pixels), separated by white gaps."""
  enlarged = [np.kron(p, np.ones((scale, scale, 1), np.uint8)) for p in panels]
  height = enlarged[0].shape[0]
  spacer = np.full((height, gap, 3), 255, np.uint8)
  row = []
  for panel in enlarged:
    row += [panel, spacer]
  return np.concatenate(row[:-1], axis=1)


def to_uint8(image):
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
