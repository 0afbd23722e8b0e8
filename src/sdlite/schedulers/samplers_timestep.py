"""DDIM, PLMS and UniPC — AUTOMATIC1111's "CompVis" samplers — written over σ in k-diffusion's convention.

The originals run on VP latents x_vp = x/√(1+σ²) at integer (DDIM, PLMS) or fractional (UniPC) timesteps with an
ε-model. Dividing their updates by √ᾱ of the target timestep turns them into updates of x over the σ of those
timesteps, exactly: DDIM becomes an Euler (η = 0) or ancestral-Euler step with ε = (x − D)/σ as slope, PLMS the
same step with a multistep combination of ε, UniPC its own formulas in λ = −log σ. So any σ list works; the σ of
the original timesteps (``sigmas.compvis_sigmas`` / ``sigmas.unipc_sigmas``) reproduce the originals, and the
sampler table (``samplers.SAMPLERS``) converts between the two latent scalings the way A1111 does.
"""

from __future__ import annotations

import torch

from .samplers_ode import default_noise, denoise, report, to_d
from .samplers_sde import ancestral_step


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=0.0):
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12 with σ_t(η) of eq. 16).

    Over σ, a DDIM step is the ancestral Euler step: the DDIM noise std divided by √ᾱ_prev is
    η·√(σ_next²(σ²−σ_next²)/σ²). Matches diffusers' DDIMScheduler (and A1111's DDIM) on the same timesteps.
    """
    noise_sampler = default_noise(x, noise_sampler)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        if eta and sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * sigma_up
    return x


# Adams–Bashforth weights for equally spaced steps, newest ε first; PLMS applies them whatever the spacing.
_ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@torch.no_grad()
def sample_plms(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """PLMS, the pseudo linear multistep method (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on
    Manifolds", eq. 12 with the DDIM transfer): DDIM steps driven by a 4th-order Adams–Bashforth combination of
    the last ε; the first step is a pseudo improved-Euler (Heun) step. Matches diffusers' PNDMScheduler
    (skip_prk_steps=True) and A1111's PLMS on the same timesteps. A first step into σ = 0 is a plain DDIM step."""
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(model, x, sigma, extra_args)
        report(callback, x, i, sigma, sigma, denoised)
        eps = to_d(x, sigma, denoised)
        if not history and sigma_next > 0:
            x_next = x + eps * (sigma_next - sigma)
            slope = (eps + to_d(x_next, sigma_next, denoise(model, x_next, sigma_next, extra_args))) / 2
        else:
            past = [eps, *history][:4]
            slope = sum(w * e for w, e in zip(_ADAMS_BASHFORTH[len(past)], past))
        x = x + slope * (sigma_next - sigma)
        history = [eps, *history][:3]
    return x


@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                 order=3, variant="bh1", lower_order_final=True):
    """UniPC multistep with data prediction (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for
    Fast Sampling of Diffusion Models", Algorithms 2–3 with B(h) = h ("bh1") or eᴴ−1 ("bh2")).

    Each step predicts x at σ_next with UniP of the step's order, calls the model there, and corrects with UniC
    using that output (which is then reused as the next step's history: one call per step). The order ramps up
    over the first steps and, with ``lower_order_final``, down over the last ones; the last step has no corrector.
    A step into σ = 0 lands on the prediction. Matches diffusers' UniPCMultistepScheduler and A1111's UniPC on the
    same timesteps (A1111: order 3, bh1, lower_order_final).
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    steps = len(sigmas) - 1
    denoised = denoise(model, x, sigmas[0], extra_args)
    history = [(sigmas[0], denoised)]  # (σ, data prediction), newest last
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        report(callback, x, i, sigma, sigma, history[-1][1])
        step_order = min(order, i + 1, steps - i) if lower_order_final else min(order, i + 1)
        if sigma_next == 0:
            x = history[-1][1]
            break
        last = i == steps - 1
        x, model_next = _unipc_step(model, x, history[-step_order:], sigma_next, variant, extra_args,
                                    correct=not last)
        if not last:
            history = (history + [(sigma_next, model_next)])[-order:]
    return x


def _unipc_step(model, x, history, sigma_next, variant, extra_args, correct):
    """One UniP(-C) step of order len(history) from history[-1]'s σ to ``sigma_next``, in λ = −log σ."""
    sigma, m0 = history[-1]
    lam, lam_next = -sigma.log(), -sigma_next.log()
    h = lam_next - lam
    order = len(history)
    # Scaled differences to the older predictions, at their relative positions r_k in λ.
    rks, d1s = [], []
    for sigma_k, m_k in reversed(history[:-1]):
        rk = (-sigma_k.log() - lam) / h
        rks.append(rk)
        d1s.append((m_k - m0) / rk)
    rks.append(torch.ones_like(h))
    rks = torch.stack(rks)

    hh = -h  # data prediction runs the exponential integrator in −h
    h_phi_1 = torch.expm1(hh)
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    # b_k = k!·φ_{k+1}(hh)·hh^k / B(h): the right-hand side of the order conditions (Zhao et al. 2023, eq. 8).
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    b = torch.stack(b)
    R = torch.stack([rks**k for k in range(order)])

    x_base = (sigma_next / sigma) * x - h_phi_1 * m0
    x_pred = x_base
    if d1s:
        rhos_p = torch.full_like(h, 0.5)[None] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        x_pred = x_base - b_h * sum(r * d for r, d in zip(rhos_p, d1s))
    if not correct:
        return x_pred, None
    m_next = denoise(model, x_pred, sigma_next, extra_args)
    rhos_c = torch.full_like(h, 0.5)[None] if order == 1 else torch.linalg.solve(R, b)
    correction = sum((r * d for r, d in zip(rhos_c[:-1], d1s)), torch.zeros_like(x)) + rhos_c[-1] * (m_next - m0)
    return x_base - b_h * correction, m_next
