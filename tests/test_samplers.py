"""Samplers against their references, in float64 with the same denoiser, σ and injected noise:

- every sampler k-diffusion has, against ``k_diffusion.sampling.sample_*`` (analytic denoiser, and a tiny UNet
  through sdlite's Denoiser vs k-diffusion's CompVisDenoiser);
- DDIM, PLMS, UniPC and LCM against diffusers' schedulers run on the same timesteps with an ε-model;
- Restart (A1111's own) against its definition (Xu et al. 2023) as A1111 parameterises it;
- the sampler table against A1111 1.10's, and the A1111 wiring of ``get_sampler_and_sigmas``.
"""

from __future__ import annotations

import inspect

import k_diffusion.external as kext
import k_diffusion.sampling as ks
import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, PNDMScheduler, UniPCMultistepScheduler

import sdlite.schedulers as S
from sdlite.schedulers import Denoiser, DiscreteSchedule, LCMDenoiser, LCMSchedule

from conftest import rel_err
from test_denoiser import LDMAdapter, ldm_alphas_cumprod, tiny_unet

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 6, 6)
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


class Mixture:
    """The exact denoiser for data whose elements are i.i.d. draws of a 1-D Gaussian mixture: E[x₀ | x₀ + σε = x].
    Cheap, yet non-linear in x and σ. Counts its calls in ``sigmas``."""

    means = torch.tensor([-1.2, 0.3, 1.5], dtype=F64)
    log_weights = torch.tensor([0.3, 0.5, 0.2], dtype=F64).log()
    var = 0.05

    def __init__(self):
        self.sigmas: list[float] = []

    def __call__(self, x, sigma, **_):
        self.sigmas.append(float(sigma[0]))
        s2 = sigma.to(F64).reshape(-1, 1, 1, 1, 1) ** 2
        xk, mu = x[..., None], self.means
        total = self.var + s2
        log_r = self.log_weights - 0.5 * total.log() - (xk - mu) ** 2 / (2 * total)
        posterior_means = mu + self.var / total * (xk - mu)
        return (log_r.softmax(-1) * posterior_means).sum(-1)


class Draws:
    """A deterministic ``noise_sampler``: the next N(0, I) draw of a seeded generator at every call."""

    def __init__(self, seed=0, shape=SHAPE):
        self.generator, self.shape, self.calls = torch.Generator().manual_seed(seed), shape, 0

    def __call__(self, sigma=None, sigma_next=None):
        self.calls += 1
        return torch.randn(self.shape, generator=self.generator, dtype=F64)


class TorchWithDraws:
    """k-diffusion's module-level ``torch`` with randn_like taken from ``Draws`` (how A1111 injects its noise)."""

    def __init__(self, draws):
        self.draws = draws

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn_like(self, x):
        return self.draws()


def start(sigmas, seed=1):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=F64) * sigmas[0]


KARRAS = ks.get_sigmas_karras(12, 0.0291675, 14.614642).to(F64)

CASES = [  # (sdlite function, k-diffusion function, options)
    (S.sample_euler, ks.sample_euler, {}),
    (S.sample_euler, ks.sample_euler, dict(s_churn=2.0, s_tmin=0.2, s_tmax=8.0, s_noise=1.003)),
    (S.sample_euler_ancestral, ks.sample_euler_ancestral, {}),
    (S.sample_euler_ancestral, ks.sample_euler_ancestral, dict(eta=0.6, s_noise=0.9)),
    (S.sample_heun, ks.sample_heun, {}),
    (S.sample_heun, ks.sample_heun, dict(s_churn=1.0)),
    (S.sample_dpm_2, ks.sample_dpm_2, {}),
    (S.sample_dpm_2, ks.sample_dpm_2, dict(s_churn=1.0, s_tmax=5.0)),
    (S.sample_dpm_2_ancestral, ks.sample_dpm_2_ancestral, {}),
    (S.sample_dpm_2_ancestral, ks.sample_dpm_2_ancestral, dict(eta=0.5)),
    (S.sample_lms, ks.sample_lms, {}),
    (S.sample_lms, ks.sample_lms, dict(order=2)),
    (S.sample_dpmpp_2s_ancestral, ks.sample_dpmpp_2s_ancestral, {}),
    (S.sample_dpmpp_2s_ancestral, ks.sample_dpmpp_2s_ancestral, dict(eta=0.4, s_noise=1.1)),
    (S.sample_dpmpp_sde, ks.sample_dpmpp_sde, {}),
    (S.sample_dpmpp_sde, ks.sample_dpmpp_sde, dict(eta=0.7, r=0.3)),
    (S.sample_dpmpp_2m, ks.sample_dpmpp_2m, {}),
    (S.sample_dpmpp_2m_sde, ks.sample_dpmpp_2m_sde, {}),
    (S.sample_dpmpp_2m_sde, ks.sample_dpmpp_2m_sde, dict(solver_type="heun")),
    (S.sample_dpmpp_2m_sde, ks.sample_dpmpp_2m_sde, dict(eta=0.0, solver_type="heun")),
    (S.sample_dpmpp_3m_sde, ks.sample_dpmpp_3m_sde, {}),
    (S.sample_dpmpp_3m_sde, ks.sample_dpmpp_3m_sde, dict(eta=0.5, s_noise=0.8)),
]


@pytest.mark.parametrize("ours, theirs, options", CASES,
                         ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("schedule", ["karras", "uniform"])
def test_matches_k_diffusion(ours, theirs, options, schedule, monkeypatch):
    sigmas = KARRAS if schedule == "karras" else Denoiser(None, schedule=DiscreteSchedule(dtype=F64)).get_sigmas(9)
    x = start(sigmas)
    takes_noise = "noise_sampler" in inspect.signature(theirs).parameters
    ours_model, theirs_model = Mixture(), Mixture()
    expected_draws, our_draws = Draws(), Draws()
    monkeypatch.setattr(ks, "torch", TorchWithDraws(expected_draws))
    kwargs = dict(noise_sampler=expected_draws) if takes_noise else {}
    expected = theirs(theirs_model, x, sigmas, disable=True, **kwargs, **options)
    monkeypatch.undo()
    got = ours(ours_model, x, sigmas, noise_sampler=our_draws, **options)
    assert rel_err(got, expected) < 1e-12
    assert ours_model.sigmas == pytest.approx(theirs_model.sigmas, rel=1e-12)  # same calls at the same σ
    if takes_noise or options.get("s_churn"):
        assert our_draws.calls == expected_draws.calls
        assert our_draws.calls > 0 or options.get("eta") == 0


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_fast_and_adaptive_match_k_diffusion(eta):
    sigma_min, sigma_max = 0.0291675, 14.614642
    x = start([sigma_max])
    for ours, theirs, extra in ((S.sample_dpm_fast, ks.sample_dpm_fast, dict(n=11)),
                                (S.sample_dpm_fast, ks.sample_dpm_fast, dict(n=9)),
                                (S.sample_dpm_adaptive, ks.sample_dpm_adaptive, dict(rtol=0.02, atol=0.005))):
        ours_model, theirs_model = Mixture(), Mixture()
        expected = theirs(theirs_model, x, sigma_min, sigma_max, disable=True, eta=eta, noise_sampler=Draws(),
                          **extra)
        got = ours(ours_model, x, sigma_min, sigma_max, eta=eta, noise_sampler=Draws(), **extra)
        assert rel_err(got, expected) < 1e-12
        assert len(ours_model.sigmas) == len(theirs_model.sigmas) > 6


def test_dpm_fast_and_adaptive_over_a_sigma_list_use_its_range():
    sigmas = S.get_sigmas("Karras", 10, dtype=F64)
    x = start(sigmas)
    assert torch.equal(S.get_sampler("DPM fast")(Mixture(), x, sigmas, eta=0.0),
                       S.sample_dpm_fast(Mixture(), x, sigmas[-2], sigmas[0], 10))
    assert torch.equal(S.get_sampler("DPM adaptive")(Mixture(), x, sigmas, eta=0.0),
                       S.sample_dpm_adaptive(Mixture(), x, sigmas[-2], sigmas[0]))


def test_brownian_tree_noise_is_k_diffusions():
    x = torch.zeros(SHAPE, dtype=F64)
    for seed in ([7, 8], 123):
        ours = S.BrownianTreeNoiseSampler(x, KARRAS[-2], KARRAS[0], seed=seed)
        theirs = ks.BrownianTreeNoiseSampler(x, KARRAS[-2], KARRAS[0], seed=seed)
        for a, b in ((KARRAS[0], KARRAS[1]), (KARRAS[5], KARRAS[4]), (KARRAS[3], KARRAS[7]), (KARRAS[9], KARRAS[10])):
            assert torch.equal(ours(a, b), theirs(a, b))
    # One tree per seed: an image's noise does not depend on its batch.
    pair = S.BrownianTreeNoiseSampler(x, KARRAS[-2], KARRAS[0], seed=[7, 8])(KARRAS[2], KARRAS[3])
    alone = S.BrownianTreeNoiseSampler(x[1:], KARRAS[-2], KARRAS[0], seed=[8])(KARRAS[2], KARRAS[3])
    assert torch.equal(pair[1:], alone)
    with pytest.raises(ValueError, match="2 seeds for a batch of 1"):
        S.BrownianTreeNoiseSampler(x[:1], KARRAS[-2], KARRAS[0], seed=[1, 2])


@pytest.mark.parametrize("name", ["DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"])
def test_sde_samplers_with_brownian_noise_match_k_diffusion(name):
    sampler = S.get_sampler(name)
    theirs = getattr(ks, {"DPM++ SDE": "sample_dpmpp_sde", "DPM++ 3M SDE": "sample_dpmpp_3m_sde"}
                     .get(name, "sample_dpmpp_2m_sde"))
    x = start(KARRAS)

    def tree(module):
        return module.BrownianTreeNoiseSampler(x, KARRAS[-2], KARRAS[0], seed=[5, 6])

    options = {k: v for k, v in sampler.options.items() if k in inspect.signature(theirs).parameters}
    expected = theirs(Mixture(), x, KARRAS, disable=True, noise_sampler=tree(ks), **options)
    assert rel_err(sampler(Mixture(), x, KARRAS, noise_sampler=tree(S)), expected) < 1e-12
    # Without a noise sampler they draw from an unseeded tree.
    assert not torch.equal(sampler(Mixture(), x, KARRAS), sampler(Mixture(), x, KARRAS))


@torch.no_grad()
@pytest.mark.parametrize("ours, theirs, brownian", [
    (S.sample_euler_ancestral, ks.sample_euler_ancestral, False), (S.sample_heun, ks.sample_heun, False),
    (S.sample_lms, ks.sample_lms, False), (S.sample_dpmpp_2m, ks.sample_dpmpp_2m, False),
    (S.sample_dpmpp_sde, ks.sample_dpmpp_sde, True), (S.sample_dpmpp_3m_sde, ks.sample_dpmpp_3m_sde, True)])
def test_tiny_unet_through_denoiser_matches_compvis_denoiser(ours, theirs, brownian):
    unet = tiny_unet(5)
    ac = ldm_alphas_cumprod(F64)
    denoiser = Denoiser(unet, "eps", DiscreteSchedule(ac, dtype=F64))
    reference = kext.CompVisDenoiser(LDMAdapter(unet, ac))
    sigmas = reference.get_sigmas(5).to(F64)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=F64) * sigmas[0]
    context = torch.randn(2, 7, 32, generator=g, dtype=F64)

    def noise(module):
        if brownian:
            return module.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=[1, 2])
        return Draws(3, x.shape)

    options = dict(noise_sampler=noise(ks)) if "noise_sampler" in inspect.signature(theirs).parameters else {}
    expected = theirs(reference, x, sigmas, extra_args={"cond": context}, disable=True, **options)
    got = ours(denoiser, x, sigmas, extra_args={"context": context}, noise_sampler=noise(S))
    assert rel_err(got, expected) < 1e-12


# --- the timestep samplers against diffusers -------------------------------------------------------------------

class EpsModel:
    """An ε-predicting "UNet" at integer timesteps: the ε that the Mixture denoiser implies, on VP inputs."""

    def __init__(self, alphas_cumprod):
        self.ac, self.mixture, self.timesteps = alphas_cumprod.to(F64), Mixture(), []

    def __call__(self, x_vp, t, **_):
        t = torch.as_tensor(t, dtype=F64).reshape(-1)
        assert torch.all((t - t.round()).abs() < 1e-6), t  # σ reached the UNet as its own training timestep
        self.timesteps.append(int(t[0].round()))
        a = self.ac[t.round().long()].reshape(-1, 1, 1, 1)
        sigma = ((1 - a) / a) ** 0.5
        x = x_vp / a**0.5
        return (x - self.mixture(x, sigma.reshape(-1))) / sigma


def diffusers_loop(scheduler, model, x_vp, stop=None, **step_kwargs):
    for t in scheduler.timesteps[:stop]:
        kwargs = {k: v() if callable(v) else v for k, v in step_kwargs.items()}
        x_vp = scheduler.step(model(x_vp, t), t, x_vp, **kwargs).prev_sample
    return x_vp


def ours_from_vp(sampler, denoiser, noise, sigmas, **options):
    """Run a σ-space sampler from VP noise and return the VP latent at the last σ."""
    x = sampler(denoiser, noise * (1 + sigmas[0] ** 2) ** 0.5, sigmas, **options)
    return x / (1 + sigmas[-1] ** 2) ** 0.5


def in_float64(scheduler):
    """Let diffusers compute its coefficients in float64 too (its ᾱ are float32), so that any difference shows."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(F64)
    scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod).to(F64)
    return scheduler


def table_sigmas(scheduler, timesteps):
    return (((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5)[timesteps].to(F64)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers(eta):
    scheduler = in_float64(DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False))
    scheduler.set_timesteps(10)
    model = EpsModel(scheduler.alphas_cumprod)
    denoiser = Denoiser(model, schedule=DiscreteSchedule(scheduler.alphas_cumprod, dtype=F64))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=F64)
    expected = diffusers_loop(scheduler, model, noise, eta=eta, variance_noise=Draws(4))
    sigmas = torch.cat([table_sigmas(scheduler, scheduler.timesteps), table_sigmas(scheduler, [0])])
    got = ours_from_vp(S.sample_ddim, denoiser, noise, sigmas, eta=eta, noise_sampler=Draws(4))
    assert rel_err(got, expected) < 1e-12


def test_plms_matches_diffusers_pndm():
    scheduler = in_float64(PNDMScheduler(**SD, steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False))
    scheduler.set_timesteps(10)
    model = EpsModel(scheduler.alphas_cumprod)
    denoiser = Denoiser(model, schedule=DiscreteSchedule(scheduler.alphas_cumprod, dtype=F64))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=F64)
    expected = diffusers_loop(scheduler, model, noise)
    timesteps = sorted(set(scheduler.timesteps.tolist()), reverse=True)
    sigmas = torch.cat([table_sigmas(scheduler, timesteps), table_sigmas(scheduler, [0])])
    calls = len(model.timesteps)
    got = ours_from_vp(S.sample_plms, denoiser, noise, sigmas)
    assert rel_err(got, expected) < 1e-12
    assert model.timesteps[calls:] == model.timesteps[:calls]  # the same model calls, Heun's extra one included


@pytest.mark.parametrize("variant, final, order, lower_order_final", [
    ("bh1", "sigma_min", 3, True), ("bh2", "zero", 3, True), ("bh2", "sigma_min", 2, True),
    ("bh1", "sigma_min", 3, False)])
def test_unipc_matches_diffusers(variant, final, order, lower_order_final):
    scheduler = UniPCMultistepScheduler(**SD, solver_order=order, solver_type=variant, final_sigmas_type=final,
                                        lower_order_final=lower_order_final, timestep_spacing="linspace")
    scheduler.set_timesteps(8)
    scheduler.sigmas = scheduler.sigmas.to(F64)  # diffusers would otherwise solve for the coefficients in float32
    model = EpsModel(scheduler.alphas_cumprod)
    denoiser = Denoiser(model, schedule=DiscreteSchedule(scheduler.alphas_cumprod))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=F64)
    expected = diffusers_loop(scheduler, model, noise)
    got = ours_from_vp(S.sample_unipc, denoiser, noise, scheduler.sigmas, order=order, variant=variant,
                       lower_order_final=lower_order_final)
    assert rel_err(got, expected) < 1e-12
    assert len(model.timesteps) == 2 * 8  # one model call per step


def test_lcm_matches_diffusers_on_the_same_timesteps():
    """sdlite follows A1111, whose LCM denoiser applies c_skip to x instead of the VP sample; c_skip ≤ 7e-6 on these
    timesteps, so the results agree to 6e-8 here (test_denoiser measures the denoiser itself)."""
    scheduler = in_float64(LCMScheduler(**SD))
    scheduler.set_timesteps(timesteps=[999, 679, 339, 19])
    model = EpsModel(scheduler.alphas_cumprod)
    denoiser = LCMDenoiser(model, schedule=LCMSchedule(DiscreteSchedule(scheduler.alphas_cumprod, dtype=F64)))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6), dtype=F64)
    expected = diffusers_loop(scheduler, model, noise, generator=torch.Generator().manual_seed(9))
    sigmas = torch.cat([table_sigmas(scheduler, scheduler.timesteps), torch.zeros(1, dtype=F64)])
    draws = Draws(9)
    got = ours_from_vp(S.sample_lcm, denoiser, noise, sigmas, noise_sampler=draws)
    assert rel_err(got, expected) < 1e-7 and draws.calls == 3  # measured 6.0e-8: the c_skip formula, not rounding


# --- Restart ----------------------------------------------------------------------------------------------------

def test_restart_without_segments_is_heun():
    """Restart is Heun's method plus restart segments; below 20 steps A1111 adds none."""
    for sigmas, options in ((KARRAS, {}), (S.get_sigmas("Karras", 24, dtype=F64), dict(restart_list={}))):
        x = start(sigmas)
        expected = ks.sample_heun(Mixture(), x, sigmas, disable=True)
        assert rel_err(S.sample_restart(Mixture(), x, sigmas, noise_sampler=Draws(), **options), expected) < 1e-12


def test_restart_follows_xu_et_al_as_a1111_parameterises_it():
    """20 steps: the main grid is Karras with 20 − 9 = 11 steps; on reaching the σ nearest 0.1 the sampler jumps
    back to the σ nearest 2 by adding noise of variance σ_hi² − σ_lo² (the forward process) and re-solves that
    stretch backwards with a Karras grid of 10 σ (9 Heun steps), once; then it finishes the main grid."""
    sigmas = S.get_sigmas("Karras", 20, dtype=F64)
    main = ks.get_sigmas_karras(11, float(sigmas[-2]), float(sigmas[0])).to(F64)
    lo, hi = int((main - 0.1).abs().argmin()), int((main - 2).abs().argmin())
    segment = ks.get_sigmas_karras(10, float(main[lo]), float(main[hi])).to(F64)[:-1]
    pairs = list(zip(main[:lo], main[1:lo + 1])) + list(zip(segment[:-1], segment[1:])) + \
        list(zip(main[lo:-1], main[lo + 1:]))
    x = start(sigmas)
    # The definition, spelled out: Heun steps over the pairs, one forward noise jump where σ goes up.
    draws, model, expected = Draws(8), Mixture(), x
    for k, (s, s_next) in enumerate(pairs):
        if k and pairs[k - 1][1] < s:
            expected = expected + draws() * (s**2 - pairs[k - 1][1] ** 2) ** 0.5
        expected = ks.sample_heun(model, expected, torch.stack([s, s_next]), disable=True)
    recorder = Mixture()
    got = S.sample_restart(recorder, x, sigmas, noise_sampler=Draws(8))
    assert rel_err(got, expected) < 1e-12 and draws.calls == 1
    assert recorder.sigmas == pytest.approx(model.sigmas, rel=1e-12) and len(recorder.sigmas) == 2 * 20 - 1
    # Deterministic given the noise; the noise matters only through the restart jump.
    assert torch.equal(S.sample_restart(Mixture(), x, sigmas, noise_sampler=Draws(8)), got)
    assert not torch.equal(S.sample_restart(Mixture(), x, sigmas, noise_sampler=Draws(9)), got)


# --- the sampler table and A1111's wiring -----------------------------------------------------------------------

A1111 = {  # name: (what "Automatic" means, noise, discard penultimate σ, second order) — A1111 1.10's tables
    "DPM++ 2M": ("Karras", "none", False, False), "DPM++ SDE": ("Karras", "brownian", False, True),
    "DPM++ 2M SDE": ("Exponential", "brownian", False, False),
    "DPM++ 2M SDE Heun": ("Exponential", "brownian", False, False),
    "DPM++ 2S a": ("Karras", "ancestral", False, True), "DPM++ 3M SDE": ("Exponential", "brownian", True, False),
    "Euler a": ("Uniform", "ancestral", False, False), "Euler": ("Uniform", "none", False, False),
    "LMS": ("Uniform", "none", False, False), "Heun": ("Uniform", "none", False, True),
    "DPM2": ("Karras", "none", True, True), "DPM2 a": ("Karras", "ancestral", True, True),
    "DPM fast": ("Uniform", "ancestral", False, False), "DPM adaptive": ("Uniform", "ancestral", False, False),
    "Restart": ("Karras", "ancestral", False, True), "DDIM": ("Uniform", "ancestral", False, False),
    "PLMS": ("Uniform", "none", False, False), "UniPC": ("Uniform", "none", False, False),
    "LCM": ("Uniform", "ancestral", False, False),
}


def test_table_is_a1111s():
    assert set(S.SAMPLER_NAMES) == set(A1111)
    for name, (schedule, noise, discard, second_order) in A1111.items():
        entry = S.get_sampler(name)
        assert (entry.schedule, entry.noise, entry.discard_penultimate_sigma, entry.second_order) == \
            (schedule, noise, discard, second_order), name
    assert S.get_sampler("DPM++ 2M SDE Heun").options["solver_type"] == "heun"
    assert S.get_sampler("Euler a").options["eta"] == 1.0 and S.get_sampler("DDIM").options["eta"] == 0.0
    assert S.get_sampler("DPM fast").options["eta"] == 1.0  # A1111 passes its ancestral η to every sampler taking one
    assert S.get_sampler("LCM").lcm and isinstance(S.get_sampler("LCM").make_denoiser(None), LCMDenoiser)
    assert {s.name for s in S.SAMPLERS if s.grid in ("compvis", "unipc")} == {"DDIM", "PLMS", "UniPC"}


def test_names():
    assert S.parse_sampler_name("DPM++ 2M Karras") == ("DPM++ 2M", "Karras")
    assert S.parse_sampler_name("DPM++ 2M SDE Heun Exponential") == ("DPM++ 2M SDE Heun", "Exponential")
    assert S.parse_sampler_name("dpm2 a  karras") == ("DPM2 a", "Karras")
    assert S.parse_sampler_name("Euler a") == ("Euler a", "Automatic")
    assert S.parse_sampler_name("k_dpmpp_2m") == ("DPM++ 2M", "Automatic")
    assert S.parse_sampler_name("Euler SGMUniform") == ("Euler", "SGM Uniform")
    assert S.parse_sampler_name("DDIM") == ("DDIM", "Automatic")
    assert S.get_sampler("DPM++ SDE Karras").function is S.sample_dpmpp_sde
    assert S.get_sampler("LMS Karras").schedule == "Karras" and S.get_sampler("LMS").schedule == "Uniform"
    for bad in ("Euler z", "DPM++ 2M Karrass", "", None):
        with pytest.raises(ValueError, match="Euler a, Euler, LMS"):
            S.get_sampler(bad)


def test_sampler_defaults_are_applied():
    x = start(KARRAS)
    tree = lambda: S.BrownianTreeNoiseSampler(x, KARRAS[-2], KARRAS[0], seed=3)  # noqa: E731
    assert torch.equal(S.get_sampler("DPM++ 2M SDE Heun")(Mixture(), x, KARRAS, noise_sampler=tree()),
                       S.sample_dpmpp_2m_sde(Mixture(), x, KARRAS, noise_sampler=tree(), solver_type="heun"))


def test_automatic_schedules_and_discarded_sigma():
    denoiser = Denoiser(None)
    assert torch.equal(S.get_sampler("DPM++ 2M").get_sigmas(8, denoiser=denoiser), S.get_sigmas("Karras", 8))
    assert torch.equal(S.get_sampler("Euler").get_sigmas(8, denoiser=denoiser), denoiser.get_sigmas(8))
    assert torch.equal(S.get_sampler("Euler").get_sigmas(8, "Exponential"), S.get_sigmas("Exponential", 8))
    nine = S.get_sigmas("Karras", 9)
    dpm2 = S.get_sampler("DPM2").get_sigmas(8)
    assert len(dpm2) == 9 and torch.equal(dpm2, torch.cat([nine[:-2], nine[-1:]]))
    assert torch.equal(S.get_sampler("DDIM").get_sigmas(10, "Karras"), S.compvis_sigmas(10))
    assert len(S.get_sampler("UniPC").get_sigmas(10)) == 11
    assert torch.equal(S.get_sampler("LCM").get_sigmas(4, denoiser=denoiser), LCMSchedule().get_sigmas(4))


def test_get_sampler_and_sigmas_img2img_and_brownian_wiring():
    denoiser = Denoiser(None, schedule=DiscreteSchedule(dtype=F64))
    sp = S.get_sampler_and_sigmas("Euler a", "Karras", 10, 6, denoiser, dtype=F64)
    sigmas = sp.sigmas
    assert torch.equal(sigmas, S.get_sigmas("Karras", 10, denoiser=denoiser, dtype=F64)[4:]) and len(sigmas) == 7
    assert sp.options == {"eta": 1.0, "s_noise": 1.0} and sp.sampler is S.get_sampler("Euler a")
    assert sp.steps == 6 and sp.model_calls == 6 and torch.equal(sp.grid, sigmas) and sp.schedule.label == "Karras"
    x = start(sigmas)
    noise = lambda s, t: torch.ones_like(x)  # noqa: E731
    assert torch.equal(sp(Mixture(), x, noise_sampler=noise),
                       S.sample_euler_ancestral(Mixture(), x, sigmas, noise_sampler=noise))
    sp = S.get_sampler_and_sigmas("DPM++ 2M SDE", "Automatic", 10, 6, denoiser, seeds=[11, 12], dtype=F64, eta=0.5)
    sigmas = sp.sigmas
    full, x = S.get_sigmas("Exponential", 10, denoiser=denoiser, dtype=F64), start(sigmas)
    assert sp.options == {"eta": 0.5, "s_noise": 1.0} and sp.schedule.label == "Exponential"
    tree = S.BrownianTreeNoiseSampler(x, full[-2], full[0], seed=[11, 12])  # over the whole schedule, as A1111
    assert torch.equal(sp(Mixture(), x, noise_sampler=noise),  # the tree, not the ancestral noise
                       S.sample_dpmpp_2m_sde(Mixture(), x, sigmas, noise_sampler=tree, eta=0.5))
    assert S.get_sampler_and_sigmas("DPM++ SDE", steps=10, run_steps=6).model_calls == 12
    sp = S.get_sampler_and_sigmas("DPM++ 2M Karras", "Exponential", 10, denoiser=denoiser, dtype=F64)
    assert torch.equal(sp.sigmas, S.get_sigmas("Karras", 10, denoiser=denoiser, dtype=F64))  # the name's suffix wins
    with pytest.raises(ValueError, match="Karras"):
        S.get_sampler_and_sigmas("Euler", "Karrass", 10)


def test_get_sampler_and_sigmas_reproduces_a1111_ddim():
    """A1111's DDIM (CompVis sampler): timesteps 1, 101, …, 901 for 10 steps, txt2img from VP noise at 901, nine
    steps down to timestep 1, the VP latent returned; img2img noised to timesteps[t_enc], sampled over
    timesteps[:t_enc]. Checked against diffusers' DDIM steps over the same timesteps."""
    scheduler = in_float64(DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False))
    scheduler.set_timesteps(10)
    model = EpsModel(scheduler.alphas_cumprod)
    denoiser = Denoiser(model, schedule=DiscreteSchedule(scheduler.alphas_cumprod, dtype=F64))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=F64)
    sp = S.get_sampler_and_sigmas("DDIM", "Karras", 10, denoiser=denoiser, dtype=F64)
    got = sp(denoiser, noise * sp.sigmas[0])
    assert rel_err(got, diffusers_loop(scheduler, model, noise, stop=-1)) < 1e-12

    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8), dtype=F64)
    t_enc = 6  # denoising strength 0.6
    sp = S.get_sampler_and_sigmas("DDIM", "Automatic", 10, t_enc + 1, denoiser, dtype=F64)
    a = scheduler.alphas_cumprod[scheduler.timesteps[-1 - t_enc]].to(F64)
    scheduler.set_timesteps(10)
    x_vp = x0 * a**0.5 + noise * (1 - a) ** 0.5
    expected = x_vp
    for t in scheduler.timesteps[-t_enc:-1]:
        expected = scheduler.step(model(expected, t), t, expected).prev_sample
    assert rel_err(sp(denoiser, x0 + noise * sp.sigmas[0]), expected) < 1e-12
    assert len(sp.grid) == t_enc and torch.equal(sp.grid, sp.sigmas[1:])  # the sampler runs below its start


def test_get_sampler_and_sigmas_reproduces_a1111_unipc():
    """A1111's UniPC for 26 steps: len(timesteps(26)) = 27 UniPC steps over model times evenly spaced from 999 to 0,
    here all integers (999 = 27·37), from VP noise, ending at timestep 0 with the VP latent — the same run as
    diffusers' UniPC (order 3, bh1, "linspace", final σ of timestep 0) for 27 steps."""
    scheduler = UniPCMultistepScheduler(**SD, solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min",
                                        timestep_spacing="linspace")
    scheduler.set_timesteps(27)
    ac = scheduler.alphas_cumprod.to(F64)
    table = ((1 - ac) / ac) ** 0.5
    assert scheduler.timesteps.tolist() == list(range(999, 0, -37))
    scheduler.sigmas = torch.cat([table[scheduler.timesteps], table[:1]])
    model = EpsModel(ac)
    denoiser = Denoiser(model, schedule=DiscreteSchedule(ac, dtype=F64))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9), dtype=F64)
    sp = S.get_sampler_and_sigmas("UniPC", "Automatic", 26, denoiser=denoiser, dtype=F64)
    assert len(sp.sigmas) == 28 and sp.schedule is None
    assert rel_err(sp(denoiser, noise * sp.sigmas[0]), diffusers_loop(scheduler, model, noise)) < 1e-12
