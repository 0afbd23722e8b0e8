"""The generation core against the same pipeline assembled by hand from k-diffusion's samplers, the reference text
encoder and A1111's seed rules; img2img/inpaint pixel guarantees; input checks; the CLI round trip."""

from __future__ import annotations

import k_diffusion.external as kext
import k_diffusion.sampling as ks
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sdlite
from sdlite.cli import main as cli_main
from sdlite.infotext import read_infotext

from conftest import rel_err
from sdfiles import build, open_clip_tokens


class LDMModel(torch.nn.Module):
    """What k-diffusion's CompVisDenoiser wraps: the LDM schedule (float64 betas, float32 alphas_cumprod) and
    apply_model(x, t, cond)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())

    def apply_model(self, x, t, cond):
        return self.unet(x, t, cond)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    b = build("sd1", seed=7)
    path = tmp_path_factory.mktemp("sd1") / "tiny-sd1.safetensors"
    save_file(b.state, str(path))
    return sdlite.load(path), b, path


def by_hand(pipe, b, prompt, negative, seeds, steps, cfg, sampler, karras=False, width=64, height=64):
    """txt2img as A1111 composes it, from k-diffusion and the reference text encoder."""
    tokens = open_clip_tokens([prompt, negative])
    tokens[tokens == 0] = 49407
    with torch.no_grad():
        ctx = b.clip(tokens).last_hidden_state
    n = len(seeds)
    cond, uncond = ctx[:1].expand(n, -1, -1), ctx[1:].expand(n, -1, -1)
    wrapped = kext.CompVisDenoiser(LDMModel(pipe.unet))
    if karras:
        sigmas = ks.get_sigmas_karras(steps, wrapped.sigmas[0].item(), wrapped.sigmas[-1].item(), rho=7.0)
    else:
        sigmas = wrapped.get_sigmas(steps)
    shape = (4, height // 8, width // 8)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.stack([torch.randn(shape, generator=g) for g in generators]) * sigmas[0]

    def model(x, sigma, **_):
        out = wrapped(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
        c, u = out.chunk(2)
        return u + (c - u) * cfg

    noise_sampler = lambda s, sn: torch.stack([torch.randn(shape, generator=g) for g in generators])  # noqa: E731
    with torch.no_grad():
        if sampler is ks.sample_euler_ancestral:
            return sampler(model, x, sigmas, disable=True, noise_sampler=noise_sampler)
        return sampler(model, x, sigmas, disable=True)


@pytest.mark.parametrize("name, fn, karras", [("Euler", ks.sample_euler, False),
                                              ("Euler a", ks.sample_euler_ancestral, False),
                                              ("DPM++ 2M Karras", ks.sample_dpmpp_2m, True)])
def test_txt2img_matches_k_diffusion_by_hand(sd1, name, fn, karras):
    pipe, b, _ = sd1
    result = pipe.txt2img("a cat drinking a pint of beer", "blurry", width=64, height=64, steps=6, cfg_scale=5.0,
                          sampler=name, seed=1234, batch_size=2)
    expected = by_hand(pipe, b, "a cat drinking a pint of beer", "blurry", [1234, 1235], 6, 5.0, fn, karras)
    assert result.seeds == [1234, 1235]
    assert rel_err(result.latents, expected) < 1e-4
    assert len(result.images) == 2 and result.images[0].size == (64, 64)


def test_same_seed_same_image_and_random_seed_reported(sd1):
    pipe = sd1[0]
    a = pipe.txt2img("x", width=64, height=64, steps=3, seed=5)
    b = pipe.txt2img("x", width=64, height=64, steps=3, seed=5)
    assert torch.equal(a.latents, b.latents)
    r = pipe.txt2img("x", width=64, height=64, steps=2, seed=-1)
    assert 0 <= r.seeds[0] < 2**32 and f"Seed: {r.seeds[0]}," in r.infotexts[0]


def test_img2img_step_accounting(sd1):
    pipe = sd1[0]
    calls = []
    pipe.img2img(Image.new("RGB", (64, 64), (200, 30, 30)), "red", strength=0.5, steps=10, width=64, height=64,
                 seed=1, sampler="Euler", callback=calls.append)
    assert len(calls) == int(0.5 * 10) + 1  # A1111: int(min(strength, 0.999) * steps) + 1 steps


def test_inpaint_keeps_unmasked_pixels(sd1):
    pipe = sd1[0]
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for fill in ("original", "fill", "latent noise", "latent nothing"):
        out = pipe.inpaint(image, mask, "a hole", strength=0.8, steps=4, width=64, height=64, seed=3, mask_blur=0,
                           inpaint_fill=fill).images[0]
        got, want = np.asarray(out), np.asarray(image)
        keep = np.asarray(mask) == 0
        assert np.array_equal(got[keep], want[keep]), fill
        assert not np.array_equal(got[~keep], want[~keep]), fill


def test_inpaint_only_masked_pastes_back(sd1):
    pipe = sd1[0]
    image = Image.new("RGB", (96, 64), (10, 120, 200))
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (60, 20, 76, 36))
    out = pipe.inpaint(image, mask, "x", steps=3, width=64, height=64, seed=3, mask_blur=0, only_masked=True,
                       only_masked_padding=8).images[0]
    assert out.size == (96, 64)
    keep = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(out)[keep], np.asarray(image)[keep])


def test_hires_fix_runs_its_own_steps(sd1):
    pipe = sd1[0]
    calls = []
    r = pipe.txt2img("x", width=64, height=64, steps=4, seed=2, sampler="Euler",
                     hires=dict(scale=1.5, steps=3, denoising_strength=0.5), callback=calls.append)
    assert r.images[0].size == (96, 96)
    assert len(calls) == 4 + 3
    assert "Hires upscale: 1.5" in r.infotexts[0] and "Hires steps: 3" in r.infotexts[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(width=65), "multiples of 8"), (dict(batch_size=0), "batch_size"), (dict(sampler="Euler z"), "Euler a"),
    (dict(scheduler="Karrass"), "Karras"), (dict(rng="TPU"), "CPU"), (dict(cfg=7), "unknown option"),
])
def test_bad_input_is_refused_before_any_model_work(sd1, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        sd1[0].txt2img("x", **dict(dict(width=64, height=64, steps=2), **kwargs))


def test_bad_img2img_input(sd1):
    pipe = sd1[0]
    with pytest.raises(ValueError, match=r"strength must lie in \[0, 1\]"):
        pipe.img2img(Image.new("RGB", (64, 64)), "x", strength=1.5, width=64, height=64)
    with pytest.raises(ValueError, match="mask is 32x32 but the image is 64x64"):
        pipe.inpaint(Image.new("RGB", (64, 64)), Image.new("L", (32, 32)), "x", width=64, height=64)


def test_cli_writes_infotext_and_from_png_reproduces_bit_for_bit(sd1, tmp_path, capsys):
    path = sd1[2]
    first, again = tmp_path / "a.png", tmp_path / "b.png"
    assert cli_main(["txt2img", str(path), "a red, round thing", "-n", "blurry", "--width", "64", "--height", "64",
                     "--steps", "3", "--seed", "77", "--sampler", "DPM++ 2M Karras", "-o", str(first)]) == 0
    params = read_infotext(first)
    assert params["Prompt"] == "a red, round thing" and params["Negative prompt"] == "blurry"
    assert params["Seed"] == "77" and params["Sampler"] == "DPM++ 2M Karras" and params["Size"] == "64x64"
    assert params["Model"] == "tiny-sd1" and len(params["Model hash"]) == 10
    assert cli_main(["txt2img", str(path), "--from-png", str(first), "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert "it/s" in capsys.readouterr().err


def test_cli_info(sd1, capsys):
    assert cli_main(["info", str(sd1[2])]) == 0
    assert "family sd1" in capsys.readouterr().out


def test_txt2img_with_controlnet(sd1):
    from sdlite.adapters.controlnet import create_from_unet

    from conftest import randomize_

    pipe = sd1[0]
    args = dict(width=64, height=64, steps=3, seed=4, sampler="Euler")
    hint = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    plain = pipe.txt2img("x", **args).latents
    net = create_from_unet(pipe.unet)
    assert torch.equal(pipe.txt2img("x", controlnets=[sdlite.ControlUnit(net, hint)], **args).latents, plain)
    randomize_(net, 5)
    controlled = pipe.txt2img("x", controlnets=[sdlite.ControlUnit(net, hint, weight=0.5)], **args).latents
    assert rel_err(controlled, plain) > 1e-3
    idle = pipe.txt2img("x", controlnets=[sdlite.ControlUnit(net, hint, start=0.9, end=1.0)], **args).latents
    assert torch.equal(idle, plain)  # progress 0, 1/3, 2/3: never inside [0.9, 1]
    guess = pipe.txt2img("x", controlnets=[sdlite.ControlUnit(net, hint, guess_mode=True)], **args).latents
    assert rel_err(guess, controlled) > 1e-4


@pytest.fixture(scope="module")
def sdxl_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl")
    save_file(build("sdxl", seed=11).state, str(folder / "base.safetensors"))
    save_file(build("sdxl-refiner", seed=12).state, str(folder / "refiner.safetensors"))
    return sdlite.load(folder / "base.safetensors"), sdlite.load(folder / "refiner.safetensors")


def test_sdxl_refiner_takes_over_the_last_part_of_the_schedule(sdxl_pair):
    base, refiner = sdxl_pair
    calls = {"base": 0, "refiner": 0}
    hooks = [m.unet.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
             for k, m in (("base", base), ("refiner", refiner))]
    try:
        out = base.txt2img("a castle", width=64, height=64, steps=4, sampler="Euler", seed=1, refiner=refiner,
                           refiner_switch_at=0.5)
    finally:
        for h in hooks:
            h.remove()
    # A1111 1.10: the refiner from the first call whose nearest timestep t has (999 - t)/1000 >= 0.5; the 4 Euler
    # calls sit at t = 999, 666, 333, 0 (done 0, 0.333, 0.666, 0.999), so the refiner takes the last two.
    assert calls == {"base": 2, "refiner": 2}
    plain = base.txt2img("a castle", width=64, height=64, steps=4, sampler="Euler", seed=1)
    assert rel_err(out.latents, plain.latents) > 1e-5  # the last two, low-noise steps differ
    assert "Refiner: refiner [" in out.infotexts[0]


def test_refiner_must_share_the_latent_space(sdxl_pair, sd1):
    with pytest.raises(ValueError, match="SDXL-family"):
        sdxl_pair[0].txt2img("x", width=64, height=64, steps=2, refiner=sd1[0])


def test_outpaint_extends_the_canvas(sd1):
    pipe = sd1[0]
    image = Image.new("RGB", (48, 64), (30, 160, 90))
    out = pipe.outpaint(image, "grass", right=16, steps=3, seed=2, mask_blur=0).images[0]
    assert out.size == (64, 64)
    assert np.array_equal(np.asarray(out)[:, :48], np.asarray(image))


def test_lora_prompt_tags_apply_for_one_generation(sd1, tmp_path):
    from lorafiles import text_layers, unet_layers, write_file

    pipe = sd1[0]
    write_file(tmp_path / "ink.safetensors", unet_layers(pipe.unet) + text_layers(pipe.text_encoders[0], "te"),
               "lora", "sd1", seed=3)
    args = dict(width=64, height=64, steps=3, seed=8, sampler="Euler")
    plain = pipe.txt2img("a castle", **args)
    pipe.lora_dirs = [tmp_path]
    try:
        tagged = pipe.txt2img("a castle <lora:ink:0.8>", **args)
        handle = pipe.add_lora(tmp_path / "ink.safetensors", weight=0.8, te_weight=0.8, mode="merge")
        merged = pipe.txt2img("a castle", **args)
        handle.remove()
        with pytest.raises(ValueError, match="no missing.safetensors"):
            pipe.txt2img("a castle <lora:missing:1>", **args)
    finally:
        pipe.lora_dirs = []
    assert rel_err(tagged.latents, merged.latents) < 1e-5
    assert rel_err(tagged.latents, plain.latents) > 1e-3
    assert torch.equal(pipe.txt2img("a castle", **args).latents, plain.latents)  # the tag's LoRA was taken off
    assert 'Lora hashes: "ink: ' in tagged.infotexts[0] and not pipe.loras


def test_cfg_batch_off_runs_cond_and_uncond_separately(sd1):
    pipe = sd1[0]
    batches = []
    hook = pipe.unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        args = dict(width=64, height=64, steps=2, seed=6, sampler="Euler")
        together = pipe.txt2img("x", **args).latents
        n = len(batches)
        apart = pipe.txt2img("x", cfg_batch=False, **args).latents
    finally:
        hook.remove()
    assert batches[:n] == [2, 2] and batches[n:] == [1, 1, 1, 1]
    assert rel_err(apart, together) < 1e-5


def test_controlnet_progress_comes_from_the_step_object(sd1, monkeypatch):
    """Heun, 3 steps: calls at σ0, σ1 | σ1, σ2 | σ2 belong to steps 0, 1, 1, 2, 2 (a call counts with the step its σ
    leads to, as the step count reported by the sampler's callback did), so the guidance range sees 0, ⅓, ⅓, ⅔, ⅔."""
    import sdlite.adapters.controlnet as controlnet
    from sdlite.adapters.controlnet import create_from_unet

    seen = []
    real = controlnet.control_residuals
    monkeypatch.setattr(controlnet, "control_residuals",
                        lambda *a, progress, **kw: seen.append(progress) or real(*a, progress=progress, **kw))
    pipe = sd1[0]
    unit = sdlite.ControlUnit(create_from_unet(pipe.unet), Image.new("RGB", (64, 64)))
    pipe.txt2img("x", width=64, height=64, steps=3, seed=1, sampler="Heun", controlnets=[unit])
    assert seen == [0, 1 / 3, 1 / 3, 2 / 3, 2 / 3]


def test_emphasis_and_old_timelines_reach_the_encoder_and_the_infotext(sd1):
    pipe = sd1[0]
    args = dict(width=64, height=64, steps=4, seed=3, sampler="Euler")
    ignored = pipe.txt2img("a (cat:1.5)", emphasis="Ignore", **args)
    assert torch.equal(ignored.latents, pipe.txt2img("a cat", **args).latents)  # brackets read, weight dropped
    assert read_infotext(ignored.infotexts[0])["Emphasis"] == "Ignore"
    assert "Emphasis" not in read_infotext(pipe.txt2img("a cat", emphasis="No norm", **args).infotexts[0])
    # Old timelines: a number >= 1 is a step, even "1.0" (new: a number with "." is a fraction of the steps).
    old = pipe.txt2img("a [cat:dog:1.0]", use_old_scheduling=True, **args)
    assert torch.equal(old.latents, pipe.txt2img("a [cat:dog:1]", **args).latents)
    assert read_infotext(old.infotexts[0])["Old prompt editing timelines"] == "True"
    new = pipe.txt2img("a [cat:dog:1.0]", **args)
    assert rel_err(new.latents, old.latents) > 1e-4 and "Old prompt" not in new.infotexts[0]
    same = pipe.txt2img("a [cat:dog:0.5]", use_old_scheduling=True, **args)
    assert "Old prompt" not in same.infotexts[0]  # written only when the option changes a schedule
    with pytest.raises(ValueError, match="emphasis"):
        pipe.txt2img("x", emphasis="original", **args)


def test_ti_hashes_accumulate_as_a1111_writes_them(sd1, sdxl_pair, tmp_path):
    """A1111's text encoder wrapper puts the embeddings of each encoding in front of the "TI hashes" so far: the
    negative prompt is encoded first, then each distinct AND part, once per text encoder (SDXL: twice)."""
    import hashlib

    pipe, xl = sd1[0], sdxl_pair[0]
    g = torch.Generator().manual_seed(0)
    width = pipe.text_encoders[0].config.width
    save_file({"emb_params": torch.randn(2, width, generator=g)}, str(tmp_path / "mystyle.safetensors"))
    save_file({"emb_params": torch.randn(1, width, generator=g)}, str(tmp_path / "badthing.safetensors"))
    l, big = (e.config.width for e in xl.text_encoders)
    save_file({"clip_l": torch.randn(1, l, generator=g), "clip_g": torch.randn(1, big, generator=g)},
              str(tmp_path / "xlstyle.safetensors"))
    h = {n: hashlib.sha256((tmp_path / f"{n}.safetensors").read_bytes()).hexdigest()[:12]
         for n in ("mystyle", "badthing", "xlstyle")}
    args = dict(width=64, height=64, steps=1, seed=3, sampler="Euler")
    pipe.load_embeddings(tmp_path / "mystyle.safetensors", tmp_path / "badthing.safetensors")
    xl.load_embeddings(tmp_path / "xlstyle.safetensors")
    try:
        # Parts as A1111 splits them: "badthing", " a mystyle cat" twice (encoded once).
        out = pipe.txt2img("badthing AND a mystyle cat AND a mystyle cat", "badthing", **args)
        plain = pipe.txt2img("a cat", **args)
        styled = xl.txt2img("xlstyle", **args)
    finally:
        pipe.embeddings = xl.embeddings = None
    hashes = f"mystyle: {h['mystyle']}, badthing: {h['badthing']}, badthing: {h['badthing']}"
    assert read_infotext(out.infotexts[0])["TI hashes"] == hashes
    assert "TI hashes" not in plain.infotexts[0]
    assert read_infotext(styled.infotexts[0])["TI hashes"] == f"xlstyle: {h['xlstyle']}, xlstyle: {h['xlstyle']}"


def test_from_png_reads_the_prompt_options(tmp_path):
    from sdlite.cli import options_from_png
    from sdlite.images import write_png

    path = str(tmp_path / "a.png")
    write_png(path, Image.new("RGB", (8, 8)), "a [b:c:1]\nSteps: 4, Seed: 1, Emphasis: No norm, Version: v1.5.1")
    prompt, options = options_from_png(path)
    assert options["emphasis"] == "No norm" and options["use_old_scheduling"]  # A1111 < 1.6: old timelines
    write_png(path, Image.new("RGB", (8, 8)), "a [b:c:1]\nSteps: 4, Seed: 1, Version: v1.6.0")
    assert "use_old_scheduling" not in options_from_png(path)[1]
    write_png(path, Image.new("RGB", (8, 8)), "a\nSteps: 4, Seed: 1, Old prompt editing timelines: True")
    assert options_from_png(path)[1]["use_old_scheduling"] is True


def test_align_your_steps_uses_the_models_family_table(sdxl_pair):
    """A1111 picks the SDXL table of Align Your Steps for SDXL models (sd_schedulers.py); not SD 1.5's."""
    from sdlite.schedulers import get_sigmas

    base = sdxl_pair[0]
    seen = []
    base.txt2img("a castle", width=64, height=64, steps=4, sampler="Euler", scheduler="Align Your Steps", seed=1,
                 callback=lambda info: seen.append(float(info["sigma"])))
    expected = get_sigmas("Align Your Steps", 4, family="sdxl")
    other = get_sigmas("Align Your Steps", 4, family="sd1")
    assert not torch.allclose(expected, other)
    assert seen == pytest.approx(expected[:4].tolist(), rel=1e-5)


def test_cli_refuses_to_write_over_its_input_before_any_work(tmp_path, capsys):
    """img2img -o onto the input image: an error naming it, before the model is even opened; the input unchanged."""
    from sdlite.cli import main

    photo = tmp_path / "photo.png"
    Image.new("RGB", (16, 16), (10, 20, 30)).save(photo)
    before = photo.read_bytes()
    assert main(["img2img", str(tmp_path / "no-such-model.safetensors"), str(photo), "a cat", "-o", str(photo)]) == 2
    assert "input" in capsys.readouterr().err
    assert photo.read_bytes() == before
