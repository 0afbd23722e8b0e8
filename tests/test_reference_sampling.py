"""What happens during sampling, against the reference pipeline (tests/refpipe.py) and A1111 1.10's rules:
v-prediction (SD 2.x style, k-diffusion's CompVisVDenoiser), prompt weights ("Original" emphasis), prompt editing and
alternation counted in model calls (second-order samplers included), variation seeds, seed resize, ENSD and the
noise sources."""

from __future__ import annotations

import k_diffusion.sampling as ks
import pytest
import torch

import sdlite
from sdlite.rng import PhiloxGenerator

from conftest import rel_err
from refpipe import CFG, Noise, batch, load_reference, max_pixel_diff, sample, write_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    path, built = write_model(tmp_path_factory.mktemp("sd1"), "sd1", seed=101)
    return sdlite.load(path), load_reference(path, built)


@pytest.fixture(scope="module")
def sd2v(tmp_path_factory):
    path, built = write_model(tmp_path_factory.mktemp("sd2"), "sd2", seed=102)
    return sdlite.load(path, prediction="v"), load_reference(path, built, prediction="v")


def txt2img(ref, cond_at, uncond, seeds, steps, fn, *, cfg=5.0, karras=False, discard=False, ancestral=False,
            noise=None, first=None, size=(64, 64)):
    n, (w, h) = len(seeds), size
    noise = noise or Noise((4, h // 8, w // 8), seeds)
    sigmas = ref.sigmas(steps, karras=karras, discard_penultimate=discard)
    x = (noise.first() if first is None else first) * sigmas[0]
    model = CFG(ref.wrapped, lambda k: [(batch(cond_at(k), n), 1.0)], lambda _: batch(uncond, n), cfg)
    return sample(fn, model, x, sigmas, noise if ancestral else None)


def check(ref, got, expected):
    assert rel_err(got.latents, expected) < 1e-4
    for mine, theirs in zip(got.images, ref.to_images(expected)):
        assert max_pixel_diff(mine, theirs) <= 1


@pytest.mark.parametrize("sampler, fn, karras, ancestral", [("Euler a", ks.sample_euler_ancestral, False, True),
                                                            ("DPM++ 2M", ks.sample_dpmpp_2m, True, False)])
def test_v_prediction_matches_compvis_v_denoiser(sd2v, sampler, fn, karras, ancestral):
    pipe, ref = sd2v
    assert pipe.prediction == "v" and pipe.family == "sd2"
    got = pipe.txt2img("a snowy peak", "haze", width=64, height=64, steps=4, cfg_scale=5.0, sampler=sampler, seed=3,
                       batch_size=2)
    c, u = ref.encode(["a snowy peak"]), ref.encode(["haze"])
    check(ref, got, txt2img(ref, lambda _: c, u, [3, 4], 4, fn, karras=karras, ancestral=ancestral))


def test_prompt_weights_match_the_original_emphasis(sd1):
    """"a (red:1.4) house [with trees]" is four fragments (A1111 parse_prompt_attention): each tokenized alone and its
    tokens weighted; the encoding is multiplied by the weights and rescaled to its original mean."""
    pipe, ref = sd1
    got = pipe.txt2img("a (red:1.4) house [with trees]", "(blurry:0.8), dark", width=64, height=64, steps=3,
                       cfg_scale=5.0, sampler="Euler", seed=12)
    c = ref.encode([[("a ", 1.0), ("red", 1.4), (" house ", 1.0), ("with trees", 1 / 1.1)]])
    u = ref.encode([[("blurry", 0.8), (", dark", 1.0)]])
    check(ref, got, txt2img(ref, lambda _: c, u, [12], 3, ks.sample_euler))


def edited_text(t: int, total: int) -> str:
    """"a [cat:dog:0.5] in a [garden|street]" at schedule step t of ``total`` (A1111's prompt_parser): the edit
    switches after step int(0.5·total); the alternation shows option (t − 1) mod 2 at step t."""
    animal = "cat" if t <= int(0.5 * total) else "dog"
    return f"a {animal} in a {['garden', 'street'][(t - 1) % 2]}"


@pytest.mark.parametrize("sampler, fn, karras, discard", [("Euler", ks.sample_euler, False, False),
                                                          ("Heun", ks.sample_heun, False, False),
                                                          ("DPM2", ks.sample_dpm_2, True, True)])
def test_prompt_editing_and_alternation_follow_model_calls(sd1, sampler, fn, karras, discard):
    """A1111 lays the schedule over steps (×2 for second-order samplers) and picks, at model call k, the first
    schedule entry whose end step is ≥ k, so call 0 and call 1 share step 1's text."""
    pipe, ref = sd1
    steps = 3
    total = steps * 2 if sampler in ("Heun", "DPM2") else steps
    texts = [edited_text(t, total) for t in range(1, total + 1)]
    conds = ref.encode(texts)  # one batch, as A1111 encodes a prompt's schedule
    u = ref.encode(["plain"])
    seen = []

    def cond_at(k):
        t = max(k, 1)
        seen.append(texts[t - 1])
        return {key: value[t - 1:t] for key, value in conds.items()}

    got = pipe.txt2img("a [cat:dog:0.5] in a [garden|street]", "plain", width=64, height=64, steps=steps,
                       cfg_scale=5.0, sampler=sampler, seed=21)
    expected = txt2img(ref, cond_at, u, [21], steps, fn, karras=karras, discard=discard)
    assert len(set(seen)) >= 2  # the schedule really changed the conditioning during this run
    check(ref, got, expected)


def slerp(t, low, high):
    """A1111's slerp of two noise tensors [C, H, W], normalised along dim 1 (rng.slerp)."""
    ln, hn = low / low.norm(dim=1, keepdim=True), high / high.norm(dim=1, keepdim=True)
    dot = (ln * hn).sum(1)
    if dot.mean() > 0.9995:
        return low * t + high * (1 - t)
    omega = torch.acos(dot)
    return ((torch.sin((1 - t) * omega) / torch.sin(omega)).unsqueeze(1) * low
            + (torch.sin(t * omega) / torch.sin(omega)).unsqueeze(1) * high)


def a1111_first_noise(seeds, subseeds, strength, shape, resize_from=None):
    """ImageRNG.first: the seed's noise (at the "resize seed from" size, from a fresh generator, when set), slerped
    towards the subseed's, then pasted in the middle of the image generator's first draw."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    small = shape if resize_from is None else (shape[0], resize_from[1] // 8, resize_from[0] // 8)
    out = []
    for seed, subseed, g in zip(seeds, subseeds, gens):
        noise = torch.randn(small, generator=g if resize_from is None else torch.Generator().manual_seed(seed))
        if strength:
            noise = slerp(strength, noise, torch.randn(small, generator=torch.Generator().manual_seed(subseed)))
        if resize_from is not None:
            x = torch.randn(shape, generator=g)
            dy, dx = (shape[1] - small[1]) // 2, (shape[2] - small[2]) // 2
            x[:, dy:dy + small[1], dx:dx + small[2]] = noise
            noise = x
        out.append(noise)
    return torch.stack(out), gens


@pytest.mark.parametrize("strength, resize_from", [(0.3, None), (0.0, (48, 32)), (0.6, (40, 48))])
def test_variation_seed_and_seed_resize_match_a1111(sd1, strength, resize_from):
    pipe, ref = sd1
    options = {} if resize_from is None else {"seed_resize_from": resize_from}
    got = pipe.txt2img("a tree", width=64, height=64, steps=3, cfg_scale=5.0, sampler="Euler a", seed=31, subseed=500,
                       subseed_strength=strength, batch_size=2, **options)
    first, gens = a1111_first_noise([31, 32], [500, 501], strength, (4, 8, 8), resize_from)
    noise = Noise((4, 8, 8), [31, 32])
    noise.generators = gens  # ancestral noise goes on with the image generators
    c, u = ref.encode(["a tree"]), ref.encode([""])
    check(ref, got, txt2img(ref, lambda _: c, u, [31, 32], 3, ks.sample_euler_ancestral, ancestral=True,
                            noise=noise, first=first))


@pytest.mark.parametrize("source", ["CPU", "GPU", "NV"])
def test_ensd_and_noise_sources(sd1, source):
    """ENSD reseeds the image generators with seed + delta after the initial noise; "GPU" draws from the device's
    generator, "NV" from NVIDIA's Philox (the generator itself is checked against CUDA's values in test_rng.py)."""
    pipe, ref = sd1
    got = pipe.txt2img("a river", width=64, height=64, steps=3, cfg_scale=5.0, sampler="Euler a", seed=41, batch_size=2,
                       eta_noise_seed_delta=31337, rng=source)
    make = PhiloxGenerator if source == "NV" else (lambda s: torch.Generator(pipe.device).manual_seed(s))
    noise = Noise((4, 8, 8), [41, 42], ensd=31337, make=make)
    c, u = ref.encode(["a river"]), ref.encode([""])
    check(ref, got, txt2img(ref, lambda _: c, u, [41, 42], 3, ks.sample_euler_ancestral, ancestral=True,
                            noise=noise))
    plain = pipe.txt2img("a river", width=64, height=64, steps=3, cfg_scale=5.0, sampler="Euler a", seed=41,
                         batch_size=2, rng=source)
    assert rel_err(plain.latents, got.latents) > 1e-3  # the delta changed the ancestral noise
