"""MultiDiffusion: the denoiser run on overlapping windows of the latent and fused per pixel (Bar-Tal et al. 2023,
"MultiDiffusion: Fusing Diffusion Paths for Controlled Image Generation", eq. 5 with uniform weights), or with the
Gaussian window weights of Mixture of Diffusers (Jiménez 2023).

The fusion is a wrapper around the sampler's :class:`~sdlite.schedulers.Denoiser`, inside the guided denoiser, so
every sampler, every mode (img2img makes a tiled upscaler) and CFG work unchanged: for the latent ``x`` at σ,

    D(x; σ)[p] = Σ_i w_i[p] · D(x[F_i]; σ)[p] / Σ_i w_i[p]

over the windows F_i that contain pixel p. Windows are evaluated ``batch`` at a time, so memory grows with the batch
of windows, not with the image. The UNet call is told which windows its rows are (``windows=``), so that a ControlNet
hint, an inpainting model's image conditioning, … are cropped to them (:meth:`WindowBatch.crop`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

WEIGHTS = ("uniform", "gaussian")


@dataclass(frozen=True)
class Tiles:
    """Overlapping windows of ``size``×``size`` latent pixels, ``stride`` apart, evaluated ``batch`` at a time.

    Along each axis the windows start at 0, stride, 2·stride, … while they fit, plus one flush with the far edge
    when the stride does not divide evenly; an axis not longer than ``size`` is one window over its whole length.
    ``weights``: "uniform" (MultiDiffusion's average) or "gaussian" (Mixture of Diffusers). ``circular``: the image
    wraps around horizontally (360° panoramas): windows start at every multiple of the stride and run across the
    right edge into the left one.
    """

    size: int = 64
    stride: int = 48
    batch: int = 4
    weights: str = "uniform"
    circular: bool = False

    def check(self) -> None:
        if not isinstance(self.size, int) or not isinstance(self.stride, int) or self.size < 1:
            raise ValueError(f"Tiles: size and stride are whole numbers of latent pixels, got {self.size}, "
                             f"{self.stride}")
        if not 1 <= self.stride <= self.size:
            raise ValueError(f"Tiles: the stride must lie in [1, size={self.size}] so that windows overlap or touch, "
                             f"got {self.stride}")
        if self.batch < 1:
            raise ValueError(f"Tiles: batch must be at least 1, got {self.batch}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"Tiles: unknown weights {self.weights!r}; known: {', '.join(WEIGHTS)}")

    def starts(self, length: int, wrap: bool = False) -> tuple[list[int], int]:
        """(window starts, window length) along an axis of ``length`` latent pixels."""
        if length <= self.size:
            return [0], length
        if wrap:
            return list(range(0, length, self.stride)), self.size
        starts = list(range(0, length - self.size + 1, self.stride))
        if starts[-1] + self.size < length:
            starts.append(length - self.size)
        return starts, self.size

    def windows(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """The windows (top, left, height, width) of a ``height``×``width`` latent, row by row."""
        tops, h = self.starts(height)
        lefts, w = self.starts(width, wrap=self.circular)
        return [(top, left, h, w) for top in tops for left in lefts]

    def weight(self, height: int, width: int) -> torch.Tensor:
        """The per-pixel weight of one window [height, width] (float64)."""
        if self.weights == "uniform":
            return torch.ones(height, width, dtype=torch.float64)
        # Mixture of Diffusers: N(midpoint, 0.01) over the position relative to the window length; its code centres
        # the width at (w − 1)/2 and the height at h/2, kept here so that the weights are the ones it uses.
        return torch.outer(_gaussian(height, height / 2), _gaussian(width, (width - 1) / 2))

    def infotext(self) -> dict:
        return {"Tile size": self.size, "Tile stride": self.stride,
                "Tile weights": self.weights if self.weights != "uniform" else None,
                "Tile circular": True if self.circular else None}

    @staticmethod
    def from_infotext(params: dict) -> "Tiles | None":
        if "Tile size" not in params:
            return None
        return Tiles(size=int(params["Tile size"]), stride=int(params.get("Tile stride", params["Tile size"])),
                     weights=params.get("Tile weights", "uniform"), circular=params.get("Tile circular") == "True")


def _gaussian(n: int, midpoint: float, var: float = 0.01) -> torch.Tensor:
    x = torch.arange(n, dtype=torch.float64)
    return torch.exp(-((x - midpoint) / n) ** 2 / (2 * var)) / math.sqrt(2 * math.pi * var)


@dataclass(frozen=True)
class WindowBatch:
    """The windows whose crops a UNet batch holds, in order, each repeated over an equal share of the rows, in a
    latent of ``height``×``width`` (columns wrap around when ``circular``)."""

    windows: tuple[tuple[int, int, int, int], ...]
    height: int
    width: int
    circular: bool = False

    def _columns(self, left: int, w: int, scale: int, device) -> torch.Tensor | slice:
        start, stop = left * scale, (left + w) * scale
        if stop <= self.width * scale:
            return slice(start, stop)
        return torch.arange(start, stop, device=device) % (self.width * scale)

    def cut(self, t: torch.Tensor, window: tuple[int, int, int, int]) -> torch.Tensor:
        """One window of ``t``, whose spatial size is the latent's times a whole factor (a hint: ×8)."""
        scale = t.shape[-1] // self.width
        if t.shape[-1] != self.width * scale or t.shape[-2] != self.height * scale:
            raise ValueError(f"a {t.shape[-2]}x{t.shape[-1]} tensor cannot be cut into windows of a "
                             f"{self.height}x{self.width} latent")
        top, left, h, w = window
        rows = t[..., top * scale:(top + h) * scale, :]
        columns = self._columns(left, w, scale, t.device)
        return rows[..., columns] if isinstance(columns, slice) else rows.index_select(-1, columns)

    def crop(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """``t`` [b, C, H·s, W·s] (the whole image, b dividing the rows of a window) → the crops of every window,
        each repeated to its share of a ``rows``-row batch, stacked in the batch's order."""
        share = rows // len(self.windows)
        if share * len(self.windows) != rows or share % t.shape[0]:
            raise ValueError(f"a batch of {rows} rows over {len(self.windows)} windows does not repeat {t.shape[0]}")
        return torch.cat([self.cut(t, w).repeat(share // t.shape[0], *[1] * (t.ndim - 1)) for w in self.windows])

    def add(self, total: torch.Tensor, window: tuple[int, int, int, int], value: torch.Tensor) -> None:
        """``total[..., window] += value`` (wrapping around the right edge)."""
        top, left, h, w = window
        columns = self._columns(left, w, 1, total.device)
        band = total[..., top:top + h, :]
        if isinstance(columns, slice):
            band[..., columns] += value
        else:
            band.index_add_(band.ndim - 1, columns, value)


class TiledDenoiser:
    """``denoiser(x, sigma, context=, y=, cond_rows=)`` fused over the windows of :class:`Tiles` (see the module).

    Takes the place of the :class:`~sdlite.schedulers.Denoiser` a :class:`~sdlite.guidance.GuidedDenoiser` calls;
    ``denoiser`` is called on ``tiles.batch`` windows at a time with ``windows=`` (a :class:`WindowBatch`) among its
    keyword arguments, which the Denoiser passes on to the UNet call.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], tiles: Tiles):
        tiles.check()
        self.denoiser, self.tiles = denoiser, tiles

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, *, context: torch.Tensor, y: torch.Tensor | None = None,
                 cond_rows: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        height, width = x.shape[-2:]
        windows = self.tiles.windows(height, width)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        _, _, h, w = windows[0]
        weight = self.tiles.weight(h, w).to(x.device, torch.float32)
        value = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        count = torch.zeros((height, width), dtype=torch.float32, device=x.device)
        for first in range(0, len(windows), self.tiles.batch):
            group = WindowBatch(tuple(windows[first:first + self.tiles.batch]), height, width, self.tiles.circular)
            n = len(group.windows)
            out = self.denoiser(torch.cat([group.cut(x, win) for win in group.windows]), sigma.repeat(n),
                                context=context.repeat(n, 1, 1), y=None if y is None else y.repeat(n, 1),
                                cond_rows=None if cond_rows is None else cond_rows.repeat(n), windows=group, **kwargs)
            for win, chunk in zip(group.windows, out.chunk(n)):
                group.add(value, win, chunk.float() * weight)
                group.add(count, win, weight)
        return (value / count).to(x.dtype)
