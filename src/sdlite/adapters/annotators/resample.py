"""The image handling shared by the ControlNet annotators, after lllyasviel's ``annotator/util.py`` (which
controlnet_aux keeps): ``hwc3`` (any uint8 image to 3 channels, alpha composited on white), ``resize_image`` (the
shorter side to ``resolution``, both sides then rounded to multiples of 64) and ``safe_step`` (HED's quantisation).

The annotators resize with OpenCV's ``cv2.resize``; sdlite does not depend on OpenCV, so its three filters are
written here as separable weight matrices: INTER_AREA (box average over the source area each output pixel covers;
for an axis that grows, OpenCV's area-to-linear rule), INTER_LINEAR (half-pixel centres, edge replicated) and
INTER_LANCZOS4 (8 taps, sinc·sinc(x/4) normalised to sum 1, edge replicated). They are computed in float64 and
rounded, where OpenCV uses fixed-point arithmetic for uint8 images, so uint8 results can differ from OpenCV's by one
level; float maps agree to float precision.
"""

from __future__ import annotations

import math

import numpy as np

AREA, LINEAR, LANCZOS4 = "area", "linear", "lanczos4"


def hwc3(x: np.ndarray) -> np.ndarray:
    """uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] → [H, W, 3]; RGBA composited on white."""
    if x.dtype != np.uint8:
        raise ValueError(f"annotators take uint8 images, got {x.dtype}")
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise ValueError(f"an image must be [H, W] or [H, W, 1|3|4], got {list(x.shape)}")
    if x.shape[2] == 3:
        return x
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    return (x[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


def _clamped(weights: np.ndarray, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, size: int) -> None:
    np.add.at(weights, (rows, np.clip(cols, 0, size - 1)), values)


def _axis_weights(src: int, dst: int, kind: str) -> np.ndarray:
    """[dst, src] matrix of one axis of ``cv2.resize`` with the given filter."""
    w = np.zeros((dst, src))
    scale = src / dst
    out = np.arange(dst)
    if kind == AREA and scale >= 1:
        for i in range(dst):
            a, b = i * scale, (i + 1) * scale
            lo, hi = int(math.floor(a)), min(src, int(math.ceil(b)))
            for j in range(lo, hi):
                w[i, j] = (min(b, j + 1) - max(a, j)) / scale
        return w
    if kind == AREA:  # growing axis: OpenCV's linear weights with the area rule for the fraction
        sx = np.floor(out * scale).astype(int)
        fx = (out + 1) - (sx + 1) / scale
        fx = np.where(fx <= 0, 0.0, fx - np.floor(fx))
        _clamped(w, out, sx, 1.0 - fx, src)
        _clamped(w, out, sx + 1, fx, src)
        return w
    centre = (out + 0.5) * scale - 0.5
    if kind == LINEAR:
        sx = np.floor(centre).astype(int)
        fx = centre - sx
        fx = np.where(sx < 0, 0.0, fx)
        sx = np.maximum(sx, 0)
        fx = np.where(sx >= src - 1, 0.0, fx)
        _clamped(w, out, sx, 1.0 - fx, src)
        _clamped(w, out, sx + 1, fx, src)
        return w
    if kind != LANCZOS4:
        raise ValueError(f"unknown filter {kind!r}")
    sx = np.floor(centre).astype(int)
    fx = centre - sx
    taps = np.arange(8)
    d = fx[:, None] + 3 - taps[None, :]  # distance of each tap (sx-3 … sx+4) from the sample point
    with np.errstate(invalid="ignore", divide="ignore"):
        y = d * math.pi / 4
        coeffs = np.where(np.abs(d) < 1e-12, 1.0, 4 * np.sin(y * 4) * np.sin(y) / (4 * y * y * 4))
    coeffs[fx < np.finfo(np.float32).eps] = (taps == 3).astype(float)
    coeffs /= coeffs.sum(axis=1, keepdims=True)
    _clamped(w, np.repeat(out, 8), (sx[:, None] - 3 + taps[None, :]).ravel(), coeffs.ravel(), src)
    return w


def resize(image: np.ndarray, width: int, height: int, kind: str) -> np.ndarray:
    """``cv2.resize(image, (width, height), interpolation=...)`` for [H, W] or [H, W, C] uint8 or float images."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image.copy()
    x = image.astype(np.float64)
    rest = x.shape[2:]
    x = (_axis_weights(h, height, kind) @ x.reshape(h, -1)).reshape(height, w, *rest)
    x = np.moveaxis(x, 1, 0).reshape(w, -1)
    x = np.moveaxis((_axis_weights(w, width, kind) @ x).reshape(width, height, *rest), 0, 1)
    if image.dtype == np.uint8:
        return np.clip(np.round(x), 0, 255).astype(np.uint8)
    return x.astype(image.dtype)


def resize_image(image: np.ndarray, resolution: int) -> np.ndarray:
    """The annotators' input size rule: scale so the shorter side is ``resolution``, round both sides to multiples
    of 64; Lanczos when enlarging, area averaging when shrinking."""
    h, w = image.shape[:2]
    k = float(resolution) / min(h, w)
    height, width = int(np.round(h * k / 64.0)) * 64, int(np.round(w * k / 64.0)) * 64
    return resize(image, width, height, LANCZOS4 if k > 1 else AREA)


def safe_step(x: np.ndarray, step: int = 2) -> np.ndarray:
    """HED "safe" mode: quantise the edge probability to ``step`` levels so that faint edges drop out."""
    y = x.astype(np.float32) * float(step + 1)
    return y.astype(np.int32).astype(np.float32) / float(step)
