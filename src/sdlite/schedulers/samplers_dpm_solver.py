"""DPM-Solver with a fixed budget of model calls ("DPM fast") and with adaptive step sizes ("DPM adaptive").

Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around 10 Steps":
the singlestep solvers of orders 1–3 (Algorithms 1–2), the fast order schedule for a given number of function
evaluations (§3.3) and the adaptive order-2/3 pairs with an error estimate (Algorithm 5), here with k-diffusion's
PID step-size controller and optional ancestral noise (η > 0; A1111 runs both with η = 1). Time is λ = −log σ and
the model enters through its noise prediction ε = (x − D(x; σ))/σ.

As in k-diffusion these take ``sigma_min``/``sigma_max`` (and a call budget ``n``) instead of a σ list, and stop
at sigma_min rather than 0. The sampler table adapts them to the common signature.
"""

from __future__ import annotations

import math

import torch

from .samplers_ode import default_noise, report
from .samplers_sde import ancestral_step


def _sigma(lam: torch.Tensor) -> torch.Tensor:
    return (-lam).exp()


def _lam(sigma) -> torch.Tensor:
    return -torch.as_tensor(sigma).log()


class _Solver:
    """The model as ε(x, λ) with a per-step cache, and the singlestep DPM-Solver updates from λ to λ_next."""

    def __init__(self, model, extra_args):
        self.model, self.extra_args = model, extra_args or {}

    def eps(self, cache: dict, key: str, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        if key not in cache:
            sigma = _sigma(lam)
            denoised = self.model(x, sigma * x.new_ones([x.shape[0]]), **self.extra_args)
            cache[key] = (x - denoised) / sigma
        return cache[key]

    def order_1(self, x, lam, lam_next, cache):
        h = lam_next - lam
        return x - _sigma(lam_next) * torch.expm1(h) * self.eps(cache, "eps", x, lam)

    def order_2(self, x, lam, lam_next, cache, r1=0.5):
        h = lam_next - lam
        eps = self.eps(cache, "eps", x, lam)
        s1 = lam + r1 * h
        u1 = x - _sigma(s1) * torch.expm1(r1 * h) * eps
        eps_1 = self.eps(cache, "eps_r1", u1, s1)
        first_order = x - _sigma(lam_next) * torch.expm1(h) * eps
        return first_order - _sigma(lam_next) / (2 * r1) * torch.expm1(h) * (eps_1 - eps)

    def order_3(self, x, lam, lam_next, cache, r1=1 / 3, r2=2 / 3):
        h = lam_next - lam
        eps = self.eps(cache, "eps", x, lam)
        s1, s2 = lam + r1 * h, lam + r2 * h
        u1 = x - _sigma(s1) * torch.expm1(r1 * h) * eps
        eps_1 = self.eps(cache, "eps_r1", u1, s1)
        phi_2 = torch.expm1(r2 * h) / (r2 * h) - 1
        u2 = x - _sigma(s2) * torch.expm1(r2 * h) * eps - _sigma(s2) * (r2 / r1) * phi_2 * (eps_1 - eps)
        eps_2 = self.eps(cache, "eps_r2", u2, s2)
        first_order = x - _sigma(lam_next) * torch.expm1(h) * eps
        return first_order - _sigma(lam_next) / r2 * (torch.expm1(h) / h - 1) * (eps_2 - eps)

    def step(self, order, x, lam, lam_next, cache):
        return {1: self.order_1, 2: self.order_2, 3: self.order_3}[order](x, lam, lam_next, cache)


def _ancestral_target(lam, lam_next, lam_end, eta):
    """Where the deterministic part of an ancestral step lands (never past the end), and the noise to add."""
    if not eta:
        return lam_next, 0.0
    sigma_down, _ = ancestral_step(_sigma(lam), _sigma(lam_next), eta)
    lam_down = torch.minimum(lam_end, _lam(sigma_down))
    return lam_down, (_sigma(lam_next) ** 2 - _sigma(lam_down) ** 2) ** 0.5


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None,
                    eta=0.0, s_noise=1.0, noise_sampler=None):
    """DPM-Solver-fast: ``n`` model calls spent on ⌊n/3⌋+1 steps evenly spaced in λ, third order except for a
    final second/first-order step (Lu et al. 2022, §3.3)."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    noise_sampler = default_noise(x, noise_sampler)
    solver = _Solver(model, extra_args)
    dtype = torch.as_tensor(sigma_max).dtype
    lam_start, lam_end = _lam(sigma_max).to(dtype), _lam(sigma_min).to(dtype)
    m = n // 3 + 1
    grid = torch.linspace(float(lam_start), float(lam_end), m + 1, dtype=dtype)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        cache: dict = {}
        lam, lam_next = grid[i], grid[i + 1]
        lam_down, sigma_up = _ancestral_target(lam, lam_next, lam_end, eta)
        denoised = x - _sigma(lam) * solver.eps(cache, "eps", x, lam)
        report(callback, x, i, _sigma(lam), _sigma(lam), denoised)
        x = solver.step(order, x, lam, lam_down, cache)
        if eta:
            x = x + sigma_up * s_noise * noise_sampler(_sigma(lam), _sigma(lam_next))
    return x


class PIDStepSizeController:
    """Step-size control from the error estimate, k-diffusion's PID form (Söderlind 2003, "Digital filters in
    adaptive time-stepping"): h ← h·limiter(ε₀^b₁·ε₁^b₂·ε₂^b₃) with εᵢ the inverse errors of recent accepted steps
    and limiter(v) = 1 + atan(v − 1); a step is accepted when that factor is at least ``accept_safety``."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety, self.eps = accept_safety, eps
        self.inverse_errors: list[float] = []

    def propose_step(self, error) -> bool:
        inverse = 1 / (float(error) + self.eps)
        if not self.inverse_errors:
            self.inverse_errors = [inverse] * 3
        self.inverse_errors[0] = inverse
        e0, e1, e2 = self.inverse_errors
        factor = 1 + math.atan(e0**self.b1 * e1**self.b2 * e2**self.b3 - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.inverse_errors = [e0, e0, e1]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
                        accept_safety=0.81, eta=0.0, s_noise=1.0, noise_sampler=None, return_info=False):
    """DPM-Solver-12/23 with adaptive steps (Lu et al. 2022, Algorithm 5): each step computes an order-(k−1) and
    an order-k solution sharing model calls; their scaled difference drives the step size."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3, got {order}")
    noise_sampler = default_noise(x, noise_sampler)
    solver = _Solver(model, extra_args)
    dtype = torch.as_tensor(sigma_max).dtype
    lam, lam_end = _lam(sigma_max).to(dtype), _lam(sigma_min).to(dtype)
    atol, rtol = torch.tensor(atol), torch.tensor(rtol)
    pid = PIDStepSizeController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    x_prev = x
    while lam < lam_end - 1e-5:
        cache: dict = {}
        lam_next = torch.minimum(lam_end, lam + pid.h)
        lam_down, sigma_up = _ancestral_target(lam, lam_next, lam_end, eta)
        denoised = x - _sigma(lam) * solver.eps(cache, "eps", x, lam)
        if order == 2:
            x_low = solver.order_1(x, lam, lam_down, cache)
            x_high = solver.order_2(x, lam, lam_down, cache)
        else:
            x_low = solver.order_2(x, lam, lam_down, cache, r1=1 / 3)
            x_high = solver.order_3(x, lam, lam_down, cache)
        scale = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / scale) / x.numel() ** 0.5
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high
            if eta:
                x = x + sigma_up * s_noise * noise_sampler(_sigma(lam), _sigma(lam_next))
            lam = lam_next
            info["n_accept"] += 1
        else:
            info["n_reject"] += 1
        info["nfe"] += order
        info["steps"] += 1
        report(callback, x, info["steps"] - 1, _sigma(lam), _sigma(lam), denoised)
    return (x, info) if return_info else x
