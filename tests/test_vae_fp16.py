"""A float16 VAE that overflows (as SDXL's original VAE does) is redone and kept in float32; one that fits stays
float16 (sdlite.vae.model.AutoencoderKL, for whole images, tiles and the pipelines).

The overflowing VAE is the reduced test VAE with one convolution in the decoder's up path and one in the encoder's
down path scaled by 2e4: their outputs reach about 1e5, beyond float16's 65504, and the GroupNorms after them bring
the values back to order one, so float32 is fine while float16 turns them into inf and then NaN. CPU float16 kernels
are slow, so the sizes stay small.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sdlite
from sdlite.vae import AutoencoderKL, VAEUpcastWarning, decode_tiled, encode_tiled

from conftest import randomize_, rel_err
from sdfiles import VAE, build

# The convolutions made to overflow, as state-dict keys (without first_stage_model.), and the factor.
LOUD = ("decoder.up.1.upsample.conv", "encoder.down.1.downsample.conv")
FACTOR = 2e4


def vae32(loud: bool) -> AutoencoderKL:
    vae = randomize_(AutoencoderKL(VAE), 1).eval()
    if loud:
        with torch.no_grad():
            for name in LOUD:
                conv = vae.get_submodule(name)
                conv.weight.mul_(FACTOR)
                conv.bias.mul_(FACTOR)
    return vae


def half_copy(vae: AutoencoderKL) -> AutoencoderKL:
    copy = AutoencoderKL(VAE).eval()
    copy.load_state_dict(vae.state_dict())
    return copy.half()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 3, 64, 64, generator=g) * 2 - 1


def dtypes(vae: AutoencoderKL) -> tuple[torch.dtype, torch.dtype]:
    return next(vae.encoder.parameters()).dtype, next(vae.decoder.parameters()).dtype


@torch.no_grad()
def test_the_loud_vae_really_overflows_float16(inputs):
    z, x = inputs
    loud = half_copy(vae32(True))
    assert not torch.isfinite(loud.decoder(loud.post_quant_conv(z.half()))).all()
    assert not torch.isfinite(loud.quant_conv(loud.encoder(x.half()))).all()
    quiet = vae32(True)
    assert torch.isfinite(quiet.decode(z)).all() and torch.isfinite(quiet.moments(x)).all()


@torch.no_grad()
def test_overflowing_decode_and_encode_are_redone_in_float32_once(inputs):
    z, x = inputs
    reference = vae32(True)
    vae = half_copy(reference)
    with pytest.warns(VAEUpcastWarning, match="float16 decode gave inf/NaN.*decode in float32 from now on"):
        decoded = vae.decode(z.half())
    assert dtypes(vae) == (torch.float16, torch.float32)  # only the direction that overflowed
    with pytest.warns(VAEUpcastWarning, match="float16 encode gave inf/NaN"):
        posterior = vae.encode(x.half())
    assert dtypes(vae) == (torch.float32, torch.float32)
    assert decoded.dtype == posterior.mean.dtype == torch.float16
    assert torch.isfinite(decoded).all() and torch.isfinite(posterior.mean).all() and torch.isfinite(posterior.std).all()
    # Only the weights' float16 rounding separates the redo from float32 (measured: 1.1e-3 and 8e-4).
    assert rel_err(decoded, reference.decode(z)) < 1e-2
    assert rel_err(posterior.mean, reference.encode(x).mean) < 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second image pays once, and says nothing
        assert torch.equal(vae.decode(z.half()), decoded)
        vae.encode(x.half())


@torch.no_grad()
def test_a_vae_that_fits_stays_float16(inputs):
    z, x = inputs
    vae = half_copy(vae32(False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded, mean = vae.decode(z.half()), vae.encode(x.half()).mean
    assert dtypes(vae) == (torch.float16, torch.float16)
    assert torch.isfinite(decoded).all() and decoded.dtype == mean.dtype == torch.float16


@torch.no_grad()
def test_float32_by_choice_takes_and_returns_the_callers_dtype(inputs):
    z, x = inputs
    reference = vae32(True)
    vae = half_copy(reference).float()  # the knob: a float32 VAE for a float16 pipeline, no overflowing call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = vae.decode(z.half())
    assert decoded.dtype == torch.float16 and rel_err(decoded, reference.decode(z)) < 1e-2


@torch.no_grad()
def test_tiles_are_upcast_too(inputs):
    z, x = inputs
    reference = vae32(True)
    vae = half_copy(reference)
    with pytest.warns(VAEUpcastWarning) as caught:
        decoded = decode_tiled(vae, z.half(), tile=4)
        mean = encode_tiled(vae, x.half(), tile=32).mean
    assert len(caught) == 2  # one per direction, not one per tile
    assert decoded.dtype == mean.dtype == torch.float16
    assert rel_err(decoded, decode_tiled(reference, z, tile=4)) < 1e-2
    assert rel_err(mean, encode_tiled(reference, x, tile=32).mean) < 1e-2


@pytest.fixture(scope="module")
def loud_file(tmp_path_factory):
    state = build("sd1", seed=7).state
    for name in LOUD:
        for p in ("weight", "bias"):
            state[f"first_stage_model.{name}.{p}"] = state[f"first_stage_model.{name}.{p}"] * FACTOR
    path = tmp_path_factory.mktemp("loud") / "loud-vae-sd1.safetensors"
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("tiling", [False, 4])
def test_float16_pipeline_with_an_overflowing_vae(loud_file, tiling):
    pipe = sdlite.load(loud_file, dtype=torch.float16)
    reference = sdlite.load(loud_file).vae
    args = dict(width=64, height=64, steps=2, seed=3, sampler="Euler", vae_tiling=tiling)
    with pytest.warns(VAEUpcastWarning, match="decode"):
        out = pipe.txt2img("a cat", **args)
    assert pipe.dtype == torch.float16 and torch.isfinite(out.latents).all()
    with torch.no_grad():
        latents = out.latents.float() / reference.scale_factor
        expected = decode_tiled(reference, latents, tile=4) if tiling else reference.decode(latents)
    expected = ((expected[0].clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
    assert np.abs(np.asarray(out.images[0], dtype=np.float64) - expected).mean() < 1.0
    # img2img goes through the encoder: it overflows too, is upcast, and the generation stays finite.
    with pytest.warns(VAEUpcastWarning, match="encode"):
        again = pipe.img2img(out.images[0], "a cat", strength=0.5, **args)
    assert torch.isfinite(again.latents).all() and dtypes(pipe.vae) == (torch.float32, torch.float32)
