"""Noise the way AUTOMATIC1111 draws it, so that a seed gives the same image here as there.

Image i of a batch has its own generator seeded with its seed; its initial noise is that generator's first draw and
every later draw (the noise of ancestral samplers) continues it. Variation seeds ("subseeds") are slerped in, "resize
seed from" pastes the noise of another size into the middle, and ENSD (eta noise seed delta) reseeds the generators
with seed + delta after the first draw. Three sources, as in A1111's "Random number generator source" option:

* ``"CPU"`` (default): ``torch.Generator("cpu")`` — the same numbers on every machine;
* ``"GPU"``: the device's own generator — faster, but device-specific;
* ``"NV"``: NVIDIA's Philox4x32-10 generator with cuRAND's Box-Muller step, computed on the CPU with numpy, so that
  images made with CUDA's ``torch.randn`` are reproduced on any device (Salmon et al. 2011, "Parallel random
  numbers: as easy as 1, 2, 3"). Measured on an H200 (benchmarks/cuda_checks.py): the same numbers in the same
  order for every shape and seed tried, equal to float32 rounding (at most 2.3e-5 apart) but not bit for bit, as
  CUDA's Box-Muller runs in float32 with its own ``logf``/``sincosf`` and this one in float64.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

SOURCES = ("CPU", "GPU", "NV")

_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_W = (np.uint32(0x9E3779B9), np.uint32(0xBB67AE85))
# cuRAND's constants rounded to float32, then used in float64 arithmetic as A1111's port does.
_INV_2_32 = float(np.float32(2.3283064e-10))
_INV_2_32_2PI = float(np.float32(2.3283064e-10 * 6.2831855))


class PhiloxGenerator:
    """``torch.randn(shape, device="cuda")`` after ``torch.manual_seed(seed)``, reproduced on the CPU.

    Each call to ``randn`` uses a new Philox counter offset (as each CUDA kernel launch does); element k of a call has
    counter (offset, 0, k, 0) and key = the 64-bit seed, and keeps the first of the Box-Muller pair.
    """

    def __init__(self, seed: int):
        self.seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        self.offset = 0

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        n = math.prod(shape)
        c0 = np.full(n, self.offset, dtype=np.uint32)
        c1 = np.zeros(n, dtype=np.uint32)
        c2 = np.arange(n, dtype=np.uint32)
        c3 = np.zeros(n, dtype=np.uint32)
        k0 = np.full(n, self.seed & 0xFFFFFFFF, dtype=np.uint32)
        k1 = np.full(n, self.seed >> 32, dtype=np.uint32)
        self.offset += 1
        for round_ in range(10):
            p0 = c0.astype(np.uint64) * _PHILOX_M[0]
            p1 = c2.astype(np.uint64) * _PHILOX_M[1]
            hi0, lo0 = (p0 >> np.uint64(32)).astype(np.uint32), p0.astype(np.uint32)
            hi1, lo1 = (p1 >> np.uint64(32)).astype(np.uint32), p1.astype(np.uint32)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
            if round_ < 9:
                k0, k1 = k0 + _PHILOX_W[0], k1 + _PHILOX_W[1]
        u = c0.astype(np.float64) * _INV_2_32 + _INV_2_32 / 2
        v = c1.astype(np.float64) * _INV_2_32_2PI + _INV_2_32_2PI / 2
        normal = np.sqrt(-2.0 * np.log(u)) * np.sin(v)
        return torch.from_numpy(normal.astype(np.float32).reshape(tuple(shape)))


class _TorchGenerator:
    def __init__(self, seed: int, device: torch.device):
        self.device = device
        self.generator = torch.Generator(device).manual_seed(int(seed))

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, device=self.device)


def make_generator(seed: int, source: str = "CPU", device: torch.device | str = "cpu"):
    """A generator with ``randn(shape)`` for one of A1111's noise sources."""
    if source == "NV":
        return PhiloxGenerator(seed)
    if source == "CPU":
        return _TorchGenerator(seed, torch.device("cpu"))
    if source == "GPU":
        return _TorchGenerator(seed, torch.device(device))
    raise ValueError(f"unknown noise source {source!r}; known: {', '.join(SOURCES)}")


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's spherical interpolation of two noise tensors [C, H, W] (normalised along dim 1, as it does)."""
    low_norm = low / low.norm(dim=1, keepdim=True)
    high_norm = high / high.norm(dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * t + high * (1 - t)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so).unsqueeze(1) * low + (torch.sin(t * omega) / so).unsqueeze(1) * high


class ImageNoise:
    """Per-image noise for one batch: ``first()`` is the initial noise, ``next()`` every later draw; both [B, C, H, W].

    ``shape`` is one image's latent shape (C, H, W); ``seed_resize_from`` is (width, height) in pixels, 0 for off.
    """

    def __init__(self, shape: Sequence[int], seeds: Sequence[int], *, subseeds: Sequence[int] | None = None,
                 subseed_strength: float = 0.0, seed_resize_from: tuple[int, int] = (0, 0), source: str = "CPU",
                 device: torch.device | str = "cpu", eta_noise_seed_delta: int = 0):
        self.shape, self.seeds = tuple(shape), [int(s) for s in seeds]
        self.subseeds, self.subseed_strength = subseeds, subseed_strength
        self.seed_resize_from, self.source, self.device = seed_resize_from, source, torch.device(device)
        self.eta_noise_seed_delta = eta_noise_seed_delta
        self.generators = [make_generator(s, source, device) for s in self.seeds]
        self._started = False

    def _fresh(self, seed: int, shape) -> torch.Tensor:
        return make_generator(seed, self.source, self.device).randn(shape)

    def first(self) -> torch.Tensor:
        self._started = True
        rw, rh = self.seed_resize_from
        resized = rw > 0 and rh > 0
        noise_shape = (self.shape[0], rh // 8, rw // 8) if resized else self.shape
        images = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self.generators)):
            noise = self._fresh(seed, noise_shape) if resized else generator.randn(self.shape)
            if self.subseeds is not None and self.subseed_strength != 0:
                subseed = self.subseeds[i] if i < len(self.subseeds) else 0
                noise = slerp(self.subseed_strength, noise, self._fresh(subseed, noise_shape).to(noise.device))
            if resized:
                noise = self._paste_centered(generator.randn(self.shape), noise)
            images.append(noise)
        if self.eta_noise_seed_delta:
            self.generators = [make_generator(s + self.eta_noise_seed_delta, self.source, self.device)
                               for s in self.seeds]
        return torch.stack(images).to(self.device)

    @staticmethod
    def _paste_centered(target: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        dx = (target.shape[2] - noise.shape[2]) // 2
        dy = (target.shape[1] - noise.shape[1]) // 2
        w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
        h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
        tx, ty, sx, sy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
        target[:, ty:ty + h, tx:tx + w] = noise[:, sy:sy + h, sx:sx + w]
        return target

    def next(self) -> torch.Tensor:
        if not self._started:
            return self.first()
        return torch.stack([g.randn(self.shape) for g in self.generators]).to(self.device)

    def noise_sampler(self, sigma=None, sigma_next=None) -> torch.Tensor:
        """k-diffusion's ``noise_sampler(sigma, sigma_next)`` signature, drawing the next per-image noise."""
        return self.next()
