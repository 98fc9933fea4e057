"""Fixtures for the kernel tests: a fresh random seed per test, printed so a failure can be
replayed (pytest shows a failing test's captured output) with KERNEL_TEST_SEED=<seed>."""

import os

import numpy as np
import pytest


@pytest.fixture
def seed() -> int:
  value = os.environ.get("KERNEL_TEST_SEED")
  value = int(value) if value else int(np.random.SeedSequence().entropy % 2**32)
  print(f"random seed {value} (replay: KERNEL_TEST_SEED={value} python -m pytest ...)")
  return value


@pytest.fixture
def rng(seed) -> np.random.Generator:
  return np.random.default_rng(seed)
