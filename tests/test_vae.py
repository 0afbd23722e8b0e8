"""Tests of sdlite.vae against diffusers' AutoencoderKL loaded through its own original-checkpoint converter.

Our state_dict() is in the original `first_stage_model.*` layout; diffusers' `convert_ldm_vae_checkpoint` maps
exactly that layout, so a wrongly named key shows up as a strict-load failure on diffusers' side and a wrongly
wired block shows up in the numbers.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdlite.errors import CheckpointError, ShapeMismatchError
from sdlite.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, infer_vae_config

SD_SCALE = 0.18215

# Two levels with one res block; three levels with two, so that downsample, upsample, nin_shortcut
# and multi-block levels are all exercised. Different z_channels check that nothing assumes 4.
SMALL = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=3, scale_factor=SD_SCALE)
THREE_LEVELS = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=4, scale_factor=0.13025)
FULL = VAEConfig(scale_factor=SD_SCALE)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomised(config: VAEConfig, seed: int = 0) -> AutoencoderKL:
    """Our VAE with every parameter redrawn, norms and biases included, so no comparison is of zeros or ones."""
    gen = torch.Generator().manual_seed(seed)
    model = AutoencoderKL(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if ".norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                # Variance-preserving scale keeps activations O(1) through the whole network.
                p.copy_(noise / p[0].numel() ** 0.5)
    return model


def diffusers_reference(model: AutoencoderKL):
    """diffusers' AutoencoderKL holding the same weights, loaded via convert_ldm_vae_checkpoint, strict."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    c = model.config
    levels = len(c.ch_mult)
    dconfig = dict(
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[c.ch * m for m in c.ch_mult],
        layers_per_block=c.num_res_blocks,
        latent_channels=c.z_channels,
        norm_num_groups=32,
        scaling_factor=c.scale_factor,
    )
    original = {f"first_stage_model.{k}": v for k, v in model.state_dict().items()}
    ref = DiffusersVAE(**dconfig).eval()
    ref.load_state_dict(convert_ldm_vae_checkpoint(original, dconfig), strict=True)
    return ref


def check_parity(config: VAEConfig, height: int, width: int) -> None:
    torch.manual_seed(1)
    model = randomised(config)
    ref = diffusers_reference(model)
    images = torch.rand(2, config.in_channels, height, width) * 2 - 1
    f = config.downsample_factor
    latents = torch.randn(2, config.z_channels, height // f, width // f)
    with torch.no_grad():
        ours = model.encode(images)
        theirs = ref.encode(images).latent_dist
        decoded, ref_decoded = model.decode(latents), ref.decode(latents).sample
    assert ours.mean.shape == (2, config.z_channels, height // f, width // f)
    assert rel_err(ours.mean, theirs.mean) < 1e-4
    assert rel_err(ours.logvar, theirs.logvar) < 1e-4
    assert decoded.shape == (2, config.out_channels, height, width)
    assert rel_err(decoded, ref_decoded) < 1e-4


@pytest.mark.parametrize("config", [SMALL, THREE_LEVELS], ids=["2-levels", "3-levels"])
def test_parity_with_diffusers(config: VAEConfig) -> None:
    check_parity(config, height=48, width=64)


@pytest.mark.slow
def test_parity_full_size_sd_vae() -> None:
    check_parity(FULL, height=64, width=64)


@pytest.mark.parametrize("config", [SMALL, THREE_LEVELS, FULL], ids=["2-levels", "3-levels", "sd"])
def test_infer_config_recovers_config(config: VAEConfig) -> None:
    with torch.device("meta"):
        sd = AutoencoderKL(config).state_dict()
    assert infer_vae_config(sd, scale_factor=config.scale_factor) == config


def test_sd_vae_key_layout() -> None:
    """Spot checks against docs/formats.md §1.4; the full key set is checked by the diffusers parity tests."""
    with torch.device("meta"):
        model = AutoencoderKL(FULL)
    sd = model.state_dict()
    assert len(sd) == 248
    assert sum(t.numel() for t in sd.values()) == 83_653_863
    assert sd["encoder.conv_in.weight"].shape == (128, 3, 3, 3)
    assert sd["quant_conv.weight"].shape == (8, 8, 1, 1)
    assert sd["post_quant_conv.weight"].shape == (4, 4, 1, 1)
    assert sd["decoder.conv_out.weight"].shape == (3, 128, 3, 3)
    for name in ("q", "k", "v", "proj_out"):
        assert sd[f"encoder.mid.attn_1.{name}.weight"].shape == (512, 512, 1, 1)
    # Original indexing: up[3] runs first at 512 channels, up[0] last at 128 (with the 256->128 shortcut).
    assert sd["decoder.up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.3.downsample.conv.weight" not in sd
    assert list(model.buffers()) == []
    assert model.scale_factor == SD_SCALE and FULL.downsample_factor == 8


def test_meta_build_then_assign_load_matches() -> None:
    model = randomised(THREE_LEVELS)
    with torch.device("meta"):
        lazy = AutoencoderKL(THREE_LEVELS)
    lazy.load_state_dict(model.state_dict(), strict=True, assign=True)
    latents = torch.randn(1, 4, 6, 8)
    with torch.no_grad():
        assert torch.equal(lazy.decode(latents), model.decode(latents))


def test_sample_is_reproducible_and_uses_the_generator() -> None:
    model = randomised(SMALL)
    with torch.no_grad():
        posterior = model.encode(torch.rand(1, 3, 16, 24) * 2 - 1)
    a = posterior.sample(torch.Generator().manual_seed(42))
    b = posterior.sample(torch.Generator().manual_seed(42))
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(42))
    assert torch.equal(a, b)
    assert torch.equal(a, posterior.mean + posterior.std * noise)
    assert not torch.equal(a, posterior.sample(torch.Generator().manual_seed(43)))
    assert posterior.sample().shape == posterior.mean.shape


def test_logvar_is_clamped() -> None:
    posterior = DiagonalGaussian(torch.zeros(3), torch.tensor([-100.0, 0.0, 100.0]))
    assert posterior.logvar.tolist() == [-30.0, 0.0, 20.0]
    assert torch.allclose(posterior.std, torch.exp(torch.tensor([-15.0, 0.0, 10.0])))


@pytest.mark.parametrize(
    "key",
    ["encoder.conv_in.weight", "quant_conv.weight", "decoder.conv_out.weight", "encoder.down.1.block.0.conv1.weight"],
)
def test_missing_key_names_it(key: str) -> None:
    with torch.device("meta"):
        sd = AutoencoderKL(SMALL).state_dict()
    del sd[key]
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")) as info:
        infer_vae_config(sd, scale_factor=SD_SCALE)
    assert info.value.path is None


@pytest.mark.parametrize(
    "key, shape",
    [
        ("decoder.conv_in.weight", (64, 5, 3, 3)),
        ("post_quant_conv.weight", (4, 4, 1, 1)),
        ("encoder.conv_out.weight", (6, 32, 3, 3)),
        ("quant_conv.weight", (6, 6, 3, 3)),
    ],
)
def test_wrong_shape_names_key_expected_and_found(key: str, shape: tuple[int, ...]) -> None:
    with torch.device("meta"):
        sd = AutoencoderKL(SMALL).state_dict()
    expected = tuple(sd[key].shape)
    sd[key] = torch.empty(shape, device="meta")
    with pytest.raises(ShapeMismatchError) as info:
        infer_vae_config(sd, scale_factor=SD_SCALE)
    assert info.value.key == key and info.value.expected == expected and info.value.found == shape
    assert key in str(info.value)


def test_missing_decoder_level_is_an_error() -> None:
    with torch.device("meta"):
        sd = AutoencoderKL(SMALL).state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("decoder.up.1.")}
    with pytest.raises(CheckpointError, match="decoder.up"):
        infer_vae_config(sd, scale_factor=SD_SCALE)


def test_config_validation() -> None:
    with pytest.raises(TypeError):
        VAEConfig()  # scale_factor has no default on purpose
    with pytest.raises(TypeError):
        VAEConfig(128, scale_factor=SD_SCALE)  # keyword-only
    with pytest.raises(ValueError, match="GroupNorm"):
        VAEConfig(ch=48, scale_factor=SD_SCALE)
    with pytest.raises(ValueError, match="ch_mult"):
        VAEConfig(ch_mult=(), scale_factor=SD_SCALE)
    with pytest.raises(ValueError, match="scale_factor"):
        VAEConfig(scale_factor=0.0)
    assert VAEConfig(ch_mult=[1, 2, 4, 4], scale_factor=SD_SCALE) == FULL
    with pytest.raises(dataclasses.FrozenInstanceError):
        FULL.ch = 64  # type: ignore[misc]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decode_is_close_to_float32(dtype: torch.dtype) -> None:
    # Small sizes: CPU half-precision convolutions are slow kernels, and the point is dtype handling.
    model = randomised(THREE_LEVELS)
    gen = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 4, 4, 6, generator=gen)
    images = torch.rand(1, 3, 16, 24, generator=gen) * 2 - 1
    with torch.no_grad():
        reference = model.decode(latents)
        reference_mean = model.encode(images).mean
        model.to(dtype)
        decoded = model.decode(latents.to(dtype))
        posterior = model.encode(images.to(dtype))
    assert decoded.dtype == dtype and torch.isfinite(decoded).all()
    assert rel_err(decoded.float(), reference) < 5e-2
    assert torch.isfinite(posterior.std).all() and rel_err(posterior.mean.float(), reference_mean) < 5e-2
