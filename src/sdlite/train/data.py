"""Training images and their captions, in the folder layouts kohya sd-scripts reads (docs/formats.md §12).

A data folder holds images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``) with same-named ``.txt`` captions,
or subfolders named ``N_identifier class`` (kohya's DreamBooth convention): each image of such a folder is seen N
times per epoch, and "identifier class" is its caption when it has no ``.txt``. ``prompt=`` gives one caption to every
image without a caption file. Every image is opened and checked (readable, large enough, captioned) when the data set
is built, so bad data stops the run before any training, with the file named.

Captions are varied per step as kohya does: the tags (comma-separated) after the first ``keep_tokens`` are shuffled,
and the whole caption is dropped (trained as "") with probability ``caption_dropout``.

Aspect-ratio buckets (NovelAI's aspect-ratio bucketing, in kohya sd-scripts' form): every training image is resized
to one of a few bucket sizes, all multiples of 64 with an area close to the training resolution², instead of being
cropped square. kohya's rule: with the area counted in 64x64 cells, A = (W/64)·(H/64), the buckets are the square
side √A·64 (rounded down to a whole cell), and for every width w from ``min_size`` to ``max_size`` in steps of 64 the
pair (w, h) and (h, w) with h = min(max_size, ⌊A / (w/64)⌋·64). An image goes to the bucket whose aspect ratio w/h is
nearest its own, is scaled to cover the bucket, and the overhang is cut off (centred by default, random on request);
the cut's top-left corner is what SDXL's crop conditioning receives.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import SdliteError

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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPEATS = re.compile(r"^(\d+)_(.*)$")


class DataError(SdliteError):
    """A training image or caption that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Example:
    """One training image: where it is, its caption, how often an epoch shows it, and where it lands."""

    path: Path
    caption: str
    repeats: int
    size: tuple[int, int]  # the image's own (width, height)
    placement: Placement


def _folders(root: Path) -> list[tuple[Path, int, str | None]]:
    """(folder, repeats, folder caption) of a data root: its ``N_name`` subfolders, else the root itself."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder of training images")
    concepts = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        m = _REPEATS.match(sub.name)
        if m is not None:
            concepts.append((sub, int(m[1]), m[2].strip() or None))
    return concepts or [(root, 1, None)]


def _read_caption(image: Path, extension: str) -> str | None:
    path = image.with_suffix(extension)
    if not path.exists():
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the caption ({e})") from None


class ImageFolder:
    """The training examples of a data folder, checked and placed in aspect-ratio buckets.

    ``resolution``: the training side (buckets have about resolution² pixels); ``buckets=False`` trains square
    crops. An image needing more than ``max_upscale`` times enlargement to fill its bucket is "too small".
    """

    def __init__(self, root: str | Path, *, resolution: int = 512, prompt: str | None = None,
                 caption_extension: str = ".txt", buckets: bool = True, min_bucket: int = 256,
                 max_bucket: int = 1024, max_upscale: float = 2.0, random_crop: bool = False, seed: int = 0):
        self.root, self.resolution = Path(root), resolution
        self.buckets = bucket_sizes(resolution, min_bucket, max_bucket) if buckets else [(resolution, resolution)]
        rng = random.Random(seed) if random_crop else None
        self.examples: list[Example] = []
        for folder, repeats, folder_caption in _folders(self.root):
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            for path in images:
                caption = _read_caption(path, caption_extension)
                if caption is None:
                    caption = prompt if prompt is not None else folder_caption
                if caption is None:
                    raise DataError(f"{path}: no caption ({path.with_suffix(caption_extension).name} is missing) and "
                                    "no prompt for the whole folder was given (--prompt)")
                size = self._check_image(path)
                placement = place(size, self.buckets, rng)
                if (need := placement.scaled[0] / size[0]) > max_upscale:
                    raise DataError(f"{path}: {size[0]}x{size[1]} is too small for training at {resolution}x"
                                    f"{resolution} (it would be enlarged {need:.1f}x to fill its "
                                    f"{placement.bucket[0]}x{placement.bucket[1]} bucket, more than {max_upscale}x); "
                                    "use a larger image or a smaller --resolution")
                self.examples.append(Example(path, caption, repeats, size, placement))
        if not self.examples:
            raise DataError(f"{self.root}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or in N_name subfolders")

    @staticmethod
    def _check_image(path: Path) -> tuple[int, int]:
        try:
            with Image.open(path) as image:
                image.load()
                return image.size
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"{path}: cannot read the image ({e})") from None

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_images(self) -> int:
        """Images seen per epoch (repeats counted), kohya's ``ss_num_train_images``."""
        return sum(e.repeats for e in self.examples)

    def pixels(self, index: int, flip: bool = False) -> torch.Tensor:
        """The image resized and cut to its bucket, [3, H, W] in [-1, 1], mirrored left-right if ``flip``."""
        e = self.examples[index]
        with Image.open(e.path) as image:
            image = fit(image, e.placement)
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        x = data.view(image.height, image.width, 3).permute(2, 0, 1).float() / 127.5 - 1
        return x.flip(-1) if flip else x

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's ``ss_tag_frequency``: per folder, how many captions hold each comma-separated tag."""
        out: dict[str, dict[str, int]] = {}
        for e in self.examples:
            counts = out.setdefault(e.path.parent.name, {})
            for tag in filter(None, (t.strip() for t in e.caption.split(","))):
                counts[tag] = counts.get(tag, 0) + 1
        return out


def vary_caption(caption: str, rng: random.Random, *, shuffle_tags: bool = False, keep_tokens: int = 0,
                 dropout: float = 0.0) -> str:
    """The caption as one training step sees it: dropped to "" with probability ``dropout``, else with its tags
    after the first ``keep_tokens`` shuffled when ``shuffle_tags`` (kohya's shuffle_caption / keep_tokens)."""
    if dropout and rng.random() < dropout:
        return ""
    if not shuffle_tags:
        return caption
    tags = [t.strip() for t in caption.split(",")]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(kept + rest)
