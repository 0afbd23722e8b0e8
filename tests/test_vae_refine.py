"""Decoder inversion (sdlite.vae.refine_latents) and the training latent cache's ``refine`` option: the refined
latents reproduce the image better than the encoder's, only the latents move, and on the built-in model they carry
shapes its encoder loses (a star, a ring) as the detector reads them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import sdlite
from sdlite.data.scene import Obj, Scene, render
from sdlite.data.shapes import describe
from sdlite.images import to_pil, to_tensor
from sdlite.train.batches import LatentCache
from sdlite.train.data import ImageFolder
from sdlite.vae import AutoencoderKL, refine_latents

from conftest import randomize_
from sdfiles import VAE


@pytest.fixture(scope="module")
def vae():
    return randomize_(AutoencoderKL(VAE), 4).eval().requires_grad_(False)


def _error(vae, x, z):
    with torch.no_grad():
        e = vae.decode(z) - x
    return (e.abs().mean() + e.pow(2).mean()).item()


def test_refined_latents_reproduce_the_image_better_and_only_the_latents_move(vae):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        z0 = vae.encode(x).mean
    weights = {k: v.clone() for k, v in vae.state_dict().items()}
    vae.requires_grad_(True)  # even with trainable weights, only z gets gradients
    try:
        z = refine_latents(vae, x, z0, steps=20)
        assert all(p.grad is None for p in vae.parameters())
    finally:
        vae.requires_grad_(False)
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in weights.items())
    assert z.shape == z0.shape and z.dtype == torch.float32 and not z.requires_grad
    before, after = _error(vae, x, z0), _error(vae, x, z)
    assert after < 0.9 * before, (before, after)
    assert torch.equal(refine_latents(vae, x, z0, steps=0), z0)


def test_refine_refuses_mismatched_sizes_and_negative_steps(vae):
    x, z = torch.zeros(1, 3, 64, 64), torch.zeros(1, 4, 4, 4)
    with pytest.raises(ValueError, match=r"\(64, 64\) pixels do not match latents of \(4, 4\)"):
        refine_latents(vae, x, z, steps=1)
    with pytest.raises(ValueError, match="steps must be"):
        refine_latents(vae, x, torch.zeros(1, 4, 8, 8), steps=-1)


def test_latent_cache_refines_and_keys_its_files_by_it(tmp_path, vae):
    g = torch.Generator().manual_seed(1)
    Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()).save(tmp_path / "0.png")
    data = ImageFolder(tmp_path, resolution=64, prompt="p")
    plain = LatentCache(data, vae, folder=tmp_path / "cache", seed=3)
    refined = LatentCache(data, vae, folder=tmp_path / "cache", seed=3, refine=10)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # a refined latent is not mistaken for a plain one
    x = data.pixels(0)[None]
    k = vae.scale_factor
    assert _error(vae, x, refined.get(0)[None] / k) < _error(vae, x, plain.get(0)[None] / k)
    again = LatentCache(data, None, folder=tmp_path / "cache", seed=3, refine=10)  # read back, no VAE needed
    assert torch.equal(again.get(0), refined.get(0))


def test_built_in_model_draws_a_star_and_a_ring_from_refined_latents():
    vae = sdlite.load().vae.float()
    rng = np.random.default_rng(0)
    objects = [Obj("yellow", "star", "large", "center"), Obj("red", "circle", "large", "left", outline=True)]
    scenes = [Scene("blue", (objects[0],)), Scene("black", (objects[1],))]
    x = torch.stack([to_tensor(render(s, rng)) for s in scenes]) * 2 - 1
    with torch.no_grad():
        z0 = vae.encode(x).mean
        encoded = to_pil(vae.decode(z0))
        refined = to_pil(vae.decode(refine_latents(vae, x, z0, steps=100)))

    def read(image):
        return [(f.obj.colour, f.obj.shape, f.obj.outline) for f in describe(image).found]

    wanted = [[(o.colour, o.shape, o.outline)] for o in objects]
    assert [read(i) for i in encoded] != wanted  # what the encoder alone gives back: neither is right
    assert [read(i) for i in refined] == wanted
