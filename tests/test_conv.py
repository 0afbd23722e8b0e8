"""The CPU convolution paths (Winograd F(4x4, 3x3), the patch product) against torch's direct convolution, alone
and inside the UNet and VAE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from sdlite import conv as fastconv
from sdlite.conv import Conv2d, fast_path, gemm_conv3x3, winograd_conv3x3

from conftest import rel_err
from test_unet import SD1, SDXL, adm_inputs, build_pair, inputs
from test_vae import SMALL, diffusers_reference, randomised


@pytest.fixture
def always_winograd(monkeypatch):
    """Every eligible 3x3 layer takes the Winograd path, however small the test model."""
    monkeypatch.setattr(fastconv, "MIN_TILES", {4: 1, 2: 1})
    monkeypatch.setattr(fastconv, "MIN_CHANNELS", 1)


@pytest.fixture
def always_winograd2(monkeypatch):
    """Every eligible 3x3 layer takes F(2x2, 3x3)."""
    monkeypatch.setattr(fastconv, "MIN_TILES", {4: 10**9, 2: 1})
    monkeypatch.setattr(fastconv, "MIN_CHANNELS", 1)


@pytest.fixture
def always_gemm(monkeypatch):
    """Every eligible 3x3 layer takes the patch product (stride 2 ones too)."""
    monkeypatch.setattr(fastconv, "MIN_TILES", {4: 10**9, 2: 10**9})
    monkeypatch.setattr(fastconv, "GEMM_MIN_KERNEL_BYTES", 0)


@pytest.mark.parametrize("shape, out_channels", [((2, 5, 7, 9), 3), ((1, 33, 13, 4), 40), ((3, 16, 8, 8), 16),
                                                 ((1, 1, 1, 1), 2), ((2, 4, 2, 17), 6)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tile", [4, 2])
def test_matches_direct_convolution_in_float64(shape, out_channels, bias, tile):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    w = torch.randn(out_channels, shape[1], 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(out_channels, generator=g, dtype=torch.float64) if bias else None
    got = winograd_conv3x3(x, w, b, tile=tile)
    assert got.shape == (shape[0], out_channels, *shape[2:])
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(got, F.conv2d(x, w, b, padding=1)) < 1e-13


@pytest.mark.parametrize("tile", [4, 2])
def test_float32_error_is_that_of_a_direct_convolution(tile):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 32, 40, generator=g, dtype=torch.float64)
    w = torch.randn(96, 64, 3, 3, generator=g, dtype=torch.float64) / 24
    b = torch.randn(96, generator=g, dtype=torch.float64)
    exact = F.conv2d(x, w, b, padding=1)
    direct = rel_err(F.conv2d(x.float(), w.float(), b.float(), padding=1), exact)
    assert rel_err(winograd_conv3x3(x.float(), w.float(), b.float(), tile=tile), exact) < max(4 * direct, 5e-6)


@pytest.mark.parametrize("tile", [4, 2])
def test_bands_of_tiles_cover_the_image(monkeypatch, tile):
    # one row of tiles per band: the band loop and its edges are exercised, not only the single-band case
    monkeypatch.setattr(fastconv, "BLOCK_BYTES", 1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 22, 13, generator=g, dtype=torch.float64)
    w = torch.randn(5, 8, 3, 3, generator=g, dtype=torch.float64)
    assert rel_err(winograd_conv3x3(x, w, tile=tile), F.conv2d(x, w, padding=1)) < 1e-13


def test_wrong_kernel_shape_is_named():
    for conv in (winograd_conv3x3, gemm_conv3x3):
        with pytest.raises(ValueError, match=r"\[C_out, 4, 3, 3\] kernel .* got \[2, 4, 5, 5\]"):
            conv(torch.zeros(1, 4, 8, 8), torch.zeros(2, 4, 5, 5))


@pytest.mark.parametrize("shape, out_channels", [((2, 5, 7, 9), 3), ((1, 33, 13, 4), 40), ((1, 1, 1, 1), 2)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_patch_product_matches_direct_convolution_in_float64(shape, out_channels, stride, bias):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    w = torch.randn(out_channels, shape[1], 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(out_channels, generator=g, dtype=torch.float64) if bias else None
    expected = F.conv2d(x, w, b, stride=stride, padding=1)
    got = gemm_conv3x3(x, w, b, stride=stride)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-13


@pytest.mark.parametrize("stride", [1, 2])
def test_patch_product_bands_cover_the_image(monkeypatch, stride):
    monkeypatch.setattr(fastconv, "BLOCK_BYTES", 1)  # one row of one image per band
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 6, 11, 7, generator=g, dtype=torch.float64)
    w = torch.randn(4, 6, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    assert rel_err(gemm_conv3x3(x, w, b, stride), F.conv2d(x, w, b, stride=stride, padding=1)) < 1e-13


def test_which_path_is_taken():
    conv = Conv2d(64, 64, 3, padding=1)
    big = torch.zeros(2, 64, 64, 64)
    large_kernel = Conv2d(1280, 1280, 3, padding=1)  # 56 MiB of float32 kernel
    with torch.no_grad():
        assert fast_path(conv, big) == "winograd4"
        assert fast_path(conv, torch.zeros(2, 64, 16, 16)) == "winograd2"  # 32 tiles of 4x4, 128 of 2x2
        assert fast_path(conv, big.double()) is None  # float32 only
        assert fast_path(conv, torch.zeros(1, 64, 8, 8)) is None  # too few tiles to pay for the kernel transform
        assert fast_path(large_kernel, torch.zeros(2, 1280, 8, 8)) == "gemm"
        assert fast_path(Conv2d(1280, 1280, 3, padding=1, stride=2), torch.zeros(2, 1280, 16, 16)) == "gemm"
        assert fast_path(Conv2d(64, 64, 3, padding=1, stride=2), big) is None
        assert fast_path(Conv2d(64, 64, 3, padding=0), big) is None
        assert fast_path(Conv2d(64, 4, 3, padding=1), big) is None  # too few output channels
        assert fast_path(Conv2d(64, 64, 3, padding=1, padding_mode="reflect"), big) is None
        assert fast_path(Conv2d(64, 64, 1), big) is None
    assert fast_path(conv, big) is None  # grad enabled and the weight trainable: training keeps F.conv2d


def test_is_a_conv2d_with_its_keys():
    conv = Conv2d(8, 16, 3, padding=1)
    assert isinstance(conv, nn.Conv2d)  # found by the LoRA key map like any conv
    assert list(conv.state_dict()) == list(nn.Conv2d(8, 16, 3, padding=1).state_dict())


@torch.no_grad()
def test_parametrized_weight_is_used(always_winograd):
    # LoRA's inject mode puts a parametrization on the weight; the Winograd path must read the live weight
    conv = Conv2d(8, 16, 3, padding=1)
    x = torch.randn(1, 8, 12, 12)

    class AddDelta(nn.Module):
        def forward(self, w):
            return w + 0.1

    parametrize.register_parametrization(conv, "weight", AddDelta())
    assert rel_err(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1)) < 1e-5
    assert rel_err(conv(x), F.conv2d(x, conv.parametrizations.weight.original, conv.bias, padding=1)) > 1e-2


@pytest.fixture(params=["winograd", "winograd2", "gemm"])
def forced_path(request):
    return request.getfixturevalue(f"always_{request.param}")


@torch.no_grad()
@pytest.mark.parametrize("name", ["SD1", "SDXL"])
def test_unet_with_fast_paths_matches_diffusers(forced_path, name):
    ours, ref, config = build_pair({"SD1": SD1, "SDXL": SDXL}[name])
    x, t, context, g = inputs(config)
    kwargs, y = {}, None
    if config.adm_in_channels:
        y, kwargs["added_cond_kwargs"] = adm_inputs(config, x.shape[0], g)
    expected = ref(x, t, encoder_hidden_states=context, **kwargs).sample
    assert rel_err(ours(x, t, context, y=y), expected) < 1e-4


@torch.no_grad()
def test_vae_with_fast_paths_matches_diffusers(forced_path):
    model = randomised(SMALL)
    ref = diffusers_reference(model)
    latents = torch.randn(1, SMALL.z_channels, 12, 10)
    images = torch.rand(1, 3, 40, 56) * 2 - 1
    assert rel_err(model.decode(latents), ref.decode(latents).sample) < 1e-4
    assert rel_err(model.encode(images).mean, ref.encode(images).latent_dist.mean) < 1e-4
