"""The LoRA key mapping: file key syntax of every layout, diffusers UNet names → original modules for the block
structures of SD1/SD2/SDXL (two res blocks per level, levels without attention, distilled depths, inpainting),
HF CLIP names → open_clip modules, and the family guess used to refuse a LoRA made for another model."""

from __future__ import annotations

import pytest
import torch

from sdlite.adapters.lora_keys import KeyMap, guess_family, parse_key
from sdlite.clip import OpenCLIPTextModel, TextEncoderConfig
from sdlite.unet import UNetConfig, UNetModel

import test_unet
from conftest import randomize_
from lorafiles import unet_layers


@pytest.mark.parametrize("key,component,path,role", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "unet", "down_blocks_0_attentions_0_proj_in",
     "down"),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.alpha", "unet",
     "input_blocks_4_1_transformer_blocks_0_attn2_to_k", "alpha"),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_a", "te1", "text_model_encoder_layers_0_mlp_fc1",
     "hada_w1_a"),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lokr_w2_b", "te1",
     "text_model_encoder_layers_0_self_attn_q_proj", "lokr_w2_b"),
    ("lora_te2_text_model_encoder_layers_31_mlp_fc2.dora_scale", "te2", "text_model_encoder_layers_31_mlp_fc2",
     "dora_scale"),
    ("lora_unet_input_blocks_1_0_in_layers_2.lora_mid.weight", "unet", "input_blocks_1_0_in_layers_2", "mid"),
    ("lora_unet_out_2.diff_b", "unet", "out_2", "diff_b"),
    ("unet.mid_block.attentions.0.proj_in.lora.down.weight", "unet", "mid_block_attentions_0_proj_in", "down"),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight", "unet",
     "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0", "up"),
    ("up_blocks.1.attentions.2.transformer_blocks.0.attn2.processor.to_k_lora.down.weight", "unet",
     "up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k", "down"),
    ("text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight", "te1",
     "text_model_encoder_layers_0_self_attn_q_proj", "down"),
    ("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight", "te1",
     "text_model_encoder_layers_0_mlp_fc1", "up"),
    ("text_encoder_2.text_model.encoder.layers.3.self_attn.k_proj.lora_B.weight", "te2",
     "text_model_encoder_layers_3_self_attn_k_proj", "up"),
    ("unet.down_blocks.1.attentions.0.proj_in.lora_A.default.weight", "unet", "down_blocks_1_attentions_0_proj_in",
     "down"),
    ("unet.conv_in.lora_magnitude_vector", "unet", "conv_in", "magnitude"),
    ("base_model.model.down_blocks.0.resnets.0.conv1.lora_A.weight", "unet", "down_blocks_0_resnets_0_conv1", "down"),
    ("text_encoder.encoder.layers.2.self_attn.out_proj.lora_A.weight", "te1", "encoder_layers_2_self_attn_out_proj",
     "down"),
    ("diffusion_model.output_blocks.2.1.conv.lora_up.weight", "unet", "output_blocks_2_1_conv", "up"),
])
def test_keys_of_every_layout_are_split(key, component, path, role):
    parsed = parse_key(key)
    assert (parsed.component, parsed.path, parsed.role) == (component, path, role)


@pytest.mark.parametrize("key", ["bundle_emb.cat.string_to_param.*", "lora_unet_mid_block_proj_in.on_input",
                                 "lora_unet_x.oft_blocks", "model.diffusion_model.out.2.weight", "something.lora_A"])
def test_other_keys_are_not_taken_for_lora_layers(key):
    assert parse_key(key) is None


SPECS = {name: getattr(test_unet, name) for name in ("SD1", "SD2", "SDXL", "INPAINT")}
SPECS["SDXL_DISTILLED"] = dict(test_unet.SDXL_DISTILLED, transformer_depth_middle=2)  # what diffusers can describe


@pytest.mark.parametrize("name", list(SPECS))
def test_diffusers_and_original_names_resolve_to_the_same_module(name):
    """Every Linear/Conv2d of diffusers' UNet, found by its diffusers name and by its original name; the reference
    pairing is diffusers' own checkpoint converter (same random tensor in both models)."""
    unet = randomize_(UNetModel(UNetConfig(**SPECS[name])))
    keymap = KeyMap(unet, [])
    layers = unet_layers(unet)
    assert len(layers) == sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in unet.modules())
    for layer in layers:
        for path in (layer.dotted, layer.ldm):
            target = keymap.resolve("unet", path.replace(".", "_"))
            assert target is not None and target.module is layer.module and target.path == layer.ldm, path
    assert keymap.resolve("unet", "down_blocks_9_attentions_0_proj_in") is None
    assert keymap.resolve("unet", "up_blocks_0_upsamplers_0_conv").path.endswith(".conv")
    assert keymap.resolve("unet", "down_blocks_0_resnets_0_norm1") is None  # not a Linear/Conv2d


def test_hf_clip_names_address_open_clip_modules():
    config = TextEncoderConfig(layout="openclip", width=128, layers=2, heads=2, mlp_width=256, projection_dim=64,
                               activation="gelu")
    tower = OpenCLIPTextModel(config)
    keymap = KeyMap(randomize_(UNetModel(UNetConfig(**test_unet.SD2))), [tower])
    attn = tower.transformer.resblocks[1].attn
    for proj, rows in (("q", (0, 128)), ("k", (128, 256)), ("v", (256, 384))):
        target = keymap.resolve("te1", f"text_model_encoder_layers_1_self_attn_{proj}_proj")
        assert (target.module, target.weight, target.bias) == (attn, "in_proj_weight", "in_proj_bias")
        assert target.rows == rows
        assert target.shape == (128, 128) and target.bias_shape == (128,)
    mlp = tower.transformer.resblocks[0].mlp
    assert keymap.resolve("te1", "text_model_encoder_layers_0_mlp_fc1").module is mlp.c_fc
    assert keymap.resolve("te1", "encoder_layers_0_mlp_fc2").module is mlp.c_proj
    assert keymap.resolve("te1", "transformer_resblocks_1_attn_out_proj").module is attn.out_proj
    assert keymap.resolve("te1", "text_model_encoder_layers_2_mlp_fc1") is None  # only two layers
    assert keymap.resolve("te2", "text_model_encoder_layers_0_mlp_fc1") is None  # only one text encoder


def test_family_guess():
    assert guess_family([], {}, {"ss_base_model_version": "sdxl_base_v1-0"}).families == {"sdxl"}
    assert guess_family([], {}, {"modelspec.architecture": "stable-diffusion-v1/lora"}).families == {"sd1"}
    assert guess_family([], {}, {"ss_v2": "True"}).families == {"sd2"}
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    assert guess_family([key], {key: (4, 1024)}, {}).families == {"sd2"}
    assert guess_family(["lora_te2_x.alpha"], {}, {}).families == {"sdxl"}
    assert guess_family(["lora_unet_input_blocks_4_1_proj_in.alpha"], {}, {}).families == {"sdxl", "sdxl-refiner"}
    assert guess_family(["lora_te_x.alpha"], {}, {}).families == {"sd1", "sd2"}
    assert guess_family(["unet.conv_in.lora_A.weight"], {"unet.conv_in.lora_A.weight": (4, 4, 3, 3)}, {}) is None
