"""Tiled VAE encode/decode: the image is processed in overlapping square tiles, one at a time, and each tile is
blended linearly into its upper and left neighbours, so that peak memory is about one tile's activations
(a 2048x2048 decode needs what a 512x512 one does, plus the output).

The tiling follows diffusers' `AutoencoderKL.tiled_decode` / `_tiled_encode` exactly (tile starts every
`int(tile * (1 - overlap))`, blend extent `int(out_tile * overlap)`, each blended tile cropped to
`out_tile - blend extent`), so results can be compared with a diffusers VAE after `enable_tiling()`. Unlike
diffusers, finished tiles are not all kept: only the strips a later tile blends with are, and each cropped tile
goes straight into a preallocated output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sdlite.vae.model import AutoencoderKL, DiagonalGaussian


def _blend(previous: Tensor, tile: Tensor, extent: int, dim: int) -> None:
    """Overwrite the first `extent` rows (dim 2) or columns (dim 3) of `tile` with a linear ramp from the
    neighbour's last ones to the tile's own, in place, as diffusers' blend_v / blend_h do."""
    extent = min(previous.shape[dim], tile.shape[dim], extent)
    if extent == 0:
        return
    # Weight of the new tile at offset y is y / extent (0 at the seam start, never quite 1).
    w = (torch.arange(extent, dtype=torch.float64) / extent).to(tile.device, tile.dtype)
    w = w.view(-1, 1) if dim == 2 else w.view(1, -1)
    head = tile.narrow(dim, 0, extent)
    head.copy_(previous.narrow(dim, previous.shape[dim] - extent, extent) * (1 - w) + head * w)


def _tiled(x: Tensor, run: Callable[[Tensor], Tensor], tile: int, overlap: float, out_tile: int,
           out_len: Callable[[int], int]) -> Tensor:
    """Run `run` over `tile`-sized windows of `x` (input units) and stitch the outputs (output units, where a
    full tile gives `out_tile` and a window of n gives `out_len(n)`)."""
    if tile < 1 or not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile must be positive and overlap in [0, 1), got tile={tile}, overlap={overlap}")
    stride = int(tile * (1 - overlap))
    if stride < 1:
        raise ValueError(f"tile {tile} with overlap {overlap} leaves no stride between tiles")
    extent = int(out_tile * overlap)
    keep = out_tile - extent  # diffusers' row_limit
    if stride * out_tile != keep * tile:
        # int() rounds the input stride and the output blend extent separately, so for some overlaps the kept
        # part of a tile is not its stride scaled; diffusers then returns an image of the wrong size.
        raise ValueError(f"tile {tile} with overlap {overlap}: a stride of {stride} inputs keeps {keep} outputs, "
                         f"not {stride * out_tile / tile:g}; pick an overlap that makes both whole numbers")
    height, width = x.shape[-2:]
    rows, cols = range(0, height, stride), range(0, width, stride)
    # Each tile contributes its output cropped to `keep` (one stride's worth), so the sizes sum to the input's
    # times the scale.
    row_sizes = [min(keep, out_len(min(tile, height - i))) for i in rows]
    col_sizes = [min(keep, out_len(min(tile, width - j))) for j in cols]
    out: Tensor | None = None
    above: list[Tensor] = []  # bottom strip of each tile in the previous row, after its own blending
    top = 0
    for r, i in enumerate(rows):
        below: list[Tensor] = []
        left: Tensor | None = None
        x0 = 0
        for c, j in enumerate(cols):
            t = run(x[:, :, i:i + tile, j:j + tile])
            if r > 0:
                _blend(above[c], t, extent, dim=2)
            if left is not None:
                _blend(left, t, extent, dim=3)
            if out is None:
                out = t.new_empty((*t.shape[:2], sum(row_sizes), sum(col_sizes)))
            # Keep only the edges later tiles blend with; clone so the whole tile can be freed.
            below.append(t[:, :, t.shape[2] - min(extent, t.shape[2]):, :].clone())
            left = t[:, :, :, t.shape[3] - min(extent, t.shape[3]):].clone()
            out[:, :, top:top + row_sizes[r], x0:x0 + col_sizes[c]] = t[:, :, :row_sizes[r], :col_sizes[c]]
            x0 += col_sizes[c]
            del t
        above = below
        top += row_sizes[r]
    assert out is not None
    return out


def decode_tiled(vae: AutoencoderKL, latents: Tensor, *, tile: int = 64, overlap: float = 0.25) -> Tensor:
    """Like `vae.decode`, in `tile` x `tile` latent tiles (tile * f pixels out) overlapping by `overlap`.

    Latents that fit in one tile are decoded whole, so the result equals `vae.decode(latents)` exactly.
    """
    if latents.shape[-1] <= tile and latents.shape[-2] <= tile:
        return vae.decode(latents)
    f = vae.config.downsample_factor
    return _tiled(latents, vae.decode, tile, overlap, out_tile=tile * f, out_len=lambda n: n * f)


def encode_tiled(vae: AutoencoderKL, images: Tensor, *, tile: int = 512, overlap: float = 0.25) -> DiagonalGaussian:
    """Like `vae.encode`, in `tile` x `tile` pixel tiles (tile / f latents out) overlapping by `overlap`.

    Mean and log-variance are blended together before the posterior's clamp, as diffusers does; images that fit
    in one tile are encoded whole, so the result equals `vae.encode(images)` exactly.
    """
    if images.shape[-1] <= tile and images.shape[-2] <= tile:
        return vae.encode(images)
    f = vae.config.downsample_factor
    # Tiles go through vae.moments / vae.decode, so a half-precision VAE that overflows on some tile is upcast
    # there as it would be for a whole image, and every tile comes back in the caller's dtype.
    # Each stride-2 downsample floors odd sizes, so n pixels give n // f latents.
    mean, logvar = _tiled(images, vae.moments, tile, overlap, out_tile=tile // f, out_len=lambda n: n // f).chunk(2, 1)
    return DiagonalGaussian(mean, logvar)
