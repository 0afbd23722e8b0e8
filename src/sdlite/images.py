"""PIL images in and out, and the image-side steps of A1111's img2img and inpainting (modules/processing.py,
masking.py, images.py of AUTOMATIC1111 1.10): resize modes, mask binarisation/blur/inversion, the "only masked" crop,
the "fill" of masked content, and the overlay that puts the original pixels back outside the mask."""

from __future__ import annotations


import os
from typing import Iterable

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, PngImagePlugin

from .checkpoint.write import atomic_path

RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → [3, H, W] float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] → PIL images; values truncated to uint8 after ×255, as A1111 does."""
    x = ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    arrays = (255.0 * x.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def flatten(image: Image.Image, background: str = "#ffffff") -> Image.Image:
    """RGBA/LA/P images composited on a solid background (A1111 images.flatten), others converted to RGB."""
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, background)
        return Image.alpha_composite(base, rgba).convert("RGB")
    return image.convert("RGB")


def resize_image(mode: str, image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's resize modes: stretch, crop to the target ratio then resize, or fit then fill the bands by stretching
    the edge rows/columns."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; known: {', '.join(RESIZE_MODES)}")
    lanczos = Image.Resampling.LANCZOS
    if mode == "just resize":
        return image.resize((width, height), resample=lanczos)
    ratio, src_ratio = width / height, image.width / image.height
    cover = (ratio > src_ratio) if mode == "crop and resize" else (ratio < src_ratio)
    src_w = width if cover else image.width * height // image.height
    src_h = image.height * width // image.width if cover else height
    resized = image.resize((src_w, src_h), resample=lanczos)
    out = Image.new("RGB" if image.mode != "L" else "L", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == "resize and fill":
        if ratio < src_ratio:  # bands above and below
            fill = height // 2 - src_h // 2
            if fill > 0:
                out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
                out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                          box=(0, fill + src_h))
        elif ratio > src_ratio:  # bands left and right
            fill = width // 2 - src_w // 2
            if fill > 0:
                out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
                out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                          box=(fill + src_w, 0))
    return out


def binary_mask(mask: Image.Image) -> Image.Image:
    """A mask as "L": from the alpha channel (>128 → white) when it has a real one, else its grey levels."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        return mask.split()[-1].convert("L").point(lambda v: 255 if v > 128 else 0)
    return mask.convert("L")


def _fixed_point_kernel(sigma: float) -> np.ndarray:
    """A1111's kernel (size 2·int(2.5σ+0.5)+1) in OpenCV's bit-exact 8-bit form: the normalised Gaussian with its
    centre set to 1 − Σ(others), scaled by 256 and rounded from the outside in with the rounding error carried
    inwards, the centre taking what makes the sum exactly 256 (OpenCV's getGaussianKernelFixedPoint_ED)."""
    size = 2 * int(2.5 * sigma + 0.5) + 1
    x = np.arange(size) - (size - 1) / 2
    k = np.exp(-(x ** 2) / (2 * sigma ** 2))
    k /= k.sum()
    half = size // 2
    fixed = np.zeros(size, dtype=np.int64)
    err = 0.0
    for i in range(half):
        adjusted = k[i] * 256 + err
        fixed[i] = fixed[size - 1 - i] = int(np.rint(adjusted))
        err = adjusted - fixed[i]
    fixed[half] = 256 - 2 * int(fixed[:half].sum())
    return fixed


def blur_mask(mask: Image.Image, blur_x: float, blur_y: float) -> Image.Image:
    """A1111's mask blur: cv2.GaussianBlur on the 8-bit mask along x, then along y, each pass in OpenCV's fixed point
    (8-bit kernel, integer sums, rounded back to 8 bits) with reflect-101 borders, so masks match A1111's exactly."""
    a = np.asarray(mask.convert("L"), dtype=np.int64)
    for axis, sigma in ((1, blur_x), (0, blur_y)):
        if sigma > 0:
            k = _fixed_point_kernel(sigma)
            pad = [(0, 0), (0, 0)]
            pad[axis] = (len(k) // 2, len(k) // 2)
            padded = np.pad(a, pad, mode="reflect")
            acc = np.zeros_like(a)
            for i, weight in enumerate(k):
                window = [slice(None), slice(None)]
                window[axis] = slice(i, i + a.shape[axis])
                acc += weight * padded[tuple(window)]
            a = np.clip((acc + 128) >> 8, 0, 255)
    return Image.fromarray(a.astype(np.uint8))


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int]:
    """Bounding box (x1, y1, x2, y2) of the non-zero mask pixels, grown by ``padding``, clipped to the image."""
    a = np.asarray(mask.convert("L"))
    rows, cols = np.nonzero(a.any(axis=1))[0], np.nonzero(a.any(axis=0))[0]
    if len(rows) == 0:
        return 0, 0, mask.width, mask.height
    return (max(int(cols[0]) - padding, 0), max(int(rows[0]) - padding, 0),
            min(int(cols[-1]) + 1 + padding, mask.width), min(int(rows[-1]) + 1 + padding, mask.height))


def expand_region(region, width: int, height: int, image_w: int, image_h: int) -> tuple[int, int, int, int]:
    """Grow a crop region to the width/height ratio of the generation, keeping it inside the image."""
    x1, y1, x2, y2 = region
    want = width / height
    if (x2 - x1) / (y2 - y1) > want:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / want - (y2 - y1)), image_h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * want - (x2 - x1)), image_w)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, diff: int, limit: int) -> tuple[int, int]:
    lo, hi = lo - diff // 2, hi + diff - diff // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        hi, lo = hi - lo, 0
    return lo, min(hi, limit)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" masked content: the masked area painted with ever less blurred copies of the unmasked colours."""
    out = Image.new("RGBA", image.size)
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def overlay_original(generated: Image.Image, original: Image.Image, overlay_mask: Image.Image,
                     paste_to: tuple[int, int, int, int] | None = None) -> Image.Image:
    """Put the original pixels back where the mask is 0 (A1111 apply_overlay); "only masked" results are first
    resized into their crop box of the full image."""
    if paste_to is not None:
        x, y, w, h = paste_to
        base = original.convert("RGB").copy()
        base.paste(generated.resize((w, h), resample=Image.Resampling.LANCZOS), (x, y))
        generated = base
    keep = Image.new("RGBa", original.size)
    keep.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask.convert("L")))
    composed = generated.convert("RGBA")
    composed.alpha_composite(keep.convert("RGBA"))
    return composed.convert("RGB")


def latent_mask(mask: Image.Image, latent_w: int, latent_h: int, channels: int) -> torch.Tensor:
    """The mask at latent size, rounded to 0/1 (1 = regenerate), [channels, h, w] as A1111 builds it."""
    small = np.asarray(mask.convert("RGB").resize((latent_w, latent_h)), dtype=np.float32)[..., 0] / 255.0
    return torch.from_numpy(np.around(small)).expand(channels, -1, -1).clone()


def check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise ValueError(f"width and height must be positive multiples of 8, got {width}x{height}")


def outpaint_canvas(image: Image.Image, left: int = 0, right: int = 0, up: int = 0, down: int = 0):
    """Extend the canvas for outpainting: the new border repeats the edge pixels and is masked (white)."""
    rgb = np.asarray(image.convert("RGB"))
    canvas = Image.fromarray(np.pad(rgb, ((up, down), (left, right), (0, 0)), mode="edge"))
    mask = Image.new("L", canvas.size, 255)
    mask.paste(0, (left, up, left + image.width, up + image.height))
    return canvas, mask


def write_png(path: str | os.PathLike, image: Image.Image, infotext: str,
              inputs: Iterable[str | os.PathLike] = ()) -> str | os.PathLike:
    """A PNG with its infotext in the "parameters" text chunk (where A1111 writes it), written to a temporary name and
    renamed when complete; a path among ``inputs`` is refused."""
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", infotext)
    with atomic_path(path, inputs) as tmp:
        image.save(tmp, format="PNG", pnginfo=meta)
    return path
