"""Proposal files (zoo.data.proposal_files) and the pipeline's `proposals` feature."""

import pickle

import numpy as np
import pytest
import scipy.io

from zoo.data import augment, load_data_source, pipeline, proposal_files


def random_proposals(rng, n, size=64):
  xy = rng.uniform(0, size - 8, (n, 2))
  wh = rng.uniform(1, 8, (n, 2))
  return np.concatenate([xy, xy + wh], -1).astype(np.float32)


def test_npz_round_trip_keeps_keys_order_and_values(tmp_path):
  rng = np.random.default_rng(0)
  for keys in ([3, 0, 17], ["000005", "000007"]):
    boxes = {k: random_proposals(rng, n) for k, n in zip(keys, (5, 0, 9))}
    path = str(tmp_path / "p.npz")
    proposal_files.save_proposals(path, boxes)
    loaded = proposal_files.load_proposals(path)
    assert list(loaded) == keys
    for k in keys:
      np.testing.assert_array_equal(loaded[k], boxes[k])
  assert not list(tmp_path.glob("*.tmp*"))   # written atomically: no temporary left


def test_detectron2_pickle_is_sorted_by_objectness(tmp_path):
  boxes = np.array([[0, 0, 4, 4], [1, 1, 5, 5], [2, 2, 6, 6]], np.float32)
  data = {"ids": [11, 12], "boxes": [boxes, boxes[:1]],
          "objectness_logits": [np.array([0.1, 2.0, -1.0]), np.array([0.0])], "bbox_mode": 0}
  path = tmp_path / "p.pkl"
  path.write_bytes(pickle.dumps(data))
  loaded = proposal_files.load_proposals(str(path))
  np.testing.assert_array_equal(loaded[11], boxes[[1, 0, 2]])
  np.testing.assert_array_equal(loaded[12], boxes[:1])
  data["bbox_mode"] = 1   # XYWH_ABS
  path.write_bytes(pickle.dumps(data))
  with pytest.raises(ValueError, match="only XYXY_ABS"):
    proposal_files.load_proposals(str(path))


def test_selective_search_mat_is_converted_like_py_faster_rcnn(tmp_path):
  # py-faster-rcnn: raw[:, (1, 0, 3, 2)] - 1 gives 0-based inclusive (x1, y1, x2, y2); pixel
  # edges add 1 to x2 and y2.
  raw = np.array([[1, 2, 10, 20], [5, 6, 7, 8]], np.float64)   # (y1, x1, y2, x2), 1-based
  images = np.empty((2,), object)
  images[:] = ["000005", "000007"]
  cells = np.empty((2,), object)
  cells[:] = [raw, raw[:1]]
  path = str(tmp_path / "voc_2007_test.mat")
  scipy.io.savemat(path, {"images": images, "boxes": cells})
  loaded = proposal_files.load_proposals(path)
  np.testing.assert_array_equal(loaded["000005"], [[1, 0, 20, 10], [5, 4, 8, 7]])
  np.testing.assert_array_equal(loaded["000007"], [[1, 0, 20, 10]])


def test_bad_files_are_named(tmp_path):
  with pytest.raises(ValueError, match="does not exist; write one"):
    proposal_files.load_proposals(str(tmp_path / "missing.npz"))
  (tmp_path / "p.json").write_text("{}")
  with pytest.raises(ValueError, match="unknown extension '.json'"):
    proposal_files.load_proposals(str(tmp_path / "p.json"))
  np.savez(tmp_path / "bad.npz", ids=np.array([1, 2]), counts=np.array([1, 1]),
           boxes=np.zeros((3, 4)))
  with pytest.raises(ValueError, match="must agree"):
    proposal_files.load_proposals(str(tmp_path / "bad.npz"))


def test_source_looks_up_clips_drops_and_normalises():
  image = np.zeros((40, 80, 3), np.uint8)
  examples = [{"image": image, "image/id": np.int64(7)},
              {"image": image, "image/filename": b"000005.jpg"},
              {"image": image, "id": np.int64(2)}]
  boxes = np.array([[-4, 10, 20, 30], [70, 0, 90, 50], [30, 5, 30, 9]], np.float32)
  source = proposal_files.ProposalSource(examples, {7: boxes, "000005": boxes[:1], 2: boxes[1:2]})
  first = source[0]["proposals"]
  # clipped to the 80 x 40 image, the zero-width third box dropped; (ymin, xmin, ymax, xmax) / size
  np.testing.assert_allclose(first, [[10 / 40, 0, 30 / 40, 20 / 80], [0, 70 / 80, 1, 1]])
  np.testing.assert_allclose(source[1]["proposals"], first[:1])
  np.testing.assert_allclose(source[2]["proposals"], first[1:2])
  with pytest.raises(ValueError, match=r"Example 0 \(keys \[7\]\) has no proposals in f.npz"):
    proposal_files.ProposalSource(examples, {}, "f.npz")[0]


def examples_with_proposals(num=3, size=64, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(num):
    pixels = random_proposals(rng, 5 + i, size)
    out.append({"image": rng.integers(0, 256, (size, size, 3), np.uint8), "id": np.int64(i),
                "objects": {"bbox": np.zeros((0, 4), np.float32), "label": np.zeros((0,), np.int64)},
                "proposals": pixels[:, [1, 0, 3, 2]] / size, "pixels": pixels})
  return out


def test_pipeline_gives_pixels_truncated_and_padded():
  examples = examples_with_proposals()
  batches = list(pipeline.eval_batches(examples, global_batch_size=2, max_proposals=6,
                                       features=("image", "proposals"), process_index=0,
                                       process_count=1))
  proposals = np.concatenate([b["proposals"] for b in batches])
  valid = np.concatenate([b["proposals_valid"] for b in batches])
  assert proposals.shape == (4, 6, 4) and valid.shape == (4, 6)
  np.testing.assert_array_equal(valid.sum(1), [5, 6, 6, 0])   # 5, 6, 7 -> 6 kept; eval padding 0
  for i, example in enumerate(examples):
    n = valid[i].sum()
    np.testing.assert_allclose(proposals[i, :n], example["pixels"][:n], atol=1e-4)
    assert (proposals[i, n:] == 0).all()


def test_asking_for_proposals_without_a_file_is_a_clear_error():
  examples = examples_with_proposals(1)
  del examples[0]["proposals"]
  with pytest.raises(ValueError, match="has no proposals; load the source with a proposal file"):
    next(iter(pipeline.eval_batches(examples, global_batch_size=1, features=("proposals",),
                                    process_index=0, process_count=1)))


def test_random_translate_moves_proposals_with_the_image():
  example = {"image": np.zeros((32, 32, 3), np.float32),
             "proposals": np.array([[0, 0, 10, 10], [28, 28, 32, 32], [0, 0, 0, 0]], np.float32),
             "proposals_valid": np.array([True, True, False])}
  moved = augment.random_translate(example, np.random.default_rng(3), max_shift=8)
  shift = moved["proposals"][0, 2:] - 10   # (dx, dy) of the right/bottom edge of the first box
  expected = np.clip(example["proposals"] + np.tile(shift, 2), 0, 32)
  np.testing.assert_allclose(moved["proposals"], expected)
  on_canvas = (expected[:, 2] > expected[:, 0]) & (expected[:, 3] > expected[:, 1])
  np.testing.assert_array_equal(moved["proposals_valid"], on_canvas & example["proposals_valid"])


def test_embedded_data_proposal_files_equal_the_standin_proposals(tiny_data_dir, tmp_path):
  """make_proposals' files and load_data_source(proposals={settings}) join the same boxes:
  standin_proposals.jittered_proposals of each example's padded ground truth and id."""
  import jax
  from zoo.data import standin_proposals

  settings = dict(num_proposals=32, copies=4, seed=5, max_objects=8)
  source = load_data_source("digit_canvases/tiny", "validation", data_dir=tiny_data_dir)
  written = standin_proposals.split_proposals(source, **settings, batch_size=8)
  path = str(tmp_path / "digit_canvases_{split}.npz")
  proposal_files.save_proposals(path.replace("{split}", "validation"), written)
  batches = []
  for proposals in (path, settings):
    joined = load_data_source("digit_canvases/tiny", "validation", data_dir=tiny_data_dir,
                              proposals=proposals)
    batches.append(next(iter(pipeline.eval_batches(
        joined, global_batch_size=16, max_proposals=32, features=("boxes", "proposals", "id"),
        process_index=0, process_count=1))))
  batch = batches[0]
  assert batch["proposals_valid"].all()
  np.testing.assert_array_equal(batches[1]["proposals"], batch["proposals"])
  for i in range(3):
    expected = standin_proposals.jittered_proposals(
        standin_proposals.example_key(5, jax.numpy.int32(batch["id"][i])), batch["boxes"][i],
        batch["objects_valid"][i], (64, 64), num_proposals=32, copies=4)
    np.testing.assert_allclose(batch["proposals"][i], expected, atol=1e-4)
