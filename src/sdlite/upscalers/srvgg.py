"""SRVGGNetCompact, Real-ESRGAN's compact upscaler (``realesr-general-x4v3.pth``, ``realesr-animevideov3.pth``;
Wang et al. 2021, "Real-ESRGAN", the "compact" models of its v0.2.5 release).

A plain stack ``body``: 3x3 conv to ``features`` channels, PReLU, then ``convs`` times (3x3 conv, PReLU), then a 3x3
conv to ``out_channels * scale**2`` channels that a pixel shuffle turns into the upscaled image; the network predicts
a residual over the nearest-neighbour upscaled input. Keys: ``body.{2i}.weight/bias`` for convs and
``body.{2i+1}.weight`` ([features]) for the PReLUs, under ``params`` in the published files.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True, kw_only=True)
class SRVGGConfig:
    in_channels: int = 3
    out_channels: int = 3
    features: int = 64
    convs: int = 32  # hidden convs between the first and the last (32 in general-x4v3, 16 in animevideov3)
    scale: int = 4


class SRVGGNetCompact(nn.Module):
    def __init__(self, config: SRVGGConfig):
        super().__init__()
        self.config, self.scale = config, config.scale
        c = config.features
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, c, 3, padding=1), nn.PReLU(c)]
        for _ in range(config.convs):
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.PReLU(c)]
        layers.append(nn.Conv2d(c, config.out_channels * config.scale ** 2, 3, padding=1))
        self.body = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        return F.pixel_shuffle(out, self.scale) + F.interpolate(x, scale_factor=self.scale, mode="nearest")


def infer_srvgg_config(shapes: dict[str, tuple[int, ...]]) -> SRVGGConfig:
    """The config from the ``body.N`` shapes (keys without any ``params.`` prefix). Raises ValueError naming what
    does not fit."""
    indices = sorted(int(k.split(".")[1]) for k in shapes if k.startswith("body.") and k.endswith(".weight"))
    if indices != list(range(len(indices))) or len(indices) < 3 or len(indices) % 2 == 0:
        raise ValueError(f"body.N indices {indices[:6]}… are not a conv/PReLU alternation ending with a conv")
    first, last = shapes["body.0.weight"], shapes[f"body.{indices[-1]}.weight"]
    features, in_channels = first[0], first[1]
    for i in indices[:-1]:
        want = (features,) if i % 2 else (features, features if i else in_channels, 3, 3)
        if shapes[f"body.{i}.weight"] != want:
            raise ValueError(f"body.{i}.weight has shape {list(shapes[f'body.{i}.weight'])}, expected {list(want)}"
                             + (" (a PReLU with one slope per channel)" if i % 2 else ""))
    squared, rem = divmod(last[0], in_channels)
    scale = int(round(squared ** 0.5))
    if rem or scale * scale != squared or last[1:] != (features, 3, 3):
        raise ValueError(f"the last conv body.{indices[-1]}.weight {list(last)} is not "
                         f"[{in_channels}·scale², {features}, 3, 3]")
    return SRVGGConfig(in_channels=in_channels, out_channels=in_channels, features=features,
                       convs=(len(indices) - 3) // 2, scale=scale)
