"""The sampler table: AUTOMATIC1111 1.10's samplers by display name, with the defaults A1111 runs them with.

``get_sampler("DPM++ 2M")`` returns a :class:`Sampler`: call it like any k-diffusion sampler
(``sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, **options)``); it
fills in A1111's keyword defaults (η, solver type, …). Its fields say what else A1111 does around the call: which
schedule "Automatic" means, whether the penultimate σ is dropped, what noise the sampler draws, whether it needs
the LCM denoiser, and whether it is one of the timestep ("CompVis") samplers that ignore the schedule type.
``sdlite.schedulers.sampling_pass.get_sampler_and_sigmas`` does that wiring for one sampling pass, as A1111's
sample / sample_img2img do. This module is also where the "Automatic" schedule type is resolved
(:func:`resolve_schedule`), and :func:`get_sigmas` is the schedule lookup that understands it.

Names combined with a schedule ("DPM++ 2M Karras", as infotexts from before A1111 1.9 have them) are split by
:func:`parse_sampler_name`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

from .denoiser import Denoiser, LCMDenoiser, LCMSchedule
from .samplers_dpm_solver import sample_dpm_adaptive, sample_dpm_fast
from .samplers_ode import sample_dpm_2, sample_dpmpp_2m, sample_euler, sample_heun, sample_lms, sample_restart
from .samplers_sde import (sample_dpm_2_ancestral, sample_dpmpp_2m_sde,
                           sample_dpmpp_2s_ancestral, sample_dpmpp_3m_sde, sample_dpmpp_sde,
                           sample_euler_ancestral, sample_lcm)
from .samplers_timestep import sample_ddim, sample_plms, sample_unipc
from .sigmas import SCHEDULES, Schedule, compvis_sigmas, compvis_timesteps, find_schedule, schedule_sigmas, unipc_sigmas


def _range_of(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DPM fast/adaptive read only the ends of a σ list: its first and its last non-zero σ."""
    return sigmas[sigmas > 0][-1], sigmas[0]


def sample_dpm_fast_over_sigmas(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                noise_sampler=None, **options):
    """:func:`sample_dpm_fast` from σ_max = sigmas[0] to the last non-zero σ with len(sigmas) − 1 model calls."""
    sigma_min, sigma_max = _range_of(sigmas)
    return sample_dpm_fast(model, x, sigma_min, sigma_max, len(sigmas) - 1, extra_args, callback, disable,
                           noise_sampler=noise_sampler, **options)


def sample_dpm_adaptive_over_sigmas(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                    noise_sampler=None, **options):
    """:func:`sample_dpm_adaptive` from σ_max = sigmas[0] to the last non-zero σ (the step count is its own)."""
    sigma_min, sigma_max = _range_of(sigmas)
    return sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args, callback, disable,
                               noise_sampler=noise_sampler, **options)


@dataclass(frozen=True)
class Sampler:
    """One sampler as A1111 1.10 runs it.

    ``schedule``: what the "Automatic" schedule type means for it (unused by the timestep samplers; resolved by
    :meth:`schedule_for`). ``options``: the keyword defaults A1111 passes (its "Eta for ancestral samplers" 1.0,
    "Eta for DDIM" 0.0, …). ``noise``: ``"ancestral"`` draws from ``noise_sampler`` (A1111: the per-image
    generators), ``"brownian"`` wants a Brownian tree seeded with the image seeds, ``"none"`` draws nothing.
    ``discard_penultimate_sigma``: A1111 computes one step more and drops the next-to-last σ. ``second_order``: two model calls per step, which A1111's prompt schedules count.
    ``uses_ensd``: A1111 writes "ENSD" into the infotext. ``grid``: ``"schedule"`` (any schedule type),
    ``"sigma_range"`` (DPM fast/adaptive: only the σ range and step count are used), ``"compvis"``/``"unipc"``
    (A1111's timestep samplers: own grid whatever the schedule type, VP-scaled latents). ``lcm``: needs
    :class:`~.denoiser.LCMDenoiser`.
    """

    name: str
    function: Callable
    aliases: tuple[str, ...] = ()
    schedule: str = "Uniform"
    options: Mapping[str, Any] = field(default_factory=dict)
    noise: str = "none"
    discard_penultimate_sigma: bool = False
    second_order: bool = False
    uses_ensd: bool = False
    grid: str = "schedule"
    lcm: bool = False

    def __post_init__(self):
        # A read-only copy: entries share their option dicts, and the table is module state.
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def __call__(self, model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                 **options):
        return self.function(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                             noise_sampler=noise_sampler, **{**self.options, **options})

    def total_steps(self, steps: int) -> int:
        """Model calls A1111 budgets for ``steps`` (prompt editing counts calls, not steps)."""
        return steps * 2 if self.second_order else steps

    def make_denoiser(self, unet, prediction: str = "eps") -> Denoiser:
        """The denoiser A1111 wraps the UNet in for this sampler."""
        return LCMDenoiser(unet, prediction) if self.lcm else Denoiser(unet, prediction)

    def schedule_for(self, schedule: str = "Automatic") -> Schedule:
        """The schedule ``schedule`` names for this sampler: "Automatic" is this sampler's default (for a combined
        name such as "DPM++ 2M Karras", the named one)."""
        found = find_schedule(schedule)
        return find_schedule(self.schedule) if found.function is None else found

    def get_sigmas(self, n: int, schedule: str = "Automatic", *, denoiser=None, sigma_min=None, sigma_max=None,
                   dtype: torch.dtype = torch.float32, **options) -> torch.Tensor:
        """The σ list A1111 builds for ``n`` steps of this sampler with schedule type ``schedule`` (its
        KDiffusionSampler.get_sigmas). For the timestep samplers: their own grid, the schedule type ignored."""
        if self.grid == "compvis":
            return compvis_sigmas(n, denoiser, dtype=dtype)
        if self.grid == "unipc":
            return unipc_sigmas(len(compvis_timesteps(n)), denoiser, dtype=dtype)
        if self.lcm and not isinstance(getattr(denoiser, "schedule", denoiser), LCMSchedule):
            denoiser = LCMSchedule(getattr(denoiser, "schedule", denoiser))
        extra = 1 if self.discard_penultimate_sigma else 0
        sigmas = schedule_sigmas(self.schedule_for(schedule), n + extra, sigma_min, sigma_max, denoiser=denoiser,
                                 dtype=dtype, **options)
        return torch.cat([sigmas[:-2], sigmas[-1:]]) if extra else sigmas


_ANCESTRAL = dict(noise="ancestral", uses_ensd=True, options={"eta": 1.0, "s_noise": 1.0})
_BROWNIAN = dict(noise="brownian", options={"eta": 1.0, "s_noise": 1.0})

SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", sample_dpmpp_2m, ("k_dpmpp_2m",), schedule="Karras"),
    Sampler("DPM++ SDE", sample_dpmpp_sde, ("k_dpmpp_sde",), schedule="Karras", second_order=True, **_BROWNIAN),
    Sampler("DPM++ 2M SDE", sample_dpmpp_2m_sde, ("k_dpmpp_2m_sde",), schedule="Exponential", **_BROWNIAN),
    Sampler("DPM++ 2M SDE Heun", sample_dpmpp_2m_sde, ("k_dpmpp_2m_sde_heun",), schedule="Exponential",
            noise="brownian", options={"eta": 1.0, "s_noise": 1.0, "solver_type": "heun"}),
    Sampler("DPM++ 2S a", sample_dpmpp_2s_ancestral, ("k_dpmpp_2s_a",), schedule="Karras", second_order=True,
            **_ANCESTRAL),
    Sampler("DPM++ 3M SDE", sample_dpmpp_3m_sde, ("k_dpmpp_3m_sde",), schedule="Exponential",
            discard_penultimate_sigma=True, **_BROWNIAN),
    Sampler("Euler a", sample_euler_ancestral, ("k_euler_a", "k_euler_ancestral"), **_ANCESTRAL),
    Sampler("Euler", sample_euler, ("k_euler",)),
    Sampler("LMS", sample_lms, ("k_lms",)),
    Sampler("Heun", sample_heun, ("k_heun",), second_order=True),
    Sampler("DPM2", sample_dpm_2, ("k_dpm_2",), schedule="Karras", discard_penultimate_sigma=True,
            second_order=True),
    Sampler("DPM2 a", sample_dpm_2_ancestral, ("k_dpm_2_a",), schedule="Karras", discard_penultimate_sigma=True,
            second_order=True, **_ANCESTRAL),
    Sampler("DPM fast", sample_dpm_fast_over_sigmas, ("k_dpm_fast",), grid="sigma_range", **_ANCESTRAL),
    Sampler("DPM adaptive", sample_dpm_adaptive_over_sigmas, ("k_dpm_ad",), grid="sigma_range", **_ANCESTRAL),
    Sampler("Restart", sample_restart, ("restart",), schedule="Karras", second_order=True, noise="ancestral"),
    Sampler("DDIM", sample_ddim, ("ddim",), options={"eta": 0.0}, noise="ancestral", grid="compvis"),
    Sampler("PLMS", sample_plms, ("plms",), grid="compvis"),
    Sampler("UniPC", sample_unipc, ("unipc",), grid="unipc",
            options={"order": 3, "variant": "bh1", "lower_order_final": True}),
    Sampler("LCM", sample_lcm, ("k_lcm",), noise="ancestral", lcm=True),
)
SAMPLER_NAMES = tuple(s.name for s in SAMPLERS)
_BY_NAME = {name.lower(): s for s in SAMPLERS for name in (s.name, *s.aliases)}


def _unknown(name) -> ValueError:
    return ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLER_NAMES)} "
                      f"(optionally followed by a schedule type, e.g. 'DPM++ 2M Karras')")


def parse_sampler_name(name: str) -> tuple[str, str]:
    """Split an A1111 sampler name into (sampler name, schedule type): "DPM++ 2M Karras" → ("DPM++ 2M", "Karras"),
    "Euler a" → ("Euler a", "Automatic"). Case and k-diffusion aliases ("k_dpmpp_2m") are accepted."""
    if not isinstance(name, str):
        raise _unknown(name)
    text = " ".join(name.split())
    if text.lower() in _BY_NAME:
        return _BY_NAME[text.lower()].name, "Automatic"
    for schedule in SCHEDULES[1:]:
        for suffix in (schedule.label, *schedule.aliases):
            head = text[:-len(suffix) - 1]
            if text.lower().endswith(" " + suffix.lower()) and head.lower() in _BY_NAME:
                return _BY_NAME[head.lower()].name, schedule.label
    raise _unknown(name)


def get_sampler(name: str) -> Sampler:
    """The sampler called ``name`` (display name, alias or combined "<sampler> <schedule>"); ValueError listing
    the known names if there is none. For a combined name, ``.schedule`` is the named schedule type."""
    sampler_name, schedule = parse_sampler_name(name)
    entry = _BY_NAME[sampler_name.lower()]
    return entry if schedule == "Automatic" else replace(entry, schedule=schedule)


def resolve_schedule(schedule: str = "Automatic", sampler: str | None = None) -> Schedule:
    """The concrete schedule meant by ``schedule`` for ``sampler`` (an A1111 sampler name, possibly combined with a
    schedule): the one place "Automatic" is resolved. A schedule named in the sampler's name wins ("DPM++ 2M
    Karras" is Karras whatever ``schedule`` says, as A1111 reads old infotexts); then ``schedule`` itself;
    "Automatic" is the sampler's default, or "Uniform" (the model's own ``get_sigmas``) without a sampler."""
    found = find_schedule(schedule)  # checked even when the sampler's name overrides it
    if sampler is None:
        return find_schedule("Uniform") if found.function is None else found
    if parse_sampler_name(sampler)[1] != "Automatic":
        schedule = "Automatic"  # the entry's default is then the named schedule (get_sampler)
    return get_sampler(sampler).schedule_for(schedule)


def get_sigmas(name: str, n: int, sigma_min: float | None = None, sigma_max: float | None = None, *,
               denoiser=None, sampler: str | None = None, dtype: torch.dtype = torch.float32,
               **options) -> torch.Tensor:
    """The σ of schedule ``name`` for ``n`` steps: n+1 values from high to low ending in 0 (see
    :mod:`~sdlite.schedulers.sigmas` for the two A1111 schedules that break that shape).

    ``"Automatic"`` resolves to the default of ``sampler`` (an A1111 sampler name), or to "Uniform" without one
    (:func:`resolve_schedule`). ``options`` are the schedule's own: ``rho`` (Karras 7, Polyexponential 1),
    ``family`` (Align Your Steps: "sd1", "sd2", "sdxl", …), ``alpha``/``beta`` (Beta, 0.6 each). The σ range, and
    the model's table, come from ``denoiser`` when given.
    """
    return schedule_sigmas(resolve_schedule(name, sampler), n, sigma_min, sigma_max, denoiser=denoiser, dtype=dtype,
                           **options)
