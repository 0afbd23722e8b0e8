"""A1111's seed rules: per-image CPU generators, variation seeds, seed resize, ENSD, and NVIDIA's Philox source."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdlite.rng import ImageNoise, PhiloxGenerator, make_generator


def test_philox_reproduces_cuda_randn():
    # torch.manual_seed(0); torch.randn(3, 4, device="cuda") on NVIDIA GPUs (the values A1111 documents for its port).
    cuda = torch.tensor([[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                         [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                         [-1.07454231, -0.36314407, -1.67105067, 2.26550497]])
    g = PhiloxGenerator(0)
    assert torch.allclose(g.randn((3, 4)), cuda, atol=1e-6)
    assert not torch.allclose(g.randn((3, 4)), cuda)  # each call advances the counter offset


def test_cpu_noise_is_one_generator_per_image():
    shape, seeds = (4, 8, 6), [10, 11, 12]
    noise = ImageNoise(shape, seeds)
    first, second = noise.first(), noise.next()
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(first[i], torch.randn(shape, generator=g))
        assert torch.equal(second[i], torch.randn(shape, generator=g))


def test_ensd_reseeds_after_the_first_draw():
    shape = (4, 8, 8)
    noise = ImageNoise(shape, [100], eta_noise_seed_delta=31337)
    first, second = noise.first(), noise.next()
    assert torch.equal(first[0], torch.randn(shape, generator=torch.Generator().manual_seed(100)))
    assert torch.equal(second[0], torch.randn(shape, generator=torch.Generator().manual_seed(100 + 31337)))


def _slerp_reference(t, a, b):
    """A1111's slerp, normalising along dim 1 of [C, H, W], written with numpy."""
    a, b = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    dot = (an * bn).sum(1)
    omega = np.arccos(dot)
    so = np.sin(omega)
    return np.sin((1 - t) * omega)[:, None] / so[:, None] * a + np.sin(t * omega)[:, None] / so[:, None] * b


def test_variation_seed_is_slerped():
    shape = (4, 8, 8)
    noise = ImageNoise(shape, [5], subseeds=[77], subseed_strength=0.3).first()[0]
    base = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    sub = torch.randn(shape, generator=torch.Generator().manual_seed(77))
    np.testing.assert_allclose(noise.numpy(), _slerp_reference(0.3, base, sub), rtol=1e-4, atol=1e-5)
    assert torch.equal(ImageNoise(shape, [5], subseeds=[77], subseed_strength=0.0).first()[0], base)


def test_seed_resize_pastes_the_other_size_in_the_middle():
    shape = (4, 12, 16)  # 128x96 pixels
    noise = ImageNoise(shape, [9], seed_resize_from=(64, 64)).first()[0]
    small = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(9))
    big = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    assert torch.equal(noise[:, 2:10, 4:12], small)
    assert torch.equal(noise[:, :2], big[:, :2]) and torch.equal(noise[:, :, :4], big[:, :, :4])


def test_sources():
    assert torch.equal(make_generator(3, "NV").randn((2, 2)), PhiloxGenerator(3).randn((2, 2)))
    assert torch.equal(make_generator(3, "GPU", "cpu").randn((5,)), torch.randn(5, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="CPU, GPU, NV"):
        make_generator(3, "TPU")
    nv = ImageNoise((4, 2, 2), [0], source="NV")
    assert torch.allclose(nv.first()[0].flatten()[:4], PhiloxGenerator(0).randn((16,))[:4])
