"""The image side of A1111 1.10's inpainting, written from its rules (modules/processing.py
StableDiffusionProcessingImg2Img.init, masking.py, images.py) for the reference tests: mask blur with OpenCV, the
"only masked" crop region, resize modes, the "fill" of masked content, the latent mask, the 9-channel conditioning and
the final overlay. OpenCV's GaussianBlur is the reference for the blur; everything else is PIL and numpy."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

FILL = {"fill": 0, "original": 1, "latent noise": 2, "latent nothing": 3}


def resize_image(mode: int, im: Image.Image, width: int, height: int) -> Image.Image:
    """images.resize_image: 0 stretch, 1 crop to the target ratio, 2 fit and stretch the edges into the bands;
    Lanczos for every resize."""
    def resize(image, w, h):
        return image.resize((w, h), resample=Image.Resampling.LANCZOS)

    if mode == 0:
        return resize(im, width, height)
    ratio, src_ratio = width / height, im.width / im.height
    if mode == 1:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
    else:
        src_w = width if ratio < src_ratio else im.width * height // im.height
        src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = resize(im, src_w, src_h)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == 2 and ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            res.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                      box=(0, fill + src_h))
    elif mode == 2 and ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            res.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill + src_w, 0))
    return res


def blur(mask: Image.Image, radius: int) -> Image.Image:
    """Horizontal then vertical cv2.GaussianBlur, kernel 2·int(2.5·r + 0.5) + 1, σ = r."""
    size = 2 * int(2.5 * radius + 0.5) + 1
    a = cv2.GaussianBlur(np.array(mask), (size, 1), radius)
    return Image.fromarray(cv2.GaussianBlur(a, (1, size), radius))


def crop_region(mask: Image.Image, pad: int, width: int, height: int) -> tuple[int, int, int, int]:
    """masking.get_crop_region (bounding box grown by ``pad``) then expand_crop_region to the generation's ratio."""
    x1, y1, x2, y2 = mask.getbbox()
    w, h = mask.size
    x1, y1, x2, y2 = max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, w), min(y2 + pad, h)
    if (x2 - x1) / (y2 - y1) > width / height:
        diff = int((x2 - x1) / (width / height) - (y2 - y1))
        y1, y2 = _expand(y1 - diff // 2, y2 + diff - diff // 2, h)
    else:
        diff = int((y2 - y1) * (width / height) - (x2 - x1))
        x1, x2 = _expand(x1 - diff // 2, x2 + diff - diff // 2, w)
    return x1, y1, x2, y2


def _expand(lo, hi, limit):
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """masking.fill: the unmasked colours, blurred less and less, composited over the masked area."""
    out = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


@dataclass
class Prepared:
    image: Image.Image  # what the VAE encodes, at the generation size
    mask: Image.Image  # the working mask at the generation size (latent mask and 9-channel conditioning)
    overlay: Image.Image  # RGBA: the original where it is kept
    paste_to: tuple[int, int, int, int] | None


def prepare(image: Image.Image, mask: Image.Image, width: int, height: int, *, mask_blur: int, fill_mode: str,
            only_masked: bool = False, padding: int = 32) -> Prepared:
    mask = mask.convert("L")
    if mask_blur > 0:
        mask = blur(mask, mask_blur)
    crop, paste_to = None, None
    if only_masked:
        overlay_mask = mask
        crop = crop_region(mask, padding, width, height)
        x1, y1, x2, y2 = crop
        work = resize_image(2, mask.crop(crop), width, height)
        paste_to = (x1, y1, x2 - x1, y2 - y1)
    else:
        work = resize_image(0, mask, width, height)
        overlay_mask = Image.fromarray(np.clip(np.array(work).astype(np.float32) * 2, 0, 255).astype(np.uint8))
    image = image.convert("RGB")
    if crop is None:
        image = resize_image(0, image, width, height)
    overlay = Image.new("RGBa", image.size)
    overlay.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask.convert("L")))
    if crop is not None:
        image = resize_image(2, image.crop(crop), width, height)
    if fill_mode != "original":
        image = fill(image, work)
    return Prepared(image, work, overlay.convert("RGBA"), paste_to)


def latent_mask(work: Image.Image, latent_w: int, latent_h: int) -> torch.Tensor:
    """The mask at latent size (PIL's default resample of an RGB image), first channel, /255, rounded: 1 = redo."""
    small = np.array(work.convert("RGB").resize((latent_w, latent_h)), dtype=np.float32)[..., 0] / 255
    return torch.from_numpy(np.around(small))


def conditioning_mask(work: Image.Image) -> torch.Tensor:
    """The 9-channel models' pixel mask [1, 1, H, W]: the working mask /255, rounded."""
    return torch.round(torch.from_numpy(np.array(work.convert("L")).astype(np.float32) / 255.0)[None, None])


def apply_overlay(generated: Image.Image, prepared: Prepared) -> Image.Image:
    """processing.apply_overlay: an "only masked" result is crop-resized into its box of a blank canvas, then the
    original is composited over it."""
    if prepared.paste_to is not None:
        x, y, w, h = prepared.paste_to
        base = Image.new("RGBA", prepared.overlay.size)
        base.paste(resize_image(1, generated, w, h), (x, y))
        generated = base
    image = generated.convert("RGBA")
    image.alpha_composite(prepared.overlay)
    return image.convert("RGB")
