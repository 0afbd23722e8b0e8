"""Regional prompts on the built-in model, measured by its detector: a 128x64 canvas in two native 64x64 windows,
"a red circle" as the left region and "a blue square" as the right one; each half must show its own object and not
the other's (no bleeding between regions)."""

from __future__ import annotations

import torch

import sdlite
from sdlite.data import shapes

LEFT = sdlite.Region("a red circle on a white background", (0, 0, 64, 64))
RIGHT = sdlite.Region("a blue square on a white background", (64, 0, 64, 64))


def _objects(image):
    return {(f.obj.colour, f.obj.shape) for f in shapes.describe(image).found}


def test_each_region_draws_its_own_object_only():
    pipe = sdlite.load()
    right = 0
    with torch.no_grad():
        for seed in range(4):
            image = pipe.txt2img("a white background", width=128, height=64, steps=20, cfg_scale=5, seed=seed,
                                 tiling=sdlite.Tiles(size=8, stride=8, batch=2), regions=[LEFT, RIGHT]).images[0]
            left, rest = _objects(image.crop((0, 0, 64, 64))), _objects(image.crop((64, 0, 128, 64)))
            assert ("blue", "square") not in left and ("red", "circle") not in rest, (seed, left, rest)
            right += ("red", "circle") in left and ("blue", "square") in rest
    assert right >= 3, right
