"""Control images for ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"): fitting an image to the generation size, and the preprocessors that need no model weights.

The conventions are those of sd-webui-controlnet, so that settings carry over from AUTOMATIC1111:

* resize modes "just resize" (stretch), "crop and resize" (scale to cover, centre crop) and "resize and fill"
  (scale to fit, centre, pad with the median colour of the map's border);
* "canny" is the Canny (1986) edge detector as OpenCV computes it (3x3 Sobel, L1 gradient magnitude, 4-direction
  non-maximum suppression, double threshold with 8-connected hysteresis) with A1111's default thresholds 100/200,
  written here in numpy so that sdlite does not depend on OpenCV;
* "invert" turns black lines on white (a scan, a sketch) into the white-on-black maps the models were trained on;
* the annotators with network weights ("softedge_hed", "softedge_hedsafe", "lineart_realistic", "lineart_coarse",
  "openpose"; see ``sdlite.adapters.annotators``) run on the image at ``detect_resolution`` (512 by default, as
  sd-webui-controlnet's "Preprocessor Resolution") and their map is then fitted like an image;
* ``None`` passes a ready map (depth, normal, segmentation, scribble …) straight through.

Canny and invert run on the image already scaled to the generation size and before the crop or the padding, so edges
come out one pixel thin at the size the ControlNet sees, and the padding of "resize and fill" adds no edge.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..images import RESIZE_MODES
from . import annotators

PREPROCESSORS = (None, "canny", "invert", *annotators.PREPROCESSORS)

# tan(22.5°) in OpenCV's 15-bit fixed point; tan(67.5°) = tan(22.5°) + 2. Integer comparisons keep the direction
# sectors exactly where OpenCV puts them.
_TAN22_Q15 = 13573


def to_rgb(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """An image as uint8 [H, W, 3].

    Accepts a PIL image (any mode), a numpy array [H, W] or [H, W, C] (uint8, or float in [0, 1]) and a torch
    tensor [C, H, W] or [1, C, H, W] (float in [0, 1], or uint8). Grey images are repeated to RGB; alpha is dropped.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3:
            raise ValueError(f"a control image tensor must be [C, H, W] or [1, C, H, W], got {list(image.shape)}")
        array = t.permute(1, 2, 0).numpy()
    else:
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"a control image must have 1, 3 or 4 channels, got an array of shape {list(array.shape)}")
    if array.dtype != np.uint8:
        array = np.round(np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[:, :, :3])


def _sobel(channel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives (x to the right, y downwards) with replicated borders, in integers."""
    p = np.pad(channel.astype(np.int32), 1, mode="edge")
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return dx, dy


def _connected_to(seeds: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Pixels of ``candidates`` 8-connected (through candidates) to a pixel of ``seeds``.

    Connected components by minimum-label propagation with pointer jumping: every candidate carries the index of a
    pixel of its component, takes the smallest label around it, then follows labels to their own labels. Jumping
    makes long thin edge chains converge in a few sweeps rather than one sweep per pixel of their length.
    """
    h, w = candidates.shape
    none = h * w
    flat = candidates.ravel()
    labels = np.where(flat, np.arange(none), none)
    lookup = np.empty(none + 1, dtype=labels.dtype)
    while True:
        grid = np.pad(labels.reshape(h, w), 1, constant_values=none)
        best = labels.reshape(h, w).copy()
        for dy in range(3):
            for dx in range(3):
                np.minimum(best, grid[dy:dy + h, dx:dx + w], out=best)
        best = np.where(flat, best.ravel(), none)
        while True:
            lookup[:none], lookup[none] = best, none
            jumped = lookup[best]
            if np.array_equal(jumped, best):
                break
            best = jumped
        if np.array_equal(best, labels):
            break
        labels = best
    keep = np.zeros(none + 1, dtype=bool)
    keep[labels[seeds.ravel() & flat]] = True
    keep[none] = False
    return keep[labels].reshape(h, w)


def canny(image: np.ndarray, low: float = 100, high: float = 200) -> np.ndarray:
    """Canny edges of a uint8 image [H, W] or [H, W, C] as uint8 [H, W]: 255 on edges, 0 elsewhere.

    Thresholds apply to the L1 gradient magnitude |dx| + |dy| of the 3x3 Sobel filter on 0..255 values. For colour
    images each pixel uses the channel with the strongest gradient.
    """
    low, high = min(low, high), max(low, high)
    image = np.asarray(image)
    channels = image[:, :, None] if image.ndim == 2 else image
    derivs = [_sobel(channels[:, :, c]) for c in range(channels.shape[2])]
    dx = np.stack([d[0] for d in derivs])
    dy = np.stack([d[1] for d in derivs])
    mags = np.abs(dx) + np.abs(dy)
    pick = mags.argmax(axis=0)[None]
    dx, dy, mag = (np.take_along_axis(a, pick, axis=0)[0] for a in (dx, dy, mags))

    # Non-maximum suppression: keep a pixel only if its magnitude peaks across the edge. Neighbours outside the image
    # count as 0; ties go to the pixel that comes first along the gradient's axis, so a symmetric step edge (two equal
    # magnitudes side by side) stays one pixel wide.
    m = np.pad(mag, 1)
    h, w = mag.shape

    def at(oy: int, ox: int) -> np.ndarray:
        return m[1 + oy:1 + oy + h, 1 + ox:1 + ox + w]

    ax, ay = np.abs(dx).astype(np.int64), np.abs(dy).astype(np.int64) << 15
    tan22 = ax * _TAN22_Q15
    horizontal = ay < tan22
    vertical = ~horizontal & (ay > tan22 + (ax << 16))
    same_sign = (dx ^ dy) >= 0
    peak = np.where(horizontal, (mag > at(0, -1)) & (mag >= at(0, 1)),
                    np.where(vertical, (mag > at(-1, 0)) & (mag >= at(1, 0)),
                             np.where(same_sign, (mag > at(-1, -1)) & (mag > at(1, 1)),
                                      (mag > at(-1, 1)) & (mag > at(1, -1)))))
    candidates = peak & (mag > low)
    edges = _connected_to(candidates & (mag > high), candidates)
    return edges.astype(np.uint8) * 255


def invert(image: np.ndarray) -> np.ndarray:
    """Black lines on white → white lines on black (A1111's "invert (from white bg & black line)")."""
    return 255 - image


def _scaled_size(width: int, height: int, w0: int, h0: int, mode: str) -> tuple[int, int]:
    if mode == "just resize":
        return width, height
    if mode == "crop and resize":
        k = max(width / w0, height / h0)
        return max(width, round(w0 * k)), max(height, round(h0 * k))
    k = min(width / w0, height / h0)
    return min(width, max(1, round(w0 * k))), min(height, max(1, round(h0 * k)))


def _place(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Centre ``image`` in a width x height frame: crop what overflows, pad what is missing with the median colour
    of the image's border (sd-webui-controlnet's "resize and fill": black around edge maps, white around sketches)."""
    h, w = image.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return image[top:top + height, left:left + width]
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    frame = np.empty((height, width, image.shape[2]), dtype=image.dtype)
    frame[:] = np.median(border, axis=0).astype(image.dtype)
    top, left = max(0, -top), max(0, -left)
    frame[top:top + h, left:left + w] = image
    return frame


def prepare(image: Image.Image | np.ndarray | torch.Tensor, width: int, height: int, *,
            preprocessor: str | None = None, resize_mode: str = "crop and resize",
            canny_thresholds: tuple[float, float] = (100, 200), annotator: torch.nn.Module | None = None,
            annotator_dirs=(), detect_resolution: int = 512) -> np.ndarray:
    """The control map for a width x height generation: float32 [height, width, 3] in [0, 1].

    The image is scaled as ``resize_mode`` says (Lanczos), run through ``preprocessor``, then cropped or padded to
    the exact size. A preprocessor with a network runs first, on the image as given, with ``annotator`` (a module
    from ``annotators.load``) or the weight file found in ``annotator_dirs``.
    """
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, not {resize_mode!r}")
    if preprocessor not in PREPROCESSORS:
        raise ValueError(f"preprocessor must be one of {PREPROCESSORS}, not {preprocessor!r}")
    if width < 1 or height < 1:
        raise ValueError(f"the generation size must be positive, got {width}x{height}")
    rgb = to_rgb(image)
    if preprocessor in annotators.PREPROCESSORS:
        net = annotator if annotator is not None else annotators.network_for(preprocessor, annotator_dirs)
        rgb = annotators.annotate(preprocessor, rgb, net, detect_resolution)
    h0, w0 = rgb.shape[:2]
    size = _scaled_size(width, height, w0, h0, resize_mode)
    if size != (w0, h0):
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))
    if preprocessor == "canny":
        rgb = np.repeat(canny(rgb, *canny_thresholds)[:, :, None], 3, axis=2)
    elif preprocessor == "invert":
        rgb = invert(rgb)
    return _place(rgb, width, height).astype(np.float32) / 255.0
