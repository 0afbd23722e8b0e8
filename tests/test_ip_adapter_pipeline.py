"""txt2img with an IP-Adapter unit against the reference pipeline (tests/refpipe.py) with diffusers' IP-Adapter
loader on the same UNet: image embeds on the cond rows, zeros on the uncond rows, the unit's weight as the scale."""

from __future__ import annotations

import k_diffusion.external as kext
import k_diffusion.sampling as ks
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

import sdlite
from sdlite.adapters import ip_adapter
from sdlite.checkpoint.write import save_safetensors
from sdlite.clip import load_vision, preprocess

from conftest import rel_err
from refpipe import CFG, LDM, Noise, batch, load_reference, max_pixel_diff, sample, write_model
from test_ip_adapter import adapter_file

pytestmark = pytest.mark.usefixtures("one_thread")


class ImagePromptLDM(LDM):
    """The reference LDM passing each row's image embeds to diffusers' UNet (its IP-Adapter image projection)."""

    def apply_model(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond["context"],
                         added_cond_kwargs={"image_embeds": [cond["ip"][:, None]]}).sample


@torch.no_grad()
def test_txt2img_with_an_image_prompt_matches_the_reference(tmp_path):
    path, built = write_model(tmp_path, "sd1", seed=41)
    pipe, ref = sdlite.load(path), load_reference(path, built)
    torch.manual_seed(2)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=224,
        patch_size=32, projection_dim=48, hidden_act="gelu")).eval()
    encoder = load_vision(save_safetensors(tmp_path / "enc.safetensors",
                                           {k: v for k, v in clip.state_dict().items() if "position_ids" not in k}),
                          heads=4, activation="gelu")
    nested = adapter_file(pipe.unet, "base", seed=5, embed_dim=48)
    flat = {f"{part}.{k}": v for part, d in nested.items() for k, v in d.items()}
    adapter = ip_adapter.load(save_safetensors(tmp_path / "ip.safetensors", flat))
    image = Image.new("RGB", (96, 80), (30, 160, 220))

    unit = sdlite.IPAdapterUnit(adapter, image, weight=0.8, encoder=encoder)
    got = pipe.txt2img("a lighthouse", "fog", width=64, height=64, steps=4, cfg_scale=5.0, sampler="Euler", seed=9,
                       ip_adapters=[unit])
    plain = pipe.txt2img("a lighthouse", "fog", width=64, height=64, steps=4, cfg_scale=5.0, sampler="Euler", seed=9)

    ref.unet._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)
    for proc in ref.unet.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [0.8]
    wrapped = kext.CompVisDenoiser(ImagePromptLDM(ref.unet))
    embeds = clip(pixel_values=preprocess(image)).image_embeds
    c = {**ref.encode(["a lighthouse"]), "ip": embeds}
    u = {**ref.encode(["fog"]), "ip": torch.zeros_like(embeds)}
    noise = Noise((4, 8, 8), [9])
    sigmas = wrapped.get_sigmas(4)
    model = CFG(wrapped, lambda _: [(batch(c, 1), 1.0)], lambda _: batch(u, 1), 5.0)
    expected = sample(ks.sample_euler, model, noise.first() * sigmas[0], sigmas)

    assert rel_err(got.latents, expected) < 1e-4
    assert max_pixel_diff(got.images[0], ref.to_images(expected)[0]) <= 1
    assert rel_err(plain.latents, expected) > 1e-3  # the image prompt changed the result
