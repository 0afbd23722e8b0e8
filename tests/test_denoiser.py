"""The discrete schedule and the ε/v/LCM denoiser wrappers against k-diffusion's DiscreteSchedule and
CompVisDenoiser / CompVisVDenoiser (and, for LCM, diffusers' LCMScheduler boundary condition)."""

from __future__ import annotations

import k_diffusion.external as kext
import pytest
import torch
from diffusers import LCMScheduler

from sdlite.schedulers import Denoiser, DiscreteSchedule, LCMDenoiser, LCMSchedule, scaled_linear_alphas_cumprod
from sdlite.unet import UNetConfig, UNetModel

from conftest import randomize_, rel_err

TINY = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1),
            transformer_depth=(1, 1), transformer_depth_output=(1, 1, 1, 1), transformer_depth_middle=1,
            context_dim=32, use_linear_in_transformer=True, head_dim=32)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(seed: int = 0) -> UNetModel:
    """A randomised two-level sdlite UNet in float64: cheap, but a real, non-linear function of x, t and context."""
    return randomize_(UNetModel(UNetConfig(**TINY)), seed).double().eval()


def ldm_alphas_cumprod(dtype=torch.float32) -> torch.Tensor:
    """ᾱ as ldm computes it (float64 β, cumulative product) and A1111 stores it (float32 by default)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).to(dtype)


class LDMAdapter(torch.nn.Module):
    """What k-diffusion's CompVis wrappers expect: ``alphas_cumprod`` and ``apply_model(x, t, cond)``."""

    def __init__(self, unet, alphas_cumprod):
        super().__init__()
        self.unet = unet
        self.register_buffer("alphas_cumprod", alphas_cumprod)

    def apply_model(self, x, t, cond):
        return self.unet(x, t, cond)


def test_default_table_is_the_ldm_a1111_table():
    ours = DiscreteSchedule()
    ref = kext.DiscreteEpsDDPMDenoiser(None, ldm_alphas_cumprod(), quantize=False)
    assert torch.equal(ours.sigmas, ref.sigmas) and ours.sigmas.dtype == torch.float32
    assert torch.equal(scaled_linear_alphas_cumprod().float(), ldm_alphas_cumprod())
    assert ours.sigma_min == ref.sigma_min and ours.sigma_max == ref.sigma_max
    assert abs(float(ours.sigma_min) - 0.0291675) < 1e-6 and abs(float(ours.sigma_max) - 14.614642) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigma_to_t_and_back_match_k_diffusion(dtype):
    ours = DiscreteSchedule(ldm_alphas_cumprod(dtype), dtype=dtype)
    ref = kext.DiscreteEpsDDPMDenoiser(None, ldm_alphas_cumprod(dtype), quantize=False)
    g = torch.Generator().manual_seed(0)
    # In range, outside it (clamped) and exactly on table entries.
    sigma = torch.cat([torch.exp(torch.empty(200, dtype=dtype).uniform_(-4, 3, generator=g)),
                       torch.tensor([1e-3, 40.0], dtype=dtype), ours.sigmas[::97]])
    t = ours.sigma_to_t(sigma)
    assert t.shape == sigma.shape and t.dtype == dtype
    assert torch.allclose(t, ref.sigma_to_t(sigma), rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    # k-diffusion casts t to float32 in t_to_sigma; compare on float32-representable timesteps.
    t32 = torch.empty(300).uniform_(0, 999, generator=g).to(dtype)
    assert rel_err(ours.t_to_sigma(t32), ref.t_to_sigma(t32)) < (1e-12 if dtype == torch.float64 else 1e-7)
    # Round trips.
    inside = sigma[(sigma >= ours.sigma_min) & (sigma <= ours.sigma_max)]
    assert rel_err(ours.t_to_sigma(ours.sigma_to_t(inside)), inside) < (1e-12 if dtype == torch.float64 else 1e-6)
    assert torch.allclose(ours.sigma_to_t(ours.t_to_sigma(t32)), t32, rtol=0,
                          atol=1e-12 if dtype == torch.float64 else 1e-3)
    assert torch.equal(ours.sigma_to_t(ours.sigmas[::97]), torch.arange(0, 1000, 97, dtype=dtype))


def test_quantized_and_get_sigmas_match_k_diffusion():
    ours = DiscreteSchedule(quantize=True)
    ref = kext.DiscreteEpsDDPMDenoiser(None, ldm_alphas_cumprod(), quantize=True)
    sigma = torch.exp(torch.linspace(-3.5, 2.6, 101))
    assert torch.equal(ours.sigma_to_t(sigma), ref.sigma_to_t(sigma))
    for n in (1, 2, 7, 20, 50):
        assert torch.equal(ours.get_sigmas(n), ref.get_sigmas(n))
        assert ours.get_sigmas(n)[-1] == 0 and len(ours.get_sigmas(n)) == n + 1


@torch.no_grad()
@pytest.mark.parametrize("prediction, reference", [("eps", kext.CompVisDenoiser), ("v", kext.CompVisVDenoiser)])
def test_parameterisations_match_k_diffusion(prediction, reference):
    unet = tiny_unet(1)
    ac = ldm_alphas_cumprod(torch.float64)
    ours = Denoiser(unet, prediction, DiscreteSchedule(ac, dtype=torch.float64))
    ref = reference(LDMAdapter(unet, ac))
    g = torch.Generator().manual_seed(2)
    sigma = torch.tensor([14.6, 3.1, 0.7, 0.03], dtype=torch.float64)
    x = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64) * sigma[:, None, None, None]
    context = torch.randn(4, 7, 32, generator=g, dtype=torch.float64)
    expected = ref(x, sigma, cond=context)
    assert rel_err(ours(x, sigma, context=context), expected) < 1e-12
    # A scalar σ is broadcast over the batch.
    assert rel_err(ours(x, sigma[1], context=context), ref(x, sigma[1].expand(4), cond=context)) < 1e-12


def test_unet_kwargs_pass_through_and_bad_prediction_is_refused():
    seen = {}

    def unet(x, t, **kwargs):
        seen.update(kwargs, t=t)
        return torch.zeros_like(x)

    x = torch.ones(2, 4, 2, 2)
    out = Denoiser(unet)(x, torch.tensor([1.0, 2.0]), context="c", y="y", control=["r"])
    assert torch.equal(out, x)  # ε = 0: nothing to remove
    assert seen["context"] == "c" and seen["y"] == "y" and seen["control"] == ["r"] and seen["t"].shape == (2,)
    with pytest.raises(ValueError, match="eps"):
        Denoiser(unet, "x0")


def test_lcm_schedule_is_a1111s():
    """A1111's LCMCompVisDenoiser: the 50 σ of timesteps 19, 39, …, 999; σ → nearest grid timestep;
    timestep → interpolation over the grid index (t − 19)/20; get_sigmas spaced evenly from 999 to 19."""
    base = DiscreteSchedule()
    lcm = LCMSchedule(base)
    grid = torch.arange(19, 1000, 20)
    assert torch.equal(lcm.sigmas, base.sigmas[grid])
    assert torch.equal(lcm.sigma_to_t(base.sigmas[grid]), grid)
    probe = base.sigmas[[0, 25, 28, 30, 500, 999]]
    nearest = (probe.log()[:, None] - lcm.sigmas.log()[None]).abs().argmin(dim=1)
    assert torch.equal(lcm.sigma_to_t(probe), grid[nearest])
    assert lcm.sigma_to_t(probe)[0] == 19 and lcm.sigma_to_t(probe)[-1] == 999
    n = 4
    index = (torch.linspace(999, 19, n) - 19) / 20
    lo, frac = index.floor().long(), index - index.floor()
    expected = torch.exp((1 - frac) * lcm.log_sigmas[lo] + frac * lcm.log_sigmas[(lo + 1).clamp(max=49)])
    assert torch.allclose(lcm.get_sigmas(n)[:-1], expected, rtol=1e-6) and lcm.get_sigmas(n)[-1] == 0


@torch.no_grad()
def test_lcm_denoiser_boundary_condition_matches_diffusers():
    """D = c_out·x̂₀ + c_skip·x with diffusers' scalings at the same timestep. diffusers multiplies c_skip with the
    VP sample, A1111 (and sdlite) with x: the test measures that this changes D by less than 1e-6."""
    unet = tiny_unet(3)
    ac = ldm_alphas_cumprod(torch.float64)
    ours = LCMDenoiser(unet, schedule=LCMSchedule(DiscreteSchedule(ac, dtype=torch.float64)))
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    timesteps = torch.tensor([999, 679, 339, 19])
    sigma = ((1 - ac[timesteps]) / ac[timesteps]) ** 0.5
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64) * sigma[:, None, None, None]
    context = torch.randn(4, 5, 32, generator=g, dtype=torch.float64)
    got = ours(x, sigma, context=context)
    s = sigma[:, None, None, None]
    x_vp = x / (1 + s**2) ** 0.5
    eps = unet(x_vp, timesteps.double(), context)
    x0 = x - s * eps
    c_skip, c_out = zip(*[scheduler.get_scalings_for_boundary_condition_discrete(int(t)) for t in timesteps])
    c_skip = torch.tensor(c_skip, dtype=torch.float64)[:, None, None, None]
    c_out = torch.tensor(c_out, dtype=torch.float64)[:, None, None, None]
    assert rel_err(got, c_out * x0 + c_skip * x) < 1e-12
    assert rel_err(got, c_out * x0 + c_skip * x_vp) < 1e-6


def test_default_sigmas_are_k_diffusions():
    """denoiser.get_sigmas(n) is A1111's "Automatic"/"Uniform" schedule: k-diffusion's own get_sigmas."""
    ref = kext.CompVisDenoiser(LDMAdapter(None, ldm_alphas_cumprod()))
    for n in (1, 3, 20, 37):
        assert torch.equal(Denoiser(None).get_sigmas(n), ref.get_sigmas(n))
