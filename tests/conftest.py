"""Test-session setup: 8 virtual CPU devices, and seeded random inputs.

XLA reads the device-count flag when jax initialises its backends, so it is set before any
test imports jax. Single-device tests simply use the first device.

Seeds. Every test runs with its own seed, derived from the session's base seed and the test's
id, and printed (pytest shows it when the test fails). `np.random.default_rng()` called
without a seed inside a test draws from that seed, so tests that ask for "fresh random
inputs" are replayable too. The base seed is fixed (0) unless asked otherwise:
  ZOO_TEST_SEED=<int> python -m pytest ...   replays a printed base seed;
  python -m pytest --fuzz ...                draws a fresh base seed (the fuzz run).
The `seed` and `rng` fixtures give a test its seed and a generator seeded with it.
"""

import hashlib
import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

_default_rng = np.random.default_rng


def pytest_addoption(parser):
  parser.addoption("--fuzz", action="store_true",
                   help="Draw a fresh base seed instead of the fixed one (replay it with "
                        "ZOO_TEST_SEED=<printed seed>).")


def pytest_configure(config):
  if os.environ.get("ZOO_TEST_SEED"):
    base = int(os.environ["ZOO_TEST_SEED"])
  elif config.getoption("--fuzz"):
    base = int(np.random.SeedSequence().entropy % 2**32)
  else:
    base = 0
  config.zoo_base_seed = base


def pytest_report_header(config):
  base = config.zoo_base_seed
  return (f"random base seed {base} (replay: ZOO_TEST_SEED={base} python -m pytest ...; "
          "--fuzz draws a fresh one)")


def _test_seed(base: int, nodeid: str) -> int:
  digest = hashlib.sha256(f"{base}:{nodeid}".encode()).digest()
  return int.from_bytes(digest[:4], "little")


@pytest.fixture(autouse=True)
def seed(request, monkeypatch) -> int:
  """This test's seed; unseeded `np.random.default_rng()` calls draw from it."""
  base = request.config.zoo_base_seed
  value = _test_seed(base, request.node.nodeid)
  print(f"test seed {value} from base seed {base} (replay: ZOO_TEST_SEED={base} "
        f"python -m pytest '{request.node.nodeid}')")
  streams = np.random.SeedSequence(value)

  def default_rng(seed=None):
    return _default_rng(streams.spawn(1)[0] if seed is None else seed)

  monkeypatch.setattr(np.random, "default_rng", default_rng)
  return value


@pytest.fixture
def rng(seed) -> np.random.Generator:
  return _default_rng(seed)
