"""Centre cropping, for U-Net skip connections and for targets of VALID-padded models."""


def center_crop(x, size):
  """The centre (h, w) window of x's axes 1 and 2.

  Ronneberger et al. 2015, Fig. 1: "copy and crop" of the contracting path's feature map
  to the size of the expanding path's one. When H - h is odd the extra row is dropped at
  the bottom (top = (H - h) // 2); likewise for columns.

  Args:
    x: (B, H, W, ...).
    size: (h, w) with h <= H, w <= W.

  Returns:
    (B, h, w, ...).
  """
  height, width = x.shape[1:3]
  h, w = size
  if (h, w) == (height, width):
    return x
  if h > height or w > width:
    raise ValueError(f"Cannot crop {height}x{width} to the larger {h}x{w}.")
  top, left = (height - h) // 2, (width - w) // 2
  return x[:, top:top + h, left:left + w]
