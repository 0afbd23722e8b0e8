"""Stochastic samplers: ancestral steps and SDE solvers, plus the Brownian-tree noise the SDE solvers use.

Same calling convention as :mod:`.samplers_ode`. Ancestral samplers take an ODE step down to σ_down and add fresh
noise back up to σ_next; their draws come from ``noise_sampler(sigma, sigma_next)`` (default ``torch.randn_like``),
which a pipeline points at its per-image generators. The DPM++ SDE solvers treat the noise as increments of one
Brownian motion over σ; A1111 feeds them a :class:`BrownianTreeNoiseSampler` seeded with the image seeds so that
an image does not depend on its batch (without a noise sampler they build an unseeded one).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from .samplers_ode import default_noise, denoise, dpm_2_step, report, to_d


def ancestral_step(sigma, sigma_next, eta: float = 1.0):
    """Split the step σ → σ_next into a deterministic part down to σ_down and noise of std σ_up back up, with
    σ_down² + σ_up² = σ_next² and σ_up = η·√(σ_next²(σ²−σ_next²)/σ²), the DDPM posterior's std for η = 1
    (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 16, in σ form); σ_up is capped at σ_next."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                           eta=1.0, s_noise=1.0):
    """Ancestral sampling with Euler steps (k-diffusion's "Euler a")."""
    noise_sampler = default_noise(x, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = denoise(model, x, sigmas[i], extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                           eta=1.0, s_noise=1.0):
    """Ancestral sampling with k-diffusion's DPM2 midpoint steps ("DPM2 a")."""
    noise_sampler = default_noise(x, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = denoise(model, x, sigmas[i], extra_args)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = dpm_2_step(model, x, sigmas[i], torch.as_tensor(sigma_down, dtype=sigmas.dtype, device=sigmas.device),
                       denoised, extra_args)
        if sigma_down != 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                              eta=1.0, s_noise=1.0):
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022, "DPM-Solver++", Algorithm 1, r = 1/2)."""
    noise_sampler = default_noise(x, noise_sampler)
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = denoise(model, x, sigma, extra_args)
        sigma_down, sigma_up = ancestral_step(sigma, sigmas[i + 1], eta)
        report(callback, x, i, sigma, sigma, denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            # Midpoint in λ = −log σ, then the full step with the midpoint's data prediction.
            sigma_mid = (sigma * sigma_down) ** 0.5
            x_2 = (sigma_mid / sigma) * x - torch.expm1(sigma_mid.log() - sigma.log()) * denoised
            denoised_2 = denoise(model, x_2, sigma_mid, extra_args)
            x = (sigma_down / sigma) * x - torch.expm1((sigma_down / sigma).log()) * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                     eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ (stochastic), k-diffusion's "DPM++ SDE": a two-stage step whose stages are ancestral steps
    (intermediate point at fraction ``r`` of the step in λ = −log σ), noise from a Brownian tree."""
    noise_sampler = _brownian_default(x, sigmas, noise_sampler)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        # Work in λ = −log σ like k-diffusion, including the σ = exp(−λ) round trips: the Brownian tree is
        # queried at exactly these values, and its noise changes with the last bit of a query time.
        lam, lam_next = -sigma.log(), -sigma_next.log()
        lam_s = lam + r * (lam_next - lam)
        sigma, sigma_s, sigma_next = (-lam).exp(), (-lam_s).exp(), (-lam_next).exp()
        fac = 1 / (2 * r)
        # Stage 1: ancestral step to σ_s.
        sd, su = ancestral_step(sigma, sigma_s, eta)
        x_2 = (sd / sigma) * x - torch.expm1(sd.log() + lam) * denoised
        x_2 = x_2 + noise_sampler(sigma, sigma_s) * s_noise * su
        denoised_2 = denoise(model, x_2, sigma_s, extra_args)
        # Stage 2: ancestral step to σ_next with the blended data prediction.
        sd, su = ancestral_step(sigma, sigma_next, eta)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (sd / sigma) * x - torch.expm1(sd.log() + lam) * denoised_d
        x = x + noise_sampler(sigma, sigma_next) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                        eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++", the SDE variant of §4.2), k-diffusion's form: the
    first-order SDE step keeps exp(−η·h) of x's noise and adds fresh noise for the rest; the second-order
    correction is ``"midpoint"`` or ``"heun"`` (A1111's "DPM++ 2M SDE Heun")."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    noise_sampler = _brownian_default(x, sigmas, noise_sampler)
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            eta_h = eta * h
            decay = -torch.expm1(-h - eta_h)  # 1 − e^{−(1+η)h}
            x = sigma_next / sigma * (-eta_h).exp() * x + decay * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (decay / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * decay * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise_sampler(sigma, sigma_next) * sigma_next * (-torch.expm1(-2 * eta_h)).sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                        eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE: the 2M SDE step with a third-order multistep correction from two past predictions
    (Lu et al. 2022, "DPM-Solver++", §4 and appendix; k-diffusion's form)."""
    noise_sampler = _brownian_default(x, sigmas, noise_sampler)
    denoised_1 = denoised_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x - torch.expm1(-h_eta) * denoised
            phi_2 = torch.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                x = x + noise_sampler(sigma, sigma_next) * sigma_next * (-torch.expm1(-2 * h * eta)).sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Algorithm 1): jump to the consistency
    function's x₀ estimate, then re-noise to the next σ. Pair it with :class:`~.denoiser.LCMDenoiser`."""
    noise_sampler = default_noise(x, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = denoise(model, x, sigmas[i], extra_args)
        report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


def _brownian_default(x, sigmas, noise_sampler):
    if noise_sampler is not None:
        return noise_sampler
    return BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max())


class BrownianTreeNoiseSampler:
    """Noise as normalised increments of a Brownian motion W over σ: ``(W(σ_next) − W(σ)) / √|σ_next − σ|``.

    Built on ``torchsde.BrownianTree`` (Li et al. 2020, "Scalable Gradients for Stochastic Differential
    Equations"), so that the same seed gives the same noise at any step size. ``seed`` may be a list with one seed
    per batch item (one tree each, as A1111 passes its image seeds), an int (one tree for the whole batch) or None
    (a random seed). The construction mirrors k-diffusion's, so equal seeds give k-diffusion's noise.
    """

    def __init__(self, x: torch.Tensor, sigma_min, sigma_max, seed: int | Sequence[int] | None = None):
        try:
            import torchsde
        except ImportError:
            raise ImportError("the DPM++ SDE samplers need the optional dependency torchsde for their Brownian-tree "
                              "noise: pip install torchsde (or pass your own noise_sampler)") from None
        t0, t1 = sorted((torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)), key=float)
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, []))
        try:
            seeds, self.batched = list(seed), True
        except TypeError:
            seeds, self.batched = [seed], False
        if self.batched and len(seeds) != x.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {x.shape[0]}")
        w0 = torch.zeros_like(x[0] if self.batched else x)
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in seeds]

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        a, b = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi = sorted((a, b), key=float)
        with warnings.catch_warnings():
            # σ recomputed as exp(log σ) may lie an ulp outside the tree's interval; torchsde warns, then clamps.
            warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
            w = torch.stack([tree(lo, hi) for tree in self.trees])  # W(hi) − W(lo)
        w = w if self.batched else w[0]
        # Stepping down in σ the increment runs the other way.
        return (w if b >= a else -w) / (b - a).abs().sqrt()
