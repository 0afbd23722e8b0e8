"""Noise schedules by their AUTOMATIC1111 1.10 names (the "Schedule type" menu and infotext field).

``get_sigmas(name, n, sigma_min, sigma_max, denoiser=...)`` returns the σ a sampler steps through: n+1 values from
high to low ending in 0, as A1111 computes them (in float32 unless another dtype is asked for). Two A1111 schedules
break that shape and are reproduced as they are: "KL Optimal" ends at sigma_min instead of 0, and "DDIM" has more
than n+1 values when n does not divide 1000. "Automatic" is the sampler's own default and is resolved by the sampler
table (``samplers.resolve_schedule``, the one place that knows both tables); this module knows schedules alone.

Schedules that read the model's discrete σ table (Uniform, SGM Uniform, Simple, Normal, DDIM) take it from
``denoiser`` (anything with ``sigmas``, ``sigma_to_t``, ``t_to_sigma`` and ``get_sigmas``, e.g.
:class:`~sdlite.schedulers.denoiser.Denoiser`); without one they use SD's standard schedule, which SD 1.x, 2.x and
XL all share, as A1111 holds it (float32 ᾱ; σ are then computed in the requested dtype).
``sigma_min``/``sigma_max`` default to the ends of that table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..checkpoint.family_table import FAMILIES
from .denoiser import DiscreteSchedule, append_zero


def _karras(n, sigma_min, sigma_max, table, dtype, *, rho: float = 7.0):
    """Karras et al. 2022, eq. 5: evenly spaced in σ^(1/ρ)."""
    ramp = torch.linspace(0, 1, n, dtype=dtype)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((hi + ramp * (lo - hi)) ** rho)


def _exponential(n, sigma_min, sigma_max, table, dtype):
    """Evenly spaced in log σ."""
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=dtype).exp())


def _polyexponential(n, sigma_min, sigma_max, table, dtype, *, rho: float = 1.0):
    """log σ follows a power ``rho`` of a linear ramp (k-diffusion's polynomial-in-log-σ schedule)."""
    ramp = torch.linspace(1, 0, n, dtype=dtype) ** rho
    return append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def _uniform(n, sigma_min, sigma_max, table, dtype):
    """The model's own ``get_sigmas(n)``: timesteps evenly spaced over the whole table (σ range ignored)."""
    return table.get_sigmas(n)


def _timestep_range(sigma_min, sigma_max, table):
    start = table.sigma_to_t(torch.tensor(sigma_max, dtype=table.sigmas.dtype))
    end = table.sigma_to_t(torch.tensor(sigma_min, dtype=table.sigmas.dtype))
    return float(start), float(end)


def _sgm_uniform(n, sigma_min, sigma_max, table, dtype):
    """Stability's sgm discretisation: n+1 evenly spaced timesteps over the σ range, the last one dropped for 0."""
    start, end = _timestep_range(sigma_min, sigma_max, table)
    return append_zero(table.t_to_sigma(torch.linspace(start, end, n + 1, dtype=table.sigmas.dtype)[:-1]))


def _normal(n, sigma_min, sigma_max, table, dtype):
    """n evenly spaced timesteps from the one of sigma_max to the one of sigma_min, then 0 (ComfyUI's "normal")."""
    start, end = _timestep_range(sigma_min, sigma_max, table)
    return append_zero(table.t_to_sigma(torch.linspace(start, end, n, dtype=table.sigmas.dtype)))


def _simple(n, sigma_min, sigma_max, table, dtype):
    """Every (len/n)-th table σ from the top, truncating the fractional index (ComfyUI's "simple")."""
    stride = len(table.sigmas) / n
    return append_zero(torch.stack([table.sigmas[-(1 + int(i * stride))] for i in range(n)]))


def _ddim(n, sigma_min, sigma_max, table, dtype):
    """Table σ at timesteps 1, 1+k, 1+2k, … (k = len // n) below len, highest first, then 0 (ComfyUI's
    "ddim_uniform"). When n does not divide 1000 this yields more than n steps, as in A1111."""
    stride = max(len(table.sigmas) // n, 1)
    return append_zero(table.sigmas[1::stride].flip(0))


def _kl_optimal(n, sigma_min, sigma_max, table, dtype):
    """Evenly spaced in arctan σ (Sabour et al. 2024, "Align Your Steps", the KL-optimal schedule). A1111 returns
    n+1 values from sigma_max down to sigma_min, without a final 0: the last step stops at sigma_min."""
    a_min = torch.arctan(torch.tensor(sigma_min, dtype=dtype))
    a_max = torch.arctan(torch.tensor(sigma_max, dtype=dtype))
    frac = torch.arange(n + 1, dtype=dtype) / n
    return torch.tan(frac * a_min + (1 - frac) * a_max)


def _align_your_steps(n, sigma_min, sigma_max, table, dtype, *, family: str = "sd1"):
    """NVIDIA's 10-step AYS tables, interpolated linearly in log σ over an even grid to n values, then 0.
    ``family`` picks the SDXL table for "sdxl"/"sdxl-refiner", SD 1.5's for anything else (as A1111 does)."""
    base = np.array(FAMILIES.get(family, FAMILIES["sd1"]).ays_sigmas, dtype=np.float64)  # tables: family_table
    if n != len(base):
        log_rising = np.log(base[::-1])
        base = np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(base)), log_rising))[::-1]
    return append_zero(torch.tensor(base.copy(), dtype=dtype))


def _beta(n, sigma_min, sigma_max, table, dtype, *, alpha: float = 0.6, beta: float = 0.6):
    """Beta-distribution quantiles of an even grid, mapped linearly onto [sigma_min, sigma_max]
    (Lee et al. 2024, "Beta Sampling is All You Need", arXiv:2407.12173; A1111's defaults α = β = 0.6)."""
    grid = 1 - np.linspace(0, 1, n)
    sigmas = [sigma_min + beta_ppf(q, alpha, beta) * (sigma_max - sigma_min) for q in grid]
    return append_zero(torch.tensor(sigmas, dtype=torch.float64))


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b), by its continued fraction (evaluated with Lentz's method)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean; use I_x(a,b) = 1 − I_{1−x}(b,a)
        return 1.0 - betainc(b, a, 1.0 - x)
    prefix = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(1000):
        m = i // 2
        if i == 0:
            term = 1.0
        elif i % 2 == 0:
            term = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            term = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + term * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + term / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-16:
            break
    return prefix * (f - 1.0)


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile function of the Beta(a, b) distribution, by bisection on :func:`betainc` (monotone in x)."""
    if q <= 0.0 or q >= 1.0:
        return float(q >= 1.0)
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if betainc(a, b, mid) < q else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Schedule:
    label: str  # A1111's display name, as written in infotexts
    key: str  # A1111's internal name
    function: Callable | None
    aliases: tuple[str, ...] = ()


SCHEDULES = (
    Schedule("Automatic", "automatic", None),
    Schedule("Uniform", "uniform", _uniform),
    Schedule("Karras", "karras", _karras),
    Schedule("Exponential", "exponential", _exponential),
    Schedule("Polyexponential", "polyexponential", _polyexponential),
    Schedule("SGM Uniform", "sgm_uniform", _sgm_uniform, ("SGMUniform",)),
    Schedule("KL Optimal", "kl_optimal", _kl_optimal),
    Schedule("Align Your Steps", "align_your_steps", _align_your_steps),
    Schedule("Simple", "simple", _simple),
    Schedule("Normal", "normal", _normal),
    Schedule("DDIM", "ddim", _ddim),
    Schedule("Beta", "beta", _beta),
)
SCHEDULE_NAMES = tuple(s.label for s in SCHEDULES)
_BY_NAME = {name.lower(): s for s in SCHEDULES for name in (s.label, s.key, *s.aliases)}


def find_schedule(name: str) -> Schedule:
    """The schedule called ``name`` (display name, internal name or alias, any case); ValueError if unknown."""
    try:
        return _BY_NAME[name.strip().lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown schedule type {name!r}; known: {', '.join(SCHEDULE_NAMES)}") from None


def schedule_sigmas(schedule: Schedule | str, n: int, sigma_min: float | None = None,
                    sigma_max: float | None = None, *, denoiser=None, dtype: torch.dtype = torch.float32,
                    **options) -> torch.Tensor:
    """The σ of a concrete schedule (a :class:`Schedule` or its name) for ``n`` steps (see the module docstring for
    the shape). ``options`` are the schedule's own: ``rho`` (Karras 7, Polyexponential 1), ``family`` (Align Your
    Steps: "sd1", "sd2", "sdxl", …), ``alpha``/``beta`` (Beta, 0.6 each). The σ range, and the model's table, come
    from ``denoiser`` when given. "Automatic" is not a schedule of its own: ``sdlite.schedulers.get_sigmas`` and
    the samplers resolve it first.
    """
    if n < 1:
        raise ValueError(f"a schedule needs at least 1 step, got {n}")
    schedule = find_schedule(schedule) if isinstance(schedule, str) else schedule
    if schedule.function is None:
        raise ValueError('"Automatic" means the sampler\'s default schedule: resolve it with '
                         "sdlite.schedulers.resolve_schedule(schedule, sampler) first")
    table = denoiser if denoiser is not None else DiscreteSchedule()
    sigma_min = float(table.sigmas[0]) if sigma_min is None else float(sigma_min)
    sigma_max = float(table.sigmas[-1]) if sigma_max is None else float(sigma_max)
    try:
        sigmas = schedule.function(n, sigma_min, sigma_max, table, dtype, **options)
    except TypeError as e:
        raise TypeError(f"schedule {schedule.label!r}: {e}") from None
    return sigmas.to(dtype)


# --- the timestep grids of A1111's "CompVis" samplers (DDIM, PLMS, UniPC), which ignore the schedule type ---

def compvis_timesteps(n: int) -> list[int]:
    """A1111's timesteps for DDIM/PLMS/UniPC, ascending: 1, 1+k, 1+2k, … with k = 1000 // n (clipped to 999).
    When n does not divide 1000 there are more than n of them, as in A1111."""
    return [min(t + 1, 999) for t in range(0, 1000, 1000 // n)]


def compvis_sigmas(n: int, denoiser=None, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """σ of :func:`compvis_timesteps`, highest first and without a final 0. A1111's DDIM and PLMS step through
    these (one step fewer than there are timesteps) and stop at timestep 1."""
    table = denoiser if denoiser is not None else DiscreteSchedule()
    return table.sigmas[torch.tensor(compvis_timesteps(n))].flip(0).to(dtype)


def unipc_sigmas(steps: int, denoiser=None, *, t_max: float = 999.0, dtype: torch.dtype = torch.float32):
    """σ of A1111's UniPC grid: steps+1 model times evenly spaced from ``t_max`` to 0 ("time_uniform"), with ᾱ at
    fractional times interpolated linearly in log ᾱ (the "discrete" NoiseScheduleVP of DPM-Solver/UniPC, Lu et al.
    2022, Zhao et al. 2023). The last σ is the table's smallest, not 0."""
    table = denoiser.schedule if hasattr(denoiser, "schedule") else denoiser
    table = table if table is not None else DiscreteSchedule()
    log_ac = table.alphas_cumprod.to(dtype).log()
    t = torch.linspace(t_max, 0, steps + 1, dtype=dtype)
    low, high = t.floor().long(), t.ceil().long()
    log_ac_t = torch.lerp(log_ac[low], log_ac[high], t - low)
    return torch.expm1(-log_ac_t).sqrt()
