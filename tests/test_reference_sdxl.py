"""SDXL base and refiner against the reference pipeline (tests/refpipe.py) with the size and aesthetic conditioning
built as diffusers' StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline build their add_time_ids and embedded
by diffusers' UNet (add_time_proj, add_embedding); and the refiner handoff of A1111 1.10."""

from __future__ import annotations

from types import SimpleNamespace

import k_diffusion.sampling as ks
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

import sdlite

from conftest import rel_err
from refpipe import CFG, Noise, a1111_img2img_steps, batch, load_reference, max_pixel_diff, sample, write_model
from sdfiles import build
from test_reference_img2img import picture, pixels

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl")
    base_path, base = write_model(folder, "sdxl", seed=71)
    # The released base and refiner carry the same VAE; so do these (A1111 decodes a handoff with the refiner's).
    refiner = build("sdxl-refiner", seed=72)
    refiner.state.update({k: v for k, v in base.state.items() if k.startswith("first_stage_model.")})
    refiner_path = folder / "tiny-sdxl-refiner.safetensors"
    save_file(refiner.state, str(refiner_path))
    return {"base": (sdlite.load(base_path), load_reference(base_path, base)),
            "refiner": (sdlite.load(refiner_path), load_reference(refiner_path, refiner))}


def base_ids(ref, original, crop, target) -> torch.Tensor:
    """diffusers' convention: (height, width) sizes and (top, left) crop; the same ids for the negative prompt."""
    return StableDiffusionXLPipeline._get_add_time_ids(SimpleNamespace(unet=ref.unet), original, crop, target,
                                                       torch.float32, text_encoder_projection_dim=128)


def refiner_ids(ref, original, crop, target, score, negative_score):
    pipe = SimpleNamespace(unet=ref.unet, config=SimpleNamespace(requires_aesthetics_score=True))
    return StableDiffusionXLImg2ImgPipeline._get_add_time_ids(pipe, original, crop, target, score, negative_score,
                                                              original, crop, target, torch.float32,
                                                              text_encoder_projection_dim=128)


def conds(ref, prompt, negative, ids, negative_ids, n):
    c, u = ref.encode([prompt]), ref.encode([negative], negative=True)
    return batch({**c, "time_ids": ids}, n), batch({**u, "time_ids": negative_ids}, n)


@pytest.mark.parametrize("negative, original_size, crop", [("blurry", (96, 80), (8, 16)), ("", None, (0, 0))])
def test_sdxl_size_and_crop_conditioning_match_diffusers(xl, negative, original_size, crop):
    pipe, ref = xl["base"]
    width, height, seeds = 64, 48, [81, 82]
    options = {} if original_size is None else {"original_size": original_size}
    got = pipe.txt2img("a castle", negative, width=width, height=height, steps=4, cfg_scale=5.0, seed=81,
                       batch_size=2, sampler="Euler a", crop=crop, **options)
    ow, oh = original_size or (width, height)
    ids = base_ids(ref, (oh, ow), (crop[1], crop[0]), (height, width))
    c, u = conds(ref, "a castle", negative, ids, ids, 2)
    noise = Noise((4, height // 8, width // 8), seeds)
    sigmas = ref.sigmas(4)
    expected = sample(ks.sample_euler_ancestral, CFG(ref.wrapped, lambda _: [(c, 1.0)], lambda _: u, 5.0),
                      noise.first() * sigmas[0], sigmas, noise)
    assert rel_err(got.latents, expected) < 1e-4
    for mine, theirs in zip(got.images, ref.to_images(expected)):
        assert max_pixel_diff(mine, theirs) <= 1


@pytest.mark.parametrize("score, negative_score", [(6.0, 2.5), (7.5, 1.0)])
def test_refiner_img2img_aesthetic_scores_match_diffusers(xl, score, negative_score):
    pipe, ref = xl["refiner"]
    image, steps, strength = picture(64, 64, seed=9), 5, 0.4
    got = pipe.img2img(image, "a castle", "ugly", strength=strength, steps=steps, cfg_scale=6.0, seed=91,
                       sampler="Euler", aesthetic_score=score, negative_aesthetic_score=negative_score, width=64,
                       height=64, original_size=(128, 96))
    ids, negative_ids = refiner_ids(ref, (96, 128), (0, 0), (64, 64), score, negative_score)
    c, u = conds(ref, "a castle", "ugly", ids, negative_ids, 1)
    init = ref.encode_image(pixels(image, 1), 91)
    sigmas = ref.sigmas(steps)[steps - a1111_img2img_steps(steps, strength):]
    x = init + Noise((4, 8, 8), [91]).first() * sigmas[0]
    expected = sample(ks.sample_euler, CFG(ref.wrapped, lambda _: [(c, 1.0)], lambda _: u, 6.0), x, sigmas)
    assert rel_err(got.latents, expected) < 1e-4
    assert max_pixel_diff(got.images[0], ref.to_images(expected)[0]) <= 1


class Switch:
    """A1111's refiner handoff inside CFGDenoiser: before each model call, apply_refiner decides from the call's σ
    (or, with "switch by sampling steps", from calls done / total calls) whether the refiner takes over; from then
    on its model and conditioning are used, the sampler and the call count going on."""

    def __init__(self, base: CFG, refiner: CFG, should_switch):
        self.base, self.refiner, self.should_switch = base, refiner, should_switch
        self.switched, self.calls, self.used = False, 0, []

    def __call__(self, x, sigma, **_):
        self.switched = self.switched or self.should_switch(self.calls, sigma)
        model = self.refiner if self.switched else self.base
        model.step = self.calls
        self.calls += 1
        self.used.append("refiner" if self.switched else "base")
        return model(x, sigma)


def reference_handoff(xl, prompt, negative, seed, steps, switch_at, by_steps):
    base, refiner = xl["base"][1], xl["refiner"][1]
    ids = base_ids(base, (64, 64), (0, 0), (64, 64))
    c, u = conds(base, prompt, negative, ids, ids, 1)
    r_ids, r_negative_ids = refiner_ids(refiner, (64, 64), (0, 0), (64, 64), 6.0, 2.5)
    rc, ru = conds(refiner, prompt, negative, r_ids, r_negative_ids, 1)

    def should_switch(calls, sigma):
        if by_steps:
            return calls / steps >= switch_at
        t = torch.argmin((base.wrapped.sigmas - sigma.max()).abs())
        return (999 - t) / 1000 >= switch_at

    model = Switch(CFG(base.wrapped, lambda _: [(c, 1.0)], lambda _: u, 5.0),
                   CFG(refiner.wrapped, lambda _: [(rc, 1.0)], lambda _: ru, 5.0), should_switch)
    noise = Noise((4, 8, 8), [seed])
    sigmas = base.sigmas(steps)
    return sample(ks.sample_euler, model, noise.first() * sigmas[0], sigmas), model.used


def handoff(xl, switch_at, by_steps):
    pipe, refiner = xl["base"][0], xl["refiner"][0]
    got = pipe.txt2img("a castle", "fog", width=64, height=64, steps=4, cfg_scale=5.0, sampler="Euler", seed=7,
                       refiner=refiner, refiner_switch_at=switch_at)
    expected, used = reference_handoff(xl, "a castle", "fog", 7, 4, switch_at, by_steps)
    return got, expected, used


def test_refiner_handoff_by_sampling_steps_matches_the_reference(xl):
    """With "switch by sampling steps" and a switch point between two calls' progress, the refiner takes the last
    call (progress 3/4 ≥ 0.6); its own encoders, aesthetic ADM and UNet continue the same Euler run."""
    got, expected, used = handoff(xl, 0.6, by_steps=True)
    assert used == ["base"] * 3 + ["refiner"]
    assert rel_err(got.latents, expected) < 1e-4
    assert max_pixel_diff(got.images[0], xl["refiner"][1].to_images(expected)[0]) <= 1


@pytest.mark.xfail(strict=True, reason="known discrepancy: since A1111 PR #14978 (1.9, so 1.10 too) the refiner takes "
                   "over when (999 − t)/1000 ≥ switch_at, t the training timestep nearest the call's σ (the option "
                   "'switch by sampling steps' keeps calls/total ≥ switch_at); sdlite's Handoff switches when "
                   "calls/total > switch_at. With 4 Euler steps and 0.5 A1111 hands the last two calls to the "
                   "refiner, sdlite only the last (and none at the default 0.8)")
def test_refiner_handoff_by_sigma_matches_the_reference(xl):
    got, expected, used = handoff(xl, 0.5, by_steps=False)
    assert used == ["base"] * 2 + ["refiner"] * 2
    assert rel_err(got.latents, expected) < 1e-4
