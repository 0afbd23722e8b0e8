"""Loading upscaler files as published: the architecture is read from the keys and shapes, never from the name.

Recognised: RRDBNet (ESRGAN / Real-ESRGAN / BSRGAN) and SRVGGNetCompact (see ``archs``). Real-ESRGAN's
files keep their weights under ``params_ema`` (preferred, as Real-ESRGAN's own loader does) or ``params``; the other
files are bare state dicts. Anything else is refused with a description of what the file holds.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..checkpoint import open_tensor_file
from ..checkpoint.materialize import materialize, plan
from ..errors import CheckpointError
from .archs import NAMED_LAYOUTS, RRDBConfig, SRVGGNetCompact, build, infer_srvgg_config, unshuffle_factor

WRAPPERS = ("params_ema.", "params.")
SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt", ".bin")

# AUTOMATIC1111's names for the upscalers it downloads, as infotexts write them ("Hires upscaler: R-ESRGAN 4x+"),
# and the file each one is. Other files are found by their stem ("4x-UltraSharp").
A1111_NAMES = {
    "R-ESRGAN 4x+": "RealESRGAN_x4plus",
    "R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B",
    "R-ESRGAN 2x+": "RealESRGAN_x2plus",
    "R-ESRGAN General 4xV3": "realesr-general-x4v3",
    "R-ESRGAN General WDN 4xV3": "realesr-general-wdn-x4v3",
    "R-ESRGAN AnimeVideo": "realesr-animevideov3",
    "ESRGAN_4x": "ESRGAN_4x",
}


def _blocks(shapes, pattern: str, what: str) -> int:
    found = sorted({int(m.group(1)) for k in shapes if (m := re.fullmatch(pattern, k))})
    if not found or found != list(range(len(found))):
        raise ValueError(f"{what} indices {found[:8]} are not 0..N-1")
    return len(found)


def infer_rrdb_config(shapes: dict[str, tuple[int, ...]]) -> RRDBConfig:
    """RRDBNet's config from its keys (without a ``params_ema.`` prefix): layout, features (first conv's width),
    growth (a dense block's first conv width), blocks (count of RRDBs), x2 stages (count of upsampling convs) and
    the pixel-unshuffle factor (first conv input channels / output channels). Raises ValueError on what does not fit."""
    if "model.0.weight" in shapes:
        layout, first = "esrgan", shapes["model.0.weight"]
        blocks = _blocks(shapes, r"model\.1\.sub\.(\d+)\.RDB1\.conv1\.0\.weight", "model.1.sub.N RRDB")
        growth = shapes["model.1.sub.0.RDB1.conv1.0.weight"][0]
        convs = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("model.")} - {0, 1})
        # Each x2 stage is (Upsample, conv, LeakyReLU) from index 2, so its convs sit at 3, 6, …; then conv,
        # LeakyReLU, conv.
        ups = len(convs) - 2
        expected = [3 * (k + 1) for k in range(ups)] + [3 * ups + 2, 3 * ups + 4]
        if ups < 0 or convs != expected:
            raise ValueError(f"model.N conv indices after the trunk are {convs}, expected 3, 6, … then two more "
                             f"(e.g. {[3, 6, 8, 10]} for x4)")
        last = shapes[f"model.{convs[-1]}.weight"]
    else:
        layout = next((name for name, n in NAMED_LAYOUTS.items() if f"{n['trunk']}.0.{n['dense']}1.conv1.weight"
                       in shapes), None)
        if layout is None or "conv_first.weight" not in shapes or "conv_last.weight" not in shapes:
            raise ValueError("neither model.0 (ESRGAN), conv_first + body.N.rdbK (Real-ESRGAN) nor conv_first + "
                             "RRDB_trunk.N.RDBK (ESRGAN/BSRGAN) keys")
        n = NAMED_LAYOUTS[layout]
        first, last = shapes["conv_first.weight"], shapes["conv_last.weight"]
        blocks = _blocks(shapes, rf"{n['trunk']}\.(\d+)\.{n['dense']}1\.conv1\.weight", f"{n['trunk']}.N RRDB")
        growth = shapes[f"{n['trunk']}.0.{n['dense']}1.conv1.weight"][0]
        ups = 0  # the upsampling convs are numbered from 1
        while f"{n['up']}{ups + 1}.weight" in shapes:
            ups += 1
    if any(".conv1x1." in k for k in shapes):
        raise ValueError("ESRGAN+ (its dense blocks have conv1x1 layers) is not supported")
    factor = unshuffle_factor(first[1], last[0])
    return RRDBConfig(layout=layout, in_channels=first[1] // factor ** 2, out_channels=last[0], features=first[0],
                      growth=growth, blocks=blocks, upsamples=ups, unshuffle=factor)


def _describe(keys: list[str]) -> str:
    tops: dict[str, int] = {}
    for k in keys:
        tops[k.split(".")[0]] = tops.get(k.split(".")[0], 0) + 1
    listing = ", ".join(f"{t}.* ({n})" for t, n in sorted(tops.items(), key=lambda kv: -kv[1])[:6])
    return f"{len(keys)} tensors: {listing}"


def load(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """An upscaler file as a module in eval mode: ``model(x)`` maps [B, 3, H, W] RGB in [0, 1] to
    [B, 3, H·s, W·s]; ``model.scale`` is s, ``model.config`` the inferred architecture and ``model.name`` the name
    A1111 gives it ("R-ESRGAN 4x+" for RealESRGAN_x4plus.pth, else the file stem)."""
    tf = open_tensor_file(path)
    try:
        prefix = next((w for w in WRAPPERS if any(k.startswith(w) for k in tf.keys())), "")
        shapes = {k[len(prefix):]: s for k, s in tf.shapes.items() if k.startswith(prefix)}
        rrdb = "model.1.sub.0.RDB1.conv1.0.weight" in shapes or "conv_first.weight" in shapes
        srvgg = "body.0.weight" in shapes and len(shapes.get("body.1.weight", ())) == 1
        try:
            if rrdb:
                config = infer_rrdb_config(shapes)
                p = plan(tf, lambda: build(config), prefix, name=f"RRDBNet ({config.layout} layout)")
            elif srvgg:
                config = infer_srvgg_config(shapes)
                p = plan(tf, lambda: SRVGGNetCompact(config), prefix, name="SRVGGNetCompact")
            else:
                raise CheckpointError(path, "not an upscaler sdlite knows (ESRGAN/Real-ESRGAN RRDBNet, "
                                            f"SRVGGNetCompact): {_describe(list(tf.keys()))}")
        except ValueError as e:
            kind = "an RRDBNet (ESRGAN)" if rrdb else "an SRVGGNetCompact"
            raise CheckpointError(path, f"looks like {kind} upscaler but {e}") from None
        model = materialize(tf, p, dtype, device)
    finally:
        tf.close()
    model.name = display_name(path)
    return model


def display_name(path: str | os.PathLike) -> str:
    """The name A1111 shows (and writes as "Hires upscaler") for an upscaler file: its own name for the files it
    downloads, else the file stem."""
    stem = Path(path).stem
    return next((name for name, s in A1111_NAMES.items() if s == stem), stem)


def find(name: str, dirs: Iterable[str | os.PathLike]) -> Path:
    """The file of an upscaler named as A1111 names it ("R-ESRGAN 4x+", "ESRGAN_4x") or by its file stem
    ("4x-UltraSharp"), searched in ``dirs`` in order (a name that is a path is returned as it is)."""
    if os.path.isfile(name):
        return Path(name)
    stems = [A1111_NAMES.get(name, name)]
    if name not in A1111_NAMES:
        stems += [s for a, s in A1111_NAMES.items() if a.lower() == name.lower()]
    dirs = [Path(d) for d in dirs]
    for d in dirs:
        for stem in stems:
            for suffix in SUFFIXES:
                if (d / (stem + suffix)).is_file():
                    return d / (stem + suffix)
    searched = ", ".join(str(d) for d in dirs) or "no directories (set pipe.upscaler_dirs)"
    raise FileNotFoundError(f"no upscaler file for {name!r} ({' or '.join(s + '.pth' for s in stems)}) in {searched}")


@functools.lru_cache(maxsize=2)
def _cached(path: str, mtime: float) -> nn.Module:
    return load(path)


def resolve(upscaler: str | os.PathLike | nn.Module, dirs: Iterable[str | os.PathLike]) -> nn.Module:
    """A loaded upscaler as it is; a name or path (see ``find``) loaded once and kept (on the CPU, float32) for the
    generations that follow."""
    if isinstance(upscaler, nn.Module):
        return upscaler
    path = find(os.fspath(upscaler), dirs)
    return _cached(str(path), path.stat().st_mtime)


def name_of(model: nn.Module) -> str:
    """The name infotexts give ``model``: the one ``load`` recorded, else its class name."""
    return getattr(model, "name", type(model).__name__)
