"""Tests of sdlite.vae.tiling against diffusers' AutoencoderKL with `enable_tiling()`, same weights, same tile sizes.

A reduced VAE with four levels (factor 8, as released) keeps the run short while the seams, the blend ramps and the
short last row/column of tiles are all exercised.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import sdlite
from sdlite.vae import AutoencoderKL, VAEConfig, decode_tiled, encode_tiled

from conftest import randomize_, rel_err
from sdfiles import build
from test_vae import diffusers_reference

CONFIG = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=4, scale_factor=0.18215)


@pytest.fixture(scope="module")
def vaes():
    model = randomize_(AutoencoderKL(CONFIG), seed=3).eval()
    return model, diffusers_reference(model)


def tiled_reference(ref, latent_tile: int, overlap: float):
    """Turn on diffusers' tiling with a latent tile of `latent_tile` (and the matching pixel tile)."""
    ref.enable_tiling()
    ref.tile_latent_min_size = latent_tile
    ref.tile_sample_min_size = latent_tile * CONFIG.downsample_factor
    ref.tile_overlap_factor = overlap
    return ref


@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_decode_tiled_matches_diffusers(vaes, overlap: float) -> None:
    model, ref = vaes
    tiled_reference(ref, 16, overlap)
    latents = torch.randn(1, 4, 40, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = decode_tiled(model, latents, tile=16, overlap=overlap)
        theirs = ref.decode(latents).sample
        whole = model.decode(latents)
    assert ours.shape == theirs.shape == (1, 3, 320, 384)
    assert rel_err(ours, theirs) < 1e-4
    # The seams are a real approximation: tiled and untiled decodes must differ, or no tiling happened.
    assert rel_err(ours, whole) > 1e-3


def test_encode_tiled_matches_diffusers(vaes) -> None:
    model, ref = vaes
    tiled_reference(ref, 16, 0.25)
    images = torch.rand(2, 3, 320, 384, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ours = encode_tiled(model, images, tile=128, overlap=0.25)
        theirs = ref.encode(images).latent_dist
    assert ours.mean.shape == theirs.mean.shape == (2, 4, 40, 48)
    assert rel_err(ours.mean, theirs.mean) < 1e-4
    assert rel_err(ours.logvar, theirs.logvar) < 1e-4


def test_single_tile_equals_untiled(vaes) -> None:
    model, _ = vaes
    latents = torch.randn(1, 4, 16, 12, generator=torch.Generator().manual_seed(2))
    images = torch.rand(1, 3, 128, 96, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(decode_tiled(model, latents, tile=16), model.decode(latents))
        tiled, whole = encode_tiled(model, images, tile=128), model.encode(images)
    assert torch.equal(tiled.mean, whole.mean) and torch.equal(tiled.logvar, whole.logvar)


def test_bad_tile_settings_are_rejected(vaes) -> None:
    model, _ = vaes
    latents = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError):
        decode_tiled(model, latents, tile=4, overlap=1.0)
    with pytest.raises(ValueError):
        decode_tiled(model, latents, tile=1, overlap=0.5)
    # Stride int(4 * 0.7) = 2 latents but 32 - int(32 * 0.3) = 23 pixels kept: diffusers would return 8x8 latents
    # as an 85x85 image; we refuse.
    with pytest.raises(ValueError, match="overlap"):
        decode_tiled(model, latents, tile=4, overlap=0.3)


def test_txt2img_with_vae_tiling(tmp_path) -> None:
    path = tmp_path / "tiny-sd1.safetensors"
    save_file(build("sd1", seed=7).state, str(path))
    pipe = sdlite.load(path)
    args = dict(width=64, height=64, steps=2, seed=3, sampler="Euler")
    plain = pipe.txt2img("x", **args)
    # 8x8 latents in 4x4 tiles with stride 3: three rows and columns of tiles, blended.
    tiled = pipe.txt2img("x", vae_tiling=4, **args)
    default = pipe.txt2img("x", vae_tiling=True, **args)  # 64-latent tiles: one tile, so the untiled decode
    assert torch.equal(tiled.latents, plain.latents)
    assert tiled.images[0].size == (64, 64)
    assert default.images[0].tobytes() == plain.images[0].tobytes()
    assert tiled.images[0].tobytes() != plain.images[0].tobytes()
    img = pipe.img2img(plain.images[0], "x", strength=0.5, vae_tiling=4, **args)
    assert img.images[0].size == (64, 64)
