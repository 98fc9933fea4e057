"""zoo.detection.losses against a float64 NumPy transcription of detectron2's losses, and
against the detection task's loss (the same numbers)."""

import numpy as np
import pytest

from zoo.detection import losses
from zoo.detection.task import Detection


def random_outputs(rng, b=2, s=8, k=5, m=4, classes=4):
  valid = rng.random((b, s)) < 0.8
  positive = valid & (rng.random((b, s)) < 0.5)
  positive[1] = False                                  # an image without positives
  target_deltas = rng.normal(size=(b, s, 4))
  target_deltas[1, ~valid[1]] = -np.inf                # unmatched slots' targets (module doc)
  rpn = dict(logits=rng.normal(size=(b, s)), labels=positive.astype(np.float32), valid=valid,
             positive=positive, deltas=rng.normal(size=(b, s, 4)), target_deltas=target_deltas)
  box = dict(class_logits=rng.normal(size=(b, s, classes + 1)),
             classes=np.where(positive, rng.integers(1, classes + 1, (b, s)), 0), valid=valid,
             positive=positive, deltas=rng.normal(size=(b, s, 4)), target_deltas=target_deltas)
  mask = dict(logits=rng.normal(size=(b, k, m, m)),
              targets=(rng.random((b, k, m, m)) < 0.5).astype(np.float32),
              valid=positive[:, :k])
  as32 = lambda d: {n: (a.astype(np.float32) if a.dtype == np.float64 else a) for n, a in d.items()}
  return {"rpn": as32(rpn), "box": as32(box), "mask": as32(mask)}


def reference(outputs):
  """float64: detectron2's RPN, Fast R-CNN and mask losses written out."""
  o = {stage: {n: np.asarray(a, np.float64) if np.asarray(a).dtype.kind == "f" else np.asarray(a)
               for n, a in d.items()} for stage, d in outputs.items()}
  bce = lambda x, t: np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
  l1 = lambda x, t, w: sum(np.abs(x[i] - t[i]).sum() for i in zip(*np.nonzero(w)))
  out = {}
  if "rpn" in o:
    rpn = o["rpn"]
    n = rpn["logits"].size
    out["rpn_objectness"] = (bce(rpn["logits"], rpn["labels"]) * rpn["valid"]).sum() / n
    out["rpn_box"] = l1(rpn["deltas"], rpn["target_deltas"], rpn["positive"]) / n
  box = o["box"]
  sampled = max(box["valid"].sum(), 1)
  logits = box["class_logits"]
  log_softmax = logits - logits.max(-1, keepdims=True)
  log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_softmax, box["classes"][..., None], -1)[..., 0]
  out["box_cls"] = -(picked * box["valid"]).sum() / sampled
  out["box_reg"] = l1(box["deltas"], box["target_deltas"], box["positive"]) / sampled
  if "mask" in o:
    mask = o["mask"]
    per_roi = bce(mask["logits"], mask["targets"]).mean((-2, -1))
    out["mask"] = (per_roi * mask["valid"]).sum() / max(mask["valid"].sum(), 1)
  return out


@pytest.mark.parametrize("stages", [("rpn", "box", "mask"), ("box",), ("rpn", "box")])
def test_losses_match_float64_reference_and_the_task(stages):
  outputs = {k: v for k, v in random_outputs(np.random.default_rng()).items() if k in stages}
  got = {k: float(v) for k, v in losses.detection_losses(outputs).items()}
  expected = reference(outputs)
  assert set(got) == set(expected)
  assert ("rpn_box" in got) == ("rpn" in stages) and ("mask" in got) == ("mask" in stages)
  for name, value in got.items():
    assert value == pytest.approx(expected[name], rel=1e-5), name
  task = Detection(4, masks="mask" in stages)
  _, metrics = task.loss(outputs, {})
  for name, value in got.items():
    assert float(metrics[name]) == pytest.approx(value, rel=1e-6), name
