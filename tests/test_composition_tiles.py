"""MultiDiffusion windows (sdlite.composition.tiles): window placement, the fused denoiser against a direct
implementation of the paper's per-pixel average, one whole-latent window against plain sampling, ControlNet hints
cut per window against a hand-made reference, and diffusers' StableDiffusionPanoramaPipeline with DDIM."""

from __future__ import annotations

import math

import k_diffusion.external as kext
import k_diffusion.sampling as ks
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPanoramaPipeline
from PIL import Image

import sdlite
from sdlite.adapters.controlnet import create_from_unet
from sdlite.composition.tiles import TiledDenoiser, Tiles, WindowBatch

from conftest import randomize_, rel_err
from refpipe import load_reference, write_model
from test_controlnet_img2img import ControlledLDM, qr_like

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiles")
    path, built = write_model(folder, "sd1", seed=41)
    inpaint_path, _ = write_model(folder, "sd1", seed=42, inpaint=True, name="tiny-sd1-inpainting")
    return sdlite.load(path), load_reference(path, built), sdlite.load(inpaint_path)


def test_window_placement():
    tiles = Tiles(size=64, stride=48)
    assert tiles.starts(256) == ([0, 48, 96, 144, 192], 64)  # the stride divides evenly: no extra window
    assert tiles.starts(250) == ([0, 48, 96, 144, 186], 64)  # one more, flush with the far edge
    assert tiles.starts(64) == ([0], 64) and tiles.starts(40) == ([0], 40)
    assert Tiles(size=64, stride=48, circular=True).windows(64, 200) == [(0, s, 64, 64) for s in (0, 48, 96, 144, 192)]
    assert Tiles(8, 4).windows(12, 8) == [(0, 0, 8, 8), (4, 0, 8, 8)]
    for bad in (Tiles(8, 9), Tiles(8, 0), Tiles(8, 4, batch=0), Tiles(8, 4, weights="cosine")):
        with pytest.raises(ValueError):
            bad.check()


def direct_multidiffusion(denoise, x, sigma, context, size, stride, *, gaussian=False, circular=False):
    """The paper's eq. 5 written out: every window on its own, its output times its weight map added to the
    pixels it covers, divided by the summed weights. Windows along the width of a circular image are cut from the
    image rolled left by their start."""
    H, W = x.shape[-2:]

    def starts(n, wrap):
        if n <= size:
            return [0], n
        if wrap:
            return list(range(0, n, stride)), size
        s = list(range(0, n - size + 1, stride))
        return (s + [n - size] if s[-1] + size < n else s), size

    def gauss(n, mid):  # Mixture of Diffusers, var 0.01 (its width midpoint (n−1)/2, height midpoint n/2)
        return [math.exp(-((i - mid) ** 2) / (n * n) / 0.02) / math.sqrt(2 * math.pi * 0.01) for i in range(n)]

    tops, h = starts(H, False)
    lefts, w = starts(W, circular)
    weight = torch.tensor(np.outer(gauss(h, h / 2), gauss(w, (w - 1) / 2)) if gaussian else np.ones((h, w)),
                          dtype=torch.float32)
    value, count = torch.zeros_like(x), torch.zeros(H, W)
    for top in tops:
        for left in lefts:
            rolled = torch.roll(x, -left, dims=-1)
            out = denoise(rolled[..., top:top + h, :w].contiguous(), sigma, context)
            v = torch.zeros_like(x)
            c = torch.zeros(H, W)
            v[..., top:top + h, :w] = out * weight
            c[top:top + h, :w] = weight
            value += torch.roll(v, left, dims=-1)
            count += torch.roll(c, left, dims=-1)
    return value / count


class Toy:
    """A position-dependent stand-in for the denoiser: a 3x3 convolution with zero padding (so window edges
    matter), the context and the σ mixed in; records the windows it is told about."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.kernel = torch.randn(4, 4, 3, 3, generator=g) / 6
        self.seen = []

    def __call__(self, x, sigma, context, y=None, cond_rows=None, windows=None):
        self.seen.append(windows)
        out = torch.nn.functional.conv2d(torch.tanh(x), self.kernel, padding=1)
        return out * sigma.reshape(-1, 1, 1, 1) + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("gaussian, circular, batch", [(False, False, 1), (False, False, 3), (True, False, 2),
                                                       (False, True, 4), (True, True, 5)])
def test_fused_denoiser_is_the_papers_per_pixel_average(gaussian, circular, batch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 20, 45, generator=g)  # two rows and several columns of windows, uneven strides
    sigma, context = torch.rand(4, generator=g) + 0.5, torch.randn(4, 7, 16, generator=g)
    toy = Toy()
    tiles = Tiles(size=12, stride=7, batch=batch, weights="gaussian" if gaussian else "uniform", circular=circular)
    got = TiledDenoiser(toy, tiles)(x, sigma, context=context)
    expected = direct_multidiffusion(lambda a, s, c: toy(a, s, c), x, sigma, context, 12, 7, gaussian=gaussian,
                                     circular=circular)
    assert rel_err(got, expected) < 1e-6
    assert all(len(w.windows) <= batch for w in toy.seen if w is not None)


def test_window_crops_wrap_around():
    t = torch.arange(2 * 3 * 16 * 40, dtype=torch.float32).reshape(2, 3, 16, 40)  # ×2 the latent's 8x20
    windows = WindowBatch(((0, 0, 8, 8), (0, 16, 8, 8)), 8, 20, circular=True)
    crops = windows.crop(t, 4)
    assert torch.equal(crops[:2], t[..., :16, :16])
    assert torch.equal(crops[2:], torch.cat([t[..., :16, 32:], t[..., :16, :8]], dim=-1))


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DDIM"])
def test_one_window_over_the_whole_latent_equals_plain_sampling(sd1, sampler):
    pipe = sd1[0]
    kw = dict(width=64, height=48, steps=3, cfg_scale=5.0, sampler=sampler, seed=9, batch_size=2)
    plain = pipe.txt2img("a lighthouse at dusk", "fog", **kw)
    tiled = pipe.txt2img("a lighthouse at dusk", "fog", tiling=Tiles(size=8, stride=8), **kw)
    assert tiled.latents.shape == (2, 4, 6, 8) and torch.equal(tiled.latents, plain.latents)
    assert "Tile size: 8, Tile stride: 8" in tiled.infotexts[0]


def test_one_window_equals_plain_inpainting_model(sd1):
    """The inpainting UNet's mask and masked-image channels go through the window crop."""
    pipe = sd1[2]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (16, 8, 48, 40))
    kw = dict(width=64, height=48, steps=3, strength=0.8, seed=4, sampler="Euler", mask_blur=0)
    plain = pipe.inpaint(image, mask, "a door", **kw)
    tiled = pipe.inpaint(image, mask, "a door", tiling=Tiles(size=64, stride=48), **kw)
    assert torch.equal(tiled.latents, plain.latents)


def test_controlnet_hint_cut_per_window_matches_by_hand(sd1):
    """Tiled txt2img with a ControlNet unit against k-diffusion's Euler over a model that cuts the latent and the
    hint into the windows itself (CFG inside each window, uniform average)."""
    pipe, ref = sd1[0], sd1[1]
    net = randomize_(create_from_unet(pipe.unet), 12)
    control, weight, cfg = qr_like(size=64).resize((96, 64)), 0.7, 4.0
    result = pipe.txt2img("a maze", "", width=96, height=64, steps=3, sampler="Euler", seed=5, cfg_scale=cfg,
                          tiling=Tiles(size=8, stride=4, batch=2),
                          controlnets=[sdlite.ControlUnit(net, control, weight=weight)])
    hint = torch.from_numpy(np.asarray(control, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    c, u = ref.encode(["a maze"])["context"], ref.encode([""])["context"]

    def denoise(x, sigma):
        total, count = torch.zeros_like(x), torch.zeros(8, 12)
        for left in (0, 4):  # a 8x12 latent: windows of 8 at columns 0 and 4
            crop = hint[..., :, left * 8:(left + 8) * 8]
            wrapped = kext.CompVisDenoiser(ControlledLDM(pipe.unet, net, crop, weight))
            xs = x[..., :, left:left + 8]
            oc, ou = wrapped(torch.cat([xs, xs]), torch.cat([sigma, sigma]), cond=torch.cat([c, u])).chunk(2)
            total[..., :, left:left + 8] += ou + (oc - ou) * cfg
            count[:, left:left + 8] += 1
        return total / count

    sigmas = kext.CompVisDenoiser(ControlledLDM(pipe.unet, net, hint, weight)).get_sigmas(3)
    x = torch.randn((1, 4, 8, 12), generator=torch.Generator().manual_seed(5)) * sigmas[0]
    with torch.no_grad():
        expected = ks.sample_euler(lambda x, s, **_: denoise(x, s), x, sigmas, disable=True)
    assert rel_err(result.latents, expected) < 1e-4


class A1111DDIM(DDIMScheduler):
    """diffusers' DDIM over A1111's DDIM steps: A1111 1.10 takes the same "leading" timesteps (1, 251, 501, 751 for
    4 steps) but runs one model call fewer, the last step going from t=251 to ᾱ at t=1; diffusers' own step then
    computes exactly that (its previous timestep is t − 1000/steps)."""

    def set_timesteps(self, num_inference_steps, device=None):
        super().set_timesteps(num_inference_steps, device)
        self.timesteps = self.timesteps[:-1]


def panorama_reference(ref, prompt_embeds, negative_embeds, latents, width, steps, cfg, circular):
    scheduler = A1111DDIM(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                              set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading")
    pipe = StableDiffusionPanoramaPipeline(vae=ref.vae, text_encoder=None, tokenizer=None, unet=ref.unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, height=512, width=width,
                    num_inference_steps=steps, guidance_scale=cfg, latents=latents, output_type="latent",
                    view_batch_size=2, circular_padding=circular).images


@pytest.mark.parametrize("circular, steps", [(False, 4), (True, 2)])
def test_matches_diffusers_panorama_pipeline_with_ddim(sd1, circular, steps):
    """diffusers places 64-latent windows 8 apart (no window flush with the edge): a 512x576 panorama (64x72
    latents) has windows at 0 and 8, both full; the circular one wraps 9 windows around (one model call, to keep
    the test short). Steps divide 1000, so that A1111's and diffusers' timesteps agree."""
    pipe, ref = sd1[0], sd1[1]
    cfg, seed, width = 6.0, 77, 576
    got = pipe.txt2img("a mountain panorama", "blurry", width=width, height=512, steps=steps, cfg_scale=cfg,
                       sampler="DDIM", seed=seed, tiling=Tiles(size=64, stride=8, batch=3, circular=circular))
    noise = torch.randn((1, 4, 64, width // 8), generator=torch.Generator().manual_seed(seed))  # A1111's CPU noise
    context, negative = ref.encode(["a mountain panorama"])["context"], ref.encode(["blurry"])["context"]
    expected = panorama_reference(ref, context, negative, noise, width, steps, cfg, circular)
    assert rel_err(got.latents, expected) < 1e-4
