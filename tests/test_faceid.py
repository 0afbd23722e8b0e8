"""IP-Adapter FaceID-Plus (v1 and v2's shortcut): the image projection against diffusers'
IPAdapterFaceIDPlusImageProjection (through diffusers' own converter of the file's keys), and a UNet driven by a
FaceID-Plus unit (face embedding + the face crop's CLIP penultimate states, zeros and a blank image on the uncond
row) against diffusers' UNet with the same file loaded through its IP-Adapter loader."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from sdlite.adapters import image_proj, ip_adapter
from sdlite.checkpoint.write import save_safetensors
from sdlite.unet_call import UNetCall

from conftest import rel_err
from test_ip_adapter import clip_files, randomised
from test_unet import SD1, SDXL, adm_inputs, build_pair, inputs


def faceid_plus_file(tmp_path, unet, clip_width=64, seed=0, name="ip-adapter-faceid-plus_sd15.safetensors"):
    """A random FaceID-Plus file for ``unet``: 4 tokens (as released), a 2-head Perceiver over CLIP states of
    width ``clip_width``, k/v projections for every cross-attention layer in diffusers' processor order."""
    context = unet.config.context_dim
    proj = randomised(image_proj.FaceIDPlusProjection(512, 1024, context, 4, clip_width, 128, 4, 4 * context,
                                                      context), seed)
    nested = {"image_proj": dict(proj.state_dict()), "ip_adapter": {}}
    g = torch.Generator().manual_seed(seed + 1)
    for n, key in enumerate(ip_adapter.processor_order(unet)):
        if key.endswith("attn2"):
            hidden = unet.get_submodule(key).to_k.out_features
            for part in ("to_k_ip", "to_v_ip"):
                nested["ip_adapter"][f"{n}.{part}.weight"] = torch.randn(hidden, context, generator=g) * 0.2
    flat = {f"{part}.{k}": v for part, d in nested.items() for k, v in d.items()}
    return save_safetensors(tmp_path / name, flat), nested


def diffusers_projection(nested, shortcut_scale):
    proj = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(
        SimpleNamespace(), nested["image_proj"], low_cpu_mem_usage=False).eval()
    proj.shortcut, proj.shortcut_scale = shortcut_scale is not None, shortcut_scale or 1.0
    return proj


@pytest.mark.parametrize("shortcut_scale", [None, 0.7])
@torch.no_grad()
def test_faceid_plus_tokens_match_diffusers(tmp_path, shortcut_scale):
    unet, _, _ = build_pair(dict(SD1, context_dim=64))
    path, nested = faceid_plus_file(tmp_path, unet, clip_width=80)
    adapter = ip_adapter.load(path)
    assert adapter.variant == "faceid-plus" and adapter.shortcut_scale is None  # a v1 name
    assert adapter.feature_width == 80 and adapter.input == "face+penultimate"
    adapter.shortcut_scale = shortcut_scale
    g = torch.Generator().manual_seed(3)
    faces, states = torch.randn(2, 512, generator=g), torch.randn(2, 17, 80, generator=g)
    reference = diffusers_projection(nested, shortcut_scale)
    reference.clip_embeds = states[:, None]  # [B, images, tokens, width], as diffusers' pipelines set it
    expected = reference(faces)
    got = adapter.image_tokens(faces, states)
    assert got.shape == expected.shape == (2, 4, 64)
    assert rel_err(got, expected) < 1e-5
    with pytest.raises(ValueError, match="penultimate"):
        adapter.image_tokens(faces)


def test_v2_files_get_the_shortcut_by_name(tmp_path):
    unet, _, _ = build_pair(dict(SD1, context_dim=64))
    path, _ = faceid_plus_file(tmp_path, unet, name="ip-adapter-faceid-plusv2_sd15.safetensors")
    assert ip_adapter.load(path).shortcut_scale == 1.0


@pytest.mark.parametrize("spec,v2", [("SD1", False), ("SDXL", True)])
@torch.no_grad()
def test_unet_with_a_faceid_plus_unit_matches_diffusers(tmp_path, spec, v2):
    unet, ref_unet, config = build_pair(dict(globals()[spec], context_dim=64), seed=3)
    clip, encoder = clip_files(tmp_path)
    path, nested = faceid_plus_file(tmp_path, unet, clip_width=64, seed=4)
    adapter = ip_adapter.load(path)
    adapter.shortcut_scale = 0.8 if v2 else None
    face = torch.randn(512, generator=torch.Generator().manual_seed(9))
    crop = Image.new("RGB", (120, 140), (180, 120, 100))
    unit = ip_adapter.IPAdapterUnit(adapter, crop, weight=0.6, encoder=encoder, face_embedding=face)
    x, t, context, g = inputs(config)
    kw, added = {}, {}
    if config.adm_in_channels:
        kw["y"], added = adm_inputs(config, 2, g)
    call = UNetCall(unet, SimpleNamespace(progress=0.0), patches=ip_adapter.patch_hook([unit], unet))
    got = call(x, t, context, cond_rows=torch.tensor([True, False]), **kw)

    ref_unet._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)
    for proc in ref_unet.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [0.6]
    proj = ref_unet.encoder_hid_proj.image_projection_layers[0]
    proj.shortcut, proj.shortcut_scale = v2, 0.8
    pixels = ip_adapter.preprocess(crop)
    states = torch.cat([clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2],
                        clip(pixel_values=torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]])
    proj.clip_embeds = states[:, None]
    faces = torch.stack([face, torch.zeros(512)])
    expected = ref_unet(x, t, encoder_hidden_states=context,
                        added_cond_kwargs={**added, "image_embeds": [faces[:, None]]}).sample
    assert rel_err(got, expected) < 1e-4
    assert rel_err(unet(x, t, context, **kw), expected) > 1e-2  # the face tokens changed the prediction


def test_faceid_plus_units_need_both_inputs(tmp_path):
    unet, _, _ = build_pair(dict(SD1, context_dim=64))
    _, encoder = clip_files(tmp_path)
    adapter = ip_adapter.load(faceid_plus_file(tmp_path, unet)[0])
    crop = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match="face_embedding="):
        ip_adapter.IPAdapterUnit(adapter, crop, encoder=encoder)
    with pytest.raises(ValueError, match="image= and encoder="):
        ip_adapter.IPAdapterUnit(adapter, face_embedding=torch.zeros(512))
    unit = ip_adapter.IPAdapterUnit(adapter, [crop, crop], encoder=encoder, face_embedding=torch.zeros(512))
    with pytest.raises(ValueError, match="1 embeddings and 2 images"):
        unit.tokens()
