"""Float64 NumPy transcriptions of torchvision's and detectron2's box code, written plainly.

torchvision: `ops/boxes.py` (box_iou, generalized_box_iou), `csrc/ops/cpu/nms_kernel.cpp`
(nms), `models/detection/_utils.py` (BoxCoder, Matcher), `anchor_utils.py` (AnchorGenerator).
detectron2: `modeling/anchor_generator.py` (DefaultAnchorGenerator). Loops where the original
loops, so the reference is independent of the vectorised code under test.
"""

import math

import numpy as np


def box_iou(a, b):
  """(N, M) IoU; NaN at 0 / 0 as torchvision."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  out = np.zeros((len(a), len(b)))
  for i, p in enumerate(a):
    for j, q in enumerate(b):
      w = max(min(p[2], q[2]) - max(p[0], q[0]), 0.0)
      h = max(min(p[3], q[3]) - max(p[1], q[1]), 0.0)
      inter = w * h
      union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
      with np.errstate(invalid="ignore", divide="ignore"):
        out[i, j] = np.float64(inter) / union
  return out


def generalized_box_iou(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  iou = box_iou(a, b)
  out = np.zeros_like(iou)
  for i, p in enumerate(a):
    for j, q in enumerate(b):
      w = max(min(p[2], q[2]) - max(p[0], q[0]), 0.0)
      h = max(min(p[3], q[3]) - max(p[1], q[1]), 0.0)
      union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - w * h
      cw = max(max(p[2], q[2]) - min(p[0], q[0]), 0.0)
      ch = max(max(p[3], q[3]) - min(p[1], q[1]), 0.0)
      with np.errstate(invalid="ignore", divide="ignore"):
        out[i, j] = iou[i, j] - (cw * ch - union) / np.float64(cw * ch)
  return out


def encode(gt, proposals, weights):
  gt, proposals = np.asarray(gt, np.float64), np.asarray(proposals, np.float64)
  wx, wy, ww, wh = weights
  out = []
  for g, p in zip(gt, proposals):
    pw, ph = p[2] - p[0], p[3] - p[1]
    px, py = p[0] + 0.5 * pw, p[1] + 0.5 * ph
    gw, gh = g[2] - g[0], g[3] - g[1]
    gx, gy = g[0] + 0.5 * gw, g[1] + 0.5 * gh
    out.append([wx * (gx - px) / pw, wy * (gy - py) / ph, ww * math.log(gw / pw),
                wh * math.log(gh / ph)])
  return np.array(out)


def decode(deltas, proposals, weights, clamp=math.log(1000.0 / 16)):
  """deltas (N, 4K) against proposals (N, 4) -> (N, 4K), as torchvision's decode_single."""
  deltas, proposals = np.asarray(deltas, np.float64), np.asarray(proposals, np.float64)
  wx, wy, ww, wh = weights
  out = np.zeros_like(deltas)
  for n, p in enumerate(proposals):
    w, h = p[2] - p[0], p[3] - p[1]
    cx, cy = p[0] + 0.5 * w, p[1] + 0.5 * h
    for k in range(deltas.shape[1] // 4):
      dx, dy, dw, dh = deltas[n, 4 * k:4 * k + 4] / np.array([wx, wy, ww, wh])
      dw, dh = min(dw, clamp), min(dh, clamp)
      x, y = dx * w + cx, dy * h + cy
      pw, ph = math.exp(dw) * w, math.exp(dh) * h
      out[n, 4 * k:4 * k + 4] = [x - 0.5 * pw, y - 0.5 * ph, x + 0.5 * pw, y + 0.5 * ph]
  return out


def cell_anchors_torchvision(sizes, ratios):
  rows = []
  for r in ratios:  # torchvision: ws = (w_ratios[:, None] * scales[None, :]).view(-1)
    for s in sizes:
      hr = np.sqrt(np.float32(r))
      wr = np.float32(1) / hr
      w, h = np.float32(wr * np.float32(s)), np.float32(hr * np.float32(s))
      rows.append([np.round(-w / np.float32(2)), np.round(-h / np.float32(2)),
                   np.round(w / np.float32(2)), np.round(h / np.float32(2))])
  return np.array(rows, np.float32)


def cell_anchors_detectron2(sizes, ratios):
  rows = []
  for s in sizes:
    for r in ratios:
      w = math.sqrt(s ** 2.0 / r)
      h = r * w
      rows.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
  return np.array(rows, np.float32)


def grid_anchors(cell, grid, stride, offset=0.0):
  rows = []
  for y in range(grid[0]):
    for x in range(grid[1]):
      sx, sy = np.float32((x + offset) * stride[1]), np.float32((y + offset) * stride[0])
      for a in cell:
        rows.append([sx + a[0], sy + a[1], sx + a[2], sy + a[3]])
  return np.array(rows, np.float32)


def match(quality, high, low, allow_low_quality):
  """torchvision's Matcher on a (G, N) quality matrix (G >= 1)."""
  quality = np.asarray(quality, np.float64)
  g, n = quality.shape
  matches = np.zeros(n, np.int64)
  for j in range(n):
    best = int(np.argmax(quality[:, j]))
    v = quality[best, j]
    matches[j] = best if v >= high else (-2 if v >= low else -1)
  if allow_low_quality:
    for i in range(g):
      top = quality[i].max()
      for j in range(n):
        if quality[i, j] == top:
          matches[j] = int(np.argmax(quality[:, j]))
  return matches


def _iou_float32(p, q):
  """The kernel's float32 IoU, inter / (area_i + area_j - inter) (NaN at 0 / 0)."""
  p, q = np.asarray(p, np.float32), np.asarray(q, np.float32)
  w = max(min(p[2], q[2]) - max(p[0], q[0]), np.float32(0))
  h = max(min(p[3], q[3]) - max(p[1], q[1]), np.float32(0))
  inter = np.float32(w * h)
  with np.errstate(invalid="ignore", divide="ignore"):
    return inter / ((p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter)


def nms(boxes, scores, threshold):
  """torchvision's CPU kernel: stable descending sort, suppress when its float32 IoU is above
  the (double) threshold."""
  order = sorted(range(len(scores)), key=lambda i: -scores[i])  # sorted() is stable
  suppressed = np.zeros(len(scores), bool)
  keep = []
  for a, i in enumerate(order):
    if suppressed[i]:
      continue
    keep.append(i)
    for j in order[a + 1:]:
      if not suppressed[j] and float(_iou_float32(boxes[i], boxes[j])) > threshold:
        suppressed[j] = True
  return np.array(keep, np.int64)


def batched_nms(boxes, scores, classes, threshold):
  """Per-class nms, then by decreasing score (ties: lower index first)."""
  keep = []
  for c in np.unique(classes):
    idx = np.flatnonzero(classes == c)
    keep.extend(idx[nms(boxes[idx], scores[idx], threshold)])
  return np.array(sorted(keep, key=lambda i: (-scores[i], i)), np.int64)
