"""Component offload (sdlite.offload, StableDiffusion.enable_offload) on the CPU alone.

There is no second device here, so the execution device is "cpu:0" and the offload device "cpu": the same memory,
but distinct device objects, so every recorded ``nn.Module.to`` call says which way a component went. The tests check
that offloaded generations are bit-identical to plain ones, that each component is moved on just before it runs and
off right after (and only then), and that everything the core creates is asked for on the execution device.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import sdlite
from sdlite.adapters.controlnet import create_from_unet

from conftest import randomize_
from sdfiles import build

EXEC, HOME = torch.device("cpu", 0), torch.device("cpu")
ARGS = dict(width=64, height=64, steps=3, seed=4, sampler="Euler")


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd1") / "tiny-sd1.safetensors"
    save_file(build("sd1", seed=7).state, str(path))
    return path


@pytest.fixture(scope="module")
def plain(sd1_file):
    return sdlite.load(sd1_file)


@pytest.fixture(scope="module")
def offloaded(sd1_file):
    return sdlite.load(sd1_file, device=EXEC, offload=True)


class Recorder:
    """Logs ``name on`` / ``name off`` for every ``.to`` of a named module (on = to the execution device) and
    ``run name`` for every forward of the module that does a component's work, consecutive runs collapsed."""

    def __init__(self, monkeypatch, named: dict[str, nn.Module], runs: dict[str, nn.Module] | None = None):
        self.events: list[str] = []
        names = {id(m): n for n, m in named.items()}
        original = nn.Module.to

        def to(module, *args, **kwargs):
            if id(module) in names:
                device = torch.device(args[0] if args else kwargs["device"])
                self.events.append(f"{names[id(module)]} {'on' if device == EXEC else 'off'}")
            return original(module, *args, **kwargs)

        monkeypatch.setattr(nn.Module, "to", to)
        self.hooks = [m.register_forward_pre_hook(lambda *_, n=n: self._ran(n))
                      for n, m in (runs or named).items()]

    def _ran(self, name: str) -> None:
        if self.events[-1:] != [f"run {name}"]:
            self.events.append(f"run {name}")

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def components(pipe, prefix: str = "") -> dict[str, nn.Module]:
    return {f"{prefix}text": pipe.text_encoders[0], f"{prefix}unet": pipe.unet, f"{prefix}vae": pipe.vae}


def runs(pipe, prefix: str = "") -> dict[str, nn.Module]:
    return {f"{prefix}text": pipe.text_encoders[0], f"{prefix}unet": pipe.unet,
            f"{prefix}vae-encode": pipe.vae.encoder, f"{prefix}vae-decode": pipe.vae.decoder}


def stage(name: str, run: str | None = None) -> list[str]:
    return [f"{name} on", f"run {run or name}", f"{name} off"]


def record(monkeypatch, pipe, call, named=None, ran=None) -> list[str]:
    recorder = Recorder(monkeypatch, named or components(pipe), ran or runs(pipe))
    try:
        call()
    finally:
        recorder.close()
        monkeypatch.undo()
    return recorder.events


def test_txt2img_is_bit_identical_and_moves_one_component_at_a_time(plain, offloaded, monkeypatch):
    assert offloaded.device == EXEC and plain.device == HOME
    assert offloaded.offload.device == EXEC and offloaded.offload.offload_device == HOME
    assert "offload_device=cpu" in repr(offloaded)
    results = []
    events = record(monkeypatch, offloaded, lambda: results.append(offloaded.txt2img("a cat", "blurry", **ARGS)))
    assert events == stage("text") + stage("unet") + stage("vae", "vae-decode")
    expected = plain.txt2img("a cat", "blurry", **ARGS)
    assert torch.equal(results[0].latents, expected.latents)
    assert np.array_equal(np.asarray(results[0].images[0]), np.asarray(expected.images[0]))
    assert offloaded.offload.resident == []


def test_noise_and_hints_are_made_on_the_execution_device(plain, offloaded, monkeypatch):
    """The core makes its tensors on ``pipe.device`` (noise, hints, the image to encode; the rest follows with
    ``.to(other_tensor)``): spy on the two constructors that take the device, and on the core's own record of it."""
    import sdlite.adapters.controlnet as controlnet
    import sdlite.generate as generate

    asked = []

    class Noise(generate.ImageNoise):
        def __init__(self, *args, device, **kwargs):
            asked.append(("noise", torch.device(device)))
            super().__init__(*args, device=device, **kwargs)

    original_hint = controlnet.prepare_hint

    def hint(*args, device=None, **kwargs):
        asked.append(("hint", torch.device(device)))
        return original_hint(*args, device=device, **kwargs)

    monkeypatch.setattr(generate, "ImageNoise", Noise)
    monkeypatch.setattr(controlnet, "prepare_hint", hint)
    unit = sdlite.ControlUnit(create_from_unet(plain.unet), Image.new("RGB", (64, 64)))
    image, mask = Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("L", (64, 64), 255)
    offloaded.inpaint(image, mask, "red", inpaint_fill="latent noise", controlnets=[unit], **ARGS)
    assert generate.Generation(offloaded, generate.Job("x")).device == EXEC
    assert sorted(set(asked)) == [("hint", EXEC), ("noise", EXEC)] and len(asked) == 3


@pytest.mark.parametrize("mode", ["img2img", "inpaint", "hires-latent", "hires-image"])
def test_other_modes_are_bit_identical_and_visit_in_order(plain, offloaded, monkeypatch, mode):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    calls = {
        "img2img": lambda p: p.img2img(image, "red", strength=0.5, **ARGS),
        "inpaint": lambda p: p.inpaint(image, mask, "a hole", strength=0.8, mask_blur=0, **ARGS),
        "hires-latent": lambda p: p.txt2img("x", hires=dict(scale=1.5, steps=2, denoising_strength=0.5), **ARGS),
        "hires-image": lambda p: p.txt2img("x", hires=dict(scale=1.5, steps=2, upscaler="Lanczos"), **ARGS),
    }
    results = []
    events = record(monkeypatch, offloaded, lambda: results.append(calls[mode](offloaded)))
    encode, decode = stage("vae", "vae-encode"), stage("vae", "vae-decode")
    expected_events = {
        "img2img": encode + stage("text") + stage("unet") + decode,
        "inpaint": encode + stage("text") + stage("unet") + decode,
        "hires-latent": stage("text") + stage("unet") + stage("text") + stage("unet") + decode,
        "hires-image": stage("text") + stage("unet") + decode + encode + stage("text") + stage("unet") + decode,
    }[mode]
    assert events == expected_events
    assert torch.equal(results[0].latents, calls[mode](plain).latents)


def test_controlnets_travel_with_the_unet(plain, offloaded, monkeypatch):
    net = randomize_(create_from_unet(plain.unet), 5)
    hint = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    unit = sdlite.ControlUnit(net, hint, weight=0.5)
    results = []
    named = components(offloaded) | {"control": net}
    events = record(monkeypatch, offloaded, lambda: results.append(offloaded.txt2img("x", controlnets=[unit], **ARGS)),
                    named=named, ran=runs(offloaded) | {"control": net})
    # The ControlNet runs first at every step, so the collapsed log alternates between the two.
    sampling = ["unet on", "control on"] + ["run control", "run unet"] * ARGS["steps"] + ["unet off", "control off"]
    assert events == stage("text") + sampling + stage("vae", "vae-decode")
    assert torch.equal(results[0].latents, plain.txt2img("x", controlnets=[unit], **ARGS).latents)


def test_encode_prompt_and_errors_leave_nothing_on_the_device(plain, offloaded, monkeypatch):
    events = record(monkeypatch, offloaded, lambda: offloaded.encode_prompt(["a", "b"]))
    assert events == stage("text")
    assert torch.equal(offloaded.encode_prompt("a cat").context, plain.encode_prompt("a cat").context)

    def fail(info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        offloaded.txt2img("x", callback=fail, **ARGS)
    assert offloaded.offload.resident == []


def test_lora_merges_while_offloaded(plain, offloaded, tmp_path):
    from lorafiles import text_layers, unet_layers, write_file

    layers = unet_layers(plain.unet) + text_layers(plain.text_encoders[0], "te1")
    write_file(tmp_path / "style.safetensors", layers, "lora", "sd1", seed=3)
    before = {k: v.clone() for k, v in offloaded.unet.state_dict().items()}
    for pipe in (plain, offloaded):
        pipe.lora_dirs = [tmp_path]
    try:
        tagged = [p.txt2img("x <lora:style:0.8>", **ARGS).latents for p in (plain, offloaded)]
        handle = offloaded.add_lora(tmp_path / "style.safetensors", weight=0.8)
        merged = offloaded.txt2img("x", **ARGS).latents
        handle.remove()
    finally:
        for pipe in (plain, offloaded):
            pipe.lora_dirs = []
    assert torch.equal(tagged[0], tagged[1]) and torch.equal(merged, tagged[1])
    assert not torch.equal(merged, plain.txt2img("x", **ARGS).latents)
    after = offloaded.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_enable_and_disable(sd1_file, monkeypatch):
    pipe = sdlite.load(sd1_file)
    assert pipe.offload is None and pipe.disable_offload() is pipe
    events = record(monkeypatch, pipe, lambda: pipe.enable_offload(EXEC))
    assert sorted(events) == ["text off", "unet off", "vae off"] and pipe.device == EXEC
    events = record(monkeypatch, pipe, pipe.disable_offload)
    assert sorted(events) == ["text on", "unet on", "vae on"] and pipe.offload is None
    # Without offload the core asks for no moves at all.
    assert record(monkeypatch, pipe, lambda: pipe.txt2img("x", **ARGS)) == ["run text", "run unet", "run vae-decode"]


@pytest.fixture(scope="module")
def sdxl_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl")
    save_file(build("sdxl", seed=11).state, str(folder / "base.safetensors"))
    save_file(build("sdxl-refiner", seed=12).state, str(folder / "refiner.safetensors"))
    return folder / "base.safetensors", folder / "refiner.safetensors"


def test_refiner_unet_takes_the_base_unets_place(sdxl_pair, monkeypatch):
    base, refiner = (sdlite.load(p, device=EXEC, offload=True) for p in sdxl_pair)
    args = dict(ARGS, refiner=refiner, refiner_switch_at=0.5)  # model calls 0, 1 by the base, 2 by the refiner
    named = {"text": base.text_encoders[0], "text2": base.text_encoders[1], "unet": base.unet, "vae": base.vae,
             "r-text": refiner.text_encoders[0], "r-unet": refiner.unet}
    ran = {k: v for k, v in named.items() if k != "vae"} | {"vae-decode": base.vae.decoder}
    results = []
    events = record(monkeypatch, base, lambda: results.append(base.txt2img("a castle", **args)), named, ran)
    text = ["text on", "text2 on"] + ["run text", "run text2"] * 2 + ["text off", "text2 off"]  # prompt, negative
    assert events == (text + stage("r-text") + stage("unet") + stage("r-unet") + stage("vae", "vae-decode"))
    plain_base, plain_refiner = (sdlite.load(p) for p in sdxl_pair)
    expected = plain_base.txt2img("a castle", **dict(args, refiner=plain_refiner))
    assert torch.equal(results[0].latents, expected.latents)
    assert base.offload.resident == [] and refiner.offload.resident == []
