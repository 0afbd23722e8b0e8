"""Decoder inversion: latents that the decoder turns back into a given image more faithfully than the encoder's.

An encoder can only return latents for what it learnt to see; a small one trained on a narrow world (the built-in
model's, which saw circles, squares and triangles) maps a star to the latents of a pentagon, although its decoder can
draw the star from other latents. Training methods learn to produce the latents they are given, so the new
concept has to be in them: ``refine_latents`` starts from the encoder's latents and moves them by gradient descent
until ``decode(z)`` reproduces the image (L1 + squared error per pixel), the VAE's weights untouched. This is the
"decoder inversion" of image-editing work on latent diffusion (e.g. Hong et al. 2023, "On exact inversion of
DPM-solvers"), used here once per training image when its latents are cached.
"""

from __future__ import annotations

import torch
from torch import Tensor


def refine_latents(vae, images: Tensor, latents: Tensor, steps: int, lr: float = 0.05) -> Tensor:
    """Raw latents [B, C, h, w] (not multiplied by the scale factor) after ``steps`` Adam steps of ``lr`` (in raw latent
    units, whose spread is about 1 / scale_factor) on ``‖decode(z) − images‖₁ + ‖decode(z) − images‖²`` (means over
    pixels), starting from ``latents``; ``images`` in [-1, 1]. Float32 latents, whatever the VAE's dtype; only
    ``z`` receives gradients (the VAE's ``.grad`` fields stay untouched). ``steps=0`` returns the latents as given.
    """
    if steps < 0:
        raise ValueError(f"refine_latents: steps must be ≥ 0, got {steps}")
    if images.shape[-2:] != (latents.shape[-2] * vae.config.downsample_factor,
                             latents.shape[-1] * vae.config.downsample_factor):
        raise ValueError(f"refine_latents: images of {tuple(images.shape[-2:])} pixels do not match latents of "
                         f"{tuple(latents.shape[-2:])} at the VAE's factor {vae.config.downsample_factor}")
    z = latents.detach().float().clone().requires_grad_(True)
    target = images.detach().float()
    optimizer = torch.optim.Adam([z], lr=lr)
    dtype = next(vae.parameters()).dtype
    with torch.enable_grad():
        for _ in range(steps):
            error = vae.decode(z.to(dtype)).float() - target
            loss = error.abs().mean() + error.pow(2).mean()
            z.grad, = torch.autograd.grad(loss, z)
            optimizer.step()
    return z.detach()
