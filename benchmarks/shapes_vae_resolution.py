"""What the built-in model's VAE carries at a higher image resolution: ``python -m benchmarks.shapes_vae_resolution``.

The recipe's VAE (``sdlite.data.recipe.VAE``, f=8, the same architecture) trained from scratch as phase 1 trains it,
but on the data set's scenes drawn at ``--side`` pixels (128: 16x16 latents, where a small shape spans 3.5 latent
cells instead of 1.75), then the round trip of ``quality.roundtrip`` at that size: the share of one-object images of
each kind and size that come back with the detector reading the object drawn. The crops are ``--side`` / 2 pixels
and the batch a quarter of the recipe's (16), so a step handles as many pixels as a phase-1 step; seeded like the
recipe.

    python -m benchmarks.shapes_vae_resolution                     # 128x128, 1 200 + 100 steps (about 20 CPU-minutes)
    python -m benchmarks.shapes_vae_resolution --side 64           # the recipe's own resolution, for comparison
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from sdlite.data import quality, recipe
from sdlite.data.pretrain import Clock, Recipe, _pixels, train_vae
from sdlite.data.scene import render
from sdlite.data.shapes import sample


def train(side: int, images: int, steps: int, full_steps: int, seed: int = 0, say=print):
    """The recipe's VAE trained by the recipe's phase 1 (``pretrain.train_vae``) on ``images`` training scenes drawn
    at ``side`` pixels; returns it, in eval mode."""
    r = Recipe(seed=seed, vae_steps=steps, vae_full_steps=full_steps, vae_batch=16, vae_crop=side // 2)
    rng = np.random.default_rng(seed)
    data = np.stack([np.asarray(render(sample(rng).scene, rng, side=side)) for _ in range(images)])
    pixels = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    _, vae, _ = recipe.build(seed)
    with tempfile.TemporaryDirectory() as state:  # the phase's resumable state, not kept
        train_vae(vae, pixels, r, Path(state), Clock(float("inf")), say)
    with torch.no_grad():
        recipe.fit_latent_scale(vae, _pixels(pixels[:256]), seed=seed)
    return vae.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--images", type=int, default=8000, help="training scenes (default 8000)")
    parser.add_argument("--steps", type=int, default=1200, help="steps on crops (default 1200)")
    parser.add_argument("--full-steps", type=int, default=100, help="then steps on whole images (default 100)")
    parser.add_argument("--roundtrip-images", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    vae = train(args.side, args.images, args.steps, args.full_steps)
    with torch.no_grad():
        shares = quality.roundtrip(vae, args.roundtrip_images, side=args.side)
    print(f"the recipe's VAE trained at {args.side}x{args.side} ({args.steps} + {args.full_steps} steps), "
          f"encoded and decoded at that size, read back by the detector\n")
    print(quality.roundtrip_table(shares, args.roundtrip_images))


if __name__ == "__main__":
    main()
