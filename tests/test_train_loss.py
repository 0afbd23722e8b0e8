"""sdlite.train's denoising loss against diffusers' DDPMScheduler (add_noise, get_velocity, the zero-terminal-SNR
rescale), diffusers.training_utils.compute_snr, and the published min-SNR-γ weights as diffusers' example training
script writes them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale
from diffusers.training_utils import compute_snr
from safetensors.torch import save_file

import sdlite
from sdlite.train import denoising_loss
from sdlite.train.loss import add_noise, min_snr_weight, rescale_zero_terminal_snr, snr, training_alphas, velocity
from sdlite.unet import UNetConfig, UNetModel

from conftest import randomize_, rel_err
from sdfiles import UNETS, build

pytestmark = pytest.mark.usefixtures("one_thread")


def scheduler(prediction="epsilon", zero_snr=False) -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         prediction_type=prediction, rescale_betas_zero_snr=zero_snr)


def data(seed=0, b=4):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 4, 8, 8, generator=g)
    noise = torch.randn(b, 4, 8, 8, generator=g)
    t = torch.tensor([0, 17, 500, 999][:b])
    return x0, noise, t


@pytest.mark.parametrize("zero_snr", [False, True])
def test_forward_process_and_velocity_match_ddpm_scheduler(zero_snr):
    ref = scheduler(zero_snr=zero_snr)
    ac = sdlite.schedulers.scaled_linear_alphas_cumprod()
    if zero_snr:
        ac = rescale_zero_terminal_snr(ac)
    assert rel_err(ac, ref.alphas_cumprod.double()) < 1e-6
    x0, noise, t = data()
    assert rel_err(add_noise(x0, noise, t, ac), ref.add_noise(x0, noise, t)) < 1e-6
    assert rel_err(velocity(x0, noise, t, ac), ref.get_velocity(x0, noise, t)) < 1e-6


def test_zero_terminal_snr_matches_diffusers_rescale():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - diffusers_rescale(betas), 0)
    ours = rescale_zero_terminal_snr(sdlite.schedulers.scaled_linear_alphas_cumprod())
    assert rel_err(ours, expected) < 1e-10
    assert ours[-1] == 0 and ours[0] == pytest.approx(1 - 0.00085)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weights_are_the_published_formulas(prediction):
    ref = scheduler()
    t = torch.arange(0, 1000, 37)
    s = compute_snr(ref, t)
    # diffusers' float32 table: SNR near t=0 divides by 1−ᾱ ≈ 8.5e-4, so float32 rounding shows at 1e-5 there.
    assert rel_err(snr(t, ref.alphas_cumprod), s) < 1e-6
    assert rel_err(snr(t, sdlite.schedulers.scaled_linear_alphas_cumprod()), s) < 1e-4
    gamma = 5.0
    # diffusers' train_text_to_image.py: min(snr, γ)/snr, and for v-prediction min(snr, γ)/(snr + 1).
    clipped = torch.stack([s, gamma * torch.ones_like(s)], dim=1).min(dim=1)[0]
    expected = clipped / (s + 1) if prediction == "v" else clipped / s
    ours = min_snr_weight(t, ref.alphas_cumprod, gamma, prediction)
    assert rel_err(ours, expected) < 1e-6
    if prediction == "eps":  # below γ the ε weight is exactly 1: only the easy (low-noise) timesteps are damped
        assert (ours[s < gamma] == 1).all() and (ours[s > gamma] < 1).all()


def test_min_snr_eps_weight_at_zero_terminal_snr_is_its_limit():
    ac = rescale_zero_terminal_snr(sdlite.schedulers.scaled_linear_alphas_cumprod())
    w = min_snr_weight(torch.tensor([998, 999]), ac, 5.0, "eps")
    assert torch.isfinite(w).all() and w[1] == 1


@pytest.fixture(scope="module")
def unet():
    return randomize_(UNetModel(UNetConfig(**UNETS["sd1"])), 3).eval()


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("gamma", [None, 5.0])
@pytest.mark.parametrize("offset", [0.0, 0.1])
@torch.no_grad()
def test_denoising_loss_matches_reference_step(unet, prediction, gamma, offset):
    """The loss of diffusers' example training scripts: offset noise, add_noise, target, per-sample MSE, min-SNR."""
    ref = scheduler("epsilon" if prediction == "eps" else "v_prediction")
    x0, noise, t = data(1)
    context = torch.randn(4, 77, 128, generator=torch.Generator().manual_seed(2))
    offset_noise = torch.randn(4, 4, 1, 1, generator=torch.Generator().manual_seed(3))

    ref_noise = noise + offset * offset_noise
    noisy = ref.add_noise(x0, ref_noise, t)
    target = ref_noise if prediction == "eps" else ref.get_velocity(x0, ref_noise, t)
    pred = unet(noisy, t, context)
    expected = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
    if gamma is not None:
        s = compute_snr(ref, t)
        clipped = torch.stack([s, gamma * torch.ones_like(s)], dim=1).min(dim=1)[0]
        expected = expected * (clipped / (s + 1) if prediction == "v" else clipped / s)

    ours = denoising_loss(unet, x0, context, noise, t, prediction=prediction, min_snr_gamma=gamma,
                          noise_offset=offset, offset_noise=offset_noise)
    assert ours.shape == (4,)
    assert rel_err(ours, expected) < 1e-5


def test_noise_offset_draws_from_the_generator(unet):
    x0, noise, t = data(1)
    context = torch.zeros(4, 77, 128)
    with torch.no_grad():
        a = denoising_loss(unet, x0, context, noise, t, noise_offset=0.1, generator=torch.Generator().manual_seed(5))
        b = denoising_loss(unet, x0, context, noise, t, noise_offset=0.1, generator=torch.Generator().manual_seed(5))
        c = denoising_loss(unet, x0, context, noise, t)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_schedule_comes_from_the_file_when_it_has_one(tmp_path):
    built = build("sd1", seed=1)
    stored = sdlite.schedulers.scaled_linear_alphas_cumprod().float() * 0.9  # any schedule other than the default
    save_file(built.state | {"alphas_cumprod": stored}, str(tmp_path / "a.safetensors"))
    save_file(built.state, str(tmp_path / "b.safetensors"))
    pipe = sdlite.load(tmp_path / "a.safetensors")
    assert torch.equal(training_alphas(pipe), stored.double())
    assert torch.equal(training_alphas(sdlite.load(tmp_path / "b.safetensors")),
                       sdlite.schedulers.scaled_linear_alphas_cumprod())
    x0, noise, t = data(1)
    context = torch.zeros(4, 77, 128)
    with torch.no_grad():
        from_pipe = denoising_loss(pipe, x0, context, noise, t)
        explicit = denoising_loss(pipe.unet, x0, context, noise, t, alphas_cumprod=stored)
    assert torch.equal(from_pipe, explicit)


def test_bad_shapes_are_refused(unet):
    x0, noise, t = data(1)
    with pytest.raises(ValueError, match="timesteps"):
        denoising_loss(unet, x0, torch.zeros(4, 77, 128), noise, t[:2])
