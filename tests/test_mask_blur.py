"""A1111's mask blur (processing.py: cv2.GaussianBlur along x, then along y, on the 8-bit mask) reproduced exactly."""

import cv2
import numpy as np
import pytest
from PIL import Image

from sdlite.images import blur_mask


@pytest.mark.parametrize("sigma", [1, 2, 3, 4, 6, 8, 16])
def test_blur_mask_equals_opencv_bit_for_bit(sigma):
    rng = np.random.default_rng(sigma)
    size = 2 * int(2.5 * sigma + 0.5) + 1
    for trial in range(6):
        h, w = rng.integers(size, size + 60, 2)
        if trial % 2:
            mask = rng.integers(0, 256, (h, w)).astype(np.uint8)
        else:
            mask = np.zeros((h, w), np.uint8)
            mask[rng.integers(0, h // 2):rng.integers(h // 2, h), rng.integers(0, w // 2):rng.integers(w // 2, w)] = 255
        expected = cv2.GaussianBlur(cv2.GaussianBlur(mask, (size, 1), sigma), (1, size), sigma)
        got = np.asarray(blur_mask(Image.fromarray(mask), sigma, sigma))
        assert np.array_equal(got, expected)
    # each direction on its own
    expected = cv2.GaussianBlur(mask, (size, 1), sigma)
    assert np.array_equal(np.asarray(blur_mask(Image.fromarray(mask), sigma, 0)), expected)
