"""Aspect-ratio buckets (NovelAI's aspect-ratio bucketing, in kohya sd-scripts' form; docs/formats.md "Training").

Every training image is resized to one of a few bucket sizes, all multiples of 64 with an area close to the training
resolution², instead of being cropped square. kohya's rule: with the area counted in 64x64 cells, A = (W/64)·(H/64),
the buckets are the square side √A·64 (rounded down to a whole cell), and for every width w from ``min_size`` to
``max_size`` in steps of 64 the pair (w, h) and (h, w) with h = min(max_size, ⌊A / (w/64)⌋·64). An image goes to the
bucket whose aspect ratio w/h is nearest its own, is scaled to cover the bucket, and the overhang is cut off
(centred by default, random on request); the cut's top-left corner is what SDXL's crop conditioning receives.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image

STEP = 64


def bucket_sizes(resolution: int, min_size: int = 256, max_size: int = 1024, step: int = STEP) -> list[tuple[int, int]]:
    """(width, height) of every bucket for square training at ``resolution``, sorted by aspect ratio."""
    if resolution % step:
        raise ValueError(f"the training resolution must be a multiple of {step}, not {resolution}")
    min_size, max_size = min(min_size, resolution), max(max_size, resolution)
    cells = (resolution // step) ** 2
    sizes = {(int(math.sqrt(cells)) * step,) * 2}
    for width in range(min_size, max_size + 1, step):
        height = min(max_size, cells // (width // step) * step)
        if height >= step:  # at small resolutions wide buckets would have no rows left
            sizes |= {(width, height), (height, width)}
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


@dataclass(frozen=True)
class Placement:
    """Where an image lands: its bucket (width, height), the size it is scaled to, and the cut's top-left corner."""

    bucket: tuple[int, int]
    scaled: tuple[int, int]
    crop: tuple[int, int]  # (left, top) in the scaled image


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (kohya: smallest |bucket ratio − image ratio|)."""
    ratio = size[0] / size[1]
    return min(buckets, key=lambda b: abs(b[0] / b[1] - ratio))


def place(size: tuple[int, int], buckets: list[tuple[int, int]], rng: random.Random | None = None) -> Placement:
    """The bucket, scaled size and crop of an image of ``size`` (width, height); ``rng`` picks a random crop."""
    w, h = size
    bucket = nearest_bucket(size, buckets)
    # Scale so that the image covers the bucket: by height when the image is relatively wider, else by width.
    scale = bucket[1] / h if w / h > bucket[0] / bucket[1] else bucket[0] / w
    scaled = (max(bucket[0], int(w * scale + 0.5)), max(bucket[1], int(h * scale + 0.5)))
    spare = (scaled[0] - bucket[0], scaled[1] - bucket[1])
    if rng is None:
        crop = (spare[0] // 2, spare[1] // 2)
    else:
        crop = (rng.randint(0, spare[0]), rng.randint(0, spare[1]))
    return Placement(bucket, scaled, crop)


def fit(image: Image.Image, placement: Placement) -> Image.Image:
    """The image resized and cut to its bucket (Lanczos when shrinking, bicubic when enlarging)."""
    resample = Image.Resampling.LANCZOS if placement.scaled[0] < image.width else Image.Resampling.BICUBIC
    image = image.convert("RGB").resize(placement.scaled, resample)
    left, top = placement.crop
    return image.crop((left, top, left + placement.bucket[0], top + placement.bucket[1]))
