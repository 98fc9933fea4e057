"""center_crop: centred windows, the odd extra row at the bottom, and a clear error."""

import numpy as np
import pytest

from zoo.layers.crop import center_crop


@pytest.mark.parametrize("size, expected_top_left", [((4, 4), (2, 2)), ((5, 3), (1, 2)), ((8, 8), (0, 0))])
def test_center_crop(size, expected_top_left):
  x = np.random.default_rng().standard_normal((2, 8, 8, 3))
  top, left = expected_top_left
  np.testing.assert_array_equal(center_crop(x, size), x[:, top:top + size[0], left:left + size[1]])


def test_center_crop_to_a_larger_size_raises():
  with pytest.raises(ValueError, match="Cannot crop 4x4 to the larger 6x4"):
    center_crop(np.zeros((1, 4, 4, 1)), (6, 4))
