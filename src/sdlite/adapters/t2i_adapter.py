"""T2I-Adapters (Mou et al. 2023, "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability for
Text-to-Image Diffusion Models") in TencentARC's original layout and in diffusers' (docs/formats.md §15.3).

An adapter turns a control image into four feature maps, one per UNet resolution level, which are added to the
UNet encoder's hidden states (see :func:`feature_blocks`). The image is first pixel-unshuffled (8x for SD1.x, 16x
for SDXL adapters), then ``conv_in`` and residual blocks run level by level; a block that starts a coarser level
average-pools its input by 2.

Original layouts, all told apart by their keys:

* full (``body.{k}`` = level·blocks + block): ``block1`` 3x3, ReLU, ``block2`` (1x1 in the released files) and an
  identity skip; ``in_conv`` where a block changes width.
* light (``body.{level}``): 1x1 ``in_conv`` to a quarter of the width, residual ``body.{j}.block1/block2``, 1x1
  ``out_conv``.
* XL (full layout, unshuffle 16): widths 320, 640, 1280, 1280 with the only pooling at the third level.

diffusers' names (``adapter.conv_in``, ``adapter.body.{level}.resnets.{j}``, ``adapter.body.{level}.in_conv``) are
renamed to the original ones on load.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..checkpoint.files import RenamedFile, open_tensor_file
from ..checkpoint.materialize import materialize, plan
from ..errors import CheckpointError

LEVELS = 4


def _pool(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling; odd sizes are padded by one zero row/column, counted in the mean, as the original does."""
    return F.avg_pool2d(x, 2, 2, padding=(x.shape[2] % 2, x.shape[3] % 2)) if x.shape[2] % 2 or x.shape[3] % 2 \
        else F.avg_pool2d(x, 2, 2)


class ResnetBlock(nn.Module):
    """One block of the full adapter: optional pooling and width change, then a residual pair of convolutions."""

    def __init__(self, in_c: int, out_c: int, *, ksize: int, down: bool):
        super().__init__()
        pad = ksize // 2
        self.down = down
        self.in_conv = nn.Conv2d(in_c, out_c, ksize, 1, pad) if in_c != out_c else None
        self.block1 = nn.Conv2d(out_c, out_c, 3, 1, 1)
        self.block2 = nn.Conv2d(out_c, out_c, ksize, 1, pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = _pool(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(F.relu(self.block1(x)))


class _LightResnet(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block1 = nn.Conv2d(c, c, 3, 1, 1)
        self.block2 = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(F.relu(self.block1(x)))


class _LightLevel(nn.Module):
    def __init__(self, in_c: int, inner: int, out_c: int, blocks: int, down: bool):
        super().__init__()
        self.down = down
        self.in_conv = nn.Conv2d(in_c, inner, 1)
        self.body = nn.Sequential(*(_LightResnet(inner) for _ in range(blocks)))
        self.out_conv = nn.Conv2d(inner, out_c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_conv(self.body(self.in_conv(_pool(x) if self.down else x)))


class T2IAdapter(nn.Module):
    """``adapter(hint)`` with ``hint`` [B, C, H, W] in [0, 1] → four feature maps, finest first."""

    def __init__(self, kind: str, unshuffle: int, blocks: nn.ModuleList, conv_in: nn.Conv2d | None):
        super().__init__()
        self.kind, self.unshuffle = kind, unshuffle
        if conv_in is not None:
            self.conv_in = conv_in
        self.body = blocks

    @property
    def hint_channels(self) -> int:
        first = self.conv_in if self.kind != "light" else self.body[0].in_conv
        return first.in_channels // self.unshuffle**2

    def forward(self, hint: torch.Tensor) -> list[torch.Tensor]:
        if hint.shape[1] != self.hint_channels:
            raise ValueError(f"this T2I-Adapter takes {self.hint_channels}-channel hints, got {hint.shape[1]}")
        if hint.shape[2] % self.unshuffle or hint.shape[3] % self.unshuffle:
            raise ValueError(f"hint size {hint.shape[3]}x{hint.shape[2]} is not a multiple of {self.unshuffle}")
        x = F.pixel_unshuffle(hint, self.unshuffle)
        if self.kind == "light":
            features = []
            for level in self.body:
                x = level(x)
                features.append(x)
            return features
        x = self.conv_in(x)
        per_level = len(self.body) // LEVELS
        features = []
        for i, block in enumerate(self.body):
            x = block(x)
            if (i + 1) % per_level == 0:
                features.append(x)
        return features


def feature_blocks(shapes: list[tuple[int, int, int]], features: list[torch.Tensor]) -> dict[str, int]:
    """Where each feature is added: ``shapes`` are the (channels, h, w) of the UNet's input-block outputs then the
    middle block's (last). Each feature goes to the last not yet taken input block of its shape (SD1: input blocks 2,
    5, 8, 11; SDXL: 3, 5, 8), a feature left over to the middle block when its shape fits (SDXL's fourth), as the
    original UNet hook and diffusers' ``down_intrablock_additional_residuals`` place them. Returns {feature index:
    block index}, the middle block being ``len(shapes) - 1``."""
    taken: dict[int, int] = {}
    used: set[int] = set()
    for f, feature in enumerate(features):
        shape = tuple(feature.shape[1:])
        matches = [i for i, s in enumerate(shapes[:-1]) if s == shape and i not in used and
                   all(i > j for j in used)]
        if matches:
            block = matches[-1]
        elif shapes[-1] == shape and len(shapes) - 1 not in used:
            block = len(shapes) - 1
        else:
            raise ValueError(f"T2I-Adapter feature {f} {list(shape)} matches no UNet block left; the adapter was "
                             "made for another model family or the hint has the wrong size")
        used.add(block)
        taken[f] = block
    return taken


_DIFFUSERS = re.compile(r"^adapter\.(conv_in|body\.(\d+)\.(in_conv|out_conv|resnets\.(\d+)\.(block1|block2)))\.(weight|bias)$")


def _from_diffusers(keys, light: bool, per_level: int) -> dict[str, str]:
    """Original key for each diffusers key."""
    out = {}
    for key in keys:
        m = _DIFFUSERS.match(key)
        if m is None:
            raise CheckpointError(None, f"unexpected key {key!r} in a diffusers T2I-Adapter")
        _, level, part, j, block, suffix = m.groups()
        if level is None:
            out[key] = f"conv_in.{suffix}"
        elif light:
            out[key] = f"body.{level}.{part if j is None else f'body.{j}.{block}'}.{suffix}"
        else:
            index = int(level) * per_level + (int(j) if j is not None else 0)
            out[key] = f"body.{index}.{part if j is None else block}.{suffix}"
    return out


def _build(shapes: dict[str, tuple[int, ...]], path):
    """A builder of the adapter the (original-layout) shapes describe."""
    if "body.0.body.0.block1.weight" in shapes:  # light
        levels = len({k.split(".")[1] for k in shapes if k.startswith("body.")})
        blocks = len({k.split(".")[3] for k in shapes if k.startswith("body.0.body.")})
        unshuffle = 8
        specs = []
        for i in range(levels):
            inner, in_c = shapes[f"body.{i}.in_conv.weight"][:2]
            specs.append((in_c, inner, shapes[f"body.{i}.out_conv.weight"][0], i > 0))
        return lambda: T2IAdapter("light", unshuffle, nn.ModuleList(
            _LightLevel(a, b, c, blocks, d) for a, b, c, d in specs), None)
    if "conv_in.weight" not in shapes or "body.0.block1.weight" not in shapes:
        raise CheckpointError(path, "not a T2I-Adapter: expected conv_in / body.N.block1 keys (original layout) or "
                                    "adapter.* keys (diffusers layout)")
    cin = shapes["conv_in.weight"][1]
    unshuffle = 16 if cin in (256, 768) else 8
    count = len({k.split(".")[1] for k in shapes if k.startswith("body.")})
    if count % LEVELS:
        raise CheckpointError(path, f"{count} adapter blocks do not split into {LEVELS} levels")
    per_level = count // LEVELS
    specs = []
    width = shapes["conv_in.weight"][0]
    for k in range(count):
        out_c = shapes[f"body.{k}.block1.weight"][0]
        ksize = shapes[f"body.{k}.block2.weight"][-1]
        level, first = k // per_level, k % per_level == 0
        specs.append((width, out_c, ksize, first and (level == 2 if unshuffle == 16 else level > 0)))
        width = out_c
    conv_in = shapes["conv_in.weight"]
    return lambda: T2IAdapter("full", unshuffle, nn.ModuleList(
        ResnetBlock(a, b, ksize=c, down=d) for a, b, c, d in specs), nn.Conv2d(conv_in[1], conv_in[0], 3, 1, 1))


def load(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> T2IAdapter:
    """Read a T2I-Adapter in TencentARC's original layout or diffusers', the architecture inferred from keys."""
    with open_tensor_file(path) as tf:
        keys = list(tf.keys())
        if any(k.startswith("adapter.") for k in keys):
            light = any(".out_conv." in k for k in keys)
            per_level = len({k.split(".")[4] for k in keys if ".body.0.resnets." in k})
            try:
                sources = {new: old for old, new in _from_diffusers(keys, light, per_level).items()}
            except CheckpointError as e:
                raise CheckpointError(tf.path, e.detail) from None
            view = RenamedFile(tf, sources)
        else:
            view = tf
        build = _build(view.shapes, tf.path)
        p = plan(view, build, "", name="T2I-Adapter")
        return materialize(view, p, dtype, device)


# --- at generation time ------------------------------------------------------------------------------------------


@dataclass
class T2IAdapterUnit:
    """One T2I-Adapter: ``pipe.txt2img(..., t2i_adapters=[T2IAdapterUnit(adapter, image, weight=1.0)])``. ``image``
    is the ready control map (PIL; resized to the generation size); the features, times ``weight``, are added on
    every row of the batch while ``start <= progress <= end``."""

    adapter: T2IAdapter
    image: Image.Image
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"start/end must satisfy 0 <= start <= end <= 1, got {self.start}, {self.end}")

    def active(self, progress: float) -> bool:
        return self.weight != 0 and self.start <= progress <= self.end


def block_shapes(unet: nn.Module, height: int, width: int) -> list[tuple[int, int, int]]:
    """(channels, h, w) of each input block's output and then the middle block's, for a latent of that size."""
    from ..unet.blocks import Downsample, ResBlock

    shapes, channels, h, w = [], 0, height, width
    for block in unet.input_blocks:
        for layer in block:
            if isinstance(layer, ResBlock):
                channels = layer.out_layers[-1].out_channels
            elif isinstance(layer, Downsample):  # a stride-2 padded convolution: sizes round up
                channels, h, w = layer.op.out_channels, (h + 1) // 2, (w + 1) // 2
            elif isinstance(layer, nn.Conv2d):
                channels = layer.out_channels
        shapes.append((channels, h, w))
    return shapes + [shapes[-1]]


def feature_hook(units, unet: nn.Module, width: int, height: int, factor: int, device, dtype):
    """The ``features(rows, step)`` hook of a sampling pass: each unit's features computed once (they depend on the
    control image only), placed on their UNet blocks, summed over the active units."""
    from ..images import resize_image, to_tensor

    prepared = []
    for unit in units:
        hint = to_tensor(resize_image("just resize", unit.image.convert("RGB" if unit.adapter.hint_channels == 3
                                                                         else "L"), width, height))[None]
        param = next(unit.adapter.parameters())
        with torch.no_grad():
            features = unit.adapter(hint.to(param.device, param.dtype))
        places = feature_blocks(block_shapes(unet, height // factor, width // factor), features)
        prepared.append((unit, {places[i]: f.to(device, dtype) * unit.weight for i, f in enumerate(features)}))

    def hook(rows: int, step) -> dict[int, torch.Tensor] | None:
        total: dict[int, torch.Tensor] = {}
        for unit, placed in prepared:
            if unit.active(step.progress):
                for block, f in placed.items():
                    total[block] = total[block] + f if block in total else f
        return {block: f.expand(rows, -1, -1, -1) for block, f in total.items()} or None

    return hook
