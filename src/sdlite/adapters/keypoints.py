"""InstantID's keypoint image (Wang et al. 2024, "InstantID: Zero-shot Identity-Preserving Generation in Seconds"):
the five facial keypoints insightface finds (eyes, nose tip, mouth corners) drawn as InstantX's ``draw_kps`` draws
them for the IdentityNet, reproduced pixel for pixel without OpenCV (docs/formats.md, "InstantID and FaceID").

The reference joins each of the four outer points to the nose with a filled ellipse (OpenCV ``ellipse2Poly`` at 1°
steps, then ``fillConvexPoly``) on a float image, scales it by 0.6 and truncates it to 8 bits, then puts a filled
circle of radius 10 on every point (``circle``, thickness -1). The IdentityNet was trained on exactly these
pictures, so the rasterisation rules matter: OpenCV's sine table (sin of whole degrees, 7 decimals, float32), its
rounding of the polygon's vertices (half to even), its 8-connected Bresenham outline with its line clipping, its
16-bit fixed-point scan conversion of convex polygons, and its integer midpoint circle: the OpenPose annotator draws
with the same primitives, so both use ``annotators.draw``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from .annotators.draw import ellipse_poly, fill_circle, fill_convex_poly

# RGB, one per keypoint (left eye, right eye, nose, left mouth corner, right mouth corner); a limb takes the colour
# of its outer point.
COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
STICK_WIDTH = 4  # the ellipses' minor semi-axis
RADIUS = 10  # the keypoints' circles
LIMB_SCALE = 0.6  # the limbs are drawn at 60 % of the colour



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
        polygon = ellipse_poly((int(np.mean(x)), int(np.mean(y))), (int(length / 2), STICK_WIDTH), int(angle))
        fill_convex_poly(canvas, polygon, COLORS[a])
    canvas = (canvas * LIMB_SCALE).astype(np.uint8)
    for (x, y), color in zip(kps, COLORS):
        fill_circle(canvas, (int(x), int(y)), RADIUS, color)
    return Image.fromarray(canvas)
