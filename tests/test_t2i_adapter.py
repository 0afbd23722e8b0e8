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


# --- in the UNet: features added where diffusers adds down_intrablock_additional_residuals ------------------------

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import sdlite  # noqa: E402
from sdlite.unet import UNetConfig, UNetModel  # noqa: E402

from conftest import randomize_  # noqa: E402
from refpipe import write_model  # noqa: E402
from test_unet import SD1, SDXL, adm_inputs, build_pair, inputs  # noqa: E402


@pytest.mark.parametrize("spec,kind,channels,unshuffle,size", [
    ("SD1", "full_adapter", [32, 64, 128, 128], 8, 128),
    ("SDXL", "full_adapter_xl", [64, 128, 128, 128], 16, 256),
])
@torch.no_grad()
def test_unet_with_adapter_features_matches_diffusers(spec, kind, channels, unshuffle, size):
    ours, ref, config = build_pair(globals()[spec])
    adapter = reference(kind, 3, channels, 2, unshuffle, seed=2)
    features = adapter(torch.rand(1, 3, size, size))
    x, t, context, g = inputs(config, h=size // 8, w=size // 8)
    kw, extra = {}, None
    if config.adm_in_channels:
        kw["y"], extra = adm_inputs(config, 2, g)
    expected = ref(x, t, encoder_hidden_states=context, added_cond_kwargs=extra,
                   down_intrablock_additional_residuals=[f.expand(2, -1, -1, -1).clone() * 0.7 for f in features]).sample
    places = t2i_adapter.feature_blocks(t2i_adapter.block_shapes(ours, size // 8, size // 8), features)
    got = ours(x, t, context, features={places[i]: f.expand(2, -1, -1, -1) * 0.7 for i, f in enumerate(features)},
               **kw)
    assert rel(got, expected) < 1e-4
    assert rel(ours(x, t, context, **kw), expected) > 1e-3


@torch.no_grad()
def test_txt2img_with_a_unit_adds_diffusers_features_at_the_documented_blocks(tmp_path):
    """A T2IAdapterUnit in txt2img equals the same generation with diffusers' adapter features added by hand after
    SD1's input blocks 2, 5, 8 and 11 (docs/formats.md §15.3), on every row, times the weight."""
    path, _ = write_model(tmp_path, "sd1", seed=71)
    pipe = sdlite.load(path)
    pipe.unet = randomize_(UNetModel(UNetConfig(**dict(SD1, context_dim=128))), 3).eval()  # four levels, as SD1.x
    ref = reference("full_adapter", 3, [32, 64, 128, 128], 2, 8, seed=4)
    adapter = t2i_adapter.load(save_safetensors(tmp_path / "t2i.safetensors", ref.state_dict()))
    hint = Image.fromarray((torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy())
    opts = dict(width=64, height=64, steps=3, cfg_scale=5.0, sampler="Euler", seed=5)
    got = pipe.txt2img("a lighthouse", "fog", t2i_adapters=[sdlite.T2IAdapterUnit(adapter, hint, weight=0.7)], **opts)

    features = ref(torch.from_numpy(np.asarray(hint, dtype=np.float32) / 255).permute(2, 0, 1)[None])
    forward = pipe.unet.forward

    def by_hand(x, t, context=None, y=None, control=None, patches=None):
        added = {2: features[0], 5: features[1], 8: features[2], 11: features[3]}
        return forward(x, t, context, y=y, control=control, patches=patches,
                       features={k: v.expand(x.shape[0], -1, -1, -1) * 0.7 for k, v in added.items()})

    pipe.unet.forward = by_hand
    expected = pipe.txt2img("a lighthouse", "fog", **opts)
    pipe.unet.forward = forward
    plain = pipe.txt2img("a lighthouse", "fog", **opts)
    assert rel(got.latents, expected.latents) < 1e-5
    assert rel(plain.latents, expected.latents) > 1e-3
