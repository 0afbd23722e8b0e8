"""UNet parity with diffusers' UNet2DConditionModel loaded through diffusers' own ldm-checkpoint converter."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from sdlite.errors import CheckpointError
from sdlite.checkpoint.family_table import heads_for_context
from sdlite.unet import UNetConfig, UNetModel, infer_unet_config
from sdlite.unet.blocks import timestep_embedding

from conftest import randomize_, rel_err
from sdfiles import FULL_UNETS as FULL

# Reduced versions of the real layouts: same block structure, fewer channels.
SD1 = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=(2, 2, 2, 2),
           transformer_depth=(1, 1, 1, 1, 1, 1, 0, 0), transformer_depth_output=(0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1),
           transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False, num_heads=8)
SD2 = dict(SD1, model_channels=64, channel_mult=(1, 2, 2, 2), context_dim=96, use_linear_in_transformer=True,
           num_heads=None, head_dim=64)
SDXL = dict(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=(2, 2, 2),
            transformer_depth=(0, 0, 1, 1, 2, 2), transformer_depth_output=(2, 2, 2, 1, 1, 1, 0, 0, 0),
            transformer_depth_middle=2, context_dim=96, use_linear_in_transformer=True, head_dim=64,
            adm_in_channels=32 + 6 * 256)
# SSD-1B-style distillation: the output side keeps fewer transformer blocks than the input side.
SDXL_DISTILLED = dict(SDXL, transformer_depth_output=(2, 1, 1, 1, 2, 1, 0, 0, 0), transformer_depth_middle=1)
INPAINT = dict(SD1, in_channels=9)

def diffusers_config(c: UNetConfig) -> dict:
    """The UNet2DConditionModel config describing the same architecture."""
    levels = len(c.channel_mult)
    n = c.num_res_blocks[0]
    depth_in = [c.transformer_depth[i * n] for i in range(levels)]
    depth_out = [list(c.transformer_depth_output[i * (n + 1):(i + 1) * (n + 1)]) for i in range(levels)]
    # diffusers takes the middle depth from the last level's entry: pass one number when all depths agree.
    used = {d for d in depth_in + [c.transformer_depth_middle] if d > 0}
    if len(used) == 1:
        depth = used.pop()
    else:
        assert c.transformer_depth_middle == depth_in[-1], "diffusers cannot describe this middle block"
        depth = depth_in
    cfg = dict(
        sample_size=32, in_channels=c.in_channels, out_channels=c.out_channels,
        block_out_channels=list(c.level_channels), layers_per_block=n,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth_in],
        up_block_types=["CrossAttnUpBlock2D" if any(d) else "UpBlock2D" for d in depth_out],
        transformer_layers_per_block=depth, reverse_transformer_layers_per_block=depth_out,
        cross_attention_dim=c.context_dim, use_linear_projection=c.use_linear_in_transformer,
        attention_head_dim=[c.attention_heads(w)[0] for w in c.level_channels],
    )
    if c.adm_in_channels is not None:
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=c.adm_in_channels)
    return cfg


def build_pair(spec: dict, seed: int = 0):
    config = UNetConfig(**spec)
    ours = randomize_(UNetModel(config), seed).eval()
    original = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    dcfg = diffusers_config(config)
    with torch.device("meta"):  # the reference shares our tensors: full-size SDXL fits in RAM only once
        ref = UNet2DConditionModel(**dcfg)
    ref.load_state_dict(convert_ldm_unet_checkpoint(original, dcfg), strict=True, assign=True)
    return ours, ref.eval(), config


def inputs(config: UNetConfig, batch=2, h=16, w=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, h, w, generator=g)
    t = torch.tensor([999.0, 261.5][:batch])
    context = torch.randn(batch, 77, config.context_dim, generator=g)
    return x, t, context, g


def adm_inputs(config: UNetConfig, batch: int, g: torch.Generator):
    """SDXL's ADM vector: pooled text embedding then six sinusoid-embedded size/crop numbers."""
    pooled = torch.randn(batch, config.adm_in_channels - 6 * 256, generator=g)
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 32.0, 1024.0, 768.0]] * batch)
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 256).reshape(batch, -1)], dim=1)
    return y, {"text_embeds": pooled, "time_ids": time_ids}


@pytest.mark.parametrize("name", ["SD1", "SD2", "SDXL", "INPAINT"])
@torch.no_grad()
def test_unet_matches_diffusers(name):
    ours, ref, config = build_pair(globals()[name])
    x, t, context, g = inputs(config)
    kwargs, y = {}, None
    if config.adm_in_channels:
        y, kwargs["added_cond_kwargs"] = adm_inputs(config, x.shape[0], g)
    expected = ref(x, t, encoder_hidden_states=context, **kwargs).sample
    got = ours(x, t, context, y=y)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-4


@torch.no_grad()
def test_distilled_output_depths_match_diffusers():
    spec = dict(SDXL_DISTILLED, transformer_depth_middle=2)  # diffusers ties the middle depth to the last level
    ours, ref, config = build_pair(spec)
    x, t, context, g = inputs(config)
    y, added = adm_inputs(config, 2, g)
    assert rel_err(ours(x, t, context, y=y), ref(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample) < 1e-4


@torch.no_grad()
def test_odd_latent_size_matches_diffusers():
    ours, ref, config = build_pair(SD1)
    x, t, context, _ = inputs(config, h=13, w=20)  # not a multiple of the 8x downsampling
    assert rel_err(ours(x, t, context), ref(x, t, encoder_hidden_states=context).sample) < 1e-4


@torch.no_grad()
def test_control_residuals_match_diffusers():
    ours, ref, config = build_pair(SD1)
    x, t, context, g = inputs(config)
    probe = []
    h = x
    # Shapes of the input-block outputs, found by running the input side once.
    emb = ours.time_embed(timestep_embedding(t, config.model_channels))
    for block in ours.input_blocks:
        h = block(h, emb, context)
        probe.append(h)
    down = [torch.randn(p.shape, generator=g) for p in probe]
    mid = torch.randn(h.shape, generator=g)
    expected = ref(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample
    got = ours(x, t, context, control=down + [mid])
    assert rel_err(got, expected) < 1e-4
    assert rel_err(got, ours(x, t, context)) > 1e-2  # the residuals did something
    with pytest.raises(ValueError, match="residuals"):
        ours(x, t, context, control=down)


@pytest.mark.parametrize("name", ["SD1", "SD2", "SDXL", "SDXL_DISTILLED", "INPAINT"])
def test_config_is_inferred_from_shapes(name):
    config = UNetConfig(**globals()[name])
    with torch.device("meta"):
        sd = UNetModel(config).state_dict()
    assert infer_unet_config(sd, heads_for_context) == config


def test_single_res_block_middle_is_inferred():
    config = UNetConfig(**dict(SD1, transformer_depth_middle=-1))
    with torch.device("meta"):
        model = UNetModel(config)
    assert len(model.middle_block) == 1
    assert infer_unet_config(model.state_dict(), heads_for_context) == config


def test_missing_and_inconsistent_keys_name_the_key():
    with torch.device("meta"):
        sd = UNetModel(UNetConfig(**SD1)).state_dict()
    broken = {k: v for k, v in sd.items() if k != "out.2.weight"}
    with pytest.raises(CheckpointError, match="out.2.weight"):
        infer_unet_config(broken, heads_for_context)
    broken = {k: v for k, v in sd.items() if not k.startswith("output_blocks.11.")}
    with pytest.raises(CheckpointError, match="11 output blocks, expected 12"):
        infer_unet_config(broken, heads_for_context)


def test_adm_vector_is_required_exactly_when_the_unet_has_label_emb():
    model = UNetModel(UNetConfig(**SDXL))
    x, t, context, _ = inputs(model.config, batch=1)
    with pytest.raises(ValueError, match="ADM"):
        model(x, t, context)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FULL))
@torch.no_grad()
def test_full_size_unet_matches_diffusers(name):
    ours, ref, config = build_pair(FULL[name])
    assert infer_unet_config(ours.state_dict(), heads_for_context) == config
    x, t, context, g = inputs(config, batch=1, h=16, w=16)
    kwargs, y = {}, None
    if config.adm_in_channels:
        y, kwargs["added_cond_kwargs"] = adm_inputs(config, 1, g)
    assert rel_err(ours(x, t, context, y=y), ref(x, t, encoder_hidden_states=context, **kwargs).sample) < 1e-4
