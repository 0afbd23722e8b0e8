"""ControlNet parity with diffusers' ControlNetModel loaded through diffusers' own original-checkpoint converter,
its residuals inside the UNet, loading from files, and applying units (weights, guess mode, start/end)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint
from PIL import Image
from safetensors.torch import save_file

from sdlite.adapters.controlnet import (ControlNet, ControlNetConfig, ControlUnit, control_residuals,
                                        create_from_unet, infer_controlnet_config, load, prepare_hint, soft_scales)
from sdlite.errors import CheckpointError, ShapeMismatchError
from sdlite.unet import UNetConfig, UNetModel
from sdlite.unet.config import UNetEncoderConfig

from conftest import randomize_, rel_err
from sdfiles import FULL_UNETS, build
from test_unet import SD1, SD2, SDXL, SDXL_DISTILLED, adm_inputs, build_pair, diffusers_config, inputs

SPECS = {"SD1": SD1, "SDXL": SDXL}


def controlnet_config(spec: dict, **extra) -> ControlNetConfig:
    """The ControlNet of the UNet described by ``spec`` (a UNetConfig keyword dict)."""
    names = {f.name for f in dataclasses.fields(UNetEncoderConfig)}
    return ControlNetConfig(**{k: v for k, v in spec.items() if k in names}, **extra)


def diffusers_controlnet_config(spec: dict) -> dict:
    unet = diffusers_config(UNetConfig(**spec))
    shared = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
              "attention_head_dim", "use_linear_projection", "transformer_layers_per_block", "addition_embed_type",
              "addition_time_embed_dim", "projection_class_embeddings_input_dim")
    return {k: unet[k] for k in shared if k in unet}


def build_controlnet_pair(spec: dict, seed: int = 0) -> tuple[ControlNet, ControlNetModel]:
    """A randomised sdlite ControlNet (zero convs included) and diffusers' ControlNetModel sharing its weights."""
    ours = randomize_(ControlNet(controlnet_config(spec)), seed).eval()
    state = ours.state_dict()
    dcfg = diffusers_controlnet_config(spec)
    converted = convert_controlnet_checkpoint({f"control_model.{k}": v for k, v in state.items()}, dcfg)
    if ours.config.adm_in_channels is not None:
        # diffusers' ControlNet converter skips label_emb (SDXL); its own mapping table names the target keys.
        for target, source in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
            converted[target] = state[source]
    with torch.device("meta"):
        ref = ControlNetModel(**dcfg)
    ref.load_state_dict(converted, strict=True, assign=True)
    return ours, ref.eval()


def controlnet_inputs(config, batch=2, h=8, w=12, seed=1):
    x, t, context, g = inputs(config, batch, h, w, seed)
    hint = torch.rand(batch, 3, 8 * h, 8 * w, generator=g)
    kwargs, y = {}, None
    if config.adm_in_channels:
        y, kwargs["added_cond_kwargs"] = adm_inputs(config, batch, g)
    return x, hint, t, context, y, kwargs


@pytest.mark.parametrize("name", list(SPECS))
@torch.no_grad()
def test_controlnet_matches_diffusers(name):
    ours, ref = build_controlnet_pair(SPECS[name])
    x, hint, t, context, y, kwargs = controlnet_inputs(ours.config)
    down, mid = ref(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False, **kwargs)
    got = ours(x, hint, t, context, y)
    assert len(got) == len(down) + 1 == {"SD1": 13, "SDXL": 10}[name]
    for a, b in zip(got, [*down, mid]):
        assert a.shape == b.shape
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("name", list(SPECS))
@torch.no_grad()
def test_residuals_in_the_unet_match_diffusers(name):
    unet, ref_unet, _ = build_pair(SPECS[name], seed=3)
    net, ref_net = build_controlnet_pair(SPECS[name], seed=4)
    x, hint, t, context, y, kwargs = controlnet_inputs(net.config, h=13, w=10)  # not a multiple of the downsampling
    down, mid = ref_net(x, t, encoder_hidden_states=context, controlnet_cond=hint, conditioning_scale=0.7,
                        return_dict=False, **kwargs)
    expected = ref_unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid, **kwargs).sample
    unit = ControlUnit(net, image=None, weight=0.7)
    control = control_residuals([unit], [hint], x, t, context, y, progress=0.5)
    got = unet(x, t, context, y=y, control=control)
    assert rel_err(got, expected) < 1e-4
    assert rel_err(got, unet(x, t, context, y=y)) > 1e-2  # the control did something


@pytest.mark.parametrize("name", list(SPECS))
@torch.no_grad()
def test_fresh_controlnet_leaves_the_unet_unchanged(name):
    unet = randomize_(UNetModel(UNetConfig(**SPECS[name])), 5).eval()
    net = create_from_unet(unet)
    for key, value in net.state_dict().items():
        if key.split(".")[0] in ("time_embed", "label_emb", "input_blocks", "middle_block"):
            assert torch.equal(value, unet.state_dict()[key]), key
    x, hint, t, context, y, _ = controlnet_inputs(net.config)
    control = net(x, hint, t, context, y)
    assert all(not c.any() for c in control)
    assert torch.equal(unet(x, t, context, y=y, control=control), unet(x, t, context, y=y))
    # The same path with non-zero output convolutions does change the result.
    for conv in [*(z[0] for z in net.zero_convs), net.middle_block_out[0], net.input_hint_block[-1]]:
        randomize_(conv, 6)
    assert rel_err(unet(x, t, context, y=y, control=net(x, hint, t, context, y)), unet(x, t, context, y=y)) > 1e-3


@pytest.mark.parametrize("spec", [SD1, SD2, SDXL, SDXL_DISTILLED, dict(SD1, transformer_depth_middle=-1),
                                  dict(SDXL, transformer_depth_middle=0), dict(SD1, in_channels=9)],
                         ids=["sd1", "sd2", "sdxl", "sdxl-distilled", "single-res-middle", "no-attention-middle",
                              "inpaint"])
def test_config_is_inferred_from_shapes(spec):
    config = controlnet_config(spec)
    with torch.device("meta"):
        assert infer_controlnet_config(ControlNet(config).state_dict()) == config


def test_hint_block_variants_are_inferred():
    config = controlnet_config(SD1, hint_channels=1, hint_block_channels=(8, 16, 32, 64))
    with torch.device("meta"):
        assert infer_controlnet_config(ControlNet(config).state_dict()) == config
    with pytest.raises(ValueError, match="downsample"):
        controlnet_config(SD1, hint_block_channels=(16, 32, 96))


@pytest.fixture(scope="module")
def sd1_net():
    return randomize_(ControlNet(controlnet_config(SD1)), 7).eval()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, dtype=torch.float32):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == dtype and torch.equal(sa[key], sb[key].to(dtype)), key


@pytest.mark.parametrize("layout", ["prefixed", "bare", "v1.0-full", "v1.0-full-pickle"])
def test_load_original_layouts(sd1_net, tmp_path, layout):
    state = {k: v.contiguous() for k, v in sd1_net.state_dict().items()}
    if layout == "bare":
        path = tmp_path / "net.safetensors"
        save_file(state, str(path))
    else:
        state = {f"control_model.{k}": v for k, v in state.items()}
        if layout.startswith("v1.0"):  # ControlNet 1.0 files also hold the SD1.5 model they were trained on
            state |= build("sd1").state
        if layout.endswith("pickle"):
            path = tmp_path / "net.pth"
            torch.save({"state_dict": state}, str(path))
        else:
            path = tmp_path / "net.safetensors"
            save_file(state, str(path))
    net = load(path)
    assert net.config == sd1_net.config and not net.training
    assert all(not p.requires_grad for p in net.parameters())
    assert_same_weights(net, sd1_net)
    assert_same_weights(load(path, dtype=torch.float16), sd1_net, torch.float16)


@pytest.mark.parametrize("name", list(SPECS))
@torch.no_grad()
def test_load_diffusers_layout(tmp_path, name):
    ours, ref = build_controlnet_pair(SPECS[name], seed=8)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    net = load(path)
    assert net.config == ours.config
    assert_same_weights(net, ours)
    x, hint, t, context, y, kwargs = controlnet_inputs(net.config)
    down, mid = ref(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False, **kwargs)
    for a, b in zip(net(x, hint, t, context, y), [*down, mid]):
        assert rel_err(a, b) < 1e-4


def test_files_of_other_kinds_are_refused_clearly(sd1_net, tmp_path):
    state = {f"control_model.{k}": v.contiguous() for k, v in sd1_net.state_dict().items()}
    cases = {
        "full sd1 checkpoint, not a ControlNet": build("sd1").state,
        "LoRA": {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32, 1, 1)},
        "difference": state | {"difference": torch.zeros(())},
        "control-LoRA": {"lora_controlnet": torch.zeros(()), "input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)},
        "not a Stable Diffusion checkpoint": {"foo.weight": torch.zeros(3)},
    }
    for i, (message, content) in enumerate(cases.items()):
        path = tmp_path / f"file{i}.safetensors"
        save_file(content, str(path))
        with pytest.raises(CheckpointError, match=message) as info:
            load(path)
        assert str(path) in str(info.value)


def test_damaged_controlnets_name_the_key(sd1_net, tmp_path):
    state = {f"control_model.{k}": v.contiguous() for k, v in sd1_net.state_dict().items()}
    path = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in state.items() if k != "control_model.zero_convs.3.0.bias"}, str(path))
    with pytest.raises(CheckpointError, match=r"missing keys: control_model\.zero_convs\.3\.0\.bias"):
        load(path)
    save_file(state | {"control_model.middle_block_out.0.weight": torch.zeros(128, 64, 1, 1)}, str(path))
    with pytest.raises(ShapeMismatchError, match="middle_block_out.0.weight"):
        load(path)
    save_file({k: v for k, v in state.items() if not k.startswith("control_model.input_hint_block.14.")}, str(path))
    with pytest.raises(CheckpointError, match="input_hint_block has convolutions at"):
        load(path)


def test_soft_scales():
    scales = soft_scales(13)
    assert scales[12] == 1.0 and scales[0] == pytest.approx(0.825 ** 12) and scales[0] == pytest.approx(0.0995, abs=1e-4)
    assert soft_scales(10) == scales[:10]  # SDXL: the first ten, as sd-webui-controlnet


@torch.no_grad()
def test_units_are_gated_weighted_and_summed(sd1_net):
    other = randomize_(ControlNet(sd1_net.config), 9).eval()
    x, hint, t, context, _, _ = controlnet_inputs(sd1_net.config)
    hint = hint[:1]  # one hint for the whole batch
    plain, second = sd1_net(x, hint.expand(2, -1, -1, -1), t, context), other(x, hint.expand(2, -1, -1, -1), t, context)
    late = ControlUnit(sd1_net, None, weight=0.5, start=0.2, end=0.6)
    for progress, active in [(0.0, False), (0.19, False), (0.2, True), (0.6, True), (0.61, False)]:
        got = control_residuals([late], [hint], x, t, context, progress=progress)
        assert (got is not None) == active, progress
    got = control_residuals([late, ControlUnit(other, None, weight=2.0)], [hint, hint], x, t, context, progress=0.4)
    for g, a, b in zip(got, plain, second):
        assert rel_err(g, 0.5 * a + 2.0 * b) < 1e-6
    assert control_residuals([ControlUnit(sd1_net, None, weight=0.0)], [hint], x, t, context, progress=0.0) is None


@torch.no_grad()
def test_guess_mode_soft_weights_on_the_conditional_rows(sd1_net):
    x, hint, t, context, _, _ = controlnet_inputs(sd1_net.config)
    full = sd1_net(x, hint, t, context)
    unit = ControlUnit(sd1_net, None, weight=1.5, guess_mode=True)
    cond = torch.tensor([True, False])
    got = control_residuals([unit], [hint], x, t, context, progress=0.0, cond=cond)
    for g, f, scale in zip(got, full, soft_scales(13)):
        assert rel_err(g[0], 1.5 * scale * f[0]) < 1e-5
        assert not g[1].any()
    # Without a CFG batch every row is conditional.
    got = control_residuals([unit], [hint], x, t, context, progress=0.0)
    assert all(rel_err(g, 1.5 * s * f) < 1e-6 for g, f, s in zip(got, full, soft_scales(13)))


@torch.no_grad()
def test_inpainting_unet_latents_and_bad_hints(sd1_net):
    x, hint, t, context, _, _ = controlnet_inputs(sd1_net.config)
    unit = ControlUnit(sd1_net, None)
    nine = torch.cat([x, torch.randn(2, 5, *x.shape[2:])], dim=1)  # noisy latents, mask, masked-image latents
    for a, b in zip(control_residuals([unit], [hint], nine, t, context, progress=0.0), sd1_net(x, hint, t, context)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="need a 96x64 hint"):
        sd1_net(x, hint[..., :32, :], t, context)
    with pytest.raises(ValueError, match="start <= end"):
        ControlUnit(sd1_net, None, start=0.8, end=0.2)
    with pytest.raises(ValueError, match="resize_mode"):
        ControlUnit(sd1_net, None, resize_mode="crop")


def test_prepare_hint(sd1_net):
    image = Image.new("RGB", (300, 200), (0, 0, 0))
    image.paste((255, 255, 255), (100, 50, 200, 150))
    unit = ControlUnit(sd1_net, image, preprocessor="canny", resize_mode="just resize")
    hint = prepare_hint(unit, 192, 128)
    assert hint.shape == (1, 3, 128, 192) and hint.dtype == torch.float32
    assert set(hint.unique().tolist()) == {0.0, 1.0}
    assert prepare_hint(unit, 192, 128, dtype=torch.float16).dtype == torch.float16


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
@torch.no_grad()
def test_full_size_controlnet_matches_diffusers(name):
    ours, ref = build_controlnet_pair(FULL_UNETS[name])
    with torch.device("meta"):
        assert infer_controlnet_config(ours.state_dict()) == ours.config
    x, hint, t, context, y, kwargs = controlnet_inputs(ours.config, batch=1, h=16, w=16)
    down, mid = ref(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False, **kwargs)
    got = ours(x, hint, t, context, y)
    assert len(got) == {"sd15": 13, "sd21": 13, "sdxl": 10}[name]
    for a, b in zip(got, [*down, mid]):
        assert rel_err(a, b) < 1e-4
