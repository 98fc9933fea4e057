"""`load_data_source`: a TFDS random-access data source by name, in the zoo's layout.

The embedded `digit_canvases` is prepared on first use (no network); real datasets must have
been prepared by the user. Real segmentation and detection datasets come wrapped in the
sources that put them in the zoo's layout (segmentation_sources, detection_sources), and
proposals (files or the embedded data's stand-ins) are joined here.
"""

import contextlib
import fcntl
import os

EMBEDDED_DATASETS = ("digit_canvases",)


def load_data_source(name: str, split: str, *, data_dir: str | None = None,
                     proposals=None):
  """The random-access TFDS data source of `split` of dataset `name`.

  Args:
    name: a TFDS name, optionally with a config (`"digit_canvases"`,
      `"digit_canvases/canvas96"`, `"coco/2017"`). The embedded `digit_canvases` is
      prepared into `data_dir` on first use (no network); any other dataset must have been
      prepared already in the array_record format (`tfds build NAME
      --file_format=array_record`): this function never downloads.
    split: a split name (`"train"`, `"validation"`, `"test"`) or a TFDS slice (`"train[:10%]"`).
    data_dir: the TFDS data dir; default `$TFDS_DATA_DIR` or `~/tensorflow_datasets`.
    proposals: region proposals to join to the examples (each example then has
      `proposals`): a file of precomputed ones (`zoo.data.proposal_files`: .npz, detectron2
      .pkl, Selective Search .mat; `{split}` in it is replaced by the split's name), or a dict
      (or ConfigDict) of `zoo.data.standin_proposals.split_proposals`' settings, e.g.
      {"num_proposals": 128, "copies": 16, "max_objects": 4}: the embedded data's stand-ins,
      generated from the ground truth and keyed by example id.

  Returns:
    A TFDS `ArrayRecordDataSource`: `len(source)` examples, `source[i]` a nested dict of
    NumPy arrays (the dataset's features; `Sequence` features come back as lists).

  Raises:
    ValueError: for an unknown dataset, config or split (naming the available ones), or a
      dataset that is not prepared (saying how to prepare it).
  """
  import tensorflow_datasets as tfds  # Imported here so that `import zoo.data` stays light.

  dataset, _, config = name.partition("/")
  if dataset in EMBEDDED_DATASETS:
    from zoo.data import digit_canvases
    builder = _prepared_builder(digit_canvases.DigitCanvases, config, data_dir)
  else:
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise ValueError(f"Unknown dataset {name!r}: neither embedded ({', '.join(EMBEDDED_DATASETS)}) "
                       "nor a registered TFDS dataset (see tfds.list_builders()).") from None
    if not builder.is_prepared():
      # tfds.data_source would download and prepare it here; the user does that, knowingly.
      raise ValueError(
          f"Dataset {name!r} is not prepared in {builder.data_dir}. Prepare it once with "
          f"`tfds build {name} --file_format=array_record"
          f"{f' --data_dir={data_dir}' if data_dir else ''}` (random access needs array_record).")
  splits = builder.info.splits
  try:
    splits[split]
  except (KeyError, ValueError, AssertionError):
    raise ValueError(f"Dataset {name!r} has no split {split!r}; available splits: "
                     f"{', '.join(sorted(splits))} (or TFDS slices of them, e.g. 'train[:100]').") from None
  source = builder.as_data_source(split=split)
  if proposals:
    from zoo.data import proposal_files
    if isinstance(proposals, str):
      path = proposals.replace("{split}", split)
      source = proposal_files.ProposalSource(source, proposal_files.load_proposals(path), path)
    else:
      from zoo.data import standin_proposals
      source = proposal_files.ProposalSource(
          source, standin_proposals.split_proposals(source, **dict(proposals)),
          f"the stand-in proposals of {name} {split}")
  from zoo.data import segmentation_sources  # Real segmentation datasets in our layout.
  if dataset in segmentation_sources.DATASETS:
    return segmentation_sources.SegmentationSource(source, dataset)
  from zoo.data import detection_sources  # Real detection datasets in our layout.
  if dataset in detection_sources.DATASETS:
    return detection_sources.DetectionSource(source, dataset)
  return source


def _prepared_builder(builder_class, config: str, data_dir: str | None):
  """`builder_class(config, data_dir)` after making sure its files are written.

  TFDS writes into `<version>.incomplete.<uuid>` and renames it when done, but two processes
  preparing at once (pytest-xdist workers, the hosts of a pod sharing a file system) both
  generate, and the second rename fails on the non-empty directory. An exclusive `flock` on
  a file beside the dataset serialises them; whoever comes second finds the data prepared.
  """
  configs = [c.name for c in builder_class.BUILDER_CONFIGS]
  if config and config not in configs:
    raise ValueError(f"{builder_class.name!r} has no config {config!r}; available configs: "
                     f"{', '.join(configs)}.")
  kwargs = dict(config=config or None, data_dir=data_dir, file_format="array_record")
  builder = builder_class(**kwargs)
  if builder.is_prepared():
    return builder
  with _exclusive_lock(builder.data_dir + ".lock"):
    builder = builder_class(**kwargs)  # Re-read: another process may have prepared it meanwhile.
    if not builder.is_prepared():
      builder.download_and_prepare(file_format="array_record")
  return builder_class(**kwargs)


@contextlib.contextmanager
def _exclusive_lock(path: str):
  if "://" in path:
    # An object store (gs://...) has no flock: prepare there once, from one process, first.
    yield
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
