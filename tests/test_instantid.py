"""InstantID: the keypoint image against InstantX's draw_kps written with OpenCV, and the UNet + IdentityNet with
the InstantID adapter against diffusers (ControlNetModel over the face tokens, the UNet with the adapter loaded
through diffusers' IP-Adapter loader) on the same random weights."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from PIL import Image

from sdlite.adapters import keypoints

COLOR_LIST = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]


def reference_draw_kps(size, kps):
    """InstantX's draw_kps (pipeline_stable_diffusion_xl_instantid.py) on a (width, height) canvas."""
    limbs = np.array([[0, 2], [1, 2], [3, 2], [4, 2]])
    kps = np.array(kps)
    w, h = size
    out = np.zeros([h, w, 3])
    for index in limbs:
        color = COLOR_LIST[index[0]]
        x, y = kps[index][:, 0], kps[index][:, 1]
        length = ((x[0] - x[1]) ** 2 + (y[0] - y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(x)), int(np.mean(y))), (int(length / 2), 4), int(angle), 0, 360, 1)
        out = cv2.fillConvexPoly(out.copy(), polygon, color)
    out = (out * 0.6).astype(np.uint8)
    for color, (x, y) in zip(COLOR_LIST, kps):
        out = cv2.circle(out.copy(), (int(x), int(y)), 10, color, -1)
    return Image.fromarray(out.astype(np.uint8))


def test_draw_kps_is_bit_exact_with_the_reference():
    rng = np.random.default_rng(0)
    # A face as insightface reports it on a 1024x1024 picture, then random ones, some reaching past the border
    # (OpenCV's line clipping) and some given as integers.
    cases = [((1024, 1024), [[420.3, 480.7], [600.1, 470.2], [515.5, 580.9], [440.2, 680.4], [590.8, 672.6]])]
    for i in range(60):
        w, h = int(rng.integers(40, 260)), int(rng.integers(40, 260))
        kps = rng.uniform(-25, [w + 25, h + 25], size=(5, 2))
        cases.append(((w, h), np.round(kps).astype(int) if i % 3 == 0 else kps))
    for size, kps in cases:
        got = keypoints.draw_kps(size, kps)
        assert got.size == size and got.mode == "RGB"
        assert np.array_equal(np.asarray(got), np.asarray(reference_draw_kps(size, kps)))
    # the image's size may be given as the image
    assert keypoints.draw_kps(Image.new("RGB", (64, 48)), cases[1][1]).size == (64, 48)


def test_opencv_primitives_are_bit_exact():
    rng = np.random.default_rng(1)
    for angle in range(-400, 800, 13):
        for axes in [(0, 0), (1, 4), (37, 4), (5000, 3000)]:
            center = (int(rng.integers(-50, 300)), int(rng.integers(-50, 300)))
            assert np.array_equal(keypoints.ellipse_polygon(center, axes, angle),
                                  cv2.ellipse2Poly(center, axes, angle, 0, 360, 1))
    for _ in range(100):
        center = (int(rng.integers(-20, 80)), int(rng.integers(-20, 80)))
        polygon = keypoints.ellipse_polygon(center, (int(rng.integers(0, 60)), int(rng.integers(0, 8))),
                                            int(rng.integers(-180, 180)))
        image = np.zeros((64, 70, 3))
        expected = cv2.fillConvexPoly(image.copy(), polygon, (255, 0, 0))
        keypoints.fill_convex_polygon(image, polygon, (255, 0, 0))
        assert np.array_equal(image, expected)
        image = np.zeros((64, 70, 3), np.uint8)
        radius = int(rng.integers(0, 15))
        expected = cv2.circle(image.copy(), center, radius, (1, 2, 3), -1)
        keypoints.fill_circle(image, center, radius, (1, 2, 3))
        assert np.array_equal(image, expected)


def test_draw_kps_refuses_other_shapes():
    with pytest.raises(ValueError, match="5 \\(x, y\\) points"):
        keypoints.draw_kps((64, 64), np.zeros((68, 2)))
