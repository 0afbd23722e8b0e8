"""CLIP vision towers against transformers' CLIPVisionModelWithProjection and open_clip's VisionTransformer."""

import numpy as np
import pytest
import torch
from open_clip.transformer import VisionTransformer
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from sdlite.checkpoint.write import save_safetensors
from sdlite.clip import load_vision, preprocess
from sdlite.errors import CheckpointError


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def hf_model(width, layers, heads, mlp, projection, act, image_size=224, patch=14):
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch,
                              projection_dim=projection, hidden_act=act)
    model = CLIPVisionModelWithProjection(config).eval()
    with torch.no_grad():  # LayerNorms start at identity: randomise them too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("width,heads,act,mlp,projection,kwargs", [
    (1280, 16, "gelu", 640, 1024, {}),           # ViT-H/14 (IP-Adapter SD1.5): heads and activation from the width
    (1664, 16, "gelu", 512, 1280, {}),           # ViT-bigG/14 (IP-Adapter SDXL)
    (64, 4, "quick_gelu", 128, 32, {"heads": 4, "activation": "quick_gelu"}),   # an unknown width, overridden
])
def test_transformers_layout_matches_transformers(tmp_path, width, heads, act, mlp, projection, kwargs):
    model = hf_model(width, 3, heads, mlp, projection, act)
    sd = model.state_dict()
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    path = save_safetensors(tmp_path / "model.safetensors", sd)
    enc = load_vision(path, **kwargs)
    assert enc.config.layout == "clip" and enc.config.layers == 3 and enc.config.image_size == 224
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = model(pixel_values=pixels, output_hidden_states=True)
        out = enc.encode_image(pixels)
    assert rel(out.image_embeds, ref.image_embeds) < 1e-5
    assert rel(out.penultimate, ref.hidden_states[-2]) < 1e-5
    assert rel(out.last_hidden, ref.last_hidden_state) < 1e-5


def test_open_clip_visual_tower_matches_open_clip(tmp_path):
    torch.manual_seed(1)
    ref = VisionTransformer(image_size=224, patch_size=14, width=1280, layers=3, heads=16, mlp_ratio=0.5,
                            output_dim=1024).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * (0.02 if p.ndim > 1 else 0.1) + (1.0 if "ln" in name and "weight" in name else 0))
    # as an open_clip checkpoint carries it: the visual tower under "visual.", next to a text tower we must ignore
    sd = {"visual." + k: v for k, v in ref.state_dict().items()}
    sd["transformer.resblocks.0.ln_1.weight"] = torch.ones(8)
    sd["token_embedding.weight"] = torch.zeros(10, 8)
    enc = load_vision(save_safetensors(tmp_path / "open_clip.safetensors", sd))
    assert enc.config.layout == "openclip" and enc.config.activation == "gelu"
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert rel(enc.encode_image(pixels).image_embeds, ref(pixels)) < 1e-5


def test_preprocess_matches_transformers_image_processor():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              [(300, 500), (640, 333), (224, 224), (100, 150)]]
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                   image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711])
    ref = processor(images=images, return_tensors="pt")["pixel_values"]
    ours = preprocess(images)
    # One level of the 8-bit image in normalised units is 1/255/0.2613 ≈ 0.0150: transformers rounds the resized
    # image differently in a few pixels, never by more than one level.
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() < 0.0151
    assert rel(ours, ref) < 2e-3


def test_files_of_another_kind_are_refused(tmp_path):
    path = save_safetensors(tmp_path / "unet.safetensors", {"model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3)})
    with pytest.raises(CheckpointError, match="not a CLIP vision model"):
        load_vision(path)
    model = hf_model(96, 2, 4, 64, 32, "gelu")
    path = save_safetensors(tmp_path / "odd.safetensors", {k: v for k, v in model.state_dict().items()})
    with pytest.raises(CheckpointError, match="pass heads="):
        load_vision(path)
    with pytest.raises(ValueError, match=r"pixels must be \[B, 3, 224, 224\]"):
        load_vision(path, heads=4).encode_image(torch.zeros(1, 3, 64, 64))
