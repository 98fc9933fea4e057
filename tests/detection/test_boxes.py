"""zoo.detection's box toolkit against float64 NumPy transcriptions and torchvision's outputs.

torchvision itself is not a test dependency: golden/torchvision_boxes.npz holds its outputs
(and the inputs they came from), written by golden/make_box_golden.py (see its docstring).
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.detection import box_reference as ref
from zoo import detection

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "torchvision_boxes.npz")


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(GOLDEN))


def random_boxes(rng, n, spread=60.0, grid=None, degenerate=0.15):
  xy = rng.uniform(0, spread, (n, 2))
  wh = rng.uniform(0, 30, (n, 2))
  if grid:
    xy, wh = np.round(xy / grid) * grid, np.round(wh / grid) * grid
  wh[rng.random((n, 2)) < degenerate] = 0
  boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  if n >= 4:
    boxes[rng.choice(n, n // 4, replace=False)] = boxes[rng.choice(n, n // 4)]
  return boxes


# ------------------------------------------------------------------ IoU

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iou_and_giou_match_reference(seed):
  rng = np.random.default_rng(seed)
  a, b = random_boxes(rng, 23), random_boxes(rng, 17, grid=5)
  for fn, reference in ((detection.box_iou, ref.box_iou),
                        (detection.generalized_box_iou, ref.generalized_box_iou)):
    got = np.asarray(jax.jit(fn)(a, b))
    want = reference(a, b)
    finite = np.isfinite(want)
    assert (~finite).any() or fn is detection.generalized_box_iou  # 0 / 0 cases are present
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-6)
    # Documented: IoU 0 where torchvision has NaN (0 / 0), so GIoU = -1 there (0 if the
    # enclosing box is empty too).
    enclosing = np.prod(np.maximum(a[:, None, 2:], b[None, :, 2:]) -
                        np.minimum(a[:, None, :2], b[None, :, :2]), axis=-1)
    nan_value = 0.0 if fn is detection.box_iou else np.where(enclosing > 0, -1.0, 0.0)
    np.testing.assert_array_equal(got[~finite], np.broadcast_to(nan_value, got.shape)[~finite])
  np.testing.assert_allclose(detection.box_area(a), (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))


@pytest.mark.parametrize("name", ["box_iou", "generalized_box_iou"])
def test_iou_gradients_match_finite_differences_of_reference(name):
  rng = np.random.default_rng(5)
  a = np.concatenate([rng.uniform(0, 40, (5, 2)), rng.uniform(5, 30, (5, 2))], 1)
  b = np.concatenate([rng.uniform(0, 40, (4, 2)), rng.uniform(5, 30, (4, 2))], 1)
  a[:, 2:] += a[:, :2]
  b[:, 2:] += b[:, :2]
  w = rng.normal(size=(5, 4))
  fn, reference = getattr(detection, name), getattr(ref, name)
  grad_a, grad_b = jax.jit(jax.grad(lambda x, y: (fn(x, y) * w).sum(), argnums=(0, 1)))(
      jnp.float32(a), jnp.float32(b))
  eps = 1e-4
  for boxes, grad, which in ((a, grad_a, 0), (b, grad_b, 1)):
    numeric = np.zeros_like(boxes)
    for idx in np.ndindex(boxes.shape):
      plus, minus = boxes.copy(), boxes.copy()
      plus[idx] += eps
      minus[idx] -= eps
      args_p = (plus, b) if which == 0 else (a, plus)
      args_m = (minus, b) if which == 0 else (a, minus)
      numeric[idx] = ((reference(*args_p) * w).sum() - (reference(*args_m) * w).sum()) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-5)


def test_iou_gradients_are_finite_at_degenerate_boxes():
  a = jnp.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 4.0, 4.0]])
  g = jax.jit(jax.grad(lambda x: (detection.box_iou(x, x) + detection.generalized_box_iou(x, x)).sum()))(a)
  assert np.isfinite(np.asarray(g)).all()


def test_iou_matches_torchvision_golden(golden):
  for name, fn in (("iou", detection.box_iou), ("giou", detection.generalized_box_iou)):
    got = np.asarray(fn(golden["iou_a"], golden["iou_b"]))
    want = golden[name]
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6, atol=1e-7)
    assert (got[~finite] <= 0).all()
    grads = jax.jit(jax.grad(lambda x, y: (fn(x, y) * golden["grad_weights"]).sum(),
                             argnums=(0, 1)))(
        golden["grad_a"], golden["grad_b"])
    np.testing.assert_allclose(grads[0], golden[f"{name}_grad_a"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads[1], golden[f"{name}_grad_b"], rtol=1e-4, atol=1e-6)


def test_iou_and_coder_under_vmap_and_jit():
  rng = np.random.default_rng(7)
  a = np.stack([random_boxes(rng, 6, degenerate=0.0) + np.float32([0, 0, 1, 1]) for _ in range(3)])
  b = np.stack([random_boxes(rng, 4, degenerate=0.0) + np.float32([0, 0, 1, 1]) for _ in range(3)])
  iou = jax.jit(jax.vmap(detection.box_iou))(a, b)
  giou = jax.jit(jax.vmap(detection.generalized_box_iou))(a, b)
  coder = detection.BoxCoder()
  deltas = jax.jit(jax.vmap(coder.encode))(a[:, :4], b)
  decoded = jax.jit(jax.vmap(coder.decode))(deltas, b)
  for i in range(3):
    np.testing.assert_allclose(iou[i], ref.box_iou(a[i], b[i]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(giou[i], ref.generalized_box_iou(a[i], b[i]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(decoded[i], a[i, :4], rtol=1e-5, atol=1e-3)


# ------------------------------------------------------------------ box coder

@pytest.mark.parametrize("weights", [(10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0), (2.0, 3.0, 0.5, 7.0)])
def test_box_coder_matches_reference(weights):
  rng = np.random.default_rng(int(sum(weights)))
  p = np.concatenate([rng.uniform(0, 50, (30, 2)), rng.uniform(1, 40, (30, 2))], 1)
  g = np.concatenate([rng.uniform(0, 50, (30, 2)), rng.uniform(1, 40, (30, 2))], 1)
  p[:, 2:] += p[:, :2]
  g[:, 2:] += g[:, :2]
  p, g = p.astype(np.float32), g.astype(np.float32)
  coder = detection.BoxCoder(weights)
  np.testing.assert_allclose(jax.jit(coder.encode)(g, p), ref.encode(g, p, weights), rtol=1e-4,
                             atol=1e-5)
  deltas = (rng.normal(size=(30, 2, 4)) * 3).astype(np.float32)
  deltas[::4, 0, 2] = 50.0  # beyond the clamp
  got = jax.jit(coder.decode)(deltas, p[:, None, :])
  want = ref.decode(deltas.reshape(30, 8), p, weights).reshape(30, 2, 4)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
  # decode inverts encode.
  np.testing.assert_allclose(coder.decode(coder.encode(g, p), p), g, rtol=1e-5, atol=1e-3)


def test_box_coder_matches_torchvision_golden(golden):
  for name, weights in (("heads", (10.0, 10.0, 5.0, 5.0)), ("rpn", (1.0, 1.0, 1.0, 1.0))):
    coder = detection.BoxCoder(weights)
    np.testing.assert_allclose(coder.encode(golden["coder_gt"], golden["coder_proposals"]),
                               golden[f"encode_{name}"], rtol=1e-5, atol=1e-5)
    deltas = golden["coder_deltas"].reshape(-1, 3, 4)
    got = coder.decode(deltas, golden["coder_proposals"][:, None]).reshape(-1, 12)
    np.testing.assert_allclose(got, golden[f"decode_{name}"], rtol=1e-6, atol=1e-3)


def test_box_coder_gradient_matches_finite_differences():
  rng = np.random.default_rng(3)
  p = np.array([[3.0, 4.0, 20.0, 30.0], [10.0, 2.0, 14.0, 9.0]])
  d = rng.normal(size=(2, 4))
  w = rng.normal(size=(2, 4))
  weights = (10.0, 10.0, 5.0, 5.0)
  grad = jax.jit(jax.grad(lambda x: (detection.BoxCoder(weights).decode(x, p) * w).sum()))(
      jnp.float32(d))
  eps = 1e-5
  numeric = np.zeros_like(d)
  for idx in np.ndindex(d.shape):
    plus, minus = d.copy(), d.copy()
    plus[idx] += eps
    minus[idx] -= eps
    numeric[idx] = ((ref.decode(plus, p, weights) - ref.decode(minus, p, weights)) * w).sum() / (
        2 * eps)
  np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ anchors

@pytest.mark.parametrize("sizes,ratios", [((32, 64, 128), (0.5, 1.0, 2.0)), ((20, 45.5), (0.3, 1.7)),
                                          ((16,), (1.0,))])
def test_cell_anchors_match_reference_in_both_conventions(sizes, ratios):
  np.testing.assert_array_equal(detection.cell_anchors(sizes, ratios),
                                ref.cell_anchors_torchvision(sizes, ratios))
  np.testing.assert_allclose(detection.cell_anchors(sizes, ratios, convention="detectron2"),
                             ref.cell_anchors_detectron2(sizes, ratios), rtol=1e-7)
  # The orders differ: ratio-major (torchvision) vs size-major (detectron2).
  if len(sizes) > 1 and len(ratios) > 1:
    tv = detection.cell_anchors(sizes, ratios)
    d2 = detection.cell_anchors(sizes, ratios, convention="detectron2")
    assert np.abs(tv[1] - np.round(d2[1])).max() > 1  # second anchor: next size vs next ratio
    np.testing.assert_allclose(tv[1], np.round(d2[len(ratios)]), atol=1)


@pytest.mark.parametrize("convention,offset", [("torchvision", 0.0), ("detectron2", 0.0),
                                               ("detectron2", 0.5)])
def test_grid_anchors_match_reference(convention, offset):
  generator = detection.AnchorGenerator(sizes=((32, 40), (64,)), aspect_ratios=((0.5, 1.0, 2.0),),
                                        strides=(8, 16), convention=convention, offset=offset)
  got = generator([(5, 7), (3, 4)])
  assert generator.num_anchors_per_location() == [6, 3]
  cell = ref.cell_anchors_torchvision if convention == "torchvision" else ref.cell_anchors_detectron2
  for level, (sizes, grid, stride) in enumerate((((32, 40), (5, 7), 8), ((64,), (3, 4), 16))):
    want = ref.grid_anchors(cell(sizes, (0.5, 1.0, 2.0)), grid, (stride, stride), offset)
    np.testing.assert_allclose(got[level], want, rtol=1e-6)


def test_anchors_match_torchvision_golden(golden):
  fpn = detection.AnchorGenerator()  # fasterrcnn_resnet50_fpn's sizes and ratios
  grids = [(24, 32), (12, 16), (6, 8), (3, 4)]
  levels = fpn(grids + [(2, 2)])
  # The golden image is 96 x 128: torchvision's P6 stride is (96 // 2, 128 // 2) = (48, 64).
  np.testing.assert_array_equal(np.concatenate(levels[:4]), golden["anchors_fpn"][:-12])
  last = detection.grid_anchors(detection.cell_anchors((512,), (0.5, 1.0, 2.0)), (2, 2), (48, 64))
  np.testing.assert_array_equal(last, golden["anchors_fpn"][-12:])
  single = detection.AnchorGenerator(sizes=((128, 256, 512),), strides=(16,))
  np.testing.assert_array_equal(single([(6, 8)])[0], golden["anchors_single"])
  np.testing.assert_array_equal(detection.cell_anchors((20, 45.5), (0.3, 1.7, 1.0)),
                                golden["cell_odd"])


# ------------------------------------------------------------------ matcher

@pytest.mark.parametrize("high,low,allow", [(0.7, 0.3, True), (0.5, 0.5, False), (0.4, 0.1, True)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matcher_matches_reference_with_padded_gt(high, low, allow, seed):
  rng = np.random.default_rng(seed)
  gt = random_boxes(rng, 6, grid=4, degenerate=0.0)
  gt[:, 2:] = np.maximum(gt[:, 2:], gt[:, :2] + 4)
  anchors = random_boxes(rng, 50, grid=4)
  quality = np.nan_to_num(ref.box_iou(gt, anchors))
  want = ref.match(quality, high, low, allow)
  # Pad with 3 invalid rows holding large IoUs: they must change nothing.
  padded = np.concatenate([quality, np.ones((3, 50))]).astype(np.float32)
  gt_valid = np.arange(9) < 6
  # Padding rows anywhere, valid rows in their order (ties go to the first best ground truth).
  slots = np.sort(rng.choice(9, 6, replace=False))
  order = np.concatenate([slots, np.setdiff1d(np.arange(9), slots)])  # slot of each row
  rows = np.empty(9, int)
  rows[order] = np.arange(9)  # row held by each slot
  result = jax.jit(detection.Matcher(high, low, allow))(padded[rows], gt_valid[rows])
  got = np.where(np.asarray(result.matches) >= 0, rows[np.maximum(result.matches, 0)],
                 result.matches)
  np.testing.assert_array_equal(got, want)
  labels = np.where(want >= 0, 1, np.where(want == -1, 0, -1))
  np.testing.assert_array_equal(result.labels, labels)


def test_matcher_matches_torchvision_golden(golden):
  # torchvision's float32 IoUs with NaN -> 0, which is what box_iou gives.
  quality = np.asarray(detection.box_iou(golden["match_gt"], golden["match_anchors"]))
  for name, args in (("rpn", (0.7, 0.3, True)), ("heads", (0.5, 0.5, False)),
                     ("low", (0.4, 0.1, True))):
    np.testing.assert_array_equal(detection.Matcher(*args)(quality).matches,
                                  golden[f"matches_{name}"])


def test_matcher_without_ground_truth_gives_negatives_and_ignores_padding():
  quality = jnp.ones((4, 10))
  result = detection.Matcher(0.7, 0.3, True)(quality, jnp.zeros(4, bool),
                                             jnp.arange(10) < 8)
  np.testing.assert_array_equal(result.matches, [-1] * 8 + [-2] * 2)
  np.testing.assert_array_equal(result.labels, [0] * 8 + [-1] * 2)
  empty = detection.Matcher()(jnp.zeros((0, 5)))
  np.testing.assert_array_equal(empty.labels, [0] * 5)
  # vmap over images.
  batched = jax.vmap(detection.Matcher(0.5, 0.4, False))(jnp.stack([quality, 0.45 * quality]),
                                                         jnp.ones((2, 4), bool))
  np.testing.assert_array_equal(batched.labels, [[1] * 10, [-1] * 10])


# ------------------------------------------------------------------ sampler

def test_sampler_counts_and_uniqueness():
  rng = np.random.default_rng(0)
  labels = rng.choice([-1, 0, 1], size=300, p=[0.2, 0.7, 0.1])
  keys = jax.random.split(jax.random.key(0), 8)
  sample = jax.jit(jax.vmap(lambda k: detection.sample_balanced(k, jnp.asarray(labels), 64, 0.25)))(
      keys)
  for b in range(8):
    idx, pos, valid = (np.asarray(x[b]) for x in sample)
    assert valid.all()
    assert pos.sum() == min((labels == 1).sum(), 16)
    assert len(set(idx.tolist())) == 64
    assert (labels[idx[pos]] == 1).all() and (labels[idx[~pos]] == 0).all()
  # Reproducible from the key, different across keys.
  again = detection.sample_balanced(keys[0], jnp.asarray(labels), 64, 0.25)
  np.testing.assert_array_equal(again.indices, sample.indices[0])
  assert not np.array_equal(sample.indices[0], sample.indices[1])


def test_sampler_fills_with_negatives_and_pads():
  labels = jnp.array([1, 1, 1, 1, 0, 0, -1, 0, 1, -1])
  s = detection.sample_balanced(jax.random.key(1), labels, 8, 0.5)
  assert int(s.is_positive.sum()) == 4 and int(s.valid.sum()) == 7  # 4 of 5 positives, all 3 negatives
  few = detection.sample_balanced(jax.random.key(1), jnp.array([0, 1, 0]), 6, 0.5)
  np.testing.assert_array_equal(few.valid, [True] * 3 + [False] * 3)
  np.testing.assert_array_equal(np.sort(np.asarray(few.indices[:3])), [0, 1, 2])
  only_negatives = detection.sample_balanced(jax.random.key(2), jnp.zeros(20, jnp.int32), 8, 0.25)
  assert not only_negatives.is_positive.any() and only_negatives.valid.all()


def test_sampler_is_uniform_over_positives_and_negatives():
  labels = jnp.array([1] * 10 + [0] * 20)
  keys = jax.random.split(jax.random.key(3), 4000)
  s = jax.vmap(lambda k: detection.sample_balanced(k, labels, 8, 0.25))(keys)
  idx = np.asarray(s.indices)
  counts = np.bincount(idx.ravel(), minlength=30)
  # Each positive is taken with probability 2/10, each negative with 6/20: 800 and 1200 of 4000.
  np.testing.assert_allclose(counts[:10], 800, rtol=0.12)
  np.testing.assert_allclose(counts[10:], 1200, rtol=0.1)


# ------------------------------------------------------------------ NMS

@pytest.mark.parametrize("threshold,tile_size", [(0.3, 512), (0.5, 16), (0.7, 7)])
@pytest.mark.parametrize("seed", [0, 1])
def test_nms_matches_reference_with_ties(threshold, tile_size, seed):
  rng = np.random.default_rng(seed)
  boxes = random_boxes(rng, 80, spread=25, grid=2)
  scores = (np.round(rng.random(80) * 10) / 10).astype(np.float32)
  classes = rng.integers(0, 3, 80)
  want = ref.nms(boxes, scores, threshold)
  kept = jax.jit(lambda b, s: detection.nms(b, s, iou_threshold=threshold, max_output=80,
                                            tile_size=tile_size))(boxes, scores)
  np.testing.assert_array_equal(np.asarray(kept.indices)[np.asarray(kept.valid)], want)
  want = ref.batched_nms(boxes, scores, classes, threshold)
  kept = detection.batched_nms(boxes, scores, classes, iou_threshold=threshold, max_output=30,
                               tile_size=tile_size)
  n = min(len(want), 30)
  np.testing.assert_array_equal(np.asarray(kept.indices)[:n], want[:n])
  assert int(kept.valid.sum()) == n


def test_nms_matches_torchvision_golden(golden):
  boxes, scores, classes = golden["nms_boxes"], golden["nms_scores"], golden["nms_classes"]
  for t in ("3", "5", "7"):
    kept = detection.nms(boxes, scores, iou_threshold=int(t) / 10, max_output=200)
    np.testing.assert_array_equal(np.asarray(kept.indices)[np.asarray(kept.valid)],
                                  golden[f"nms_keep_{t}"])
    kept = detection.batched_nms(boxes, scores, classes, iou_threshold=int(t) / 10, max_output=200)
    got = np.asarray(kept.indices)[np.asarray(kept.valid)]
    # The coordinate-offset path orders by its stable nms sort, like ours.
    np.testing.assert_array_equal(got, golden[f"batched_trick_keep_{t}"])
    np.testing.assert_array_equal(np.sort(got), np.sort(golden[f"batched_keep_{t}"]))


@pytest.mark.parametrize("tile_size", [512, 16, 5])
def test_nms_suppression_chain_across_tiles(tile_size):
  # Sliding boxes with decreasing scores: each overlaps its neighbours (IoU 0.78 > 0.7) but not
  # the boxes two away (IoU 0.6), so greedy NMS keeps every other box, a chain 60 long.
  x = np.arange(60, dtype=np.float32) * 16
  boxes = np.stack([x, 0 * x, x + 128, 0 * x + 128], 1)
  scores = np.linspace(1, 0.1, 60).astype(np.float32)
  kept = detection.nms(boxes, scores, iou_threshold=0.7, max_output=60, tile_size=tile_size)
  np.testing.assert_array_equal(np.asarray(kept.indices)[np.asarray(kept.valid)],
                                np.arange(0, 60, 2))


def test_nms_padding_and_vmap():
  rng = np.random.default_rng(4)
  boxes = random_boxes(rng, 40, spread=20)
  scores = rng.random(40).astype(np.float32)
  valid = rng.random(40) < 0.7
  want = ref.nms(boxes[valid], scores[valid], 0.5)
  want = np.flatnonzero(valid)[want]
  kept = jax.vmap(lambda b, s, v: detection.nms(b, s, v, iou_threshold=0.5, max_output=50))(
      jnp.stack([boxes, boxes]), jnp.stack([scores, scores]), jnp.stack([valid, valid]))
  for b in range(2):
    np.testing.assert_array_equal(np.asarray(kept.indices[b])[np.asarray(kept.valid[b])], want)
    assert (np.asarray(kept.indices[b])[~np.asarray(kept.valid[b])] == 0).all()
  nothing = detection.nms(boxes, scores, np.zeros(40, bool), iou_threshold=0.5, max_output=5)
  assert not nothing.valid.any()


# ------------------------------------------------------------------ errors

def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match="shape"):
    detection.box_iou(jnp.zeros((3, 5)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="weights"):
    detection.BoxCoder((1.0, 1.0, 0.0, 1.0))
  with pytest.raises(ValueError, match="convention"):
    detection.cell_anchors((32,), (1.0,), convention="mmdet")
  with pytest.raises(ValueError, match="levels"):
    detection.AnchorGenerator()([(4, 4)])
  with pytest.raises(ValueError, match="per level"):
    detection.AnchorGenerator(sizes=((32,), (64,)), strides=(4,))
  with pytest.raises(ValueError, match="low_threshold"):
    detection.Matcher(0.3, 0.7)
  with pytest.raises(ValueError, match="positive_fraction"):
    detection.sample_balanced(jax.random.key(0), jnp.zeros(4, jnp.int32), 4, 1.5)
  with pytest.raises(ValueError, match="vmap"):
    detection.nms(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3)), iou_threshold=0.5, max_output=3)
  assert math.isclose(detection.BoxCoder().clamp, math.log(1000 / 16))


# ------------------------------------------------------------------ torchvision itself

@pytest.mark.parametrize("seed", [0, 1])
def test_against_torchvision_directly(seed):
  """Fresh random inputs through torchvision (skipped where it is not installed, as in CI;
  run it with an environment that has both, e.g. PYTHONPATH=.:<jax site-packages> python -m
  pytest with torch's interpreter)."""
  torch = pytest.importorskip("torch", reason="torchvision not installed (CI has no torch)")
  pytest.importorskip("torchvision", reason="torchvision not installed (CI has no torch)")
  from torchvision.models.detection import _utils as det_utils
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  from torchvision.models.detection.image_list import ImageList
  from torchvision.ops import boxes as box_ops
  rng = np.random.default_rng(100 + seed)
  a, b = random_boxes(rng, 31), random_boxes(rng, 19, grid=3)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  for fn, tfn in ((detection.box_iou, box_ops.box_iou),
                  (detection.generalized_box_iou, box_ops.generalized_box_iou)):
    want = tfn(ta, tb).numpy()
    finite = np.isfinite(want)
    np.testing.assert_allclose(np.asarray(fn(a, b))[finite], want[finite], rtol=1e-6, atol=1e-7)
  proposals = random_boxes(rng, 40, degenerate=0.0) + np.float32([0, 0, 1, 1])
  gt = random_boxes(rng, 40, degenerate=0.0) + np.float32([0, 0, 1, 1])
  deltas = (rng.normal(size=(40, 4)) * 3).astype(np.float32)
  coder, tcoder = detection.BoxCoder(), det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
  np.testing.assert_allclose(coder.encode(gt, proposals), tcoder.encode_single(
      torch.from_numpy(gt), torch.from_numpy(proposals)).numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(coder.decode(deltas, proposals), tcoder.decode_single(
      torch.from_numpy(deltas), torch.from_numpy(proposals)).numpy(), rtol=1e-6, atol=1e-3)
  sizes = tuple(tuple(float(s) for s in rng.uniform(8, 300, 2).round(1)) for _ in range(2))
  ratios = tuple(float(r) for r in rng.uniform(0.2, 3, 3).round(2))
  grids = [(7, 9), (4, 5)]
  generator = AnchorGenerator(sizes, (ratios,) * 2)
  want = generator(ImageList(torch.zeros(1, 3, 56, 72), [(56, 72)]),
                   [torch.zeros(1, 1, *g) for g in grids])[0].numpy()
  got = detection.AnchorGenerator(sizes, (ratios,), strides=(8, 14))(grids)
  np.testing.assert_array_equal(np.concatenate(got), want)
  quality = np.asarray(detection.box_iou(gt[:6], proposals))
  for args in ((0.7, 0.3, True), (0.5, 0.5, False)):
    np.testing.assert_array_equal(detection.Matcher(*args)(quality).matches,
                                  det_utils.Matcher(*args)(torch.from_numpy(quality.copy())).numpy())
  boxes = random_boxes(rng, 150, spread=30, grid=2)
  scores = (np.round(rng.random(150) * 10) / 10).astype(np.float32)
  classes = rng.integers(0, 3, 150)
  for threshold in (0.3, 0.5):
    kept = detection.nms(boxes, scores, iou_threshold=threshold, max_output=150)
    np.testing.assert_array_equal(np.asarray(kept.indices)[np.asarray(kept.valid)],
                                  box_ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                              threshold).numpy())
    kept = detection.batched_nms(boxes, scores, classes, iou_threshold=threshold, max_output=150)
    want = box_ops._batched_nms_coordinate_trick(torch.from_numpy(boxes), torch.from_numpy(scores),
                                                 torch.from_numpy(classes), threshold).numpy()
    np.testing.assert_array_equal(np.asarray(kept.indices)[np.asarray(kept.valid)], want)
