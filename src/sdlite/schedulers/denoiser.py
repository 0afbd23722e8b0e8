"""SD's discrete noise schedule, and the wrappers that turn a UNet into a denoiser ``D(x; σ)``.

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models") write every sampler over
the denoiser D(x; σ) ≈ E[x₀ | x = x₀ + σ·ε]. SD's UNet was trained on the discrete DDPM schedule (Ho et al. 2020)
in variance-preserving form x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε, which is the same noisy point divided by √(1+σ²), with
σ_t = √((1−ᾱ_t)/ᾱ_t). The wrappers follow k-diffusion's CompVisDenoiser / CompVisVDenoiser: scale the input by
c_in = 1/√(σ²+1) back to VP form, hand the UNet the (fractional) timestep whose σ matches, and turn its ε or v
prediction (Salimans & Ho 2022) into D(x; σ).
"""

from __future__ import annotations

from typing import Callable

import torch

TRAIN_STEPS = 1000


def scaled_linear_alphas_cumprod(steps: int = TRAIN_STEPS, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ of SD's "scaled linear" β schedule (β linear in √β), float64 as ldm/sgm's make_beta_schedule computes it."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


class DiscreteSchedule:
    """The σ of each training timestep, and the maps between σ and (fractional) timesteps.

    ``alphas_cumprod`` defaults to SD's schedule (shared by SD 1.x, 2.x and XL). It is rounded to ``dtype`` before
    σ is computed from it: AUTOMATIC1111 keeps ᾱ as a float32 buffer and k-diffusion derives σ from that, so the
    default float32 table is bit-for-bit theirs. ``quantize`` snaps σ to the nearest training timestep instead of
    interpolating (A1111's "Enable quantization in K samplers" option).
    """

    def __init__(self, alphas_cumprod: torch.Tensor | None = None, *, dtype: torch.dtype = torch.float32,
                 quantize: bool = False):
        ac = scaled_linear_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod)
        self.alphas_cumprod = ac.detach().to("cpu", dtype)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()
        self.quantize = quantize
        self._log_tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def _log_sigmas(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """log σ on ``device``, in ``dtype`` or the table's own if wider (taken from σ, so that a float64 query of a
        float32 table entry lands exactly on its timestep); computed once per device and dtype."""
        dtype = torch.promote_types(dtype, self.sigmas.dtype)
        if (device, dtype) not in self._log_tables:
            self._log_tables[(device, dtype)] = self.sigmas.to(device, dtype).log()
        return self._log_tables[(device, dtype)]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Timesteps (fractional unless quantized) whose σ is ``sigma``, interpolating linearly in log σ."""
        log_table = self._log_sigmas(sigma.device, sigma.dtype)
        log_sigma = sigma.to(log_table.dtype).log()
        if self.quantize:
            return (log_sigma.reshape(-1, 1) - log_table).abs().argmin(dim=1).view(sigma.shape)
        # Bracket log σ between two neighbouring table entries; outside the table extrapolation is clamped away.
        low = (torch.searchsorted(log_table, log_sigma.reshape(-1).contiguous(), right=True) - 1)
        low = low.clamp(0, len(log_table) - 2)
        w = ((log_table[low] - log_sigma.reshape(-1)) / (log_table[low] - log_table[low + 1])).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ at (fractional) timesteps ``t``, interpolating linearly in log σ."""
        log_table = self._log_sigmas(t.device, self.sigmas.dtype)
        t = t if t.is_floating_point() else t.to(log_table.dtype)
        low, high = t.floor().long(), t.ceil().long()
        w = (t - low).to(log_table.dtype)
        # Written as k-diffusion's weighted sum (not lerp) so that the float32 σ are bit-identical to A1111's.
        return ((1 - w) * log_table[low] + w * log_table[high]).exp()

    def get_sigmas(self, n: int) -> torch.Tensor:
        """k-diffusion's default schedule: ``n`` timesteps evenly spaced from the last to 0, then σ = 0."""
        t = torch.linspace(len(self.sigmas) - 1, 0, n, dtype=self.sigmas.dtype)
        return append_zero(self.t_to_sigma(t))


class LCMSchedule(DiscreteSchedule):
    """AUTOMATIC1111's schedule for Latent Consistency Models (its LCMCompVisDenoiser).

    LCMs are distilled on a 50-step "skipping" grid of the training timesteps (19, 39, …, 999; Luo et al. 2023,
    "Latent Consistency Models"). The table holds only those σ; a σ maps to the nearest grid timestep (quantized,
    as the consistency function was only trained there) and timesteps map back by interpolating over the grid.
    """

    def __init__(self, base: DiscreteSchedule | None = None, original_steps: int = 50):
        base = DiscreteSchedule() if base is None else base
        total = len(base.alphas_cumprod)
        self.skip = total // original_steps
        grid = torch.arange(original_steps) * self.skip + (self.skip - 1)
        super().__init__(base.alphas_cumprod[grid], dtype=base.alphas_cumprod.dtype, quantize=True)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return super().sigma_to_t(sigma) * self.skip + (self.skip - 1)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        index = ((t - (self.skip - 1)) / self.skip).to(self.sigmas.dtype).clamp(0, len(self.sigmas) - 1)
        return super().t_to_sigma(index)

    def get_sigmas(self, n: int) -> torch.Tensor:
        """A1111: ``n`` timesteps evenly spaced over the grid's range (999 → 19), then σ = 0."""
        start = self.sigma_to_t(self.sigma_max).to(self.sigmas.dtype)
        end = self.sigma_to_t(self.sigma_min).to(self.sigmas.dtype)
        return append_zero(self.t_to_sigma(torch.linspace(start.item(), end.item(), n, dtype=self.sigmas.dtype)))


class Denoiser:
    """``denoiser(x, sigma, **unet_kwargs) -> D(x; σ)`` for a UNet predicting ε (``"eps"``) or v (``"v"``).

    ``unet(x, timesteps, **unet_kwargs)`` is called on the VP-scaled input with the timesteps ``sigma_to_t(sigma)``;
    ``unet_kwargs`` (``context=``, ``y=``, ``control=``) pass through untouched. ``sigma`` is a [B] tensor (or a
    scalar, broadcast over the batch). The schedule's σ table, range and maps are exposed for the schedules in
    :mod:`sdlite.schedulers.sigmas`.
    """

    def __init__(self, unet: Callable[..., torch.Tensor], prediction: str = "eps",
                 schedule: DiscreteSchedule | None = None):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.unet, self.prediction = unet, prediction
        self.schedule = DiscreteSchedule() if schedule is None else schedule

    @property
    def sigmas(self) -> torch.Tensor:
        return self.schedule.sigmas

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.schedule.sigma_max

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.schedule.sigma_to_t(sigma)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.t_to_sigma(t)

    def get_sigmas(self, n: int) -> torch.Tensor:
        return self.schedule.get_sigmas(n)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **unet_kwargs) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        s = sigma.reshape(-1, *[1] * (x.ndim - 1))
        c_in = (1 / (s**2 + 1) ** 0.5).to(x.dtype)
        out = self.unet(x * c_in, self.sigma_to_t(sigma), **unet_kwargs)
        return self._denoised(x, s, out)

    def _denoised(self, x: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.prediction == "eps":
            return x + out * (-s).to(x.dtype)
        # v = α·ε − σ_vp·x₀ (Salimans & Ho 2022), written over the k-diffusion σ.
        c_skip = (1 / (s**2 + 1)).to(x.dtype)
        c_out = (-s / (s**2 + 1) ** 0.5).to(x.dtype)
        return out * c_out + x * c_skip


class LCMDenoiser(Denoiser):
    """A1111's LCM denoiser: the :class:`LCMSchedule` (quantized timesteps) and the consistency-model boundary
    condition D = c_skip·x + c_out·x̂₀ with c_skip = σ_d²/((10t)²+σ_d²), c_out = 10t/√((10t)²+σ_d²), σ_d = 0.5
    (Song et al. 2023, "Consistency Models"; the ×10 timestep scaling is LCM's).

    Like A1111, c_skip multiplies the k-diffusion input x (diffusers' LCMScheduler uses the VP sample x/√(1+σ²));
    c_skip is below 1e-5 on the whole grid, so the two agree to about 1e-7.
    """

    sigma_data = 0.5
    timestep_scaling = 10.0

    def __init__(self, unet: Callable[..., torch.Tensor], prediction: str = "eps",
                 schedule: LCMSchedule | None = None):
        super().__init__(unet, prediction, LCMSchedule() if schedule is None else schedule)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **unet_kwargs) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        denoised = super().__call__(x, sigma, **unet_kwargs)
        t = (self.sigma_to_t(sigma) * self.timestep_scaling).reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        c_skip = self.sigma_data**2 / (t**2 + self.sigma_data**2)
        c_out = t / (t**2 + self.sigma_data**2) ** 0.5
        return c_out * denoised + c_skip * x
