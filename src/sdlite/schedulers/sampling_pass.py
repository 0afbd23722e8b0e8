"""One sampling pass wired as AUTOMATIC1111 1.10 wires it (KDiffusionSampler / CompVisSampler ``sample`` and
``sample_img2img``): the σ list for a step count and a denoising strength, the sampler's keyword defaults, the
Brownian tree of the SDE samplers, and the VP latents of the timestep samplers::

    sp = get_sampler_and_sigmas("DPM++ 2M SDE", "Karras", steps=20, run_steps=15, denoiser=denoiser, seeds=[1])
    x = sp(model, x0 + noise * sp.sigmas[0], noise_sampler=ancestral_noise, callback=report)

Everything the caller needs is in the returned :class:`SamplingPass`; there is nothing to fill in or check.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from .denoiser import Denoiser
from .samplers import Sampler, get_sampler, resolve_schedule
from .samplers_sde import BrownianTreeNoiseSampler
from .sigmas import Schedule, compvis_timesteps, unipc_sigmas

SCHEDULE_OPTIONS = ("rho", "family", "alpha", "beta")


@dataclass(frozen=True)
class SamplingPass:
    """One pass of a sampler over the tail of a schedule.

    ``sigmas``: where the pass starts and what it steps through, A1111's way: start from
    ``x = x₀ + noise·sigmas[0]`` (txt2img: ``noise·sigmas[0]``). ``grid``: the σ the sampler function itself is
    given (``sigmas``, except for the timestep samplers, whose img2img pass runs below its starting σ); a model
    call at σ belongs to sampler step "number of grid values above σ". ``steps``: the sampler steps of the pass
    (A1111's ``t_enc + 1`` in img2img), ``model_calls``: the calls A1111 budgets for them (prompt schedules count
    calls, two per step for second-order samplers). ``options``: the effective keyword arguments, A1111's defaults
    then the caller's. ``schedule``: the schedule resolved from "Automatic" (None for the timestep samplers, which
    keep their own grid). Call it to sample.
    """

    sampler: Sampler
    sigmas: torch.Tensor
    grid: torch.Tensor
    steps: int
    options: Mapping[str, Any]
    schedule: Schedule | None
    txt2img: bool
    seeds: tuple[int, ...] | None = None
    noise_range: tuple[torch.Tensor, torch.Tensor] | None = None  # the whole schedule's (σ_min, σ_max)

    @property
    def model_calls(self) -> int:
        return self.sampler.total_steps(self.steps)

    @property
    def timestep_sampler(self) -> bool:
        return self.sampler.grid in ("compvis", "unipc")

    def __call__(self, model: Callable, x: torch.Tensor, *, noise_sampler: Callable | None = None,
                 callback: Callable | None = None, disable=None) -> torch.Tensor:
        """Run the sampler on ``model`` (a k-diffusion denoiser) from ``x`` at ``sigmas[0]``.

        ``noise_sampler`` draws the fresh noise of the ancestral samplers (None: ``torch.randn_like``). The Brownian
        samplers draw from a :class:`BrownianTreeNoiseSampler` over the whole schedule's σ range seeded with
        ``seeds``, as A1111 does; a ``noise_sampler`` given in the options overrides both.
        """
        options = dict(self.options)
        chosen = options.pop("noise_sampler", None)
        if chosen is None and self.sampler.noise == "brownian":
            chosen = BrownianTreeNoiseSampler(x, *self.noise_range, seed=list(self.seeds) if self.seeds else None)
        elif chosen is None:
            chosen = noise_sampler
        grid = self.grid.to(x.device)
        kwargs = dict(callback=callback, disable=disable, noise_sampler=chosen, **options)
        if not self.timestep_sampler:
            return self.sampler(model, x, grid, **kwargs)
        # The pipeline's x is k-diffusion-scaled at sigmas[0]; A1111 holds VP latents: unscaled noise (txt2img) or
        # x₀·√ᾱ + noise·√(1−ᾱ) (img2img), which it then treats as lying at the first timestep it runs.
        x_vp = x / self.sigmas[0] if self.txt2img else x / (1 + self.sigmas[0] ** 2) ** 0.5
        if len(grid) < 2:
            return x_vp
        x = self.sampler(model, x_vp * (1 + grid[0] ** 2) ** 0.5, grid, **kwargs)
        return x / (1 + grid[-1] ** 2) ** 0.5


def get_sampler_and_sigmas(sampler: str, schedule: str = "Automatic", steps: int = 20, run_steps: int | None = None,
                           denoiser=None, *, seeds=None, txt2img: bool | None = None,
                           dtype: torch.dtype = torch.float32, **options) -> SamplingPass:
    """One sampling pass wired as A1111 1.10 wires it.

    ``steps`` is the schedule length and ``run_steps`` how many of its last steps this pass runs (img2img with
    denoising strength s: A1111's int(min(s, 0.999)·steps) + 1; default all). ``options``: sampler keyword
    arguments over A1111's defaults; schedule options (``rho``, ``family``, ``alpha``, ``beta``) go to the
    schedule (those it takes). ``txt2img`` defaults to ``run_steps == steps``; it matters only for the timestep
    samplers, whose txt2img starts from unscaled noise. ``seeds`` seed the Brownian tree of the SDE samplers.
    ``denoiser`` supplies the model's σ table (default: SD's).
    """
    info = get_sampler(sampler)
    run_steps = steps if run_steps is None else run_steps
    txt2img = run_steps == steps if txt2img is None else txt2img
    denoiser = denoiser if denoiser is not None else Denoiser(None)
    schedule_options = {k: options.pop(k) for k in SCHEDULE_OPTIONS if k in options}
    concrete = resolve_schedule(schedule, sampler)
    seeds = None if seeds is None else tuple(seeds)
    options = {**info.options, **options}
    if info.grid in ("compvis", "unipc"):
        sigmas, grid = _timestep_sigmas(info, steps, run_steps, txt2img, denoiser, dtype)
        return SamplingPass(info, sigmas, grid, run_steps, options, None, txt2img, seeds)

    if info.grid == "sigma_range" and txt2img:  # A1111 passes the model's σ range and the step count, nothing else
        full = denoiser.get_sigmas(steps).to(dtype)
    else:
        accepted = inspect.signature(concrete.function).parameters  # A1111 passes ρ only to schedules with one, …
        full = info.get_sigmas(steps, concrete.label, denoiser=denoiser, dtype=dtype,
                               **{k: v for k, v in schedule_options.items() if k in accepted})
    sigmas = full[steps - run_steps:]
    return SamplingPass(info, sigmas, sigmas, run_steps, options, concrete, txt2img, seeds,
                        (full[full > 0].min(), full.max()))


def _timestep_sigmas(info: Sampler, steps: int, run_steps: int, txt2img: bool, denoiser, dtype):
    """A1111's CompVisSampler: integer timesteps from :func:`compvis_timesteps`. Returns (the pass's σ, the grid
    the sampler runs): the same list in txt2img; in img2img the latent is noised to timesteps[t_enc] and sampled
    over timesteps[:t_enc]."""
    if txt2img:
        sigmas = info.get_sigmas(steps, denoiser=denoiser, dtype=dtype)
        return sigmas, sigmas
    timesteps = compvis_timesteps(steps)
    table = denoiser.sigmas.to(dtype)
    t_enc = run_steps - 1
    if info.grid == "compvis" or t_enc == 0:
        grid = table[torch.tensor(timesteps[:t_enc], dtype=torch.long)].flip(0)
    else:
        grid = unipc_sigmas(t_enc, denoiser, t_max=float(timesteps[t_enc - 1]), dtype=dtype)
    return torch.cat([table[timesteps[t_enc]].reshape(1), grid]), grid
