"""The KL autoencoder (VAE) of latent diffusion, in the original `first_stage_model` layout."""

from __future__ import annotations

from sdlite.vae.config import VAEConfig, infer_vae_config
from sdlite.vae.model import AutoencoderKL, DiagonalGaussian, VAEUpcastWarning
from sdlite.vae.refine import refine_latents
from sdlite.vae.tiling import decode_tiled, encode_tiled

__all__ = ["AutoencoderKL", "DiagonalGaussian", "VAEConfig", "VAEUpcastWarning", "decode_tiled", "encode_tiled",
           "infer_vae_config", "refine_latents"]
