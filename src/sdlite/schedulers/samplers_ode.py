"""Deterministic samplers: solvers of the probability-flow ODE dx/dσ = (x − D(x; σ))/σ (Karras et al. 2022, eq. 3).

All samplers in this package share k-diffusion's calling convention::

    x = sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, **options)

``model(x, sigma_batch, **extra_args)`` is a denoiser (D(x; σ), e.g. a :class:`~.denoiser.Denoiser` with
classifier-free guidance around it), ``x`` starts at noise level ``sigmas[0]`` and the result is at ``sigmas[-1]``.
``callback`` receives ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` once per step; ``disable`` (k-diffusion's
progress-bar switch) is accepted and ignored, there is no progress bar. ``noise_sampler(sigma, sigma_next)`` supplies
every random draw (default ``torch.randn_like(x)``).
"""

from __future__ import annotations

import numpy as np
import torch

from .sigmas import schedule_sigmas


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dσ of the probability-flow ODE, from the denoised estimate."""
    return (x - denoised) / sigma


def denoise(model, x: torch.Tensor, sigma: torch.Tensor, extra_args: dict | None) -> torch.Tensor:
    """One model call at a single σ, broadcast over the batch as k-diffusion does (``sigma * ones([B])``)."""
    return model(x, sigma * x.new_ones([x.shape[0]]), **(extra_args or {}))


def report(callback, x, i, sigma, sigma_hat, denoised) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def default_noise(x: torch.Tensor, noise_sampler):
    return noise_sampler if noise_sampler is not None else (lambda sigma, sigma_next: torch.randn_like(x))


def churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler):
    """Karras et al. 2022, Algorithm 2, lines 4–6: raise σ_i to σ̂ = σ_i·(1+γ) by adding fresh noise.

    With ``s_churn`` > 0 a draw is taken at every step, even where γ is 0 outside [s_tmin, s_tmax], so the draws
    line up with k-diffusion's (which draws every step) and hence with A1111's seeds.
    """
    sigma = sigmas[i]
    if s_churn <= 0:
        return x, sigma
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    eps = noise_sampler(sigma, sigma_hat) * s_noise
    if gamma > 0:
        x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Euler steps (Karras et al. 2022, Algorithm 2 with first-order steps)."""
    noise_sampler = default_noise(x, noise_sampler)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = denoise(model, x, sigma_hat, extra_args)
        report(callback, x, i, sigmas[i], sigma_hat, denoised)
        x = x + to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun's second-order method (Karras et al. 2022, Algorithm 2); an Euler step into σ = 0."""
    noise_sampler = default_noise(x, noise_sampler)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        x = heun_step(model, x, sigma_hat, sigmas[i + 1], extra_args,
                      lambda d: report(callback, x, i, sigmas[i], sigma_hat, d))
    return x


def heun_step(model, x, sigma, sigma_next, extra_args, on_denoised=None):
    """One Heun step from σ to σ_next (Euler when σ_next is 0, where the ODE's slope is undefined)."""
    denoised = denoise(model, x, sigma, extra_args)
    if on_denoised is not None:
        on_denoised(denoised)
    d = to_d(x, sigma, denoised)
    dt = sigma_next - sigma
    if sigma_next == 0:
        return x + d * dt
    x_2 = x + d * dt
    d_2 = to_d(x_2, sigma_next, denoise(model, x_2, sigma_next, extra_args))
    return x + (d + d_2) / 2 * dt


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """k-diffusion's "DPM2": a midpoint step at the geometric mean of σ and σ_next, in the spirit of DPM-Solver-2
    (Lu et al. 2022) and Karras et al.'s Algorithm 2; an Euler step into σ = 0."""
    noise_sampler = default_noise(x, noise_sampler)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = denoise(model, x, sigma_hat, extra_args)
        report(callback, x, i, sigmas[i], sigma_hat, denoised)
        x = dpm_2_step(model, x, sigma_hat, sigmas[i + 1], denoised, extra_args)
    return x


def dpm_2_step(model, x, sigma, sigma_next, denoised, extra_args):
    d = to_d(x, sigma, denoised)
    if sigma_next == 0:
        return x + d * (sigma_next - sigma)
    sigma_mid = (sigma.log() + sigma_next.log()).div(2).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, denoise(model, x_2, sigma_mid, extra_args))
    return x + d_2 * (sigma_next - sigma)


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """Adams–Bashforth weights for a non-uniform σ grid: ∫ from σ_i to σ_{i+1} of the Lagrange basis polynomial
    through σ_i, σ_{i−1}, … for each past slope. The integrands are polynomials of degree order−1, which
    Gauss–Legendre quadrature with ``order`` nodes integrates exactly."""
    a, b = float(sigmas[i]), float(sigmas[i + 1])
    nodes, weights = np.polynomial.legendre.leggauss(order)
    tau = (b - a) / 2 * nodes + (a + b) / 2
    past = [float(sigmas[i - k]) for k in range(order)]
    coefficients = []
    for j in range(order):
        basis = np.ones_like(tau)
        for k in range(order):
            if k != j:
                basis *= (tau - past[k]) / (past[j] - past[k])
        coefficients.append(float((b - a) / 2 * np.sum(weights * basis)))
    return coefficients


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, order=4):
    """Linear multistep (Adams–Bashforth) over σ using up to ``order`` past slopes, k-diffusion's "LMS"."""
    grid = sigmas.detach().cpu().numpy().astype(np.float64)
    slopes: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = denoise(model, x, sigmas[i], extra_args)
        slopes = [to_d(x, sigmas[i], denoised), *slopes][:order]
        report(callback, x, i, sigmas[i], sigmas[i], denoised)
        coefficients = lms_coefficients(grid, i, len(slopes))
        x = x + sum(c * d for c, d in zip(coefficients, slopes))
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), in k-diffusion's form: the data prediction
    is extrapolated linearly in λ = −log σ from the previous step; first order on the first and the final step."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        h = sigma.log() - sigma_next.log()  # λ_next − λ (inf when σ_next = 0: the step lands on the prediction)
        target = denoised
        if old_denoised is not None and sigma_next > 0:
            r = h_last / h
            target = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - torch.expm1(-h) * target
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_restart(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                   s_noise=1.0, restart_list=None):
    """Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes"), as A1111 wires it.

    Heun ODE steps, plus restart segments: on reaching the σ nearest to a key of ``restart_list``
    ({σ_min: [segment_steps, repeats, σ_max]}), noise is added to go back up to the σ nearest σ_max and the segment
    (Karras-spaced, ``segment_steps`` values) is solved again, ``repeats`` times. With ``restart_list`` None, A1111's
    default: none below 20 steps (plain Heun); else a segment from ~2 to ~0.1 with 9 steps run once (n ≥ 36: n//4
    steps, twice), the main grid being rebuilt as Karras with the restart steps taken off.
    """
    def karras(n, sigma_min, sigma_max):  # in float32, like the k-diffusion function A1111 calls
        return schedule_sigmas("Karras", n, float(sigma_min), float(sigma_max)).to(sigmas.device, sigmas.dtype)

    def nearest(value) -> int:
        return int(torch.argmin((sigmas - value).abs()))

    noise_sampler = default_noise(x, noise_sampler)
    steps = len(sigmas) - 1
    if restart_list is None:
        restart_list = {}
        if steps >= 20:
            segment, repeats = (9, 1) if steps < 36 else (steps // 4, 2)
            sigmas = karras(steps - segment * repeats, sigmas[-2], sigmas[0])
            restart_list = {0.1: [segment + 1, repeats, 2]}
    restarts = {nearest(key): value for key, value in restart_list.items()}

    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restarts:
            segment, repeats, restart_max = restarts[i + 1]
            top = nearest(restart_max)
            if top < i + 1:
                grid = karras(segment, sigmas[i + 1], sigmas[top])[:-1]
                pairs += list(zip(grid[:-1], grid[1:])) * repeats

    last = None
    for step, (sigma, sigma_next) in enumerate(pairs):
        if last is not None and last < sigma:  # the restart's forward jump: fresh noise from σ_last up to σ
            x = x + noise_sampler(last, sigma) * s_noise * (sigma**2 - last**2) ** 0.5
        x = heun_step(model, x, sigma, sigma_next, extra_args,
                      lambda d: report(callback, x, step, sigma, sigma, d))
        last = sigma_next
    return x
