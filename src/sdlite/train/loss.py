"""The denoising loss of latent diffusion training (Ho et al. 2020, DDPM; Rombach et al. 2022, LDM).

A clean latent x₀ is noised to timestep t by the forward process of the checkpoint's discrete schedule,
x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε, and the UNet is asked for the ε it was given (ε-prediction) or for the velocity
v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀ (v-prediction, Salimans & Ho 2022). The per-sample loss is the mean squared error over
each sample's elements, in float32, optionally weighted by min-SNR-γ (Hang et al. 2023, "Efficient Diffusion Training
via Min-SNR Weighting Strategy"): with SNR = ᾱ/(1−ᾱ), ε-models are weighted min(SNR, γ)/SNR and v-models
min(SNR, γ)/(SNR + 1). Noise offset (Guttenberg 2023) adds a per-channel constant to ε so that the model learns to
change an image's mean brightness; zero-terminal-SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
Steps are Flawed") rescales √ᾱ so that the last timestep is pure noise. docs/formats.md §12 lists the
conventions.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint.files import open_tensor_file
from ..schedulers.denoiser import scaled_linear_alphas_cumprod

__all__ = ["add_noise", "denoising_loss", "min_snr_weight", "rescale_zero_terminal_snr", "snr", "training_alphas",
           "velocity"]

PREDICTIONS = ("eps", "v")
# Keys under which ldm/sgm checkpoints store the schedule they were trained with (the DDPM module's buffers).
_SCHEDULE_KEYS = ("alphas_cumprod", "model.alphas_cumprod")


def training_alphas(pipe) -> torch.Tensor:
    """ᾱ of the checkpoint's training schedule, float64 [1000]: the file's ``alphas_cumprod`` buffer when it has one,
    else SD's scaled-linear schedule (β from 0.00085 to 0.012 linear in √β over 1000 steps)."""
    stored = [k for k in _SCHEDULE_KEYS if k in getattr(pipe, "set_aside", ())]
    if stored and getattr(pipe, "path", None):
        with open_tensor_file(pipe.path) as tf:
            return tf.read(stored[0], torch.float64)
    return scaled_linear_alphas_cumprod()


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale √ᾱ so that its last value is 0 and its first is unchanged."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return (root**2).to(alphas_cumprod.dtype)


def _at(table: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] for each sample, shaped [B, 1, 1, …] to broadcast over ``like``, in float32 at least."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    values = table.to(like.device, torch.float64)[timesteps.to(like.device).long()]
    return values.to(dtype).view(-1, *[1] * (like.ndim - 1))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The DDPM forward process: x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε (computed in float32 or wider)."""
    a = _at(alphas_cumprod, timesteps, latents)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def velocity(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
             alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The v-prediction target of Salimans & Ho 2022: v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀."""
    a = _at(alphas_cumprod, timesteps, latents)
    return a.sqrt() * noise - (1 - a).sqrt() * latents


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ/(1−ᾱ) at each timestep, float64 [B]."""
    a = alphas_cumprod.double()[timesteps.cpu().long()].to(timesteps.device)
    return a / (1 - a)


def min_snr_weight(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                   prediction: str = "eps") -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v; float64 [B].

    With a zero-terminal-SNR schedule the last timestep has SNR 0, where the ε weight's limit (1) is used."""
    s = snr(timesteps, alphas_cumprod)
    clipped = s.clamp(max=gamma)
    if prediction == "v":
        return clipped / (s + 1)
    return torch.where(s > 0, clipped / s.clamp(min=torch.finfo(s.dtype).tiny), torch.ones_like(s))


def _unet_and_prediction(model, prediction: str | None) -> tuple[nn.Module, str]:
    unet = getattr(model, "unet", model)
    prediction = prediction or getattr(model, "prediction", None) or "eps"
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, not {prediction!r}")
    return unet, prediction


def denoising_loss(pipe_or_unet, latents: torch.Tensor, context: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor, y: torch.Tensor | None = None, *, prediction: str | None = None,
                   min_snr_gamma: float | None = None, noise_offset: float = 0.0,
                   offset_noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   alphas_cumprod: torch.Tensor | None = None, zero_terminal_snr: bool = False,
                   control=None) -> torch.Tensor:
    """Per-sample denoising loss [B] (float32) of a UNet on scaled latents x₀ [B, C, H, W].

    ``pipe_or_unet``: a pipeline (its ``unet`` and ``prediction``, and the file's schedule) or a UNet (then
    ``prediction`` defaults to "eps" and the schedule to SD's). ``noise`` ε and ``timesteps`` (integers 0…999, [B])
    are drawn by the caller. ``context`` [B, T, D] and ``y`` (SDXL's ADM vector) go to the UNet as at inference.
    ``noise_offset`` adds ``noise_offset · offset_noise`` to ε, with ``offset_noise`` [B, C, 1, 1] drawn from
    ``generator`` when not given. ``alphas_cumprod`` overrides the schedule (a trainer reads the file's once, with
    :func:`training_alphas`); ``zero_terminal_snr`` rescales it (Lin et al. 2023). ``control``: ControlNet residuals.
    """
    unet, prediction = _unet_and_prediction(pipe_or_unet, prediction)
    if alphas_cumprod is None:
        alphas_cumprod = training_alphas(pipe_or_unet) if unet is not pipe_or_unet else scaled_linear_alphas_cumprod()
    if zero_terminal_snr:
        alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
    if latents.shape != noise.shape or timesteps.shape != latents.shape[:1]:
        raise ValueError(f"latents {list(latents.shape)}, noise {list(noise.shape)} and timesteps "
                         f"{list(timesteps.shape)} do not fit: expected noise like latents and one timestep each")
    if noise_offset:
        if offset_noise is None:
            offset_noise = torch.randn(*latents.shape[:2], 1, 1, generator=generator,
                                       device=generator.device if generator is not None else latents.device)
        noise = noise + noise_offset * offset_noise.to(noise)
    noisy = add_noise(latents, noise, timesteps, alphas_cumprod)
    target = noise.float() if prediction == "eps" else velocity(latents, noise, timesteps, alphas_cumprod)
    kwargs = {} if control is None else {"control": control}
    out = unet(noisy.to(latents.dtype), timesteps, context, y=y, **kwargs)
    loss = (out.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if min_snr_gamma is not None:
        loss = loss * min_snr_weight(timesteps, alphas_cumprod, min_snr_gamma, prediction).to(loss)
    return loss
