"""Fixtures: the `tiny` digit_canvases config (32 / 16 / 16 examples), prepared once per
test session into a temporary TFDS data dir, so no test touches ~/tensorflow_datasets."""

import pytest

from zoo.data import load_data_source


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> str:
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  load_data_source("digit_canvases/tiny", "train", data_dir=data_dir)  # Prepares all splits.
  return data_dir


@pytest.fixture(scope="session")
def tiny_sources(tiny_data_dir) -> dict:
  """{split: TFDS ArrayRecordDataSource} of digit_canvases/tiny."""
  return {split: load_data_source("digit_canvases/tiny", split, data_dir=tiny_data_dir)
          for split in ("train", "validation", "test")}
