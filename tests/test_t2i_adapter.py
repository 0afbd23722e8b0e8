"""T2I-Adapters in the original and diffusers layouts against diffusers' T2IAdapter on the same weights."""

import re

import pytest
import torch
from diffusers import T2IAdapter as DiffusersT2IAdapter

from sdlite.adapters import t2i_adapter
from sdlite.checkpoint.write import save_safetensors
from sdlite.errors import CheckpointError


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def reference(kind, in_channels, channels, blocks, unshuffle, seed=0):
    torch.manual_seed(seed)
    model = DiffusersT2IAdapter(in_channels=in_channels, channels=channels, num_res_blocks=blocks,
                                downscale_factor=unshuffle, adapter_type=kind).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (p.shape[1] * p[0].numel() / p.shape[1]) ** -0.5 if p.ndim > 1
                    else torch.randn_like(p) * 0.1)
    return model


def to_original(sd, light, per_level):
    """diffusers names → TencentARC's (the rule of docs/formats.md §5), written independently of sdlite's loader."""
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("adapter.")
        m = re.match(r"body\.(\d+)\.resnets\.(\d+)\.(.*)", key)
        if m and light:
            key = f"body.{m[1]}.body.{m[2]}.{m[3]}"
        elif m:
            key = f"body.{int(m[1]) * per_level + int(m[2])}.{m[3]}"
        elif not light:
            key = re.sub(r"body\.(\d+)\.in_conv", lambda n: f"body.{int(n[1]) * per_level}.in_conv", key)
        out[key] = value
    return out


CASES = {  # kind, hint channels, widths, blocks per level, unshuffle, hint size
    "sd15v2 (3-channel)": ("full_adapter", 3, [32, 64, 128, 128], 2, 8, 128),
    "sd15v2 sketch (1-channel)": ("full_adapter", 1, [32, 64, 128, 128], 2, 8, 128),
    "light": ("light_adapter", 3, [32, 64, 128], 4, 8, 128),
    "xl": ("full_adapter_xl", 3, [32, 64, 128, 128], 2, 16, 256),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_features_match_diffusers(tmp_path, case, layout):
    kind, cin, channels, blocks, unshuffle, size = CASES[case]
    ref = reference(kind, cin, channels, blocks, unshuffle)
    sd = ref.state_dict()
    if layout == "original":
        sd = to_original(sd, kind == "light_adapter", blocks)
        assert "conv_in.weight" in sd or "body.0.in_conv.weight" in sd
    adapter = t2i_adapter.load(save_safetensors(tmp_path / "adapter.safetensors", sd))
    hint = torch.rand(2, cin, size, size)
    with torch.no_grad():
        expected, ours = ref(hint), adapter(hint)
    assert len(ours) == len(expected) == 4
    for a, b in zip(ours, expected):
        assert a.shape == b.shape and rel(a, b) < 1e-5


def test_features_go_to_the_blocks_diffusers_adds_them_to():
    # SD1 (3 levels of 2 blocks + a last level): input-block output shapes of a 64x64 latent, middle last
    sd1 = [(320, 64, 64)] * 3 + [(320, 32, 32), (640, 32, 32), (640, 32, 32), (640, 16, 16), (1280, 16, 16),
                                 (1280, 16, 16), (1280, 8, 8), (1280, 8, 8), (1280, 8, 8), (1280, 8, 8)]
    feats = [torch.zeros(1, *s) for s in [(320, 64, 64), (640, 32, 32), (1280, 16, 16), (1280, 8, 8)]]
    assert t2i_adapter.feature_blocks(sd1, feats) == {0: 2, 1: 5, 2: 8, 3: 11}
    sdxl = [(320, 128, 128)] * 3 + [(320, 64, 64), (640, 64, 64), (640, 64, 64), (640, 32, 32), (1280, 32, 32),
                                    (1280, 32, 32), (1280, 32, 32)]
    feats = [torch.zeros(1, *s) for s in [(320, 64, 64), (640, 64, 64), (1280, 32, 32), (1280, 32, 32)]]
    assert t2i_adapter.feature_blocks(sdxl, feats) == {0: 3, 1: 5, 2: 8, 3: 9}
    with pytest.raises(ValueError, match="another model family"):
        t2i_adapter.feature_blocks(sd1, [torch.zeros(1, 320, 128, 128)])


def test_bad_files_and_hints_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not a T2I-Adapter"):
        t2i_adapter.load(save_safetensors(tmp_path / "x.safetensors", {"zero_convs.0.0.weight": torch.zeros(1)}))
    ref = reference("full_adapter", 3, [32, 64, 128, 128], 2, 8)
    adapter = t2i_adapter.load(save_safetensors(tmp_path / "a.safetensors", ref.state_dict()))
    with pytest.raises(ValueError, match="3-channel hints"):
        adapter(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="multiple of 8"):
        adapter(torch.zeros(1, 3, 60, 64))
