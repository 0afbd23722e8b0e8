"""Hires fix with an ESRGAN upscaler against the same pipeline assembled by hand as A1111 runs it: the first pass
decoded to uint8, upscaled by spandrel's network (BGR, as A1111 feeds it), resized as ``images.resize_image(1, …)``
does, encoded, and the second pass as img2img with k-diffusion; and the infotext written and read back."""

from __future__ import annotations

import k_diffusion.external as kext
import k_diffusion.sampling as ks
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sdlite
import sdlite.upscalers
from sdlite.infotext import read_infotext
from sdlite.upscalers.archs import RRDBConfig, build

from conftest import rel_err
from sdfiles import build as build_checkpoint
from sdfiles import open_clip_tokens

import spandrel  # noqa: E402  (the reference: a missing one fails, never skips)

from test_generate import LDMModel  # noqa: E402


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    b = build_checkpoint("sd1", seed=7)
    folder = tmp_path_factory.mktemp("hires")
    save_file(b.state, str(folder / "tiny-sd1.safetensors"))
    config = RRDBConfig(layout="real-esrgan", features=8, growth=32, blocks=1, upsamples=2)
    g = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=g) * (0.5 / max(1, v[0].numel()) ** 0.5 if v.ndim == 4 else 0.2)
             for k, v in build(config).state_dict().items()}
    torch.save({"params_ema": state}, folder / "RealESRGAN_x4plus.pth")
    return sdlite.load(folder / "tiny-sd1.safetensors"), b, folder


def a1111_upscale(path, image: Image.Image, width: int, height: int) -> Image.Image:
    """images.resize_image(1, image, width, height, upscaler) with the network in spandrel, by hand."""
    model = spandrel.ModelLoader().load_from_file(path).model.eval()
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    scale = max(src_w / image.width, src_h / image.height)
    dest = (int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8))
    bgr = np.ascontiguousarray(np.array(image)[:, :, ::-1].transpose(2, 0, 1)) / 255
    with torch.no_grad():
        out = model(torch.from_numpy(bgr).float()[None])[0].clamp(0, 1).numpy()
    big = Image.fromarray((255.0 * np.moveaxis(out, 0, 2)).astype(np.uint8)[:, :, ::-1].copy(), "RGB")
    big = big.resize(dest, Image.Resampling.LANCZOS) if big.size != dest else big
    big = big.resize((src_w, src_h), Image.Resampling.LANCZOS) if big.size != (src_w, src_h) else big
    canvas = Image.new("RGB", (width, height))
    canvas.paste(big, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return canvas


def test_hires_with_esrgan_matches_a1111_by_hand(sd1):
    pipe, b, folder = sd1
    prompt, negative, seed, steps, hires_steps, strength, cfg = "a lighthouse", "blurry", 9, 3, 2, 0.5, 5.0
    args = dict(width=64, height=64, steps=steps, sampler="Euler", seed=seed, cfg_scale=cfg)
    pipe.upscaler_dirs = [folder]
    try:
        result = pipe.txt2img(prompt, negative, **args, hires=sdlite.Hires(
            scale=2, upscaler="R-ESRGAN 4x+", steps=hires_steps, denoising_strength=strength))
    finally:
        pipe.upscaler_dirs = []
    assert "Hires upscaler: R-ESRGAN 4x+" in result.infotexts[0]
    assert read_infotext(result.infotexts[0])["Hires upscaler"] == "R-ESRGAN 4x+"

    # by hand: the first pass, decoded and truncated to uint8 as A1111's sample_hr_pass does
    first = pipe.txt2img(prompt, negative, **args).latents
    with torch.no_grad():
        decoded = ((pipe.vae.decode(first / pipe.vae.scale_factor) + 1) / 2).clamp(0, 1)
    lowres = Image.fromarray((255.0 * decoded[0].permute(1, 2, 0).numpy()).astype(np.uint8))
    upscaled = a1111_upscale(folder / "RealESRGAN_x4plus.pth", lowres, 128, 128)
    pixels = torch.from_numpy(np.asarray(upscaled, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        latent = pipe.vae.encode(pixels * 2 - 1).sample(torch.Generator().manual_seed(seed)) * pipe.vae.scale_factor
    # the second pass: A1111's img2img with the hires steps (schedule of int(steps / strength), its last steps)
    tokens = open_clip_tokens([prompt, negative])
    tokens[tokens == 0] = 49407
    with torch.no_grad():
        ctx = b.clip(tokens).last_hidden_state
    wrapped = kext.CompVisDenoiser(LDMModel(pipe.unet))
    total = int(hires_steps / strength)
    sigmas = wrapped.get_sigmas(total)[total - (hires_steps - 1) - 1:]
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed))

    def model(x, sigma, **_):
        c, u = wrapped(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=ctx).chunk(2)
        return u + (c - u) * cfg

    with torch.no_grad():
        expected = ks.sample_euler(model, latent + noise * sigmas[0], sigmas, disable=True)
    assert result.latents.shape == expected.shape == (1, 4, 16, 16)
    assert rel_err(result.latents, expected) < 1e-4


def test_hires_upscaler_module_and_unknown_name(sd1):
    pipe, _, folder = sd1
    model = sdlite.upscalers.load(folder / "RealESRGAN_x4plus.pth")
    args = dict(width=64, height=64, steps=2, sampler="Euler", seed=1)
    by_module = pipe.txt2img("x", **args, hires=sdlite.Hires(scale=1.5, upscaler=model, steps=1))
    assert "Hires upscaler: R-ESRGAN 4x+" in by_module.infotexts[0]  # the A1111 name of the file it came from
    pipe.upscaler_dirs = [folder]
    try:
        by_name = pipe.txt2img("x", **args, hires=sdlite.Hires(scale=1.5, upscaler="R-ESRGAN 4x+", steps=1))
    finally:
        pipe.upscaler_dirs = []
    assert torch.equal(by_module.latents, by_name.latents) and by_name.latents.shape == (1, 4, 12, 12)
    with pytest.raises(FileNotFoundError, match="4x-UltraSharp"):
        pipe.txt2img("x", **args, hires=sdlite.Hires(upscaler="4x-UltraSharp"))
