"""The outline style of the shapes data set (``outline=True``: each object drawn as its outline, the LoRA example's
style) and the detector telling outlines from filled shapes: on the data set, on outlines drawn by this test's own
code, and on degraded images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdlite.data import shapes
from sdlite.data.scene import OUTLINE_WIDTH
from sdlite.data.shapes import Obj, Scene

from test_shapes_detect import _inside

ALL = shapes.SHAPES + shapes.EXTRA_SHAPES


def test_outline_samples_are_the_same_scenes_outlined():
    for i in range(20):
        filled = shapes.sample(i, shapes=ALL)
        hollow = shapes.sample(i, shapes=ALL, outline=True)
        assert hollow.caption == filled.caption
        assert hollow.scene.objects == tuple(Obj(o.colour, o.shape, o.size, o.position, True)
                                             for o in filled.scene.objects)
        # an outline covers less of the picture than the filled shape, and only where the filled one does
        a = np.asarray(filled.image, dtype=np.int16)
        b = np.asarray(hollow.image, dtype=np.int16)
        background = np.array(shapes.PALETTE[filled.scene.background], dtype=np.int16)
        changed_a, changed_b = (a != background).any(-1), (b != background).any(-1)
        assert changed_b.sum() < changed_a.sum() and not (changed_b & ~changed_a).any()


def test_reads_outlines_of_the_data_set():
    data = shapes.dataset(400, seed=3, shapes=ALL, outline=True)
    wrong = [(caption, shapes.describe(image).scene) for image, caption, scene in data
             if shapes.describe(image).scene != scene]
    assert len(wrong) <= 4, wrong[:5]


def test_reads_degraded_outlines():
    rng = np.random.default_rng(1)
    data = shapes.dataset(300, seed=4, outline=True)
    wrong = 0
    for image, _, scene in data:
        image = image.filter(ImageFilter.GaussianBlur(0.6))
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, (64, 64, 3)) + rng.normal(0, 6, 3)
        read = shapes.describe(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))).scene
        wrong += read != scene
    assert wrong <= 6, wrong


def _ring(background: str, colour: str, shape: str, cx: float, cy: float, half: float) -> Image.Image:
    """An outline ``OUTLINE_WIDTH`` pixels wide inside the shape's box, from the shape's own equation (circle and
    square, whose inner edge is the same shape ``OUTLINE_WIDTH`` smaller), by 4x4 subsample coverage."""
    sub = 4
    grid = (np.arange(64 * sub) + 0.5) / sub
    x, y = np.meshgrid(grid, grid)
    inside = _inside(shape, (x - cx) / half, (y - cy) / half)
    hole = _inside(shape, (x - cx) / (half - OUTLINE_WIDTH), (y - cy) / (half - OUTLINE_WIDTH))
    cover = (inside & ~hole).reshape(64, sub, 64, sub).mean((1, 3))[..., None]
    image = np.array(shapes.PALETTE[background]) * (1 - cover) + np.array(shapes.PALETTE[colour]) * cover
    return Image.fromarray(np.round(image).astype(np.uint8))


@pytest.mark.parametrize("shape", ["circle", "square"])
def test_reads_outlines_drawn_independently(shape):
    rng = np.random.default_rng(7)
    for background, colour in [("blue", "yellow"), ("white", "red"), ("black", "green")]:
        for position, (cx, cy) in shapes.POSITIONS.items():
            for size, half in (("small", 7.0), ("large", 13.0)):
                dx, dy = rng.uniform(-1.5, 1.5, 2)
                read = shapes.describe(_ring(background, colour, shape, cx + dx, cy + dy, half))
                assert read.scene == Scene(background, (Obj(colour, shape, size, position, True),)), read


def test_filled_shapes_are_not_read_as_outlines():
    data = shapes.dataset(300, seed=6, shapes=ALL)
    assert not any(o.outline for image, _, _ in data for o in shapes.describe(image).scene.objects)
