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


def enlarge(image, scale: int = 4):
  """(H, W, 3) uint8 -> (scale H, scale W, 3), nearest neighbour, so pixels stay pixels."""
  return np.kron(np.asarray(image), np.ones((scale, scale, 1), np.uint8))


def side_by_side(panels, scale: int = 4, gap: int = 4):
  """Concatenates (H, W, 3) uint8 panels horizontally, each enlarged `scale`x (nearest
  neighbour, so pixels stay pixels), separated by white gaps; shorter panels are padded
  white at the bottom."""
  enlarged = [enlarge(p, scale) for p in panels]
  height = max(p.shape[0] for p in enlarged)
  enlarged = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255)
              for p in enlarged]
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


def class_name(class_id: int, class_names=None) -> str:
  """`class_names[class_id]`, or the id as text when there are no names for it."""
  class_id = int(class_id)
  if class_names is not None and 0 <= class_id < len(class_names):
    return str(class_names[class_id])
  return str(class_id)


def legend(entries, height: int = 256):
  """A white panel naming colours: per entry a swatch and its name, in columns of as many rows
  as `height` holds.

  Args:
    entries: sequence of (name, (3,) uint8 colour), in the order to list them.
    height: the panel's height in pixels (that of the panels it stands beside).

  Returns:
    (height, W, 3) uint8, W from the longest name and the number of columns.
  """
  from PIL import Image, ImageDraw  # pillow is only needed for drawing

  row, swatch, margin, char_width = 14, 10, 4, 6  # pixels; PIL's default font is ~6 px wide
  per_column = max(1, (height - 2 * margin) // row)
  columns = max(1, -(-len(entries) // per_column))
  column_width = swatch + 3 * margin + char_width * max([len(n) for n, _ in entries] + [1])
  picture = Image.new("RGB", (columns * column_width + margin, height), (255, 255, 255))
  draw = ImageDraw.Draw(picture)
  for k, (name, colour) in enumerate(entries):
    x = margin + (k // per_column) * column_width
    y = margin + (k % per_column) * row
    draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=tuple(int(v) for v in colour),
                   outline=(0, 0, 0))
    draw.text((x + swatch + margin, y - 1), name, fill=(0, 0, 0))
  return np.asarray(picture)


def draw_detections(image, boxes, classes, valid, scores=None, masks=None, scale: int = 4,
                    class_names=None, alpha: float = 0.5):
  """Boxes, class labels (and scores) and instance masks drawn on an enlarged image.

  Args:
    image: (H, W, 3) float in [0, 1] or uint8.
    boxes: (D, 4) (x1, y1, x2, y2) pixels of `image`.
    classes: (D,) int palette index (detector class ids: background 0, class c -> colour c).
    valid: (D,) bool; only valid entries are drawn.
    scores: (D,) float or None (ground truth).
    masks: (D, H, W) bool or None.
    scale: enlargement (nearest neighbour) so that text is readable on small canvases.
    class_names: names indexed by class id; None: the ids.

  Returns:
    (scale H, scale W, 3) uint8.
  """
  from PIL import Image, ImageDraw  # pillow is only needed for drawing

  canvas = to_uint8(image).astype(np.float32)
  order = np.flatnonzero(np.asarray(valid))
  colours = [SEGMENTATION_PALETTE[int(c) % len(SEGMENTATION_PALETTE)] for c in np.asarray(classes)]
  if masks is not None:
    for d in order:
      m = np.asarray(masks[d], bool)[..., None]
      canvas = np.where(m, (1 - alpha) * canvas + alpha * colours[d], canvas)
  picture = Image.fromarray(enlarge(canvas.round().astype(np.uint8), scale))
  draw = ImageDraw.Draw(picture)
  for d in order:
    x1, y1, x2, y2 = (float(v) * scale for v in boxes[d])
    colour = tuple(int(v) for v in colours[d])
    draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=colour, width=2)
    name = class_name(classes[d], class_names)
    text = name if scores is None else f"{name} {float(scores[d]):.2f}"
    draw.text((x1 + 2, y1 + 1), text, fill=colour)
  return np.asarray(picture)
