"""Schedules against independent references: k-diffusion's schedule functions, diffusers' schedulers' σ tables,
scipy's Beta quantiles, NVIDIA's published Align Your Steps tables; where there is none, against the defining
formula written out here."""

from __future__ import annotations

import k_diffusion.sampling as ks
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from scipy import stats

from sdlite.schedulers import (SCHEDULE_NAMES, Denoiser, DiscreteSchedule, compvis_sigmas, compvis_timesteps,
                               get_sigmas, unipc_sigmas)
from sdlite.schedulers.sigmas import beta_ppf, betainc

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
TABLE = DiscreteSchedule()
SMIN, SMAX = float(TABLE.sigma_min), float(TABLE.sigma_max)


def interp_log_sigma(t: np.ndarray, table: DiscreteSchedule = TABLE) -> np.ndarray:
    """σ at fractional timesteps, by numpy's piecewise-linear interpolation of log σ."""
    log_table = table.log_sigmas.double().numpy()
    return np.exp(np.interp(t, np.arange(len(log_table)), log_table))


def diffusers_euler(n: int, **config) -> torch.Tensor:
    s = EulerDiscreteScheduler(**SD, **config)
    s.set_timesteps(n)
    return s.sigmas.double()


# diffusers computes ᾱ in float32 (ldm/A1111 in float64, then round): compare on diffusers' own table.
DIFFUSERS = Denoiser(None, schedule=DiscreteSchedule(EulerDiscreteScheduler(**SD).alphas_cumprod))
# diffusers hands its σ out as float32: our float64 σ agree to float32 rounding (measured ≤ 1.0e-7 relative).
F32_ROUNDING = 2e-7


@pytest.mark.parametrize("n", [1, 2, 10, 33])
def test_k_diffusion_schedules(n):
    # The same float32 formulas: bit for bit.
    assert torch.equal(get_sigmas("Karras", n, SMIN, SMAX), ks.get_sigmas_karras(n, SMIN, SMAX))
    assert torch.equal(get_sigmas("Karras", n, 0.1, 10, rho=3.0), ks.get_sigmas_karras(n, 0.1, 10, rho=3.0))
    assert torch.equal(get_sigmas("Exponential", n, SMIN, SMAX), ks.get_sigmas_exponential(n, SMIN, SMAX))
    for rho in (1.0, 2.5):
        assert torch.equal(get_sigmas("Polyexponential", n, SMIN, SMAX, rho=rho),
                           ks.get_sigmas_polyexponential(n, SMIN, SMAX, rho=rho))

def test_karras_and_exponential_match_diffusers_in_float64():
    for name, option in (("Karras", "use_karras_sigmas"), ("Exponential", "use_exponential_sigmas")):
        ours = get_sigmas(name, 15, denoiser=DIFFUSERS, dtype=torch.float64)
        assert ours.dtype == torch.float64
        assert torch.allclose(ours, diffusers_euler(15, **{option: True}), rtol=F32_ROUNDING, atol=0)


@pytest.mark.parametrize("n", [10, 28])
def test_uniform_and_normal_match_diffusers_linspace_on_integer_timesteps(n):
    """For n−1 dividing 999 the evenly spaced timesteps are integers, where diffusers' linear-in-σ interpolation
    and k-diffusion's log-linear one agree."""
    reference = diffusers_euler(n, timestep_spacing="linspace")
    for name in ("Uniform", "Normal"):
        assert torch.allclose(get_sigmas(name, n, denoiser=DIFFUSERS, dtype=torch.float64), reference,
                              rtol=F32_ROUNDING, atol=0)


@pytest.mark.parametrize("n", [7, 20])
def test_table_schedules_against_their_formulas(n):
    expected_uniform = np.append(interp_log_sigma(np.linspace(999, 0, n)), 0)
    assert np.allclose(get_sigmas("Uniform", n).numpy(), expected_uniform, rtol=2e-6)
    assert np.allclose(get_sigmas("Normal", n).numpy(), expected_uniform, rtol=2e-6)
    # Normal and SGM Uniform follow a narrowed σ range; Uniform ignores it.
    t_hi, t_lo = float(TABLE.sigma_to_t(torch.tensor(8.0))), float(TABLE.sigma_to_t(torch.tensor(0.1)))
    assert np.allclose(get_sigmas("Normal", n, 0.1, 8.0).numpy(),
                       np.append(interp_log_sigma(np.linspace(t_hi, t_lo, n)), 0), rtol=2e-6)
    assert torch.equal(get_sigmas("Uniform", n, 0.1, 8.0), get_sigmas("Uniform", n))
    assert np.allclose(get_sigmas("SGM Uniform", n, 0.1, 8.0).numpy(),
                       np.append(interp_log_sigma(np.linspace(t_hi, t_lo, n + 1)[:-1]), 0), rtol=2e-6)
    simple = [TABLE.sigmas[999 - int(np.floor(i * 1000 / n))] for i in range(n)] + [0.0]
    assert np.allclose(get_sigmas("Simple", n).numpy(), np.array(simple, dtype=np.float32), rtol=1e-7)


@pytest.mark.parametrize("n", [10, 20, 25, 50])
def test_ddim_schedule_matches_diffusers_leading_timesteps(n):
    s = DDIMScheduler(**SD, steps_offset=1, timestep_spacing="leading")
    s.set_timesteps(n)
    expected = torch.cat([TABLE.sigmas[s.timesteps], torch.zeros(1)])
    assert torch.equal(get_sigmas("DDIM", n), expected)
    assert compvis_timesteps(n) == sorted(s.timesteps.tolist())
    assert torch.equal(compvis_sigmas(n), TABLE.sigmas[s.timesteps])


def test_ddim_grid_overshoots_like_a1111_when_n_does_not_divide_1000():
    # k = 1000 // 7 = 142: timesteps 1, 143, …, 995 are eight, not seven.
    assert compvis_timesteps(7) == [1, 143, 285, 427, 569, 711, 853, 995]
    assert torch.equal(get_sigmas("DDIM", 7), torch.cat([TABLE.sigmas[[995, 853, 711, 569, 427, 285, 143, 1]],
                                                         torch.zeros(1)]))
    assert compvis_timesteps(27)[-1] == 999  # 37 · 27 = 999 → 1000, clipped


@pytest.mark.parametrize("n", [3, 10, 24])
def test_beta_matches_diffusers_and_scipy(n):
    assert torch.allclose(get_sigmas("Beta", n, denoiser=DIFFUSERS, dtype=torch.float64),
                          diffusers_euler(n, use_beta_sigmas=True), rtol=F32_ROUNDING, atol=0)
    ours = get_sigmas("Beta", n, dtype=torch.float64)
    q = 1 - np.linspace(0, 1, n)
    expected = SMIN + stats.beta.ppf(q, 0.6, 0.6) * (SMAX - SMIN)
    assert np.allclose(ours[:-1].numpy(), expected, rtol=1e-12, atol=0)
    expected = SMIN + stats.beta.ppf(q, 2.0, 0.5) * (SMAX - SMIN)
    assert np.allclose(get_sigmas("Beta", n, alpha=2.0, beta=0.5, dtype=torch.float64)[:-1].numpy(), expected,
                       rtol=1e-12, atol=0)


def test_beta_special_functions_against_scipy():
    x = np.linspace(0, 1, 41)
    for a, b in ((0.6, 0.6), (2.0, 0.5), (0.3, 5.0), (7.0, 3.0)):
        assert np.allclose([betainc(a, b, v) for v in x], stats.beta.cdf(x, a, b), rtol=0, atol=1e-13)
        assert np.allclose([beta_ppf(v, a, b) for v in x], stats.beta.ppf(x, a, b), rtol=0, atol=1e-12)


def test_kl_optimal_is_a1111s_arctan_schedule_without_a_final_zero():
    n = 12
    ours = get_sigmas("KL Optimal", n, dtype=torch.float64)
    angles = np.arctan(SMAX) + np.arange(n + 1) / n * (np.arctan(SMIN) - np.arctan(SMAX))
    assert len(ours) == n + 1 and np.allclose(ours.numpy(), np.tan(angles), rtol=1e-12)
    assert abs(float(ours[-1]) - SMIN) < 1e-12  # A1111 stops at σ_min, unlike every other schedule


AYS_PUBLISHED = {  # NVIDIA, "Align Your Steps" how-to, 10-step schedules
    "sd1": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl-refiner"])
def test_align_your_steps(family):
    table = AYS_PUBLISHED["sdxl" if family.startswith("sdxl") else "sd1"]
    assert get_sigmas("Align Your Steps", 11, family=family, dtype=torch.float64).tolist() == table + [0.0]
    for n in (4, 10, 30):
        # NVIDIA's recipe: interpolate log σ linearly over an even grid (in increasing order).
        rising = np.log(table[::-1])
        expected = np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, 11), rising))[::-1]
        ours = get_sigmas("Align Your Steps", n, family=family, dtype=torch.float64)
        assert np.allclose(ours.numpy(), np.append(expected, 0), rtol=1e-12)


def test_unipc_grid_is_the_discrete_vp_schedule():
    """A1111's UniPC: model times linspace(999, 0, n+1), ᾱ interpolated linearly in log ᾱ between timesteps."""
    n = 9
    ac = TABLE.alphas_cumprod.double().numpy()
    t = np.linspace(999, 0, n + 1)
    log_alpha = np.interp(t, np.arange(1000), 0.5 * np.log(ac))
    expected = np.sqrt(1 - np.exp(2 * log_alpha)) / np.exp(log_alpha)
    assert np.allclose(unipc_sigmas(n, dtype=torch.float64).numpy(), expected, rtol=1e-12)
    # The denoiser maps these σ back to the same timesteps up to the two interpolations' difference.
    back = DiscreteSchedule(dtype=torch.float64).sigma_to_t(unipc_sigmas(n, dtype=torch.float64))
    assert np.allclose(back.numpy(), t, rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", SCHEDULE_NAMES[1:])
def test_shape_dtype_and_trailing_zero(name):
    for n in (1, 2, 5, 20):
        sigmas = get_sigmas(name, n, denoiser=Denoiser(None))
        assert sigmas.dtype == torch.float32 and get_sigmas(name, n, dtype=torch.float64).dtype == torch.float64
        assert torch.all(sigmas[:-1] > 0) and torch.all(sigmas[1:] <= sigmas[:-1])
        if name == "KL Optimal":
            assert len(sigmas) == n + 1 and sigmas[-1] > 0
        elif name == "DDIM":
            assert len(sigmas) == len(compvis_timesteps(n)) + 1 and sigmas[-1] == 0
        else:
            assert len(sigmas) == n + 1 and sigmas[-1] == 0


def test_names_automatic_and_errors():
    assert torch.equal(get_sigmas("karras", 5), get_sigmas("Karras", 5))
    assert torch.equal(get_sigmas("SGMUniform", 5), get_sigmas("SGM Uniform", 5))
    assert torch.equal(get_sigmas("sgm_uniform", 5), get_sigmas("SGM Uniform", 5))
    assert torch.equal(get_sigmas("Automatic", 5), get_sigmas("Uniform", 5))
    assert torch.equal(get_sigmas("Automatic", 5, sampler="DPM++ 2M"), get_sigmas("Karras", 5))
    assert torch.equal(get_sigmas("Automatic", 5, sampler="DPM++ 2M SDE"), get_sigmas("Exponential", 5))
    with pytest.raises(ValueError, match="Karras.*Exponential.*Beta"):
        get_sigmas("Karrass", 5)
    with pytest.raises(TypeError, match="Uniform"):
        get_sigmas("Uniform", 5, rho=3.0)
    with pytest.raises(ValueError, match="at least 1"):
        get_sigmas("Karras", 0)
