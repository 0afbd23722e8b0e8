"""Image prompts in every mode against the reference pipeline (tests/refpipe.py: diffusers' UNet, k-diffusion, A1111's
rules) with the same file loaded through diffusers' IP-Adapter loader: img2img and inpaint on SD1, txt2img on SDXL
(size conditioning), and InstantID's IdentityNet (diffusers' ControlNetModel over the face tokens) in txt2img."""

from __future__ import annotations

import k_diffusion.external as kext
import k_diffusion.sampling as ks
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

import sdlite
from sdlite.adapters import ip_adapter
from sdlite.adapters.controlnet import create_from_unet
from sdlite.checkpoint.write import save_safetensors
from sdlite.clip import load_vision, preprocess

from conftest import randomize_, rel_err
from refpipe import CFG, LDM, Noise, load_reference, max_pixel_diff, sample, write_model
from sdfiles import UNETS
from test_controlnet import diffusers_controlnet_config
from test_instantid import reference_draw_kps
from test_ip_adapter import adapter_file
from test_reference_img2img import picture, reference_img2img
from test_reference_inpaint import check, rectangle_mask, reference_inpaint
from test_reference_sdxl import base_ids, conds

pytestmark = pytest.mark.usefixtures("one_thread")


class ImagePromptLDM(LDM):
    """The reference LDM with diffusers' IP-Adapter inputs: ``cond["ip"]`` is each row's entry of diffusers'
    ``image_embeds`` list ([B, 1, …]); with an IdentityNet, its residuals over ``cond["face"]`` (the rows' face
    tokens) are added as the InstantID pipeline adds them."""

    def __init__(self, unet, net=None, hint=None, control_weight=1.0):
        super().__init__(unet)
        self.net, self.hint, self.control_weight = net, hint, control_weight

    def apply_model(self, x, t, cond):
        added = {"image_embeds": [cond["ip"]]}
        if "time_ids" in cond:
            added |= {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
        if "concat" in cond:
            x = torch.cat([x, cond["concat"]], dim=1)
        residuals = {}
        if self.net is not None:
            down, mid = self.net(x, t, encoder_hidden_states=cond["face"], return_dict=False,
                                 controlnet_cond=self.hint.expand(x.shape[0], -1, -1, -1),
                                 conditioning_scale=self.control_weight)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return self.unet(x, t, encoder_hidden_states=cond["context"], added_cond_kwargs=added, **residuals).sample


class WithImagePrompt:
    """A Reference whose prompts carry image embeds (``embeds``: prompt text → [1, 1, …]) and whose wrapped model
    is :class:`ImagePromptLDM`; everything else is the reference's."""

    def __init__(self, ref, embeds, **ldm):
        self.ref, self.embeds = ref, embeds
        self.wrapped = kext.CompVisDenoiser(ImagePromptLDM(ref.unet, **ldm))

    def __getattr__(self, name):
        return getattr(self.ref, name)

    def encode(self, prompts, negative=False):
        (prompt,) = prompts
        return {**self.ref.encode(prompts, negative=negative), "ip": self.embeds[prompt]}


def clip_encoder(tmp_path):
    torch.manual_seed(2)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=224,
        patch_size=32, projection_dim=48, hidden_act="gelu")).eval()
    path = save_safetensors(tmp_path / "enc.safetensors",
                            {k: v for k, v in clip.state_dict().items() if "position_ids" not in k})
    return clip, load_vision(path, heads=4, activation="gelu")


def image_prompt(tmp_path, pipe, ref, variant, weight):
    """A random adapter for ``pipe``'s UNet, loaded into the reference UNet too; the unit and the reference's
    positive / negative image embeds (diffusers' list entries) for one image."""
    clip, encoder = clip_encoder(tmp_path)
    nested = adapter_file(pipe.unet, variant, seed=5, embed_dim=48 if variant == "base" else 64)
    flat = {f"{part}.{k}": v for part, d in nested.items() for k, v in d.items()}
    adapter = ip_adapter.load(save_safetensors(tmp_path / f"{variant}.safetensors", flat))
    image = Image.new("RGB", (96, 80), (30, 160, 220))
    ref.unet._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)
    for proc in ref.unet.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [weight]
    pixels = preprocess(image)
    with torch.no_grad():
        if variant == "base":
            pos = clip(pixel_values=pixels).image_embeds
            neg = torch.zeros_like(pos)
        else:
            pos = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
            neg = clip(pixel_values=torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
    return sdlite.IPAdapterUnit(adapter, image, weight=weight, encoder=encoder), pos[:, None], neg[:, None]


@pytest.fixture
def sd1(tmp_path):
    path, built = write_model(tmp_path, "sd1", seed=41)
    return sdlite.load(path), load_reference(path, built)


@torch.no_grad()
def test_img2img_with_an_image_prompt_matches_the_reference(tmp_path, sd1):
    pipe, ref = sd1
    unit, pos, neg = image_prompt(tmp_path, pipe, ref, "base", 0.8)
    image = picture(64, 64, seed=1)
    got = pipe.img2img(image, "a lighthouse", "fog", strength=0.6, steps=5, cfg_scale=6.0, sampler="Euler", seed=5,
                       width=64, height=64, ip_adapters=[unit])
    expected, _ = reference_img2img(WithImagePrompt(ref, {"a lighthouse": pos, "fog": neg}), image, "a lighthouse",
                                    "fog", [5], 5, 0.6, 6.0, ks.sample_euler)
    assert rel_err(got.latents, expected) < 1e-4
    assert max_pixel_diff(got.images[0], ref.to_images(expected)[0]) <= 1
    plain = pipe.img2img(image, "a lighthouse", "fog", strength=0.6, steps=5, cfg_scale=6.0, sampler="Euler",
                         seed=5, width=64, height=64)
    assert rel_err(plain.latents, expected) > 1e-3  # the image prompt changed the result


@torch.no_grad()
def test_inpaint_with_a_plus_image_prompt_matches_the_reference(tmp_path, sd1):
    pipe, ref = sd1
    unit, pos, neg = image_prompt(tmp_path, pipe, ref, "plus", 0.7)
    image, mask = picture(64, 64, seed=3), rectangle_mask((64, 64), (16, 8, 48, 40))
    got = pipe.inpaint(image, mask, "a door", "", strength=0.8, steps=4, cfg_scale=6.0, seed=13, mask_blur=4,
                       inpaint_fill="original", width=64, height=64, ip_adapters=[unit])
    check(got, reference_inpaint(WithImagePrompt(ref, {"a door": pos, "": neg}), image, mask, "a door", "", [13],
                                 width=64, height=64, steps=4, strength=0.8, cfg=6.0, mask_blur=4,
                                 fill_mode="original"))


@torch.no_grad()
def test_sdxl_txt2img_with_an_image_prompt_matches_the_reference(tmp_path):
    path, built = write_model(tmp_path, "sdxl", seed=71)
    pipe, ref = sdlite.load(path), load_reference(path, built)
    unit, pos, neg = image_prompt(tmp_path, pipe, ref, "plus", 0.9)
    width, height = 64, 48
    got = pipe.txt2img("a castle", "blurry", width=width, height=height, steps=4, cfg_scale=5.0, seed=81,
                       sampler="Euler a", ip_adapters=[unit])
    ids = base_ids(ref, (height, width), (0, 0), (height, width))
    c, u = conds(ref, "a castle", "blurry", ids, ids, 1)
    wrapped = WithImagePrompt(ref, {}).wrapped
    noise = Noise((4, height // 8, width // 8), [81])
    sigmas = ref.sigmas(4)
    model = CFG(wrapped, lambda _: [({**c, "ip": pos}, 1.0)], lambda _: {**u, "ip": neg}, 5.0)
    expected = sample(ks.sample_euler_ancestral, model, noise.first() * sigmas[0], sigmas, noise)
    assert rel_err(got.latents, expected) < 1e-4
    assert max_pixel_diff(got.images[0], ref.to_images(expected)[0]) <= 1


def diffusers_controlnet(net, spec):
    """diffusers' ControlNetModel with ``net``'s weights, through diffusers' original-checkpoint converter."""
    dcfg = diffusers_controlnet_config(spec)
    converted = convert_controlnet_checkpoint({f"control_model.{k}": v for k, v in net.state_dict().items()}, dcfg)
    model = ControlNetModel(**dcfg)
    model.load_state_dict(converted, strict=True)
    return model.eval()


@torch.no_grad()
def test_instantid_txt2img_matches_the_reference(tmp_path, sd1):
    pipe, ref = sd1
    net = randomize_(create_from_unet(pipe.unet), 11)
    nested = adapter_file(pipe.unet, "plus", seed=6, embed_dim=512)
    flat = {f"{part}.{k}": v for part, d in nested.items() for k, v in d.items()}
    adapter = ip_adapter.load(save_safetensors(tmp_path / "ip-adapter.safetensors", flat))
    face = torch.randn(512, generator=torch.Generator().manual_seed(3))
    kps = np.array([[20.2, 18.5], [44.7, 17.9], [32.1, 30.3], [22.6, 42.0], [42.8, 41.1]])
    unit = sdlite.InstantIDUnit(adapter, net, face, kps, ip_weight=0.8, control_weight=0.7)
    got = pipe.txt2img("a portrait", "lowres", width=64, height=64, steps=4, cfg_scale=5.0, sampler="Euler",
                       seed=9, ip_adapters=[unit])

    ref.unet._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)
    for proc in ref.unet.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [0.8]
    faces = torch.stack([face, torch.zeros(512)])[:, None, None]  # [2, 1, 1, 512]: one image of one token
    tokens = ref.unet.encoder_hid_proj.image_projection_layers[0](faces[:, 0])
    hint = torch.from_numpy(np.asarray(reference_draw_kps((64, 64), kps), np.float32) / 255).permute(2, 0, 1)[None]
    wrapped = WithImagePrompt(ref, {}, net=diffusers_controlnet(net, UNETS["sd1"]), hint=hint,
                              control_weight=0.7).wrapped
    c = {**ref.encode(["a portrait"]), "ip": faces[:1], "face": tokens[:1]}
    u = {**ref.encode(["lowres"]), "ip": faces[1:], "face": tokens[1:]}
    noise = Noise((4, 8, 8), [9])
    sigmas = ref.sigmas(4)
    expected = sample(ks.sample_euler, CFG(wrapped, lambda _: [(c, 1.0)], lambda _: u, 5.0),
                      noise.first() * sigmas[0], sigmas)
    assert rel_err(got.latents, expected) < 1e-4
    assert max_pixel_diff(got.images[0], ref.to_images(expected)[0]) <= 1
    without = pipe.txt2img("a portrait", "lowres", width=64, height=64, steps=4, cfg_scale=5.0, sampler="Euler",
                           seed=9, ip_adapters=[unit.image_prompt])
    assert rel_err(without.latents, expected) > 1e-3  # the IdentityNet changed the result
