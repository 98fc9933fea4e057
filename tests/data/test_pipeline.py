"""The grain input pipeline: values, determinism, epochs, host shards, exact resumption
(get_state/set_state and Orbax via grain.checkpoint), one-pass padded evaluation, errors."""

import itertools

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from zoo.data import IGNORE_LABEL, features, pipeline

ALL = ("image", "segmentation", "boxes", "labels", "instance_masks", "id")


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def check_row_against_source(batch, row, source, max_objects):
  """Row `row` of `batch` is the source example it names, converted as documented."""
  example = source[int(batch["id"][row])]
  np.testing.assert_array_equal(batch["image"][row], example["image"] / np.float32(255))
  np.testing.assert_array_equal(batch["segmentation"][row], example["segmentation"])
  num = len(example["objects"]["label"])
  valid = batch["objects_valid"][row]
  np.testing.assert_array_equal(valid, np.arange(max_objects) < num)
  np.testing.assert_array_equal(batch["labels"][row][:num], example["objects"]["label"])
  assert (batch["labels"][row][num:] == -1).all()
  height, width = example["segmentation"].shape
  for k in range(num):
    ymin, xmin, ymax, xmax = example["objects"]["bbox"][k]
    np.testing.assert_allclose(batch["boxes"][row, k], [xmin * width, ymin * height,
                                                        xmax * width, ymax * height], rtol=1e-6)
    np.testing.assert_array_equal(batch["instance_masks"][row, k], example["objects"]["mask"][k])
  assert not batch["instance_masks"][row, num:].any() and not batch["boxes"][row, num:].any()


def test_train_batches_hold_the_source_examples(tiny_sources):
  source = tiny_sources["train"]
  batches = pipeline.train_batches(source, global_batch_size=8, seed=1, features=ALL,
                                   max_objects=6, process_index=0, process_count=1)
  batch = next(batches)
  assert batch.keys() == set(ALL) | {"objects_valid"}
  expected = {"image": ((8, 64, 64, 3), np.float32), "segmentation": ((8, 64, 64), np.int32),
              "boxes": ((8, 6, 4), np.float32), "labels": ((8, 6), np.int32),
              "instance_masks": ((8, 6, 64, 64), np.bool_), "objects_valid": ((8, 6), np.bool_),
              "id": ((8,), np.int32)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  for row in range(8):
    check_row_against_source(batch, row, source, max_objects=6)


def test_more_objects_than_max_objects_is_a_clear_error(tiny_sources):
  source = tiny_sources["train"]
  most = max(len(source[i]["objects"]["label"]) for i in range(len(source)))
  assert most > 1
  batches = pipeline.train_batches(source, global_batch_size=32, seed=0, max_objects=1,
                                   features=("labels", "id"), process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"more than max_objects=1; raise it \(--config.data.max_objects="):
    next(batches)


def test_reversed_boxes_are_rejected():
  example = {"id": 7, "image": np.zeros((4, 4, 3), np.uint8),
             "objects": {"label": np.array([1]), "bbox": np.array([[0.5, 0.6, 0.7, 0.2]], np.float32),
                         "mask": np.zeros((1, 4, 4), bool)}}
  with pytest.raises(ValueError, match="Example 7 has a box with x2 < x1"):
    pipeline._example_arrays(example, features=("boxes", "labels"),
                             layout=features.Layout((4, 4), max_objects=2))


def test_only_requested_features_are_returned_and_decoded(tiny_sources):
  source = tiny_sources["train"]
  batch = next(pipeline.train_batches(source, global_batch_size=4, seed=0,
                                      features=("image", "segmentation"), process_index=0,
                                      process_count=1))
  assert batch.keys() == {"image", "segmentation"}
  assert next(pipeline.train_batches(source, global_batch_size=4, seed=0, features=("boxes",),
                                     process_index=0, process_count=1)).keys() == {"boxes", "objects_valid"}
  # The instance masks stay zlib-compressed bytes when not asked for.
  example = pipeline._decoding_only(source, ("image", "segmentation"))[0]
  assert isinstance(example["objects"]["mask"][0], bytes)
  assert isinstance(example["image"], np.ndarray)
  example = pipeline._decoding_only(source, ("labels",))[0]
  assert isinstance(example["image"], bytes) and isinstance(example["segmentation"], bytes)


@pytest.mark.parametrize("augment", [(), ("photometric", "random_translate")])
def test_train_batches_are_deterministic(tiny_sources, augment):
  def batches(seed):
    iterator = pipeline.train_batches(tiny_sources["train"], global_batch_size=4, seed=seed,
                                      features=("image", "segmentation", "id"), augment=augment,
                                      process_index=0, process_count=1)
    return take(iterator, 10)

  assert_batches_equal(batches(5), batches(5))
  assert not np.array_equal(np.concatenate([b["id"] for b in batches(5)]),
                            np.concatenate([b["id"] for b in batches(6)]))


def test_every_epoch_is_a_new_permutation_of_the_split(tiny_sources):
  iterator = pipeline.train_batches(tiny_sources["train"], global_batch_size=8, seed=0,
                                    features=("id",), process_index=0, process_count=1)
  ids = np.concatenate([b["id"] for b in take(iterator, 12)]).reshape(3, 32)
  for epoch in ids:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(32))
  assert not np.array_equal(ids[0], ids[1]) and not np.array_equal(ids[1], ids[2])


@pytest.mark.parametrize("process_count", [2, 4])
def test_host_shards_partition_the_training_split(tiny_sources, process_count):
  epoch = []
  for host in range(process_count):
    local_batch = 8 // process_count
    iterator = pipeline.train_batches(tiny_sources["train"], global_batch_size=8, seed=3,
                                      features=("id",), process_index=host,
                                      process_count=process_count)
    ids = np.concatenate([b["id"] for b in take(iterator, 32 // process_count // local_batch)])
    assert (ids % process_count == host).all()
    epoch.append(ids)
  np.testing.assert_array_equal(np.sort(np.concatenate(epoch)), np.arange(32))


@pytest.mark.parametrize("augment", [(), ("photometric", "random_translate"),
                                     ("random_scale_crop", "horizontal_flip")])
def test_resume_from_state_is_exact(tiny_sources, augment):
  rng = np.random.default_rng()
  k, n = (int(v) for v in rng.integers(1, 12, size=2))  # Crosses epoch ends (32 / 3).

  def fresh():
    return pipeline.train_batches(tiny_sources["train"], global_batch_size=3, seed=11,
                                  features=ALL, augment=augment, process_index=0, process_count=1)

  iterator = fresh()
  take(iterator, k)
  state = iterator.get_state()
  expected = take(iterator, n)
  resumed = fresh()
  take(resumed, 2)  # Its own position is overwritten.
  resumed.set_state(state)
  assert_batches_equal(take(resumed, n), expected)


def test_orbax_checkpoint_round_trip(tiny_sources, tmp_path):
  """grain.checkpoint.CheckpointSave/Restore, as the trainer's Orbax manager uses them."""
  def fresh():
    return pipeline.train_batches(tiny_sources["train"], global_batch_size=4, seed=2,
                                  features=("image", "id"), augment=("photometric",),
                                  process_index=0, process_count=1)

  iterator = fresh()
  take(iterator, 5)
  manager = ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("data",))
  manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = take(iterator, 4)
  manager.close()

  restored = fresh()
  manager = ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("data",))
  manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  manager.close()
  assert_batches_equal(take(restored, 4), expected)


@pytest.mark.parametrize("process_count,global_batch_size", [(1, 5), (1, 16), (2, 6), (3, 3), (4, 16)])
def test_eval_covers_every_example_once(tiny_sources, process_count, global_batch_size):
  source = tiny_sources["validation"]  # 16 examples.
  seen, num_batches = [], set()
  for host in range(process_count):
    batches = list(pipeline.eval_batches(source, global_batch_size=global_batch_size,
                                         features=ALL, max_objects=4, process_index=host,
                                         process_count=process_count))
    num_batches.add(len(batches))
    local = global_batch_size // process_count
    ids = []
    for batch in batches:
      assert batch["image"].shape == (local, 64, 64, 3) and batch["example_valid"].shape == (local,)
      for row in range(local):
        if batch["example_valid"][row]:
          check_row_against_source(batch, row, source, max_objects=4)
          ids.append(int(batch["id"][row]))
        else:
          assert batch["id"][row] == -1 and not batch["image"][row].any()
          assert (batch["segmentation"][row] == IGNORE_LABEL).all()
          assert not batch["objects_valid"][row].any() and not batch["instance_masks"][row].any()
    assert ids == list(range(host, 16, process_count))  # This host's shard, in order.
    seen += ids
    # Padding only at the end: valid rows first.
    valid = np.concatenate([b["example_valid"] for b in batches])
    assert not (np.diff(valid.astype(int)) > 0).any()
  assert sorted(seen) == list(range(16))
  assert len(num_batches) == 1, "hosts must take part in the same number of eval steps"
  assert num_batches.pop() == -(-(-(-16 // process_count)) // (global_batch_size // process_count))


def test_eval_batches_can_be_iterated_again(tiny_sources):
  batches = pipeline.eval_batches(tiny_sources["test"], global_batch_size=6,
                                  features=("image", "segmentation"), process_index=0,
                                  process_count=1)
  first, second = list(batches), list(batches)
  assert len(first) == 3 and first[0].keys() == {"image", "segmentation", "example_valid"}
  assert_batches_equal(first, second)


def test_augmented_batches_stay_consistent(tiny_sources):
  iterator = pipeline.train_batches(tiny_sources["train"], global_batch_size=16, seed=4,
                                    features=ALL,
                                    augment=("random_translate", "horizontal_flip", "photometric"),
                                    process_index=0, process_count=1)
  for batch in take(iterator, 4):
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    masks = batch["instance_masks"] & batch["objects_valid"][..., None, None]
    np.testing.assert_array_equal(batch["segmentation"] > 0, masks.any(1))
    for row, k in zip(*np.nonzero(batch["objects_valid"])):
      mask = masks[row, k]
      assert (batch["segmentation"][row][mask] == batch["labels"][row, k] + 1).all()
      rows, columns = np.nonzero(mask)
      x1, y1, x2, y2 = batch["boxes"][row, k]
      assert x1 <= columns.min() and columns.max() + 1 <= x2
      assert y1 <= rows.min() and rows.max() + 1 <= y2


def test_bad_arguments_are_reported(tiny_sources):
  source = tiny_sources["train"]
  kwargs = dict(global_batch_size=8, seed=0, features=("image",), process_index=0, process_count=1)
  for function in (pipeline.train_batches, pipeline.eval_batches):
    if function is pipeline.eval_batches:
      kwargs.pop("seed")
    with pytest.raises(ValueError, match="valid features: image, segmentation, boxes"):
      function(source, **{**kwargs, "features": ("image", "heat")})
    with pytest.raises(ValueError, match="not the string"):
      function(source, **{**kwargs, "features": "image"})
    with pytest.raises(ValueError, match=r"global_batch_size=9 must be a positive multiple .* \(2\)"):
      function(source, **{**kwargs, "global_batch_size": 9, "process_count": 2})
    with pytest.raises(ValueError, match="process_index < process_count"):
      function(source, **{**kwargs, "process_index": 2, "process_count": 2})
    with pytest.raises(ValueError, match="max_objects must be a positive integer"):
      function(source, **{**kwargs, "max_objects": 0})
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
      function(source, **{**kwargs, "max_length": 1.5})
    with pytest.raises(ValueError, match=r"Example \d+ has no flow; the source does not carry the `flow`"):
      next(iter(function(source, **{**kwargs, "features": ("image", "flow")})))
  with pytest.raises(ValueError, match="Unknown augmentation.*'flip'.*known: photometric, random_translate"):
    pipeline.train_batches(source, global_batch_size=8, seed=0, features=("image",),
                           augment=("flip",), process_index=0, process_count=1)
  with pytest.raises(ValueError, match="seed must be an integer"):
    pipeline.train_batches(source, global_batch_size=8, seed=-1, features=("image",),
                           process_index=0, process_count=1)


def test_plain_sequences_work_as_sources(tiny_sources):
  """Any random-access sequence of examples in the digit_canvases layout is a source."""
  in_memory = list(itertools.islice(tiny_sources["test"], 16))
  batches = list(pipeline.eval_batches(in_memory, global_batch_size=8, features=ALL,
                                       process_index=0, process_count=1))
  reference = list(pipeline.eval_batches(tiny_sources["test"], global_batch_size=8, features=ALL,
                                         process_index=0, process_count=1))
  assert_batches_equal(batches, reference)


def test_example_batch_has_the_batches_shapes_and_dtypes(tiny_sources):
  source = tiny_sources["train"]
  layout = dict(features=ALL + ("proposals",), max_objects=6, max_proposals=5)
  with_proposals = [{**source[i], "proposals": np.array([[0.1, 0.2, 0.5, 0.6]], np.float32)}
                    for i in range(4)]
  example = pipeline.example_batch(with_proposals, **layout)
  batch = next(pipeline.train_batches(with_proposals, global_batch_size=4, seed=0,
                                      process_index=0, process_count=1, **layout))
  assert example.keys() == batch.keys() == set(ALL) | {"objects_valid", "proposals",
                                                        "proposals_valid"}
  for key, value in example.items():
    assert (value.shape, value.dtype) == ((1,) + batch[key].shape[1:], batch[key].dtype), key
  # The first example, not augmented, as eval_batches decodes it.
  first = next(iter(pipeline.eval_batches(with_proposals, global_batch_size=1, process_index=0,
                                          process_count=1, **layout)))
  for key, value in example.items():
    np.testing.assert_array_equal(value, first[key], err_msg=key)
  with pytest.raises(ValueError, match="no examples"):
    pipeline.example_batch([], features=("image",))
