"""Precomputed region proposals (Fast R-CNN's external input) joined to a TFDS data source.

Fast R-CNN takes its regions from outside the network: Selective Search's ~2,000 boxes per
image, computed once and stored beside the dataset. `load_proposals(path)` reads such a file
into {image key: (n, 4) float32 (x1, y1, x2, y2) pixel edges of the original image, best
first}; `ProposalSource(source, proposals)` adds them to every example of a random-access
source as `proposals` (n, 4) float32 normalised (ymin, xmin, ymax, xmax) of the example's
image, the layout of the objects' `bbox`, so `DetectionSource` resizes them with the image
and the pipeline turns them into the `proposals` feature (pixels, padded to max_proposals).

File formats (told by the extension):

- `.npz` (this repo's; `experiments/make_proposals.py` writes it): `ids` (N,) int or str, the
  image keys; `counts` (N,) int, boxes per image; `boxes` (sum counts, 4) float (x1, y1, x2,
  y2) pixel edges, image after image, best first.
- `.pkl` (detectron2's precomputed proposals, e.g. its Fast R-CNN baselines): a dict with
  `ids`, `boxes` (a list of (n, 4) arrays) and optionally `objectness_logits` (a list of (n,)
  arrays; boxes are then sorted by them, best first, as detectron2 does) and `bbox_mode`
  (must be XYXY_ABS, 0).
- `.mat` (py-faster-rcnn's Selective Search files, e.g. `voc_2007_trainval.mat`): `images`
  (N,) names ("000005") and `boxes` (N,) arrays of (y1, x1, y2, x2) 1-based inclusive
  pixels, converted as py-faster-rcnn does ((x1, y1, x2, y2) - 1, plus 1 on x2, y2 for edges).

Keys: an example is looked up by its `image/id` (COCO) if it has one, else by its
`image/filename` with and without the extension (VOC: "000005.jpg" or "000005"), else by its
`id` (the embedded digit canvases). An example without proposals in the file is an error
naming it (a proposal file for another split is the usual cause). Boxes are clipped to the
image and those left with no area are dropped.
"""

import os
import pickle
from typing import Mapping

import numpy as np


def load_proposals(path: str) -> dict:
  """{image key: (n, 4) float32 (x1, y1, x2, y2) pixel edges, best first} from a file (module doc).

  Raises:
    ValueError: for a missing file, an unknown extension, or a file whose fields do not fit
      the format (naming the field).
  """
  if not os.path.exists(path):
    raise ValueError(f"Proposal file {path!r} does not exist; write one with "
                     f"`python -m experiments.make_proposals` or point --config.data.proposals at "
                     f"a Selective Search (.mat) / detectron2 (.pkl) file.")
  extension = os.path.splitext(path)[1]
  if extension == ".npz":
    with np.load(path, allow_pickle=False) as f:
      missing = [k for k in ("ids", "counts", "boxes") if k not in f]
      if missing:
        raise ValueError(f"Proposal file {path!r} lacks {missing}; an .npz needs ids, counts, boxes.")
      ids, counts, boxes = f["ids"], f["counts"], f["boxes"]
    if counts.sum() != len(boxes) or len(ids) != len(counts):
      raise ValueError(f"Proposal file {path!r}: {len(ids)} ids, {len(counts)} counts summing to "
                       f"{counts.sum()}, {len(boxes)} boxes; they must agree.")
    per_image = np.split(np.asarray(boxes, np.float32).reshape(-1, 4), np.cumsum(counts)[:-1])
    return {_key(i): b for i, b in zip(ids.tolist(), per_image)}
  if extension == ".pkl":
    with open(path, "rb") as f:
      data = pickle.load(f)
    if data.get("bbox_mode", 0) not in (0, "XYXY_ABS") and str(data.get("bbox_mode")) != "BoxMode.XYXY_ABS":
      raise ValueError(f"Proposal file {path!r} has bbox_mode {data['bbox_mode']!r}; only XYXY_ABS "
                       f"(0) is read.")
    scores = data.get("objectness_logits")
    out = {}
    for n, (i, b) in enumerate(zip(data["ids"], data["boxes"])):
      b = np.asarray(b, np.float32).reshape(-1, 4)
      if scores is not None:
        b = b[np.argsort(-np.asarray(scores[n]).reshape(-1), kind="stable")]
      out[_key(i)] = b
    return out
  if extension == ".mat":
    import scipy.io
    data = scipy.io.loadmat(path)
    names = [str(np.asarray(n).reshape(-1)[0]) for n in data["images"].reshape(-1)]
    out = {}
    for name, raw in zip(names, data["boxes"].reshape(-1)):
      raw = np.asarray(raw, np.float32).reshape(-1, 4)
      out[name] = np.stack([raw[:, 1] - 1, raw[:, 0] - 1, raw[:, 3], raw[:, 2]], axis=-1)
    return out
  raise ValueError(f"Proposal file {path!r}: unknown extension {extension!r}; use .npz, .pkl "
                   f"(detectron2) or .mat (Selective Search).")


def save_proposals(path: str, proposals: Mapping) -> None:
  """Writes {key: (n, 4) pixel boxes} as this repo's .npz (module doc), atomically."""
  keys = list(proposals)
  boxes = [np.asarray(proposals[k], np.float32).reshape(-1, 4) for k in keys]
  tmp = path + ".tmp.npz"
  np.savez(tmp, ids=np.asarray(keys), counts=np.asarray([len(b) for b in boxes], np.int64),
           boxes=np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32))
  os.replace(tmp, path)


def _key(value):
  """Keys compare as Python ints or strs whatever array type they were read from."""
  if isinstance(value, bytes):
    return value.decode()
  if isinstance(value, (int, np.integer)):
    return int(value)
  return str(value)


class ProposalSource:
  """`source` with each example's proposals added as `proposals` (module doc).

  `source[i]` must have `image` (h, w, 3) and one of the keys `image/id`, `image/filename`,
  `id`; the result adds `proposals` (n, 4) float32 normalised (ymin, xmin, ymax, xmax).
  """

  def __init__(self, source, proposals: Mapping, path: str = "<proposals>"):
    self.source, self.proposals, self.path = source, proposals, path
    # TFDS random-access sources expose their features: the pipeline reads the canvas size.
    self.dataset_info = getattr(source, "dataset_info", None)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    example = dict(self.source[index])
    boxes = self._lookup(example, index)
    height, width = np.shape(example["image"])[:2]
    boxes = np.clip(boxes, 0, np.array([width, height, width, height], np.float32))
    boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    example["proposals"] = (boxes[:, [1, 0, 3, 2]] /
                            np.array([height, width, height, width], np.float32)).astype(np.float32)
    return example

  def _lookup(self, example: dict, index: int) -> np.ndarray:
    candidates = []
    if "image/id" in example:
      candidates.append(_key(np.asarray(example["image/id"]).item()))
    if "image/filename" in example:
      name = _key(np.asarray(example["image/filename"]).item())
      candidates += [name, os.path.splitext(name)[0]]
    if "id" in example:
      candidates.append(_key(np.asarray(example["id"]).item()))
    for key in candidates:
      if key in self.proposals:
        return np.asarray(self.proposals[key], np.float32).reshape(-1, 4)
    raise ValueError(f"Example {index} (keys {candidates}) has no proposals in {self.path} "
                     f"({len(self.proposals)} images); is it the file of this split?")
