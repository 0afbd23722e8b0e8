"""What the built-in model's VAE carries at a higher image resolution: ``python -m benchmarks.shapes_vae_resolution``.

The recipe's VAE (``sdlite.data.recipe.VAE``, f=8, the same architecture) trained from scratch as phase 1 trains it,
but on the data set's scenes drawn at ``--side`` pixels (128: 16x16 latents, where a small shape spans 3.5 latent
cells instead of 1.75), then the round trip of ``quality.roundtrip`` at that size: the share of one-object images of
each kind and size that come back with the detector reading the object drawn. The crops are ``--side`` / 2 pixels
and the batch a quarter of the recipe's, so a step handles as many pixels as a phase-1 step; seeded like the recipe.

    python -m benchmarks.shapes_vae_resolution                     # 128x128, 1 200 + 100 steps (about 20 CPU-minutes)
    python -m benchmarks.shapes_vae_resolution --side 64           # the recipe's own resolution, for comparison
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sdlite.data import quality, recipe
from sdlite.data.pretrain import Recipe, _crops, _pixels, _schedule_lr, vae_loss
from sdlite.data.scene import render
from sdlite.data.shapes import sample


def train(side: int, images: int, steps: int, full_steps: int, seed: int = 0, say=print):
    """The recipe's VAE trained on ``images`` training scenes drawn at ``side`` pixels; returns it, in eval mode."""
    r = Recipe(seed=seed)
    rng = np.random.default_rng(seed)
    data = np.stack([np.asarray(render(sample(rng).scene, rng, side=side)) for _ in range(images)])
    pixels = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    _, vae, _ = recipe.build(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 1)
    total, start = steps + full_steps, time.perf_counter()
    for step in range(total):
        _schedule_lr(optimizer, [r.vae_lr], step, total, 100)
        whole = step >= steps
        batch = pixels[torch.randint(0, images, (r.vae_batch // 16 if whole else r.vae_batch // 4,),
                                     generator=generator)]
        x = _pixels(batch) if whole else _crops(_pixels(batch), side // 2, generator)
        loss, l1 = vae_loss(vae, x, r.kl_weight, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0:
            say(f"step {step + 1}/{total}  L1 {l1:.4f}  {time.perf_counter() - start:.0f} s")
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
