"""Samplers and noise schedules: k-diffusion's sampler convention, AUTOMATIC1111's names and defaults.

    denoiser = Denoiser(pipe.unet, pipe.prediction)            # D(x; σ) from the ε- or v-predicting UNet
    sampler = get_sampler("DPM++ 2M")                         # A1111 display name (or "DPM++ 2M Karras")
    sigmas = sampler.get_sigmas(20, "Automatic", denoiser=denoiser)   # or get_sigmas("Karras", 20, denoiser=...)
    x = sampler(denoiser, noise * sigmas[0], sigmas, extra_args={"context": context})
    sp = get_sampler_and_sigmas("DPM++ 2M", "Karras", 20, 15, denoiser)   # a whole pass, A1111's img2img accounting
    x = sp(model, x0 + noise * sp.sigmas[0])
"""

from .denoiser import DiscreteSchedule, Denoiser, LCMDenoiser, LCMSchedule, scaled_linear_alphas_cumprod
from .samplers import (SAMPLER_NAMES, SAMPLERS, Sampler, get_sampler, get_sigmas, parse_sampler_name, resolve_schedule,
                       sample_dpm_adaptive_over_sigmas, sample_dpm_fast_over_sigmas)
from .samplers_dpm_solver import sample_dpm_adaptive, sample_dpm_fast
from .samplers_ode import (sample_dpm_2, sample_dpmpp_2m, sample_euler, sample_heun, sample_lms, sample_restart,
                           to_d)
from .samplers_sde import (BrownianTreeNoiseSampler, ancestral_step, sample_dpm_2_ancestral, sample_dpmpp_2m_sde,
                           sample_dpmpp_2s_ancestral, sample_dpmpp_3m_sde, sample_dpmpp_sde, sample_euler_ancestral,
                           sample_lcm)
from .samplers_timestep import sample_ddim, sample_plms, sample_unipc
from .sampling_pass import SamplingPass, get_sampler_and_sigmas
from .sigmas import SCHEDULE_NAMES, compvis_sigmas, compvis_timesteps, schedule_sigmas, unipc_sigmas

__all__ = [
    "DiscreteSchedule", "Denoiser", "LCMDenoiser", "LCMSchedule", "scaled_linear_alphas_cumprod",
    "SAMPLER_NAMES", "SAMPLERS", "Sampler", "get_sampler", "get_sampler_and_sigmas", "parse_sampler_name",
    "SamplingPass", "SCHEDULE_NAMES", "get_sigmas", "resolve_schedule", "schedule_sigmas", "compvis_timesteps", "compvis_sigmas", "unipc_sigmas",
    "BrownianTreeNoiseSampler", "ancestral_step", "to_d",
    "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_lms",
    "sample_dpm_fast", "sample_dpm_adaptive", "sample_dpm_fast_over_sigmas", "sample_dpm_adaptive_over_sigmas",
    "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde",
    "sample_ddim", "sample_plms", "sample_unipc", "sample_lcm", "sample_restart",
]
