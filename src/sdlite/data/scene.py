"""The vocabulary of the "shapes" world and how a scene is drawn.

A scene is a flat-coloured background with one or two flat-coloured objects. Every object is drawn inside a square
box: its size gives the box's side, its position the box's centre. An object is filled, or with ``outline`` drawn as
its outline only, ``OUTLINE_WIDTH`` pixels wide inside the same box (a style pre-training never shows; the LoRA
example teaches it). Drawing happens at 4x the output resolution and
is then reduced by 4x4 box averaging, so edges are anti-aliased by exact area coverage (no ringing, no blur beyond
one pixel), which keeps the shapes crisp and the colours of their interiors exactly the palette's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Fixed sRGB values. Chosen so that the two closest entries (orange and yellow) are still ~90 apart in RGB, far more
# than the noise of a generated image; white and black are the extremes.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 40),
    "orange": (245, 125, 15),
    "yellow": (245, 215, 35),
    "green": (40, 160, 70),
    "blue": (35, 80, 210),
    "purple": (130, 50, 160),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")  # the pre-training shapes
EXTRA_SHAPES = ("star", "heart")  # never in pre-training: kept for the adaptation examples
ALL_SHAPES = SHAPES + EXTRA_SHAPES

SIDE = 64  # output resolution
SIZES = {"small": 14, "large": 26}  # box side in pixels
POSITIONS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "center": (32, 32)}
SUPERSAMPLE = 4
JITTER = 2.0  # largest random shift of a box centre, in pixels
SIZE_JITTER = 1.0  # largest random change of a box side, in pixels
# Pixels: wide enough that a ring stays a ring through the VAE (one pixel blurs away), narrow enough that a small
# shape stays hollow.
OUTLINE_WIDTH = 2


@dataclass(frozen=True)
class Obj:
    """One object; ``position`` is one of POSITIONS (two-object scenes use "left" and "right"); ``outline``: drawn
    as its outline only."""

    colour: str
    shape: str
    size: str
    position: str
    outline: bool = False


@dataclass(frozen=True)
class Scene:
    """What an image shows: the background colour and the objects, left to right."""

    background: str
    objects: tuple[Obj, ...]


def _unit_star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    corners = []
    for k in range(2 * points):
        radius = 1.0 if k % 2 == 0 else inner
        angle = math.pi * k / points - math.pi / 2  # first point straight up
        corners.append((radius * math.cos(angle), radius * math.sin(angle)))
    return corners


def _unit_heart(n: int = 96) -> list[tuple[float, float]]:
    # The classic heart curve x = 16 sin³t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t (y up, so negated here).
    ts = [2 * math.pi * k / n for k in range(n)]
    return [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
            for t in ts]


def _normalised(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """The polygon stretched to fill the unit box [0, 1]² exactly."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, y0, w, h = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
    return tuple(((x - x0) / w, (y - y0) / h) for x, y in points)


# Outlines in the unit box; the circle is drawn as an ellipse instead.
_OUTLINES = {
    "square": ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)),
    "triangle": ((0.5, 0.0), (1.0, 1.0), (0.0, 1.0)),
    "star": _normalised(_unit_star()),
    "heart": _normalised(_unit_heart()),
}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill,
               width: int = 0) -> None:
    """Fill ``shape`` into ``box`` = (x0, y0, x1, y1) in the drawing's own pixels; with ``width``, draw only its
    outline, that many pixels wide, inside the box."""
    x0, y0, x1, y1 = box
    style = {"outline": fill, "width": width} if width else {"fill": fill}
    if shape == "circle":
        draw.ellipse(box, **style)
    elif shape in _OUTLINES:
        draw.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in _OUTLINES[shape]], **style)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(ALL_SHAPES)}")


def object_box(obj: Obj, rng: np.random.Generator | None = None) -> tuple[float, float, float, float]:
    """The box an object is drawn in, in output pixels; ``rng`` adds the small random shift and size change."""
    cx, cy = POSITIONS[obj.position]
    side = SIZES[obj.size]
    if rng is not None:
        cx, cy = cx + rng.uniform(-JITTER, JITTER), cy + rng.uniform(-JITTER, JITTER)
        side = side + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
    return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2


def render(scene: Scene, rng: np.random.Generator | None = None, side: int = SIDE) -> Image.Image:
    """The RGB image of ``scene`` at ``side`` x ``side`` pixels (the layout is defined at 64 and scaled)."""
    big = side * SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    scale = big / SIDE
    for obj in scene.objects:
        box = tuple(c * scale for c in object_box(obj, rng))
        draw_shape(draw, obj.shape, box, PALETTE[obj.colour], round(OUTLINE_WIDTH * scale) if obj.outline else 0)
    return image.reduce(SUPERSAMPLE)


def coverage(shape: str, box: tuple[float, float, float, float], size: tuple[int, int],
             outline: bool = False) -> np.ndarray:
    """How much of each pixel of a ``size`` = (width, height) canvas ``shape`` drawn in ``box`` (filled, or as its
    outline) covers, in [0, 1]."""
    width, height = size
    mask = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    draw_shape(ImageDraw.Draw(mask), shape, tuple(c * SUPERSAMPLE for c in box), 255,
               OUTLINE_WIDTH * SUPERSAMPLE if outline else 0)
    return np.asarray(mask.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0
