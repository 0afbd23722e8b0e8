"""Training on the original modules: the denoising loss, data folders, the training loop and its methods.

    import sdlite.train
    loss = sdlite.train.denoising_loss(pipe, latents, context, noise, timesteps)   # per-sample [B]
"""

from __future__ import annotations

from .loss import denoising_loss

__all__ = ["denoising_loss"]
