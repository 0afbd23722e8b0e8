"""The sampler table: AUTOMATIC1111 1.10's samplers by display name, with the defaults A1111 runs them with.

``get_sampler("DPM++ 2M")`` returns a :class:`Sampler`: call it like any k-diffusion sampler
(``sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, **options)``); it
fills in A1111's keyword defaults (η, solver type, …). Its fields say what else A1111 does around the call: which
schedule "Automatic" means, whether the penultimate σ is dropped, what noise the sampler draws, whether it needs
the LCM denoiser, and whether it is one of the timestep ("CompVis") samplers that ignore the schedule type.
``get_sampler_and_sigmas`` does that wiring for one sampling pass, as A1111's sample / sample_img2img do.

Names combined with a schedule ("DPM++ 2M Karras", as infotexts from before A1111 1.9 have them) are split by
:func:`parse_sampler_name`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

from .denoiser import Denoiser, LCMDenoiser, LCMSchedule
from .samplers_dpm_solver import sample_dpm_adaptive, sample_dpm_fast
from .samplers_ode import sample_dpm_2, sample_dpmpp_2m, sample_euler, sample_heun, sample_lms, sample_restart
from .samplers_sde import (BrownianTreeNoiseSampler, sample_dpm_2_ancestral, sample_dpmpp_2m_sde,
                           sample_dpmpp_2s_ancestral, sample_dpmpp_3m_sde, sample_dpmpp_sde,
                           sample_euler_ancestral, sample_lcm)
from .samplers_timestep import sample_ddim, sample_plms, sample_unipc
from .sigmas import SCHEDULES, compvis_sigmas, compvis_timesteps, find_schedule, get_sigmas, unipc_sigmas


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

    ``schedule``: what the "Automatic" schedule type means for it (unused by the timestep samplers). ``options``: the keyword defaults A1111 passes
    (its "Eta for ancestral samplers" 1.0, "Eta for DDIM" 0.0, …). ``noise``: ``"ancestral"`` draws from
    ``noise_sampler`` (A1111: the per-image generators), ``"brownian"`` wants a Brownian tree seeded with the image
    seeds, ``"none"`` draws nothing. ``discard_penultimate_sigma``: A1111 computes one step more and drops the
    next-to-last σ. ``second_order``: two model calls per step, which A1111's prompt schedules count.
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
        name = self.schedule if find_schedule(schedule).function is None else schedule
        extra = 1 if self.discard_penultimate_sigma else 0
        sigmas = get_sigmas(name, n + extra, sigma_min, sigma_max, denoiser=denoiser, dtype=dtype, **options)
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


def get_sampler_and_sigmas(sampler: str, schedule: str = "Automatic", steps: int = 20, run_steps: int | None = None,
                           denoiser=None, *, seeds=None, txt2img: bool | None = None,
                           dtype: torch.dtype = torch.float32, **options):
    """One sampling pass wired as A1111 1.10 wires it: ``(run, sigmas, options)``.

    ``steps`` is the schedule length and ``run_steps`` how many of its last steps this pass runs (img2img with
    denoising strength s: A1111's int(min(s, 0.999)·steps) + 1; default all). Start from ``x = x₀ + noise·sigmas[0]``
    (txt2img: ``noise·sigmas[0]``), then ``run(model, x, sigmas, **options)``. ``options`` are the effective
    keyword arguments: A1111's defaults, then yours; schedule options (``rho``, ``family``, ``alpha``, ``beta``) go
    to the schedule. ``txt2img`` defaults to ``run_steps == steps``; it matters only for the timestep samplers,
    whose txt2img starts from unscaled noise.

    What ``run`` adds around the sampler function: for "brownian" samplers with no ``noise_sampler`` given (the
    returned options hold ``noise_sampler=None`` for them), a :class:`BrownianTreeNoiseSampler` over the whole
    schedule's σ range seeded with ``seeds``; for the timestep samplers, A1111's VP latents (txt2img starts at
    x_vp = noise; img2img noises to the timestep after the first one run; the result is the VP latent at the last
    timestep).
    """
    sampler_name, named_schedule = parse_sampler_name(sampler)
    info = _BY_NAME[sampler_name.lower()]
    schedule = named_schedule if named_schedule != "Automatic" else find_schedule(schedule).label
    run_steps = steps if run_steps is None else run_steps
    txt2img = run_steps == steps if txt2img is None else txt2img
    denoiser = denoiser if denoiser is not None else Denoiser(None)
    schedule_options = {k: options.pop(k) for k in ("rho", "family", "alpha", "beta") if k in options}
    options = {**info.options, **options}
    if info.grid in ("compvis", "unipc"):
        return _timestep_pass(info, steps, run_steps, txt2img, denoiser, dtype, options)

    if info.grid == "sigma_range" and txt2img:  # A1111 passes the model's σ range and the step count, nothing else
        full = denoiser.get_sigmas(steps).to(dtype)
    else:
        full = info.get_sigmas(steps, schedule, denoiser=denoiser, dtype=dtype,
                               **_accepted(schedule if schedule != "Automatic" else info.schedule, schedule_options))
    sigmas = full[steps - run_steps:]
    if info.noise != "brownian":
        return info, sigmas, options

    def run(model, x, sigmas, noise_sampler=None, **kwargs):
        if noise_sampler is None:
            noise_sampler = BrownianTreeNoiseSampler(x, full[full > 0].min(), full.max(), seed=seeds)
        return info(model, x, sigmas, noise_sampler=noise_sampler, **kwargs)

    return run, sigmas, {**options, "noise_sampler": options.get("noise_sampler")}


def _accepted(schedule: str, options: dict) -> dict:
    """The schedule options that ``schedule`` takes (A1111 passes ρ only to schedules that have one, etc.)."""
    parameters = inspect.signature(find_schedule(schedule).function).parameters
    return {k: v for k, v in options.items() if k in parameters}


def _timestep_pass(info: Sampler, steps, run_steps, txt2img, denoiser, dtype, options):
    """A1111's CompVisSampler: integer timesteps from :func:`compvis_timesteps`, VP latents in and out."""
    timesteps = compvis_timesteps(steps)
    table = denoiser.sigmas.to(dtype)
    if txt2img:
        run_sigmas = info.get_sigmas(steps, denoiser=denoiser, dtype=dtype)
        sigmas = run_sigmas
    else:
        t_enc = run_steps - 1  # noised to timesteps[t_enc], sampled over timesteps[:t_enc]
        if info.grid == "compvis" or t_enc == 0:
            run_sigmas = table[torch.tensor(timesteps[:t_enc], dtype=torch.long)].flip(0)
        else:
            run_sigmas = unipc_sigmas(t_enc, denoiser, t_max=float(timesteps[t_enc - 1]), dtype=dtype)
        sigmas = torch.cat([table[timesteps[t_enc]].reshape(1), run_sigmas])

    def run(model, x, sigmas, **kwargs):
        # The pipeline's x is k-diffusion-scaled at sigmas[0]; A1111 holds VP latents: unscaled noise (txt2img) or
        # x₀·√ᾱ + noise·√(1−ᾱ) (img2img), which it then treats as lying at the first timestep it runs.
        x_vp = x / sigmas[0] if txt2img else x / (1 + sigmas[0] ** 2) ** 0.5
        if len(run_sigmas) < 2:
            return x_vp
        x = info(model, x_vp * (1 + run_sigmas[0] ** 2) ** 0.5, run_sigmas.to(x.device), **kwargs)
        return x / (1 + run_sigmas[-1] ** 2) ** 0.5

    return run, sigmas, options
