"""Hires fix against the reference pipeline (tests/refpipe.py) and A1111 1.10's sample_hr_pass: the first pass's
latents upscaled in latent space (torch's interpolate) or as an 8-bit image (PIL's Lanczos, then the VAE), new noise
from the image seeds at the new size, and an img2img pass that runs exactly the hires steps at the end of a schedule
stretched to steps / denoising strength."""

from __future__ import annotations

import k_diffusion.sampling as ks
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sdlite

from conftest import rel_err
from refpipe import CFG, Noise, batch, load_reference, max_pixel_diff, sample, write_model
from test_reference_img2img import pixels

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    path, built = write_model(tmp_path_factory.mktemp("hires"), "sd1", seed=51)
    return sdlite.load(path), load_reference(path, built)


def reference_hires(ref, prompt, seeds, *, width, height, steps, cfg, fn, ancestral, scale, hr_steps, strength,
                    upscaler):
    n = len(seeds)
    c, u = ref.encode([prompt]), ref.encode([""])

    def run(x0, w, h, total, run_steps):
        noise = Noise((4, h // 8, w // 8), seeds)
        sigmas = ref.sigmas(total)[total - run_steps:]
        x = noise.first() * sigmas[0] if x0 is None else x0 + noise.first() * sigmas[0]
        model = CFG(ref.wrapped, lambda _: [(batch(c, n), 1.0)], lambda _: batch(u, n), cfg)
        return sample(fn, model, x, sigmas, noise if ancestral else None)

    first = run(None, width, height, steps, steps)
    w, h = int(width * scale), int(height * scale)
    if upscaler == "Latent":
        upscaled = F.interpolate(first, size=(h // 8, w // 8), mode="bilinear", antialias=False)
    else:  # decoded to 8 bits, resized, encoded again (the posterior sample seeded as in img2img)
        pictures = [p.resize((w, h), Image.Resampling.LANCZOS) for p in ref.to_images(first)]
        upscaled = ref.encode_image(torch.cat([pixels(p, 1) for p in pictures]), seeds[0])
    requested = hr_steps or steps
    return run(upscaled, w, h, int(requested / min(strength, 0.999)), requested)


@pytest.mark.parametrize("upscaler, sampler, fn, ancestral, size, scale, hr_steps, strength", [
    ("Latent", "Euler a", ks.sample_euler_ancestral, True, (64, 64), 1.5, 3, 0.6),
    ("Lanczos", "Euler", ks.sample_euler, False, (48, 32), 2.0, 0, 0.45),
])
def test_hires_fix_matches_the_reference(sd1, upscaler, sampler, fn, ancestral, size, scale, hr_steps, strength):
    pipe, ref = sd1
    width, height = size
    calls = []
    got = pipe.txt2img("a mountain", width=width, height=height, steps=4, cfg_scale=6.0, sampler=sampler, seed=61,
                       batch_size=2, hires=dict(scale=scale, steps=hr_steps, denoising_strength=strength,
                                                upscaler=upscaler), callback=calls.append)
    expected = reference_hires(ref, "a mountain", [61, 62], width=width, height=height, steps=4, cfg=6.0, fn=fn,
                               ancestral=ancestral, scale=scale, hr_steps=hr_steps, strength=strength,
                               upscaler=upscaler)
    assert len(calls) == 4 + (hr_steps or 4)
    assert got.images[0].size == (int(width * scale), int(height * scale))
    assert rel_err(got.latents, expected) < 1e-4
    for mine, theirs in zip(got.images, ref.to_images(expected)):
        assert max_pixel_diff(mine, theirs) <= 1
