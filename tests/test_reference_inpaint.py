"""Inpainting and outpainting against the reference pipeline (tests/refpipe.py) and A1111 1.10's image-side rules
(tests/a1111_images.py): mask blur, each masked-content mode, "only masked" with padding, latent blending at every
step for ordinary checkpoints, masked-image conditioning for 9-channel ones, and the final overlay."""

from __future__ import annotations

import k_diffusion.sampling as ks
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sdlite

import a1111_images as a1111
from conftest import rel_err
from refpipe import CFG, Noise, a1111_img2img_steps, batch, load_reference, max_pixel_diff, sample, write_model
from test_reference_img2img import picture, pixels

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inpaint")
    plain_path, plain = write_model(folder, "sd1", seed=31)
    inpaint_path, inpaint = write_model(folder, "sd1", seed=32, inpaint=True, name="tiny-sd1-inpainting")
    return {"plain": (sdlite.load(plain_path), load_reference(plain_path, plain)),
            "inpaint": (sdlite.load(inpaint_path), load_reference(inpaint_path, inpaint))}


def rectangle_mask(size, box) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def reference_inpaint(ref, image, mask, prompt, negative, seeds, *, width, height, steps, strength, cfg, mask_blur,
                      fill_mode, only_masked=False, padding=32, fn=ks.sample_euler_ancestral, ancestral=True):
    n, nine = len(seeds), ref.unet.config.in_channels == 9
    prep = a1111.prepare(image, mask, width, height, mask_blur=mask_blur, fill_mode=fill_mode,
                         only_masked=only_masked, padding=padding)
    source = pixels(prep.image, n)
    init = ref.encode_image(source, seeds[0])
    redo = a1111.latent_mask(prep.mask, width // 8, height // 8).expand(4, -1, -1)[None]
    keep = 1 - redo
    if fill_mode == "latent noise":  # create_random_tensors with the image seeds: their generators' first draw
        init = init * keep + Noise(init.shape[1:], seeds).first() * redo
    elif fill_mode == "latent nothing":
        init = init * keep
    image_cond = None
    if nine:  # processing.inpainting_image_conditioning, mask weight 1
        m = a1111.conditioning_mask(prep.mask)
        masked = torch.lerp(source, source * (1.0 - m), 1.0)
        latent = ref.encode_image(masked, seeds[0])
        image_cond = torch.cat([F.interpolate(m, size=latent.shape[-2:]).expand(n, -1, -1, -1), latent], dim=1)
    noise = Noise((4, height // 8, width // 8), seeds)
    sigmas = ref.sigmas(steps)[steps - a1111_img2img_steps(steps, strength):]
    x = init + noise.first() * sigmas[0]
    c, u = ref.encode([prompt]), ref.encode([negative])
    # CFGDenoiser blends the original latent back after every step, for inpainting checkpoints too (p.mask is set
    # whenever there is an image mask), and processing blends the result once more.
    model = CFG(ref.wrapped, lambda _: [(batch(c, n), 1.0)], lambda _: batch(u, n), cfg, mask=redo, init=init,
                image_cond=image_cond)
    samples = sample(fn, model, x, sigmas, noise if ancestral else None)
    samples = samples * redo + init * keep
    return samples, [a1111.apply_overlay(p, prep) for p in ref.to_images(samples)]


def check(result, expected):
    latents, pictures = expected
    assert rel_err(result.latents, latents) < 1e-4
    for mine, theirs in zip(result.images, pictures):
        assert max_pixel_diff(mine, theirs) <= 1


@pytest.mark.parametrize("fill_mode", ["fill", "original", "latent noise", "latent nothing"])
def test_masked_content_modes_match_the_reference(models, fill_mode):
    pipe, ref = models["plain"]
    image, mask = picture(64, 64, seed=3), rectangle_mask((64, 64), (12, 20, 44, 52))
    args = dict(width=64, height=64, steps=5, strength=0.75, cfg=5.0, mask_blur=0, fill_mode=fill_mode)
    got = pipe.inpaint(image, mask, "a window", "dark", strength=0.75, steps=5, cfg_scale=5.0, seed=41,
                       batch_size=2, mask_blur=0, inpaint_fill=fill_mode, width=64, height=64)
    check(got, reference_inpaint(ref, image, mask, "a window", "dark", [41, 42], **args))


def blurred_case(models):
    """The image and mask are resized to the generation size and the mask is blurred; "original" content, so the
    blur reaches the latents only through the rounded latent mask."""
    pipe, ref = models["plain"]
    image, mask = picture(80, 48, seed=4), rectangle_mask((80, 48), (30, 10, 60, 40))
    got = pipe.inpaint(image, mask, "moss", strength=0.6, steps=4, cfg_scale=7.0, seed=8, mask_blur=3,
                       inpaint_fill="original", width=64, height=48, sampler="Euler")
    return got, reference_inpaint(ref, image, mask, "moss", "", [8], width=64, height=48, steps=4, strength=0.6,
                                  cfg=7.0, mask_blur=3, fill_mode="original", fn=ks.sample_euler, ancestral=False)


def test_blurred_mask_latents_match_the_reference(models):
    got, (latents, _) = blurred_case(models)
    assert rel_err(got.latents, latents) < 1e-4


@pytest.mark.xfail(strict=True, reason="known discrepancy: sdlite.images.blur_mask blurs in float64 and rounds once; "
                   "A1111 runs cv2.GaussianBlur on uint8 twice (x, then y; fixed-point kernel, rounded after each "
                   "pass), so blurred masks differ by 1-2 levels at some edge pixels and overlays by up to 3/255")
def test_blurred_mask_overlay_matches_the_reference(models):
    got, expected = blurred_case(models)
    check(got, expected)


@pytest.mark.parametrize("box, padding", [((40, 16, 56, 32), 8),  # 32×32 crop: the ratio already fits
                                          ((40, 16, 72, 32), 4),  # 40×24 grown to 40×40
                                          ((4, 40, 20, 62), 6)])  # at the image corner: shifted inside
def test_only_masked_with_padding_matches_the_reference(models, box, padding):
    pipe, ref = models["plain"]
    image, mask = picture(96, 64, seed=5), rectangle_mask((96, 64), box)
    got = pipe.inpaint(image, mask, "a door", strength=0.8, steps=4, cfg_scale=6.0, seed=13, mask_blur=0,
                       inpaint_fill="fill", only_masked=True, only_masked_padding=padding, width=64, height=64)
    assert got.images[0].size == (96, 64)
    check(got, reference_inpaint(ref, image, mask, "a door", "", [13], width=64, height=64, steps=4, strength=0.8,
                                 cfg=6.0, mask_blur=0, fill_mode="fill", only_masked=True, padding=padding))


@pytest.mark.parametrize("fill_mode", ["original", "fill"])
def test_inpainting_checkpoint_matches_the_reference(models, fill_mode):
    pipe, ref = models["inpaint"]
    assert pipe.is_inpaint
    image, mask = picture(64, 64, seed=6), rectangle_mask((64, 64), (8, 8, 40, 48))
    got = pipe.inpaint(image, mask, "a cat", "blur", strength=1.0, steps=4, cfg_scale=5.0, seed=21, batch_size=2,
                       mask_blur=0, inpaint_fill=fill_mode, width=64, height=64)
    check(got, reference_inpaint(ref, image, mask, "a cat", "blur", [21, 22], width=64, height=64, steps=4,
                                 strength=1.0, cfg=5.0, mask_blur=0, fill_mode=fill_mode))


def test_outpaint_is_inpainting_of_the_edge_stretched_canvas(models):
    """pipe.outpaint's documented rule: the canvas grows by repeating the edge pixels, the new border is masked, and
    masked content is "fill"."""
    pipe, ref = models["plain"]
    image = picture(48, 40, seed=7)
    got = pipe.outpaint(image, "grass", left=8, right=8, down=8, steps=4, seed=17, mask_blur=0, cfg_scale=5.0)
    canvas = Image.fromarray(np.pad(np.asarray(image), ((0, 8), (8, 8), (0, 0)), mode="edge"))
    mask = rectangle_mask(canvas.size, (0, 0, 64, 48))
    mask.paste(0, (8, 0, 56, 40))
    assert got.images[0].size == (64, 48)
    check(got, reference_inpaint(ref, canvas, mask, "grass", "", [17], width=64, height=48, steps=4, strength=0.8,
                                 cfg=5.0, mask_blur=0, fill_mode="fill"))
