"""What the RoI kernel tests share: the implementations under test, their parameters, closeness."""

import numpy as np
import pytest

IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_gpu")


def with_implementations(values, pallas_default=()):
  """pytest params (implementation, *value): every value for "xla"; for the Pallas versions
  (interpret mode on a CPU) the values not in `pallas_default` are marked slow."""
  params = []
  for implementation in IMPLEMENTATIONS:
    for value in values:
      value = value if isinstance(value, tuple) else (value,)
      slow = implementation != "xla" and value not in pallas_default
      params.append(pytest.param(implementation, *value,
                                 marks=[pytest.mark.slow] if slow else []))
  return params


def assert_close(actual, expected, seed, what, rtol, atol):
  """allclose with atol relative to the largest expected magnitude (at least 1)."""
  expected = np.asarray(expected, np.float64)
  scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol,
                             atol=atol * scale, err_msg=f"{what} (random seed {seed})")
