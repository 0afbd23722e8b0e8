"""The OpenPose stick figure the openpose ControlNet was trained on (lllyasviel's ``draw_bodypose``): for the first
17 limbs an ellipse polygon (half-axes length/2 and 4 px, one vertex per degree) filled with 0.6 × the limb's colour,
then a filled disc of radius 4 in each keypoint's colour.

The raster rules are OpenCV's (``cv2.ellipse2Poly``, ``cv2.fillConvexPoly``, ``cv2.circle`` with thickness −1 and
8-connected lines), rewritten here so that maps come out pixel for pixel as the annotator draws them without
depending on OpenCV: polygon vertices rounded half-to-even from a per-degree sine table in float32, the polygon's
outline drawn as 8-connected Bresenham lines and its rows filled between the two edges walked in 16.16 fixed point;
discs by the midpoint circle algorithm.
"""

from __future__ import annotations

import math

import numpy as np

# Limbs drawn (1-based keypoint pairs of the annotator; the last two limbs of the grouping are not drawn) and the
# colour of each limb and each keypoint (RGB).
LIMBS = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
         (2, 1), (1, 15), (15, 17), (1, 16), (16, 18)]
COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]
STICK_WIDTH = 4
RADIUS = 4
# OpenCV's per-degree sine table, 0..450°: seven-decimal literals stored as float32.
_SIN = np.round(np.sin(np.radians(np.arange(451))), 7).astype(np.float32).astype(np.float64)
_SHIFT = 16


def ellipse_poly(center: tuple[int, int], axes: tuple[int, int], angle: int) -> list[tuple[int, int]]:
    """Vertices of a full ellipse, one per degree, rotated by ``angle`` degrees, rounded, repeats dropped."""
    angle %= 360
    cos_a, sin_a = _SIN[450 - angle], _SIN[angle]
    points: list[tuple[int, int]] = []
    for deg in range(0, 361):
        x, y = axes[0] * _SIN[450 - deg], axes[1] * _SIN[deg]
        p = (round(center[0] + x * cos_a - y * sin_a), round(center[1] + x * sin_a + y * cos_a))
        if not points or p != points[-1]:
            points.append(p)
    return points if len(points) > 1 else [tuple(center)] * 2


def _hline(canvas: np.ndarray, y: int, x1: int, x2: int, color) -> None:
    h, w = canvas.shape[:2]
    if 0 <= y < h and x2 >= 0 and x1 < w:
        canvas[y, max(x1, 0):min(x2, w - 1) + 1] = color


def _clip(w: int, h: int, p0: tuple[int, int], p1: tuple[int, int]):
    """OpenCV's ``clipLine``: the endpoints moved onto the image border (integer truncation), or None when the line
    misses the image. Clipping moves the start of the pixel walk, so it changes which pixels a line sets."""
    (x1, y1), (x2, y2) = p0, p1
    right, bottom = w - 1, h - 1

    def code(x, y, vertical=True):
        return (x < 0) + (x > right) * 2 + ((y < 0) * 4 + (y > bottom) * 8 if vertical else 0)

    c1, c2 = code(x1, y1), code(x2, y2)
    if (c1 & c2) == 0 and (c1 | c2) != 0:
        if c1 & 12:
            a = 0 if c1 < 8 else bottom
            x1 += int((a - y1) * (x2 - x1) / (y2 - y1))
            y1, c1 = a, code(x1, a, False)
        if c2 & 12:
            a = 0 if c2 < 8 else bottom
            x2 += int((a - y2) * (x2 - x1) / (y2 - y1))
            y2, c2 = a, code(x2, a, False)
        if (c1 & c2) == 0 and (c1 | c2) != 0:
            if c1:
                a = 0 if c1 == 1 else right
                y1 += int((a - x1) * (y2 - y1) / (x2 - x1))
                x1, c1 = a, 0
            if c2:
                a = 0 if c2 == 1 else right
                y2 += int((a - x2) * (y2 - y1) / (x2 - x1))
                x2, c2 = a, 0
    return ((x1, y1), (x2, y2)) if (c1 | c2) == 0 else None


def _line(canvas: np.ndarray, p0: tuple[int, int], p1: tuple[int, int], color) -> None:
    """An 8-connected line walked left to right along its major axis (OpenCV's ``LineIterator``)."""
    h, w = canvas.shape[:2]
    clipped = _clip(w, h, p0, p1)
    if clipped is None:
        return
    p0, p1 = clipped
    (x0, y0), (x1, y1) = (p0, p1) if p0[0] <= p1[0] else (p1, p0)
    dx, dy = x1 - x0, abs(y1 - y0)
    sy = 1 if y1 >= y0 else -1
    steep = dy > dx
    major, minor = (dy, dx) if steep else (dx, dy)
    err = major - 2 * minor
    x, y = x0, y0
    for _ in range(major + 1):
        if 0 <= x < w and 0 <= y < h:
            canvas[y, x] = color
        step_minor = err < 0
        err += -2 * minor + (2 * major if step_minor else 0)
        if steep:
            y += sy
            x += 1 if step_minor else 0
        else:
            x += 1
            y += sy if step_minor else 0


def fill_convex_poly(canvas: np.ndarray, points: list[tuple[int, int]], color) -> None:
    """OpenCV's ``fillConvexPoly`` for integer vertices: outline lines, then each row between two edges."""
    n = len(points)
    for i in range(n):
        _line(canvas, points[i - 1], points[i], color)
    ys = [p[1] for p in points]
    xs = [p[0] for p in points]
    h, w = canvas.shape[:2]
    if n < 3 or max(xs) < 0 or max(ys) < 0 or min(xs) >= w or min(ys) >= h:
        return
    top = ys.index(min(ys))
    y, y_max = min(ys), min(max(ys), h - 1)
    one, half = 1 << _SHIFT, 1 << (_SHIFT - 1)
    edges = [dict(idx=top, di=1, x=-one, dx=0, ye=y), dict(idx=top, di=n - 1, x=-one, dx=0, ye=y)]
    remaining = n
    while True:
        for e in edges:
            if y >= e["ye"]:
                idx0 = e["idx"]
                idx = (idx0 + e["di"]) % n
                while remaining > 0:
                    remaining -= 1
                    ty = points[idx][1]
                    if ty > y:
                        xs0, xe = points[idx0][0] << _SHIFT, points[idx][0] << _SHIFT
                        e.update(ye=ty, x=xs0, idx=idx, dx=_div_trunc((xe - xs0) * 2 + (ty - y), 2 * (ty - y)))
                        break
                    idx0, idx = idx, (idx + e["di"]) % n
                else:
                    remaining -= 1
        if remaining < 0:
            return
        left, right = sorted((edges[0]["x"], edges[1]["x"]))
        if y >= 0:
            _hline(canvas, y, (left + half) >> _SHIFT, (right + half) >> _SHIFT, color)
        for e in edges:
            e["x"] += e["dx"]
        y += 1
        if y > y_max:
            return


def _div_trunc(a: int, b: int) -> int:
    """C integer division (truncation towards zero), which OpenCV's edge slopes use."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def fill_circle(canvas: np.ndarray, center: tuple[int, int], radius: int, color) -> None:
    """A filled disc by the midpoint algorithm (OpenCV's ``circle`` with thickness −1, 8-connected)."""
    cx, cy = center
    err, dx, dy, plus, minus = 0, radius, 0, 1, 2 * radius - 1
    while dx >= dy:
        _hline(canvas, cy - dy, cx - dx, cx + dx, color)
        _hline(canvas, cy + dy, cx - dx, cx + dx, color)
        _hline(canvas, cy - dx, cx - dy, cx + dy, color)
        _hline(canvas, cy + dx, cx - dy, cx + dy, color)
        dy += 1
        err += plus
        plus += 2
        if err > 0:
            err -= minus
            dx -= 1
            minus -= 2


def draw_bodypose(canvas: np.ndarray, keypoints: list) -> np.ndarray:
    """Draw one person on ``canvas`` (uint8 [H, W, 3], RGB) in place; ``keypoints``: 18 (x, y) in [0, 1] or None."""
    h, w = canvas.shape[:2]
    for (i, j), color in zip(LIMBS, COLORS):
        k1, k2 = keypoints[i - 1], keypoints[j - 1]
        if k1 is None or k2 is None:
            continue
        xs = np.array([k1[0], k2[0]]) * float(w)
        ys = np.array([k1[1], k2[1]]) * float(h)
        length = ((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        polygon = ellipse_poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), STICK_WIDTH), int(angle))
        fill_convex_poly(canvas, polygon, [int(float(c) * 0.6) for c in color])
    for k, color in zip(keypoints, COLORS):
        if k is not None:
            fill_circle(canvas, (int(k[0] * w), int(k[1] * h)), RADIUS, color)
    return canvas
