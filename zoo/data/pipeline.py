"""Input pipeline: grain over a TFDS data source, sharded by host, resumable.

    source = zoo.data.load_data_source("digit_canvases", "train")
    batches = train_batches(source, global_batch_size=32, seed=0,
                            features=("image", "segmentation"), augment=("photometric",))
    batch = next(batches)          # dict of host-local NumPy arrays
    state = batches.get_state()    # JSON-serialisable; batches.set_state(state) resumes exactly

    for batch in eval_batches(validation_source, global_batch_size=64, features=...):
      ...                          # one pass, in order; batch["example_valid"] marks padding

The source holds examples in the `digit_canvases` layout (`zoo/data/digit_canvases.py`):
`image` (H, W, 3) uint8, `segmentation` (H, W) uint8, `objects` {`bbox` normalised
(ymin, xmin, ymax, xmax), `label`, `mask` (H, W) bool}, `id`. A batch holds the requested
`features`, host-local (B = global_batch_size // process_count), as:

  image:           (B, H, W, 3) float32 in [0, 1].
  segmentation:    (B, H, W) int32; 0 background, digit d -> d + 1, IGNORE_LABEL (255) on
                   eval padding.
  boxes:           (B, M, 4) float32 (x1, y1, x2, y2) pixels, pixel-edge coordinates (a box
                   over pixel columns 3..7 has x1 = 3, x2 = 8); 0 where not valid.
  labels:          (B, M) int32 digit class 0..9; -1 where not valid.
  instance_masks:  (B, M, H, W) bool, each object's visible pixels; False where not valid.
  objects_valid:   (B, M) bool; added whenever boxes, labels or instance_masks are asked for.
  proposals:       (B, P, 4) float32 (x1, y1, x2, y2) pixels: the example's precomputed region
                   proposals (a source made with `load_data_source(..., proposals=FILE)`,
                   zoo.data.proposal_files), the first P = max_proposals of them (files list
                   them best first); 0 where not valid.
  proposals_valid: (B, P) bool; added whenever proposals are asked for.
  id:              (B,) int32, the example's index in its split; -1 on eval padding.
  example_valid:   (B,) bool, eval batches only: False on the rows padding the last batch.

Objects are padded to M = max_objects; an example with more objects, or with a box whose
x2 < x1 or y2 < y1, is rejected with a ValueError naming it (and the config field to raise).
Only the requested features are decoded: a U-Net reading image + segmentation never
decompresses instance masks.
"""

import dataclasses
import functools
from typing import Iterator, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources import base as tfds_data_sources

from zoo.data import IGNORE_LABEL
from zoo.data import augment as augment_lib

FEATURES = ("image", "segmentation", "boxes", "labels", "instance_masks", "objects_valid",
            "proposals", "proposals_valid", "id")
_OBJECT_FEATURES = ("boxes", "labels", "instance_masks", "objects_valid")
# Threads that read, decode and augment examples ahead of the consumer; grain keeps their
# output in order, so the stream and its state do not depend on them. Measured on the
# 2-core CPU machine (64x64 canvases, batch 32, image + segmentation + photometric): 0
# threads 62 batches/s, 1 thread 82, 2 threads 64, 16 threads 55 (GIL contention); with a
# 20 ms train step that releases the GIL, 1 thread hides loading entirely (49 of 50 steps/s)
# where 0 threads halve the rate (24).
_READ_THREADS = 1
_PREFETCH_EXAMPLES = 128


def train_batches(source, *, global_batch_size: int, seed: int, features: Sequence[str],
                  augment: Sequence[str] = (), max_objects: int = 8,
                  max_proposals: int = 2000, process_index: int | None = None,
                  process_count: int | None = None) -> grain.DatasetIterator:
  """Infinite, per-epoch reshuffled training batches of this host's shard of `source`.

  Pipeline: source -> this host's shard `[process_index::process_count]` -> shuffle(seed)
  -> repeat (reshuffled each epoch) -> decode -> augment (random_map) -> batch. The
  stream is a pure function of (seed, process_index, process_count, source), and the
  returned iterator's `get_state()` / `set_state()` (or `grain.checkpoint.CheckpointSave` /
  `CheckpointRestore` with Orbax) resume it exactly.

  Args:
    source: a random-access data source in the `digit_canvases` layout (see module doc).
    global_batch_size: examples per step over all hosts.
    seed: the shuffle and augmentation seed, 0 <= seed < 2**32.
    features: the keys to decode and return (see `FEATURES`).
    augment: names from `zoo.data.augment.AUGMENTATIONS`, applied in order.
    max_objects: M, the number of object slots per example.
    max_proposals: P, the number of proposal slots per example (`proposals` feature).
    process_index, process_count: this host and the number of hosts; default JAX's.

  Returns:
    A grain DatasetIterator of dicts of host-local NumPy arrays (module doc).

  Raises:
    ValueError: for unknown features or augmentations, a batch size that the hosts cannot
      split evenly, a bad seed or host index.
  """
  features = _checked_features(features, max_objects, max_proposals)
  augmentation = augment_lib.compose(augment)
  if not (isinstance(seed, (int, np.integer)) and 0 <= seed < 2**32):
    raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}.")
  process_index, process_count = _process(process_index, process_count)
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  shard = grain.MapDataset.source(_decoding_only(source, features))[process_index::process_count]
  if len(shard) == 0:
    raise ValueError(f"Host {process_index} of {process_count} has no training examples: the "
                     f"source has only {len(source)}.")
  dataset = (shard.shuffle(seed=seed).repeat()
             .map(functools.partial(_example_arrays, features=features, max_objects=max_objects,
                                    max_proposals=max_proposals,
                                    canvas_shape=_canvas_shape(source))))
  if augment:
    dataset = dataset.random_map(augmentation, seed=seed)
  dataset = dataset.batch(local_batch_size, drop_remainder=True)
  return iter(dataset.to_iter_dataset(_read_options()))


def eval_batches(source, *, global_batch_size: int, features: Sequence[str], max_objects: int = 8,
                 max_proposals: int = 2000, process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
  """Exactly one pass over this host's shard of `source`, in order, in full-size batches.

  Host p reads examples p, p + P, p + 2P, ... (P = process_count). Every host yields the
  same number of batches, ceil(ceil(N / P) / B), so a jitted multi-host evaluation step
  never waits for a host that has run out; rows past the end of a shard are padding:
  `example_valid` False, zero image, `segmentation` IGNORE_LABEL, no valid objects, id -1.
  Summed over all batches and hosts, every example counts exactly once.

  Args: as `train_batches` (no seed, no augmentation).

  Returns:
    A grain IterDataset: each `iter()` is a new pass; batches as in the module doc, plus
    `example_valid` (B,) bool.
  """
  features = _checked_features(features, max_objects, max_proposals)
  process_index, process_count = _process(process_index, process_count)
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  shard = grain.MapDataset.source(_decoding_only(source, features))[process_index::process_count]
  largest_shard = -(-len(source) // process_count)
  num_batches = -(-largest_shard // local_batch_size)
  canvas_shape = _canvas_shape(source)
  convert = functools.partial(_example_arrays, features=features, max_objects=max_objects,
                              max_proposals=max_proposals, canvas_shape=canvas_shape)
  padding = _padding_example(features, max_objects, max_proposals, canvas_shape)

  def example(position: int) -> dict:
    if position < len(shard):
      return {**convert(shard[position]), "example_valid": np.bool_(True)}
    return padding

  dataset = grain.MapDataset.range(num_batches * local_batch_size).map(example)
  return dataset.batch(local_batch_size).to_iter_dataset(_read_options())


def _read_options() -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_EXAMPLES)


def _checked_features(features: Sequence[str], max_objects: int,
                      max_proposals: int) -> tuple[str, ...]:
  for name, value in (("max_objects", max_objects), ("max_proposals", max_proposals)):
    if not (isinstance(value, (int, np.integer)) and value >= 1):
      raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  if isinstance(features, str):
    raise ValueError(f"features must be a sequence of names, not the string {features!r}.")
  unknown = [f for f in features if f not in FEATURES]
  if unknown or not features:
    raise ValueError(f"Unknown or no features {unknown or list(features)}; valid features: "
                     f"{', '.join(FEATURES)}.")
  features = tuple(dict.fromkeys(features))
  if any(f in _OBJECT_FEATURES for f in features) and "objects_valid" not in features:
    features += ("objects_valid",)  # Padded object slots are meaningless without it.
  if "proposals" in features and "proposals_valid" not in features:
    features += ("proposals_valid",)
  return features


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # Only to learn the host layout; the pipeline itself is NumPy.
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"Need 0 <= process_index < process_count, got {process_index}, {process_count}.")
  return int(process_index), int(process_count)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                     f"number of hosts ({process_count}).")
  return global_batch_size // process_count


def _decoding_only(source, features):
  """`source` with decoding switched off for the heavy TFDS features `features` does not use.

  A TFDS data source decodes every feature by default; zlib-inflating 4 instance masks
  per example costs more than the image. Other sources are returned unchanged.
  """
  if not isinstance(source, tfds_data_sources.BaseDataSource) or source.decoders:
    return source  # Not TFDS's, or decoded the caller's way: leave it alone.
  skipped = {}
  if "image" not in features:
    skipped["image"] = _Undecoded()
  if "segmentation" not in features:
    skipped["segmentation"] = _Undecoded()
  if "instance_masks" not in features:
    skipped["objects"] = {"mask": _Undecoded()}
  return dataclasses.replace(source, decoders=skipped) if skipped else source


class _Undecoded(tfds.decode.SkipDecoding):
  """Leaves a feature's serialised bytes as they are, in `Sequence`s too."""

  def decode_batch_example_np(self, serialized):
    return serialized


def _canvas_shape(source) -> tuple[int, int]:
  """(H, W) of the source's canvases, from the TFDS feature spec or the first example."""
  info = getattr(source, "dataset_info", None)
  if info is not None:
    return tuple(info.features["image"].shape[:2])
  return tuple(np.shape(source[0]["image"])[:2])


def _example_arrays(example: dict, *, features: tuple[str, ...], max_objects: int,
                    canvas_shape: tuple[int, int], max_proposals: int = 2000) -> dict:
  """One TFDS example as the pipeline's arrays (module doc), `features` only, unbatched."""
  out = {}
  if "proposals_valid" in features:
    if "proposals" not in example:
      raise ValueError(f"Example {example.get('id', '?')} has no proposals; load the source with "
                       f"a proposal file (--config.data.proposals=FILE, zoo.data.proposal_files).")
    height, width = canvas_shape
    found = np.asarray(example["proposals"], np.float32).reshape(-1, 4)[:max_proposals]
    proposals = np.zeros((max_proposals, 4), np.float32)
    proposals[:len(found)] = found[:, [1, 0, 3, 2]] * np.array([width, height, width, height],
                                                               np.float32)
    out["proposals"] = proposals
    out["proposals_valid"] = np.arange(max_proposals) < len(found)
  if "image" in features:
    out["image"] = np.asarray(example["image"], np.float32) / 255.0
  if "segmentation" in features:
    out["segmentation"] = np.asarray(example["segmentation"], np.int32)
  if "id" in features:
    out["id"] = np.int32(example["id"])
  if not any(f in _OBJECT_FEATURES for f in features):
    return out
  objects = example["objects"]
  num = len(objects["label"])
  if num > max_objects:
    raise ValueError(f"Example {example.get('id', '?')} has {num} objects, more than max_objects="
                     f"{max_objects}; raise it (--config.data.max_objects={num} or more).")
  height, width = canvas_shape
  if "boxes" in features:
    boxes = np.zeros((max_objects, 4), np.float32)
    if num:
      ymin, xmin, ymax, xmax = np.asarray(objects["bbox"][:num], np.float32).reshape(num, 4).T
      if np.any(xmax < xmin) or np.any(ymax < ymin):
        raise ValueError(f"Example {example.get('id', '?')} has a box with x2 < x1 or y2 < y1 "
                         f"(normalised ymin, xmin, ymax, xmax: {objects['bbox']}); fix the data.")
      boxes[:num] = np.stack([xmin * width, ymin * height, xmax * width, ymax * height], -1)
    out["boxes"] = boxes
  if "labels" in features:
    labels = np.full((max_objects,), -1, np.int32)
    labels[:num] = np.asarray(objects["label"][:num], np.int32).reshape(num)
    out["labels"] = labels
  if "instance_masks" in features:
    masks = np.zeros((max_objects, height, width), bool)
    if num:
      masks[:num] = np.asarray(objects["mask"][:num], bool).reshape(num, height, width)
    out["instance_masks"] = masks
  out["objects_valid"] = np.arange(max_objects) < num
  return out


def _padding_example(features: tuple[str, ...], max_objects: int, max_proposals: int,
                     canvas_shape) -> dict:
  """An eval row that counts for nothing (module doc)."""
  height, width = canvas_shape
  shapes = {
      "image": (np.zeros((height, width, 3), np.float32)),
      "segmentation": np.full((height, width), IGNORE_LABEL, np.int32),
      "boxes": np.zeros((max_objects, 4), np.float32),
      "labels": np.full((max_objects,), -1, np.int32),
      "instance_masks": np.zeros((max_objects, height, width), bool),
      "objects_valid": np.zeros((max_objects,), bool),
      "proposals": np.zeros((max_proposals, 4), np.float32),
      "proposals_valid": np.zeros((max_proposals,), bool),
      "id": np.int32(-1),
  }
  return {**{f: shapes[f] for f in features}, "example_valid": np.bool_(False)}
