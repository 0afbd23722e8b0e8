"""The inputs of img2img and inpainting as AUTOMATIC1111 1.10 prepares them (``StableDiffusionProcessingImg2Img.init``
and ``inpainting_image_conditioning``): the init image fitted to the generation size, the mask blurred, cropped for
"only masked", the masked area filled, and the overlay that puts the original's unmasked pixels back at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from . import images as im


@dataclass
class PreparedImage:
    """``image``: the picture to encode (generation size). ``mask``: the working mask at that size (None for
    img2img), which drives the latent blending and the inpainting conditioning. ``finish``: generated picture →
    final picture (the original pasted back outside the mask), or None."""

    image: Image.Image
    mask: Image.Image | None = None
    finish: Callable[[Image.Image], Image.Image] | None = None


def prepare_image(job) -> PreparedImage:
    """Resize/crop the init image and mask as A1111 does."""
    original = im.flatten(job.init_image)
    if job.mask is None:
        return PreparedImage(im.resize_image(job.resize_mode, original, job.width, job.height))
    mask = im.binary_mask(job.mask)
    if job.invert_mask:
        mask = ImageOps.invert(mask)
    if job.mask_blur > 0:
        mask = im.blur_mask(mask, job.mask_blur, job.mask_blur)
    paste_to = None
    if job.only_masked:
        overlay_mask = mask
        region = im.expand_region(im.crop_region(mask, job.only_masked_padding), job.width, job.height,
                                  mask.width, mask.height)
        x1, y1, x2, y2 = region
        work_mask = im.resize_image("resize and fill", mask.crop(region), job.width, job.height)
        image = im.resize_image("resize and fill", original.crop(region), job.width, job.height)
        paste_to = (x1, y1, x2 - x1, y2 - y1)
        base = original
    else:
        work_mask = im.resize_image(job.resize_mode, mask, job.width, job.height)
        overlay_mask = work_mask.point(lambda v: min(255, v * 2))
        image = im.resize_image(job.resize_mode, original, job.width, job.height)
        base = image
    if job.inpaint_fill != "original":
        image = im.fill_masked(image, work_mask)
    return PreparedImage(image, work_mask,
                         lambda generated: im.overlay_original(generated, base, overlay_mask, paste_to))


def masked_pixels(pixels: torch.Tensor, mask_image: Image.Image | None,
                  mask_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixel side of a 9-channel UNet's conditioning: (mask [B, 1, H, W] rounded to 0/1, the image lerped towards
    its masked version by the "conditional mask weight"); the caller encodes the second and downsizes the first."""
    b, _, h, w = pixels.shape
    if mask_image is None:
        mask = torch.ones(b, 1, h, w)
    else:
        mask = torch.from_numpy(np.around(np.asarray(mask_image.convert("L"), dtype=np.float32) / 255.0))
        mask = mask[None, None].expand(b, 1, h, w)
    return mask, torch.lerp(pixels, pixels * (1.0 - mask), mask_weight)
