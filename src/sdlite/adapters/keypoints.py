"""InstantID's keypoint image (Wang et al. 2024, "InstantID: Zero-shot Identity-Preserving Generation in Seconds"):
the five facial keypoints insightface finds (eyes, nose tip, mouth corners) drawn as InstantX's ``draw_kps`` draws
them for the IdentityNet, reproduced pixel for pixel without OpenCV (docs/formats.md, "InstantID and FaceID").

The reference joins each of the four outer points to the nose with a filled ellipse (OpenCV ``ellipse2Poly`` at 1°
steps, then ``fillConvexPoly``) on a float image, scales it by 0.6 and truncates it to 8 bits, then puts a filled
circle of radius 10 on every point (``circle``, thickness -1). The IdentityNet was trained on exactly these
pictures, so the rasterisation rules matter: OpenCV's sine table (sin of whole degrees, 7 decimals, float32), its
rounding of the polygon's vertices (half to even), its 8-connected Bresenham outline with its line clipping, its
16-bit fixed-point scan conversion of convex polygons, and its integer midpoint circle are reimplemented below.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

# RGB, one per keypoint (left eye, right eye, nose, left mouth corner, right mouth corner); a limb takes the colour
# of its outer point.
COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
STICK_WIDTH = 4  # the ellipses' minor semi-axis
RADIUS = 10  # the keypoints' circles
LIMB_SCALE = 0.6  # the limbs are drawn at 60 % of the colour

SHIFT = 16  # OpenCV's fixed-point fraction bits for polygon scan conversion
SIN_TABLE = np.round(np.sin(np.radians(np.arange(451))), 7).astype(np.float32)  # sin of 0°…450°, 7 decimals


def draw_kps(size: tuple[int, int] | Image.Image, kps: Sequence[Sequence[float]] | np.ndarray) -> Image.Image:
    """The keypoint image of ``kps`` (5 × (x, y) in pixels) on a black ``size`` = (width, height) canvas (or the
    size of a given image), as InstantX's ``draw_kps``."""
    width, height = size.size if isinstance(size, Image.Image) else size
    kps = np.asarray(kps)
    if kps.shape != (5, 2):
        raise ValueError(f"InstantID keypoints are 5 (x, y) points, got an array of shape {list(kps.shape)}")
    canvas = np.zeros((height, width, 3))
    for a, b in LIMBS:
        x, y = kps[[a, b], 0], kps[[a, b], 1]
        length = ((x[0] - x[1]) ** 2 + (y[0] - y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = ellipse_polygon((int(np.mean(x)), int(np.mean(y))), (int(length / 2), STICK_WIDTH), int(angle))
        fill_convex_polygon(canvas, polygon, COLORS[a])
    canvas = (canvas * LIMB_SCALE).astype(np.uint8)
    for (x, y), color in zip(kps, COLORS):
        fill_circle(canvas, (int(x), int(y)), RADIUS, color)
    return Image.fromarray(canvas)


def ellipse_polygon(center: tuple[int, int], axes: tuple[int, int], angle: int) -> np.ndarray:
    """OpenCV ``ellipse2Poly(center, axes, angle, 0, 360, 1)``: the vertices [N, 2] (int) of the full ellipse at
    every whole degree, rotated by ``angle`` degrees, rounded half to even, consecutive repeats dropped."""
    angle %= 360
    cos_a, sin_a = np.float64(SIN_TABLE[450 - angle]), np.float64(SIN_TABLE[angle])
    degrees = np.arange(361)
    x = float(axes[0]) * SIN_TABLE[450 - degrees].astype(np.float64)
    y = float(axes[1]) * SIN_TABLE[degrees].astype(np.float64)
    # Evaluated in OpenCV's order, in float64, so that the rounding below sees the same values.
    px = np.rint(center[0] + x * cos_a - y * sin_a).astype(np.int64)
    py = np.rint(center[1] + x * sin_a + y * cos_a).astype(np.int64)
    points = np.stack([px, py], axis=1)
    keep = np.ones(len(points), dtype=bool)
    keep[1:] = np.any(points[1:] != points[:-1], axis=1)
    points = points[keep]
    if len(points) == 1:  # a zero-size ellipse is a degenerate polygon of its centre twice
        points = np.array([center, center], dtype=np.int64)
    return points


def _cdiv(a: int, b: int) -> int:
    """C's integer division (truncation toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _clip_line(width: int, height: int, p1: list[int], p2: list[int]) -> bool:
    """OpenCV ``clipLine``: moves the end points of a segment onto the image border (Cohen–Sutherland, integer
    arithmetic); False when the segment misses the image."""
    right, bottom = width - 1, height - 1
    (x1, y1), (x2, y2) = p1, p2

    def code(x, y, vertical=True):
        return (x < 0) + (x > right) * 2 + ((y < 0) * 4 + (y > bottom) * 8 if vertical else 0)

    c1, c2 = code(x1, y1), code(x2, y2)
    if (c1 & c2) == 0 and (c1 | c2) != 0:
        if c1 & 12:
            a = 0 if c1 < 8 else bottom
            x1 += _cdiv((a - y1) * (x2 - x1), y2 - y1)
            y1, c1 = a, code(x1, a, False)
        if c2 & 12:
            a = 0 if c2 < 8 else bottom
            x2 += _cdiv((a - y2) * (x2 - x1), y2 - y1)
            y2, c2 = a, code(x2, a, False)
        if (c1 & c2) == 0 and (c1 | c2) != 0:
            if c1:
                a = 0 if c1 == 1 else right
                y1 += _cdiv((a - x1) * (y2 - y1), x2 - x1)
                x1, c1 = a, 0
            if c2:
                a = 0 if c2 == 1 else right
                y2 += _cdiv((a - x2) * (y2 - y1), x2 - x1)
                x2, c2 = a, 0
    p1[:], p2[:] = [x1, y1], [x2, y2]
    return (c1 | c2) == 0


def draw_line(image: np.ndarray, p1: Sequence[int], p2: Sequence[int], color) -> None:
    """OpenCV's 8-connected line (``LineIterator`` drawn left to right) from ``p1`` to ``p2``, both included."""
    height, width = image.shape[:2]
    p1, p2 = [int(p1[0]), int(p1[1])], [int(p2[0]), int(p2[1])]
    inside = all(0 <= p[0] < width and 0 <= p[1] < height for p in (p1, p2))
    if not inside and not _clip_line(width, height, p1, p2):
        return
    if p2[0] < p1[0]:
        p1, p2 = p2, p1
    dx, dy = p2[0] - p1[0], p2[1] - p1[1]
    step_y = -1 if dy < 0 else 1
    dy = abs(dy)
    steep = dy > dx
    if steep:  # y is the major axis
        dx, dy = dy, dx
    err, x, y = dx - 2 * dy, p1[0], p1[1]
    for _ in range(dx + 1):
        image[y, x] = color
        minor = err < 0
        err += -2 * dy + (2 * dx if minor else 0)
        if steep:
            y += step_y
            x += 1 if minor else 0
        else:
            x += 1
            y += step_y if minor else 0


def fill_convex_polygon(image: np.ndarray, points: np.ndarray, color) -> None:
    """OpenCV ``fillConvexPoly(image, points, color)`` (8-connected, no sub-pixel bits): the outline's lines, then
    the rows between the two edges walking down from the top vertex in 16-bit fixed point."""
    height, width = image.shape[:2]
    v = [(int(x), int(y)) for x, y in points]
    n = len(v)
    for i in range(n):
        draw_line(image, v[i - 1], v[i], color)
    xs, ys = [p[0] for p in v], [p[1] for p in v]
    if n < 3 or max(xs) < 0 or max(ys) < 0 or min(xs) >= width or min(ys) >= height:
        return
    y_top = min(ys)
    y_end = min(max(ys), height - 1)
    top = ys.index(y_top)
    # Two edges walk from the top vertex, one forward and one backward through the vertices; they share the count
    # of edges left, as OpenCV's do.
    walk = [{"idx": top, "di": 1, "x": -(1 << SHIFT), "dx": 0, "ye": y_top},
            {"idx": top, "di": n - 1, "x": -(1 << SHIFT), "dx": 0, "ye": y_top}]
    edges, y, half = n, y_top, 1 << (SHIFT - 1)
    while True:
        for e in walk:
            if y < e["ye"]:
                continue
            idx0 = e["idx"]
            idx = (idx0 + e["di"]) % n
            while True:
                more = edges > 0
                edges -= 1  # C's `edges-- > 0` decrements also when it fails
                if not more:
                    break
                ty = v[idx][1]
                if ty > y:
                    x0, x1 = v[idx0][0] << SHIFT, v[idx][0] << SHIFT
                    e.update(ye=ty, dx=_cdiv((x1 - x0) * 2 + (ty - y), 2 * (ty - y)), x=x0, idx=idx)
                    break
                idx0, idx = idx, (idx + e["di"]) % n
        if edges < 0:
            break
        if y >= 0:
            left, right = sorted((walk[0]["x"], walk[1]["x"]))
            x1, x2 = (left + half) >> SHIFT, (right + half) >> SHIFT
            if x2 >= 0 and x1 < width:
                image[y, max(x1, 0):min(x2, width - 1) + 1] = color
        for e in walk:
            e["x"] += e["dx"]
        y += 1
        if y > y_end:
            break


def fill_circle(image: np.ndarray, center: tuple[int, int], radius: int, color) -> None:
    """OpenCV ``circle(image, center, radius, color, -1)``: the integer midpoint circle, each octant pair's rows
    filled between its ends (clipped to the image)."""
    height, width = image.shape[:2]
    cx, cy = center
    err, dx, dy, plus, minus = 0, radius, 0, 1, 2 * radius - 1

    def row(y, x1, x2):
        if 0 <= y < height and x1 < width and x2 >= 0:
            image[y, max(x1, 0):min(x2, width - 1) + 1] = color

    while dx >= dy:
        for y in (cy - dy, cy + dy):
            row(y, cx - dx, cx + dx)
        for y in (cy - dx, cy + dx):
            row(y, cx - dy, cx + dy)
        dy += 1
        err += plus
        plus += 2
        mask = (err <= 0) - 1  # 0 while the error is not positive, else -1
        err -= minus & mask
        dx += mask
        minus -= mask & 2
