"""The "shapes" data set: flat-coloured shapes on a flat-coloured background, with captions (sdlite's own).

Each sample is a 64x64 RGB image, its caption and its ground truth (a ``Scene``), drawn deterministically from a
random generator. Vocabulary: the eight colours of ``PALETTE`` (fixed sRGB values), the shapes circle, square and
triangle (star and heart exist for adaptation and never appear unless asked for), sizes small and large, positions
left, right, top, bottom and center, one or two objects. Caption forms::

    a red circle on a blue background                                  (size and position not named)
    a small yellow triangle on the left, green background               (size and position named)
    a red circle to the left of a blue square on a white background     (two objects, left and right)

An object never has the background's colour. ``HELD_OUT`` lists 15% of the (colour, shape, background)
combinations; no object of a "train" sample is one of them, and every "held_out" sample's first object is one.

    >>> from sdlite.data import shapes
    >>> image, caption, scene = shapes.sample(np.random.default_rng(0))
    >>> shapes.describe(image).scene == scene
    True

Command line: ``python -m sdlite.data.shapes write DIR --count N --seed S`` writes DIR/000000.png with
DIR/000000.txt (its caption) and so on, the folder layout ``sdlite train`` reads;
``python -m sdlite.data.shapes describe IMAGE...`` prints what the detector reads;
``python -m sdlite.data.shapes evaluate [MODEL]`` scores a model on the held-out prompts and ``grid OUT [MODEL]``
draws a sheet of its samples (``sdlite.data.quality``); ``adapt dreambooth|ti|lora`` trains and measures the
adaptation examples (``sdlite.data.adapt``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from ..checkpoint.write import atomic_path
from ..errors import SdliteError
from .detect import Description, Found, describe
from .scene import ALL_SHAPES, COLOURS, EXTRA_SHAPES, PALETTE, POSITIONS, SHAPES, SIZES, Obj, Scene, render

__all__ = ["PALETTE", "COLOURS", "SHAPES", "EXTRA_SHAPES", "SIZES", "POSITIONS", "HELD_OUT", "FORMS", "Obj", "Scene",
           "Sample", "ShapesDataset", "Description", "Found", "caption", "sample", "dataset", "render", "describe",
           "write"]

# 25 of the 168 (colour, shape, background) combinations (15%): colour k % 8 on background k % 8 + 1 + 2 (k // 8)
# with shape k % 3, for k = 0..24, so that every colour, shape and background is held out about equally often and
# still seen in training with the other shapes and colours.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset({
    ("red", "circle", "orange"), ("orange", "square", "yellow"), ("yellow", "triangle", "green"),
    ("green", "circle", "blue"), ("blue", "square", "purple"), ("purple", "triangle", "white"),
    ("white", "circle", "black"), ("black", "square", "red"), ("red", "triangle", "green"),
    ("orange", "circle", "blue"), ("yellow", "square", "purple"), ("green", "triangle", "white"),
    ("blue", "circle", "black"), ("purple", "square", "red"), ("white", "triangle", "orange"),
    ("black", "circle", "yellow"), ("red", "square", "purple"), ("orange", "triangle", "white"),
    ("yellow", "circle", "black"), ("green", "square", "red"), ("blue", "triangle", "orange"),
    ("purple", "circle", "yellow"), ("white", "square", "green"), ("black", "triangle", "blue"),
    ("red", "circle", "black"),
})

FORMS = {"plain": 0.35, "detailed": 0.35, "pair": 0.30}  # caption form → probability
SPLITS = ("train", "held_out")
_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
          "center": "in the center"}


class Sample(NamedTuple):
    image: Image.Image
    caption: str
    scene: Scene


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def caption(scene: Scene, form: str) -> str:
    """The caption of ``scene`` in one of the ``FORMS``."""
    bg, objs = scene.background, scene.objects
    if form == "pair":
        if len(objs) != 2:
            raise ValueError(f"the pair form needs two objects, the scene has {len(objs)}")
        left, right = objs
        return f"{_a(left.colour)} {left.shape} to the left of {_a(right.colour)} {right.shape} on {_a(bg)} background"
    if len(objs) != 1:
        raise ValueError(f"the {form} form needs one object, the scene has {len(objs)}")
    (obj,) = objs
    if form == "plain":
        return f"{_a(obj.colour)} {obj.shape} on {_a(bg)} background"
    if form == "detailed":
        return f"{_a(obj.size)} {obj.colour} {obj.shape} {_WHERE[obj.position]}, {bg} background"
    raise ValueError(f"unknown caption form {form!r}; known: {', '.join(FORMS)}")


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _scene(rng: np.random.Generator, split: str, shapes: Sequence[str], form: str) -> Scene:
    """Draw a scene's attributes for ``split``: rejection sampling keeps held-out combinations out of "train"."""
    sizes = tuple(SIZES)
    while True:
        if split == "held_out":
            colour, shape, bg = _pick(rng, sorted(c for c in HELD_OUT if c[1] in shapes))
        else:
            bg = _pick(rng, COLOURS)
            colour, shape = _pick(rng, [c for c in COLOURS if c != bg]), _pick(rng, shapes)
        if form == "pair":
            other = (_pick(rng, [c for c in COLOURS if c != bg]), _pick(rng, shapes))
            if other == (colour, shape):
                continue  # two identical objects would make "to the left of" unreadable
            pair = [(colour, shape), other]
            if rng.random() < 0.5:
                pair.reverse()  # the first-drawn (held-out) object stands on either side
            objs = tuple(Obj(c, s, _pick(rng, sizes), p) for (c, s), p in zip(pair, ("left", "right")))
        else:
            objs = (Obj(colour, shape, _pick(rng, sizes), _pick(rng, tuple(POSITIONS))),)
        if split == "train" and any((o.colour, o.shape, bg) in HELD_OUT for o in objs):
            continue
        return Scene(bg, objs)


def sample(rng: np.random.Generator | int, split: str = "train", shapes: Sequence[str] = SHAPES,
           forms: dict[str, float] | None = None, outline: bool = False) -> Sample:
    """One (image, caption, scene) drawn from ``rng`` (a numpy Generator or a seed).

    ``split``: "train" (no held-out combination) or "held_out" (the first object drawn is a held-out combination).
    ``shapes``: the shapes to draw from (e.g. ``("star",)`` for adaptation); ``forms``: caption form weights;
    ``outline``: draw the objects as outlines (the same scene and caption as without it, for the LoRA example).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    unknown = [s for s in shapes if s not in ALL_SHAPES]
    if unknown or not shapes:
        raise ValueError(f"unknown shape(s) {unknown} or none given; known: {', '.join(ALL_SHAPES)}")
    if split == "held_out" and not set(shapes) & set(SHAPES):
        raise ValueError(f"the held-out combinations use the shapes {', '.join(SHAPES)}; none of them is in {shapes}")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    forms = FORMS if forms is None else forms
    names = list(forms)
    weights = np.array([forms[n] for n in names], dtype=float)
    form = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    scene = _scene(rng, split, tuple(shapes), form)
    if outline:
        scene = Scene(scene.background, tuple(dataclasses.replace(o, outline=True) for o in scene.objects))
    return Sample(render(scene, rng), caption(scene, form), scene)


class ShapesDataset(torch.utils.data.Dataset):
    """``n`` samples; sample ``i`` depends only on (seed, split, i), so any order and any worker gives the same
    data. Items are ``Sample(image, caption, scene)``."""

    def __init__(self, n: int, seed: int = 0, split: str = "train", shapes: Sequence[str] = SHAPES,
                 forms: dict[str, float] | None = None, outline: bool = False):
        if n < 0:
            raise ValueError(f"a data set cannot have {n} samples")
        sample(np.random.default_rng(0), split, shapes, forms)  # checks the arguments now, not at the first item
        self.n, self.seed, self.split, self.shapes, self.forms = n, seed, split, tuple(shapes), forms
        self.outline = outline

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Sample:
        if not -self.n <= i < self.n:
            raise IndexError(f"sample {i} of a data set of {self.n}")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), i % self.n])
        return sample(rng, self.split, self.shapes, self.forms, self.outline)


def dataset(n: int, seed: int = 0, split: str = "train", shapes: Sequence[str] = SHAPES,
            forms: dict[str, float] | None = None, outline: bool = False) -> ShapesDataset:
    return ShapesDataset(n, seed, split, shapes, forms, outline)


def write(folder: str | os.PathLike, count: int, seed: int = 0, split: str = "train",
          shapes: Sequence[str] = SHAPES, forms: dict[str, float] | None = None, outline: bool = False) -> list[Path]:
    """Write ``count`` samples as ``folder/000000.png`` + ``folder/000000.txt`` (the caption); returns the PNGs."""
    data = dataset(count, seed, split, shapes, forms, outline)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [save_example(folder / f"{i:06d}.png", image, text) for i, (image, text, _) in enumerate(data)]


def save_example(png: Path, image: Image.Image, caption: str | None = None) -> Path:
    """``image`` as ``png`` and, when given, ``caption`` beside it in the same-named .txt (the layout ``sdlite
    train`` reads), each written to a temporary name and renamed; returns ``png``."""
    with atomic_path(png) as tmp:
        image.save(tmp, format="PNG")
    if caption is not None:
        with atomic_path(png.with_suffix(".txt")) as tmp:
            tmp.write_text(caption + "\n", encoding="utf-8")
    return png


def _describe_line(path: str) -> str:
    d = describe(Image.open(path))
    objects = "; ".join(f"{f.obj.size} {f.obj.colour} {f.obj.shape}{' outline' * f.obj.outline} {f.obj.position} "
                        f"(fit {f.fit:.2f})"
                        for f in d.found) or "no object"
    return f"{path}: {d.background} background ({d.background_share:.0%} of pixels): {objects}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdlite.data.shapes", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write a folder of PNG images with .txt captions")
    w.add_argument("folder")
    w.add_argument("--count", type=int, default=1000)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--split", choices=SPLITS, default="train")
    w.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(ALL_SHAPES)}")
    w.add_argument("--outline", action="store_true", help="draw the shapes as outlines only")
    d = sub.add_parser("describe", help="print what the detector reads in images")
    d.add_argument("images", nargs="+")
    t = sub.add_parser("train", help="train the built-in model from scratch (resumable; see sdlite.data.pretrain)")
    t.add_argument("--out", required=True, help="the model file to write (.safetensors)")
    t.add_argument("--state", help="the resumable state folder (default: OUT.state)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-minutes", type=float, default=90.0, help="stop (state saved) after this long")
    t.add_argument("--phase", choices=["decoder"], help="run only the decoder phase (beside the main run)")
    t.add_argument("--device", help="where to train (default: cuda when a GPU is available, else cpu)")
    from . import adapt, quality  # the model-facing commands; imported here, as they build on this module

    quality.add_commands(sub)
    adapt.add_command(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            from .pretrain import Recipe, pretrain
            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            done = pretrain(args.out, state=args.state, r=Recipe(seed=args.seed), max_minutes=args.max_minutes,
                            phase=args.phase, device=device)
            return 0 if done or args.phase else 3
        if args.command in ("evaluate", "grid", "roundtrip"):
            return quality.run_command(args)
        if args.command == "adapt":
            return adapt.run_command(args)
        if args.command == "write":
            paths = write(args.folder, args.count, args.seed, args.split, args.shapes.split(","), outline=args.outline)
            print(f"wrote {len(paths)} images with captions to {args.folder}")
        else:
            for path in args.images:
                print(_describe_line(path))
    except (SdliteError, ValueError, OSError) as e:
        print(f"sdlite: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
