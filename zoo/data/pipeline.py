"""Input pipeline: grain over a TFDS data source, sharded by host, resumable.

    source = zoo.data.load_data_source("digit_canvases", "train")
    batches = train_batches(source, global_batch_size=32, seed=0,
                            features=("image", "segmentation"), augment=("photometric",))
    batch = next(batches)          # dict of host-local NumPy arrays
    state = batches.get_state()    # JSON-serialisable; batches.set_state(state) resumes exactly

    for batch in eval_batches(validation_source, global_batch_size=64, features=...):
      ...                          # one pass, in order; batch["example_valid"] marks padding

    shapes = example_batch(source, features=...)   # one example as (1, ...): initialise from it

The source is any random-access sequence of examples (dicts, e.g. the `digit_canvases`
layout of `zoo/data/digit_canvases.py`). Each feature is described once in
`zoo.data.features` (how it is read, padded, batched and augmented); this module only loops
over the features asked for, and never names one. A batch holds the requested `features`
and their companions, host-local (B = global_batch_size // process_count), as
`zoo.data.features` lists them; those of the digit canvases:

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

and of the families to come (image pairs, flow, depth, disparity, normals, sequences of
T = max_length frames with `frames_lengths` and `frames_mask`): see `zoo.data.features`.

Objects are padded to M = max_objects; an example with more objects (or a sequence longer
than max_length), or with a box whose x2 < x1 or y2 < y1, is rejected with a ValueError
naming it (and the config field to raise). Only the requested features are decoded: a
U-Net reading image + segmentation never decompresses instance masks.
"""

import dataclasses
import functools
from typing import Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources import base as tfds_data_sources

from zoo.data import augment as augment_lib
from zoo.data import features as features_lib

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
                  max_proposals: int = 2000, max_length: int = 16,
                  process_index: int | None = None,
                  process_count: int | None = None) -> grain.DatasetIterator:
  """Infinite, per-epoch reshuffled training batches of this host's shard of `source`.

  Pipeline: source -> this host's shard `[process_index::process_count]` -> shuffle(seed)
  -> repeat (reshuffled each epoch) -> decode -> augment (random_map) -> batch. The
  stream is a pure function of (seed, process_index, process_count, source), and the
  returned iterator's `get_state()` / `set_state()` (or `grain.checkpoint.CheckpointSave` /
  `CheckpointRestore` with Orbax) resume it exactly.

  Args:
    source: a random-access sequence of examples holding what `features` read (module doc).
    global_batch_size: examples per step over all hosts.
    seed: the shuffle and augmentation seed, 0 <= seed < 2**32.
    features: the keys to decode and return (`zoo.data.features.FEATURES`); their
      companions (objects_valid, proposals_valid, a sequence's lengths and mask) come too.
    augment: names from `zoo.data.augment.AUGMENTATIONS`, applied in order.
    max_objects: M, the number of object slots per example.
    max_proposals: P, the number of proposal slots per example (`proposals` feature).
    max_length: T, the number of steps of a sequence feature (`frames`).
    process_index, process_count: this host and the number of hosts; default JAX's.

  Returns:
    A grain DatasetIterator of dicts of host-local NumPy arrays (module doc).

  Raises:
    ValueError: for unknown features or augmentations, a batch size that the hosts cannot
      split evenly, a bad seed or host index.
  """
  features = _checked_features(features)
  augmentation = augment_lib.compose(augment)
  if not (isinstance(seed, (int, np.integer)) and 0 <= seed < 2**32):
    raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}.")
  layout = _layout(source, max_objects, max_proposals, max_length)
  process_index, process_count = _process(process_index, process_count)
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  shard = grain.MapDataset.source(_decoding_only(source, features))[process_index::process_count]
  if len(shard) == 0:
    raise ValueError(f"Host {process_index} of {process_count} has no training examples: the "
                     f"source has only {len(source)}.")
  dataset = (shard.shuffle(seed=seed).repeat()
             .map(functools.partial(_example_arrays, features=features, layout=layout)))
  if augment:
    dataset = dataset.random_map(augmentation, seed=seed)
  dataset = dataset.batch(local_batch_size, drop_remainder=True)
  return iter(dataset.to_iter_dataset(_read_options()))


def eval_batches(source, *, global_batch_size: int, features: Sequence[str], max_objects: int = 8,
                 max_proposals: int = 2000, max_length: int = 16,
                 process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
  """Exactly one pass over this host's shard of `source`, in order, in full-size batches.

  Host p reads examples p, p + P, p + 2P, ... (P = process_count). Every host yields the
  same number of batches, ceil(ceil(N / P) / B), so a jitted multi-host evaluation step
  never waits for a host that has run out; rows past the end of a shard are padding:
  `example_valid` False, every feature its `padding` value (zero image, `segmentation`
  IGNORE_LABEL, no valid objects, id -1). Summed over all batches and hosts, every example
  counts exactly once.

  Args: as `train_batches` (no seed, no augmentation).

  Returns:
    A grain IterDataset: each `iter()` is a new pass; batches as in the module doc, plus
    `example_valid` (B,) bool.
  """
  features = _checked_features(features)
  layout = _layout(source, max_objects, max_proposals, max_length)
  process_index, process_count = _process(process_index, process_count)
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  shard = grain.MapDataset.source(_decoding_only(source, features))[process_index::process_count]
  largest_shard = -(-len(source) // process_count)
  num_batches = -(-largest_shard // local_batch_size)
  convert = functools.partial(_example_arrays, features=features, layout=layout)
  padding = {**_padding_example(features, layout), "example_valid": np.bool_(False)}

  def example(position: int) -> dict:
    if position < len(shard):
      return {**convert(shard[position]), "example_valid": np.bool_(True)}
    return padding

  dataset = grain.MapDataset.range(num_batches * local_batch_size).map(example)
  return dataset.batch(local_batch_size).to_iter_dataset(_read_options())


def example_batch(source, *, features: Sequence[str], max_objects: int = 8,
                  max_proposals: int = 2000, max_length: int = 16) -> dict:
  """The source's first example, decoded and not augmented, batched as (1, ...).

  Its keys, shapes (but B = 1) and dtypes are those of every `train_batches` batch with the
  same features and layout: the trainer initialises a model's parameters from it.

  Args: as `train_batches`.

  Raises:
    ValueError: for unknown features, a bad layout or an empty source.
  """
  features = _checked_features(features)
  if len(source) == 0:
    raise ValueError("The source has no examples to take the batch shapes from.")
  layout = _layout(source, max_objects, max_proposals, max_length)
  example = _example_arrays(_decoding_only(source, features)[0], features=features,
                            layout=layout)
  return {name: np.asarray(value)[None] for name, value in example.items()}


def _read_options() -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_EXAMPLES)


def _checked_features(features: Sequence[str]) -> tuple[str, ...]:
  """`features` without repeats, followed by the companions they lack."""
  if isinstance(features, str):
    raise ValueError(f"features must be a sequence of names, not the string {features!r}.")
  registered = features_lib.FEATURES
  unknown = [f for f in features if f not in registered]
  if unknown or not features:
    raise ValueError(f"Unknown or no features {unknown or list(features)}; valid features: "
                     f"{', '.join(registered)}.")
  features = tuple(dict.fromkeys(features))
  # Padded slots are meaningless without their validity (or a sequence without its length).
  companions = (c for f in features for c in registered[f].companions)
  return tuple(dict.fromkeys(features + tuple(companions)))


def _layout(source, max_objects: int, max_proposals: int,
            max_length: int) -> features_lib.Layout:
  for name, value in (("max_objects", max_objects), ("max_proposals", max_proposals),
                      ("max_length", max_length)):
    if not (isinstance(value, (int, np.integer)) and value >= 1):
      raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  return features_lib.Layout(_canvas_shape(source), int(max_objects), int(max_proposals),
                             int(max_length))


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


def _decoding_only(source, features: tuple[str, ...]):
  """`source` with decoding switched off for the `decode_lazily` features' TFDS entries that
  no feature in `features` reads.

  A TFDS data source decodes every feature by default; zlib-inflating 4 instance masks
  per example costs more than the image. Other sources are returned unchanged.
  """
  if not isinstance(source, tfds_data_sources.BaseDataSource) or source.decoders:
    return source  # Not TFDS's, or decoded the caller's way: leave it alone.
  read = [features_lib.FEATURES[f].source for f in features]
  skipped = {}
  for spec in features_lib.FEATURES.values():
    path = spec.source
    if (spec.decode_lazily and _in_tfds_features(source.dataset_info.features, path)
        and not any(path[:len(r)] == r[:len(path)] for r in read)):
      node = skipped
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = _Undecoded()
  return dataclasses.replace(source, decoders=skipped) if skipped else source


def _in_tfds_features(tfds_features, path: tuple[str, ...]) -> bool:
  """Whether the TFDS FeaturesDict `tfds_features` has the (nested) entry `path`."""
  for key in path:
    if isinstance(tfds_features, tfds.features.Sequence):
      tfds_features = tfds_features.feature
    if not isinstance(tfds_features, tfds.features.FeaturesDict) or key not in tfds_features.keys():
      return False
    tfds_features = tfds_features[key]
  return True


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


def _example_arrays(example: dict, *, features: tuple[str, ...],
                    layout: features_lib.Layout) -> dict:
  """One source example as the pipeline's arrays (module doc), `features` only, unbatched."""
  out = {}
  for name in features:
    spec = features_lib.FEATURES[name]
    if not features_lib.has_source(example, spec):
      hint = spec.absent or f"the source does not carry the `{name}` feature"
      raise ValueError(f"Example {example.get('id', '?')} has no {'/'.join(spec.source)}; "
                       f"{hint}.")
    value = np.asarray(spec.read(example, layout), spec.dtype)
    out[name] = _padded(value, spec, layout, example)
  return out


def _padded(value: np.ndarray, spec: features_lib.Feature, layout: features_lib.Layout,
            example: dict) -> np.ndarray:
  """`value` with its slots padded to `spec.shape(layout)` by `spec.padding`."""
  shape = spec.shape(layout)
  if value.shape == shape:
    return value
  if value.ndim != len(shape) or value.shape[1:] != shape[1:] or len(value) > shape[0]:
    raise ValueError(f"Example {example.get('id', '?')}: feature {spec.name!r} has shape "
                     f"{value.shape}, which does not fit its padded shape {shape}; are all the "
                     f"source's examples the size of its first ({layout.canvas_shape})?")
  padded = np.full(shape, spec.padding, spec.dtype)
  padded[:len(value)] = value
  return padded


def _padding_example(features: tuple[str, ...], layout: features_lib.Layout) -> dict:
  """The features of an eval row that counts for nothing (module doc)."""
  specs = [features_lib.FEATURES[name] for name in features]
  return {spec.name: np.full(spec.shape(layout), spec.padding, spec.dtype) for spec in specs}
