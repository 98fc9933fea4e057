"""Writes torchvision_boxes.npz: torchvision's own outputs for tests/detection/test_boxes.py.

Produced with torch 2.14.1 + torchvision 0.29.1 (CPU) by

    /tmp/venv-torch/bin/python tests/detection/golden/make_box_golden.py

(any Python with torch + torchvision works; it needs nothing from this repo). The inputs are
drawn here with a fixed NumPy seed and stored next to the outputs, so the test feeds the very
same float32 numbers to zoo.detection.
"""

import os

import numpy as np
import torch
import torchvision
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import boxes as box_ops


def random_boxes(rng, n, grid=None, spread=90):
  """(n, 4) float32 boxes; some degenerate (zero width/height), some equal."""
  xy = rng.uniform(0, spread, (n, 2))
  wh = rng.uniform(0, 40, (n, 2))
  if grid:
    xy, wh = np.round(xy / grid) * grid, np.round(wh / grid) * grid
  wh[rng.random(n) < 0.1, 0] = 0
  wh[rng.random(n) < 0.1, 1] = 0
  boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  dup = rng.choice(n, n // 8, replace=False)
  boxes[dup] = boxes[rng.choice(n, n // 8)]
  return boxes


def main():
  rng = np.random.default_rng(20261125)
  out = {"torch_version": np.array(torch.__version__), "torchvision_version":
         np.array(torchvision.__version__)}

  # IoU / GIoU, with degenerate and duplicate boxes (torchvision gives NaN for 0 / 0).
  a, b = random_boxes(rng, 40), random_boxes(rng, 30, grid=5)
  out["iou_a"], out["iou_b"] = a, b
  out["iou"] = box_ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
  out["giou"] = box_ops.generalized_box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
  # Gradients on boxes of positive size (torchvision's are NaN at 0 / 0).
  ga = np.concatenate([rng.uniform(0, 60, (12, 2)), rng.uniform(5, 40, (12, 2))], 1)
  gb = np.concatenate([rng.uniform(0, 60, (9, 2)), rng.uniform(5, 40, (9, 2))], 1)
  ga[:, 2:] += ga[:, :2]
  gb[:, 2:] += gb[:, :2]
  weights = rng.normal(size=(12, 9))
  out["grad_a"], out["grad_b"], out["grad_weights"] = ga.astype(np.float32), gb.astype(
      np.float32), weights.astype(np.float32)
  for name, fn in (("iou", box_ops.box_iou), ("giou", box_ops.generalized_box_iou)):
    ta = torch.tensor(out["grad_a"], requires_grad=True)
    tb = torch.tensor(out["grad_b"], requires_grad=True)
    (fn(ta, tb) * torch.from_numpy(out["grad_weights"])).sum().backward()
    out[f"{name}_grad_a"], out[f"{name}_grad_b"] = ta.grad.numpy(), tb.grad.numpy()

  # Box coder: encode proposals -> gt, decode deltas (some beyond the clamp).
  proposals = np.concatenate([rng.uniform(0, 60, (50, 2)), rng.uniform(1, 40, (50, 2))], 1)
  proposals[:, 2:] += proposals[:, :2]
  gt = np.concatenate([rng.uniform(0, 60, (50, 2)), rng.uniform(1, 40, (50, 2))], 1)
  gt[:, 2:] += gt[:, :2]
  deltas = rng.normal(size=(50, 3 * 4)) * 2
  deltas[::7, 2] = 30.0  # far beyond log(1000 / 16) * 5
  deltas[::5, 3] = -30.0
  out["coder_proposals"], out["coder_gt"], out["coder_deltas"] = (
      proposals.astype(np.float32), gt.astype(np.float32), deltas.astype(np.float32))
  for name, w in (("heads", (10.0, 10.0, 5.0, 5.0)), ("rpn", (1.0, 1.0, 1.0, 1.0))):
    coder = det_utils.BoxCoder(w)
    out[f"encode_{name}"] = coder.encode_single(torch.from_numpy(out["coder_gt"]), torch.from_numpy(
        out["coder_proposals"])).numpy()
    out[f"decode_{name}"] = coder.decode_single(torch.from_numpy(out["coder_deltas"]),
                                                torch.from_numpy(out["coder_proposals"])).numpy()

  # Anchors: the fasterrcnn_resnet50_fpn generator and a single-level VGG-style one.
  image = torch.zeros(1, 3, 96, 128)
  from torchvision.models.detection.image_list import ImageList
  images = ImageList(image, [(96, 128)])
  fpn = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
  grids = [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2)]  # strides 4, 8, 16, 32, 48 x 64
  feats = [torch.zeros(1, 1, h, w) for h, w in grids]
  out["anchors_fpn"] = fpn(images, feats)[0].numpy()
  single = AnchorGenerator(((128, 256, 512),), ((0.5, 1.0, 2.0),))
  out["anchors_single"] = single(images, [torch.zeros(1, 1, 6, 8)])[0].numpy()
  odd = AnchorGenerator(((20, 45.5),), ((0.3, 1.7, 1.0),))
  out["cell_odd"] = odd.cell_anchors[0].numpy()

  # Matcher on IoUs with ties (boxes on a grid).
  gt_boxes = random_boxes(rng, 7, grid=10)
  gt_boxes[:, 2:] = np.maximum(gt_boxes[:, 2:], gt_boxes[:, :2] + 10)
  anchors = random_boxes(rng, 60, grid=10)
  out["match_gt"], out["match_anchors"] = gt_boxes, anchors
  quality = box_ops.box_iou(torch.from_numpy(gt_boxes), torch.from_numpy(anchors))
  quality = torch.nan_to_num(quality, 0.0)
  for name, args in (("rpn", (0.7, 0.3, True)), ("heads", (0.5, 0.5, False)),
                     ("low", (0.4, 0.1, True))):
    out[f"matches_{name}"] = det_utils.Matcher(*args)(quality.clone()).numpy()

  # NMS with equal scores, duplicates and degenerate boxes.
  boxes = random_boxes(rng, 200, grid=2, spread=30)
  scores = np.round(rng.random(200) * 20) / 20  # many ties
  classes = rng.integers(0, 4, 200)
  out["nms_boxes"], out["nms_scores"], out["nms_classes"] = (
      boxes, scores.astype(np.float32), classes.astype(np.int64))
  for thr in (0.3, 0.5, 0.7):
    t = f"{int(thr * 10)}"
    out[f"nms_keep_{t}"] = torchvision.ops.nms(
        torch.from_numpy(boxes), torch.from_numpy(out["nms_scores"]), thr).numpy()
    out[f"batched_keep_{t}"] = box_ops._batched_nms_vanilla(
        torch.from_numpy(boxes), torch.from_numpy(out["nms_scores"]),
        torch.from_numpy(classes), thr).numpy()
    out[f"batched_trick_keep_{t}"] = box_ops._batched_nms_coordinate_trick(
        torch.from_numpy(boxes), torch.from_numpy(out["nms_scores"]),
        torch.from_numpy(classes), thr).numpy()

  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchvision_boxes.npz")
  np.savez_compressed(path, **out)
  print("wrote", path, {k: v.shape for k, v in out.items()})


if __name__ == "__main__":
  main()
