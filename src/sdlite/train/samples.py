"""Sample images during training: the run's prompts generated through ``pipe.txt2img`` with the weights as they are at
that step, saved as PNGs with their A1111 infotext next to the output (``<output stem>-samples/``)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import PngImagePlugin

from ..checkpoint.write import atomic_path


def write_png(path: Path, image, infotext: str) -> Path:
    """A PNG with its infotext in the "parameters" text chunk (where A1111 writes it), written atomically."""
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", infotext)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=meta)
    return path


def write_samples(run, step: int) -> list[Path]:
    """One image per sample prompt at the training resolution, seeded with the run's seed; returns the paths."""
    c, pipe = run.config, run.pipe
    folder = run.output.parent / f"{run.output.stem}-samples"
    folder.mkdir(exist_ok=True)
    side = run.batches.data.resolution
    training = pipe.unet.training
    pipe.unet.eval()
    paths = []
    try:
        with torch.no_grad():
            for i, prompt in enumerate(c.sample_prompts):
                result = pipe.txt2img(prompt, width=side, height=side, steps=c.sample_steps, seed=c.seed + i)
                paths.append(write_png(folder / f"step{step:06d}-{i}.png", result.images[0], result.infotexts[0]))
    finally:
        pipe.unet.train(training)
    return paths
