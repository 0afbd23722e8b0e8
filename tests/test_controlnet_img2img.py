"""ControlNet through img2img (the "StableDiffusionControlNetImg2ImgPipeline" case: a QR code or pattern as control
image, a different init image) against the same pipeline assembled by hand from k-diffusion, and annotator
preprocessors found through ``pipe.annotator_dirs``."""

from __future__ import annotations

import k_diffusion.external as kext
import k_diffusion.sampling as ks
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sdlite
import sdlite.adapters.annotators as ann
from sdlite.adapters.annotators.edges import LineartGenerator
from sdlite.adapters.controlnet import create_from_unet

from conftest import randomize_, rel_err
from sdfiles import build, open_clip_tokens


class ControlledLDM(torch.nn.Module):
    """apply_model(x, t, cond) for k-diffusion's CompVisDenoiser: the ControlNet's residuals (× weight) fed to the
    UNet, with the hint repeated over the CFG batch."""

    def __init__(self, unet, net, hint, weight):
        super().__init__()
        self.unet, self.net, self.hint, self.weight = unet, net, hint, weight
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())

    def apply_model(self, x, t, cond):
        control = [r * self.weight for r in self.net(x, self.hint.expand(x.shape[0], -1, -1, -1), t, cond)]
        return self.unet(x, t, cond, control=control)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    b = build("sd1", seed=7)
    path = tmp_path_factory.mktemp("sd1") / "tiny-sd1.safetensors"
    save_file(b.state, str(path))
    return sdlite.load(path), b


def qr_like(size=64, cell=8, seed=3):
    bits = np.random.default_rng(seed).integers(0, 2, (size // cell, size // cell), dtype=np.uint8) * 255
    return Image.fromarray(np.kron(bits, np.ones((cell, cell), np.uint8))).convert("RGB")


def test_controlnet_img2img_matches_by_hand(sd1):
    pipe, b = sd1
    net = randomize_(create_from_unet(pipe.unet), 11)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    control = qr_like()
    steps, strength, seed, cfg, weight = 4, 0.5, 21, 6.0, 0.8
    result = pipe.img2img(init, "a qr code made of flowers", "blurry", strength=strength, steps=steps,
                          width=64, height=64, sampler="Euler", seed=seed, cfg_scale=cfg,
                          controlnets=[sdlite.ControlUnit(net, control, weight=weight)])

    # by hand: A1111's img2img (the last int(strength·steps)+1 steps, init latent + noise·sigma) with k-diffusion
    tokens = open_clip_tokens(["a qr code made of flowers", "blurry"])
    tokens[tokens == 0] = 49407
    hint = torch.from_numpy(np.asarray(control, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        ctx = b.clip(tokens).last_hidden_state
        pixels = torch.from_numpy(np.asarray(init, dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
        latent = pipe.vae.encode(pixels).sample(torch.Generator().manual_seed(seed)) * pipe.vae.scale_factor
    wrapped = kext.CompVisDenoiser(ControlledLDM(pipe.unet, net, hint, weight))
    t_enc = int(strength * steps)
    sigmas = wrapped.get_sigmas(steps)[steps - t_enc - 1:]
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))

    def model(x, sigma, **_):
        c, u = wrapped(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=ctx).chunk(2)
        return u + (c - u) * cfg

    with torch.no_grad():
        expected = ks.sample_euler(model, latent + noise * sigmas[0], sigmas, disable=True)
    assert rel_err(result.latents, expected) < 1e-4

    # the control image matters, and it is not the init image
    plain = pipe.img2img(init, "a qr code made of flowers", "blurry", strength=strength, steps=steps, width=64,
                         height=64, sampler="Euler", seed=seed, cfg_scale=cfg)
    assert rel_err(result.latents, plain.latents) > 1e-3


def test_annotator_preprocessor_found_in_annotator_dirs(sd1, tmp_path):
    pipe = sd1[0]
    net = randomize_(create_from_unet(pipe.unet), 12)
    lineart = randomize_(LineartGenerator(3), 13)
    torch.save(lineart.state_dict(), tmp_path / "sk_model.pth")
    photo = Image.fromarray(np.random.default_rng(5).integers(0, 256, (80, 96, 3), dtype=np.uint8))
    args = dict(width=64, height=64, steps=2, seed=4, sampler="Euler")

    unit = sdlite.ControlUnit(net, photo, preprocessor="lineart_realistic", detect_resolution=64)
    with pytest.raises(FileNotFoundError, match="sk_model.pth"):
        pipe.txt2img("x", controlnets=[unit], **args)
    pipe.annotator_dirs = [tmp_path]
    try:
        found = pipe.txt2img("x", controlnets=[unit], **args).latents
    finally:
        pipe.annotator_dirs = []
    # the same as annotating by hand and giving the map as a ready control image
    lineart_map = ann.annotate("lineart_realistic", np.asarray(photo), ann.load(tmp_path / "sk_model.pth"), 64)
    assert lineart_map.shape == (64, 64, 3)  # the 64-multiple rule: 80x96 at 64 → 64x64 (96·0.8 = 76.8 → 64)
    by_hand = pipe.txt2img("x", controlnets=[sdlite.ControlUnit(net, Image.fromarray(lineart_map))], **args).latents
    assert torch.equal(found, by_hand)
