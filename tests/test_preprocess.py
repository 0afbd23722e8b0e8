"""Control-image preprocessing: Canny edges against a plain gradient reference (and OpenCV where installed),
invert, input types, and the geometry of the three resize modes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from sdlite.adapters.preprocess import canny, prepare, to_rgb


def shapes(level: int = 200, size=(96, 128)) -> tuple[np.ndarray, np.ndarray]:
    """A grey image with a filled rectangle and a filled disk at ``level`` on black, and the shapes' mask."""
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    mask = ((yy >= 20) & (yy < 60) & (xx >= 10) & (xx < 50)) | ((yy - 50) ** 2 + (xx - 90) ** 2 < 20 ** 2)
    return (mask * level).astype(np.uint8), mask


def near(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixels of ``a`` that have a pixel of ``b`` in their 3x3 neighbourhood."""
    padded = np.pad(b, 1)
    h, w = b.shape
    grown = np.zeros_like(b)
    for dy in range(3):
        for dx in range(3):
            grown |= padded[dy:dy + h, dx:dx + w]
    return a & grown


def test_canny_finds_the_outline_of_shapes():
    image, mask = shapes()
    edges = canny(image) > 0
    # Reference, computed differently: central-difference gradient of the mask is non-zero on the two pixels that
    # straddle each boundary, and the boundary itself is every shape pixel with a background 4-neighbour.
    gy, gx = np.gradient(mask.astype(float))
    band = np.hypot(gx, gy) > 0
    padded = np.pad(mask, 1)
    boundary = mask & ~(padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    assert edges.any()
    assert not (edges & ~band).any(), "edges away from the outline"
    assert near(boundary, edges).sum() == boundary.sum(), "parts of the outline have no edge"
    # Non-maximum suppression: one pixel across each straight side of the rectangle.
    assert (edges[25:55, 5:30].sum(axis=1) == 1).all()
    assert (edges[10:40, 15:45].sum(axis=0) == 1).all()


def test_canny_thresholds_and_hysteresis():
    # On a straight step of height d the Sobel L1 magnitude is 4d: 30 gives 120, weak between 100 and 200.
    image, _ = shapes(level=30)
    assert not canny(image, 100, 200).any()
    assert canny(image, 100, 110).any()
    assert not canny(image, 130, 200).any()
    # A weak outline touching a strong one is kept; the same weak outline on its own is not.
    image[20:60, 45:50] = 255  # bright right side of the rectangle
    edges = canny(image, 100, 200) > 0
    assert edges[20:60, :52].any() and edges[25:55, 8:12].any(), "weak left side connected to the strong side"
    assert not edges[:, 65:].any(), "the isolated weak disk"


def test_canny_on_colour_uses_the_strongest_channel():
    grey, mask = shapes()
    colour = np.zeros((*grey.shape, 3), np.uint8)
    colour[..., 2] = grey  # blue shapes on black
    assert np.array_equal(canny(colour), canny(grey))


def test_canny_matches_opencv():
    rng = np.random.default_rng(0)
    noise = (rng.random((64, 80, 3)) * 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(noise).resize((20, 16)).resize((80, 64), Image.Resampling.BICUBIC))
    for image in (noise, smooth, smooth[..., 0], shapes()[0]):
        for low, high in ((100, 200), (30, 60)):
            assert np.array_equal(canny(image, low, high), cv2.Canny(np.ascontiguousarray(image), low, high))


def test_input_types_agree():
    rng = np.random.default_rng(1)
    rgb = (rng.random((10, 12, 3)) * 255).astype(np.uint8)
    assert np.array_equal(to_rgb(Image.fromarray(rgb)), rgb)
    assert np.array_equal(to_rgb(rgb.astype(np.float32) / 255), rgb)
    assert np.array_equal(to_rgb(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255), rgb)
    assert np.array_equal(to_rgb(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255), rgb)
    assert np.array_equal(to_rgb(np.concatenate([rgb, rgb[..., :1]], axis=2)), rgb)  # alpha dropped
    assert np.array_equal(to_rgb(rgb[..., 0]), np.repeat(rgb[..., :1], 3, axis=2))
    with pytest.raises(ValueError, match="channels"):
        to_rgb(np.zeros((4, 4, 2)))


def stripes(width: int = 200, height: int = 100) -> Image.Image:
    """Vertical quarters: green, red, blue, green."""
    array = np.zeros((height, width, 3), np.uint8)
    for i, colour in enumerate([(0, 255, 0), (255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        array[:, i * width // 4:(i + 1) * width // 4] = colour
    return Image.fromarray(array)


def colour_at(map_: np.ndarray, y: int, x: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.round(map_[y, x] * 255))


def test_just_resize_stretches():
    out = prepare(stripes(), 64, 64, resize_mode="just resize")
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    assert [colour_at(out, 32, x) for x in (4, 24, 40, 60)] == [(0, 255, 0), (255, 0, 0), (0, 0, 255), (0, 255, 0)]


def test_crop_and_resize_covers_and_crops_the_centre():
    out = prepare(stripes(), 64, 64, resize_mode="crop and resize")  # 200x100 → 128x64, columns 32..96 kept
    assert [colour_at(out, y, x) for y, x in ((0, 4), (63, 28), (10, 36), (50, 60))] == \
           [(255, 0, 0), (255, 0, 0), (0, 0, 255), (0, 0, 255)]
    tall = prepare(stripes().transpose(Image.Transpose.ROTATE_90), 64, 32, resize_mode="crop and resize")
    assert tall.shape == (32, 64, 3)  # 100x200 → 64x128, rows 48..80 kept: the middle two quarters
    assert {colour_at(tall, y, 32) for y in (2, 29)} == {(255, 0, 0), (0, 0, 255)}


def test_resize_and_fill_fits_and_pads_with_the_border_median():
    out = prepare(stripes(), 64, 64, resize_mode="resize and fill")  # 200x100 → 64x32 in rows 16..48
    border = np.asarray(stripes()).astype(float)
    border = np.concatenate([border[0], border[-1], border[:, 0], border[:, -1]])
    fill = tuple(int(v) for v in np.median(border, axis=0))
    assert fill == (0, 255, 0)
    assert np.allclose(out[:16], np.array(fill) / 255) and np.allclose(out[48:], np.array(fill) / 255)
    assert [colour_at(out, 32, x) for x in (24, 40)] == [(255, 0, 0), (0, 0, 255)]
    # Edges are found before padding, and the padding of an edge map is its (black) border median: no edge runs
    # along the seam, although green padding next to the red and blue quarters would have made one.
    edges = prepare(stripes(), 64, 64, preprocessor="canny", resize_mode="resize and fill")[..., 0] > 0
    assert not edges[:16].any() and not edges[48:].any()
    assert edges[16].sum() == edges[32].sum() == 3  # only the three seams between the quarters


def test_invert_and_passthrough():
    rng = np.random.default_rng(2)
    image = (rng.random((32, 48, 3)) * 255).astype(np.uint8)
    same = prepare(image, 48, 32)
    assert np.array_equal(np.round(same * 255).astype(np.uint8), image)
    assert np.allclose(prepare(image, 48, 32, preprocessor="invert"), 1.0 - same)
    with pytest.raises(ValueError, match="preprocessor"):
        prepare(image, 48, 32, preprocessor="depth")
    with pytest.raises(ValueError, match="resize_mode"):
        prepare(image, 48, 32, resize_mode="fill")
