"""img2img against the pipeline assembled from diffusers' UNet/VAE, the reference text encoder and k-diffusion, with
A1111's step accounting for denoising strength and its per-image seeds."""

from __future__ import annotations

import k_diffusion.sampling as ks
import numpy as np
import pytest
import torch
from PIL import Image

import sdlite

from conftest import rel_err
from refpipe import CFG, Noise, a1111_img2img_steps, batch, load_reference, max_pixel_diff, sample, write_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest on a shared CPU


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    path, built = write_model(tmp_path_factory.mktemp("sd1"), "sd1", seed=21)
    return sdlite.load(path), load_reference(path, built)


def picture(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    """A smooth random picture (a VAE sees structure, not only noise)."""
    small = np.random.default_rng(seed).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def pixels(image: Image.Image, n: int) -> torch.Tensor:
    """A1111: uint8 → float32 / 255, channels first, one copy per image of the batch."""
    x = torch.from_numpy(np.asarray(image.convert("RGB")).astype(np.float32) / 255.0).permute(2, 0, 1)
    return x[None].repeat(n, 1, 1, 1)


def reference_img2img(ref, image, prompt, negative, seeds, steps, strength, cfg, fn, *, karras=False,
                      ancestral=False):
    n, (w, h) = len(seeds), image.size
    init = ref.encode_image(pixels(image, n), seeds[0])
    noise = Noise((4, h // 8, w // 8), seeds)
    # The last int(strength·steps)+1 steps of the full schedule, starting from x₀ + noise·σ at the first of them.
    sigmas = ref.sigmas(steps, karras=karras)[steps - a1111_img2img_steps(steps, strength):]
    x = init + noise.first() * sigmas[0]
    c, u = ref.encode([prompt]), ref.encode([negative])
    model = CFG(ref.wrapped, lambda _: [(batch(c, n), 1.0)], lambda _: batch(u, n), cfg)
    return sample(fn, model, x, sigmas, noise if ancestral else None), len(sigmas) - 1


@pytest.mark.parametrize("strength", [0.25, 0.5, 0.75, 1.0])
def test_img2img_strengths_match_the_reference(sd1, strength):
    pipe, ref = sd1
    image = picture(64, 64, seed=1)
    steps, calls = 5, []
    got = pipe.img2img(image, "a lighthouse", "fog", strength=strength, steps=steps, cfg_scale=6.0,
                       sampler="Euler a", seed=99, batch_size=2, width=64, height=64, callback=calls.append)
    expected, run = reference_img2img(ref, image, "a lighthouse", "fog", [99, 100], steps, strength, 6.0,
                                      ks.sample_euler_ancestral, ancestral=True)
    assert len(calls) == run == int(min(strength, 0.999) * steps) + 1
    assert rel_err(got.latents, expected) < 1e-4
    for mine, theirs in zip(got.images, ref.to_images(expected)):
        assert max_pixel_diff(mine, theirs) <= 1


@pytest.mark.parametrize("name, fn, karras", [("Euler", ks.sample_euler, False),
                                              ("DPM++ 2M", ks.sample_dpmpp_2m, True)])
def test_img2img_samplers_match_the_reference(sd1, name, fn, karras):
    pipe, ref = sd1
    image = picture(64, 48, seed=2)
    got = pipe.img2img(image, "a red boat", "", strength=0.6, steps=6, cfg_scale=7.5, sampler=name, seed=5,
                       width=64, height=48)
    expected, _ = reference_img2img(ref, image, "a red boat", "", [5], 6, 0.6, 7.5, fn, karras=karras)
    assert rel_err(got.latents, expected) < 1e-4
    assert max_pixel_diff(got.images[0], ref.to_images(expected)[0]) <= 1
