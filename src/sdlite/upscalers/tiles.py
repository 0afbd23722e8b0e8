"""Upscaling whole images with an upscaler network, tile by tile, as AUTOMATIC1111 does (``upscaler_utils.
upscale_with_model`` with ``images.split_grid`` / ``combine_grid``; settings ``ESRGAN_tile`` = 192 and
``ESRGAN_tile_overlap`` = 8 by default).

* Grid: along each axis, ceil((size − overlap) / (tile − overlap)) tiles of ``tile`` pixels spread evenly from the
  first edge to the last (start i = int(i · (size − tile) / (n − 1))); an image no larger than a tile is one tile.
* Seams: every tile but the first of a row is laid over the row so far with its first ``overlap``·s output columns
  blended in by a linear ramp (weight r / (overlap·s) for column r), the rest overwritten; rows are combined the
  same way top to bottom. A1111 blends uint8 tiles with uint8 masks; here tiles blend in float and the image is
  quantised once, so seams differ from A1111's by at most a level or two and a single tile is the same.
* Quantisation: 255·clamp(x, 0, 1) truncated to uint8, as A1111 does.
* ``scale``: A1111's ``Upscaler.upscale``: the model is applied (at most three times) until the image reaches
  int(size · scale) // 8 · 8 on both sides, then Lanczos-resized to exactly that size.
* ``bgr``: A1111 (1.8 and later; earlier versions through Real-ESRGAN's own helper, to the same effect) hands the
  networks the image with red and blue swapped, while the networks were trained on RGB. ``bgr=True`` reproduces
  A1111's pixels (hires fix uses it to reproduce A1111 infotexts); the default gives the network RGB.

Peak memory is the model's activations for one tile plus the float output image: a 4K output (3840x2160) from a
4x model holds ~100 MB of output, whatever the input size.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Where tiles start along an axis of ``size`` pixels (A1111 ``split_grid``)."""
    if size <= tile:
        return [0]
    count = math.ceil((size - overlap) / (tile - overlap))
    step = (size - tile) / (count - 1)
    return [min(int(i * step), size - tile) for i in range(count)]


def _lay(canvas: torch.Tensor, piece: torch.Tensor, start: int, seam: int, dim: int) -> None:
    """Lay ``piece`` onto ``canvas`` from ``start`` along ``dim``, blending its first ``seam`` lines in linearly
    (nothing blended at the canvas's first edge)."""
    length = piece.shape[dim]
    if start == 0 or seam == 0:
        canvas.narrow(dim, start, length).copy_(piece)
        return
    shape = [1] * canvas.ndim
    shape[dim] = seam
    ramp = (torch.arange(seam, dtype=canvas.dtype) / seam).reshape(shape)
    old = canvas.narrow(dim, start, seam)
    old.lerp_(piece.narrow(dim, 0, seam), ramp)
    canvas.narrow(dim, start + seam, length - seam).copy_(piece.narrow(dim, seam, length - seam))


@torch.no_grad()
def upscale_tensor(x: torch.Tensor, model: nn.Module, tile: int = 192, overlap: int = 8) -> torch.Tensor:
    """[B, C, H, W] → [B, C, H·s, W·s] float32 on the CPU, the model run on tiles (``tile`` <= 0: whole image)."""
    param = next(model.parameters())
    scale = model.scale
    b, c, h, w = x.shape
    if tile <= 0 or (h <= tile and w <= tile):
        return model(x.to(param)).float().cpu()
    if not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    th, tw = min(tile, h), min(tile, w)
    out = torch.empty(b, c, h * scale, w * scale)
    for y in tile_starts(h, tile, overlap):
        row = torch.empty(b, c, th * scale, w * scale)
        for x0 in tile_starts(w, tile, overlap):
            piece = model(x[..., y:y + th, x0:x0 + tw].to(param)).float().cpu()
            _lay(row, piece, x0 * scale, overlap * scale, dim=3)
        _lay(out, row, y * scale, overlap * scale, dim=2)
    return out


def _to_pil(x: torch.Tensor, bgr: bool) -> Image.Image:
    if bgr:
        x = x.flip(0)
    return Image.fromarray((255.0 * x.clamp(0.0, 1.0).permute(1, 2, 0).numpy()).astype(np.uint8))


def _from_pil(image: Image.Image, bgr: bool) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return x.flip(0) if bgr else x


def _inputs(image) -> list[torch.Tensor]:
    if isinstance(image, Image.Image):
        return [_from_pil(image, False)]
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[1] != 3:
            raise ValueError(f"an image tensor must be [3, H, W] or [B, 3, H, W] in [0, 1], got {list(image.shape)}")
        return list(t)
    return [x for im in image for x in _inputs(im)]


def upscale(image: Image.Image | torch.Tensor | Sequence[Image.Image], model: nn.Module, scale: float | None = None,
            tile: int = 192, overlap: int = 8, *, bgr: bool = False) -> Image.Image | list[Image.Image]:
    """Upscale with ``model`` (from ``sdlite.upscalers.load``): a PIL image gives a PIL image; a tensor
    ([3, H, W] or [B, 3, H, W], RGB in [0, 1]) or a list of images gives a list. ``scale=None`` applies the model
    once; a number follows A1111 (module docstring). ``tile``/``overlap`` in input pixels; ``tile=0`` disables
    tiling."""
    results = []
    for x in _inputs(image):
        h, w = x.shape[-2:]
        if scale is None:
            results.append(_to_pil(upscale_tensor((x.flip(0) if bgr else x)[None], model, tile, overlap)[0], bgr))
            continue
        dest_w, dest_h = int(w * scale) // 8 * 8, int(h * scale) // 8 * 8
        picture = None
        for i in range(3):
            cw, ch = (w, h) if picture is None else picture.size
            if cw >= dest_w and ch >= dest_h and (i > 0 or scale != 1):
                break
            src = (x.flip(0) if bgr else x) if picture is None else _from_pil(picture, bgr)
            picture = _to_pil(upscale_tensor(src[None], model, tile, overlap)[0], bgr)
            if picture.size == (cw, ch):
                break
        if picture is None:
            picture = _to_pil(x, False)
        if picture.size != (dest_w, dest_h):
            picture = picture.resize((dest_w, dest_h), Image.Resampling.LANCZOS)
        results.append(picture)
    return results[0] if isinstance(image, Image.Image) else results


def fit(image: Image.Image, model: nn.Module, width: int, height: int, tile: int = 192, overlap: int = 8, *,
        bgr: bool = True) -> Image.Image:
    """A1111's hires-fix image step, ``images.resize_image(1, image, width, height, upscaler_name)``: crop-and-resize
    to width x height, the enlargement done by ``upscale`` with the model (A1111's scale rule), any remaining
    difference by Lanczos, the result centred on a black width x height canvas (cropping what overflows).
    ``bgr`` defaults to A1111's channel order, so that its infotexts reproduce."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    scale = max(src_w / image.width, src_h / image.height)
    resized = upscale(image, model, scale, tile, overlap, bgr=bgr) if scale > 1.0 else image
    if resized.size != (src_w, src_h):
        resized = resized.resize((src_w, src_h), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out
