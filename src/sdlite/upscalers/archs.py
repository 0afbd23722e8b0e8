"""The upscaler networks.

RRDBNet, the generator of ESRGAN (Wang et al. 2018, "ESRGAN: Enhanced Super-Resolution Generative Adversarial
Networks") and Real-ESRGAN (Wang et al. 2021, "Real-ESRGAN: Training Real-World Blind Super-Resolution with Pure
Synthetic Data"), in the three key layouts its files are published in.

The network: a 3x3 conv to ``features`` channels, a trunk of residual-in-residual dense blocks (RRDB: three dense
blocks of five 3x3 convs with ``growth`` channels each, every block's output scaled by 0.2 and added to its input)
closed by a 3x3 conv and a long skip connection, then one (nearest x2 upsampling, 3x3 conv, LeakyReLU 0.2) stage per
doubling, a 3x3 conv with LeakyReLU and a last 3x3 conv to RGB. Real-ESRGAN's x2 (x1) models first fold the image
into 12 (48) channels with a pixel unshuffle by 2 (4) and then upsample x4, so their scale is 4 / unshuffle.

Layouts (module keys are the file's keys):

* "esrgan": the original ``nn.Sequential`` one (ESRGAN's old architecture, most community models such as
  4x-UltraSharp): ``model.0`` first conv, ``model.1.sub.N.RDBk.convj.0`` the blocks, ``model.1.sub.<blocks>`` the
  trunk conv, then ``model.3``, ``model.6`` … the upsampling convs (with ``nn.Upsample`` and ``nn.LeakyReLU`` in
  between), and the last two convs two and four indices after the last upsampling one.
* "real-esrgan" (basicsr): ``conv_first``, ``body.N.rdbk.convj``, ``conv_body``, ``conv_up1``…, ``conv_hr``,
  ``conv_last``; files keep the weights under ``params_ema`` (or ``params``).
* "bsrgan" (ESRGAN's later code, BSRGAN, KAIR; A1111's ``ESRGAN_4x.pth``): ``conv_first``, ``RRDB_trunk.N.RDBk.convj``,
  ``trunk_conv``, ``upconv1``…, ``HRconv``, ``conv_last``.

SRVGGNetCompact, Real-ESRGAN's compact upscaler (``realesr-general-x4v3.pth``, ``realesr-animevideov3.pth``;
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

SLOPE = 0.2  # LeakyReLU negative slope everywhere in RRDBNet
RESIDUAL = 0.2  # dense blocks and RRDBs scale their output by this before adding their input

# Per layout: the name of the block list, of the dense blocks inside an RRDB, of the trunk's closing conv, of the
# upsampling convs (numbered from 1) and of the conv after them.
NAMED_LAYOUTS = {
    "real-esrgan": dict(trunk="body", dense="rdb", trunk_conv="conv_body", up="conv_up", hr="conv_hr"),
    "bsrgan": dict(trunk="RRDB_trunk", dense="RDB", trunk_conv="trunk_conv", up="upconv", hr="HRconv"),
}
LAYOUTS = ("esrgan", *NAMED_LAYOUTS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RRDBConfig:
    layout: str
    in_channels: int = 3  # of the image; the first conv sees in_channels * unshuffle**2
    out_channels: int = 3
    features: int = 64
    growth: int = 32
    blocks: int = 23
    upsamples: int = 2  # x2 stages
    unshuffle: int = 1

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, not {self.layout!r}")
        if self.unshuffle not in (1, 2, 4) or 2 ** self.upsamples % self.unshuffle:
            raise ValueError(f"unshuffle {self.unshuffle} with {self.upsamples} x2 stages gives no integer scale")

    @property
    def scale(self) -> int:
        return 2 ** self.upsamples // self.unshuffle


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class DenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block input and every earlier conv's output (``conv1`` … ``conv5``; the
    original layout wraps each in an ``nn.Sequential``, hence its ``convj.0`` keys)."""

    def __init__(self, features: int, growth: int, wrapped: bool):
        super().__init__()
        for j in range(5):
            conv = _conv(features + j * growth, growth if j < 4 else features)
            setattr(self, f"conv{j + 1}", nn.Sequential(conv) if wrapped else conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for j in range(1, 5):
            feats.append(F.leaky_relu(getattr(self, f"conv{j}")(torch.cat(feats, 1)), SLOPE))
        return self.conv5(torch.cat(feats, 1)) * RESIDUAL + x


class RRDB(nn.Module):
    def __init__(self, features: int, growth: int, prefix: str, wrapped: bool):
        super().__init__()
        self.names = [f"{prefix}{k}" for k in (1, 2, 3)]
        for name in self.names:
            setattr(self, name, DenseBlock(features, growth, wrapped))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for name in self.names:
            out = getattr(self, name)(out)
        return out * RESIDUAL + x


class _Shortcut(nn.Module):
    """``x + sub(x)``: the original layout's long skip around the trunk (its keys sit under ``model.1.sub``)."""

    def __init__(self, sub: nn.Module):
        super().__init__()
        self.sub = sub

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sub(x)


def _unshuffled(net, x: torch.Tensor):
    """Pixel-unshuffle the input of x2/x1 Real-ESRGAN models; odd sizes are reflect-padded first and the padding
    cropped from the output (as spandrel does), so any tile size works."""
    factor = net.config.unshuffle
    if factor == 1:
        return x, None
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % factor, -w % factor
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
    return F.pixel_unshuffle(x, factor), (h * net.scale, w * net.scale)


class ESRGAN(nn.Module):
    """RRDBNet in the original sequential layout (``model.N``)."""

    def __init__(self, config: RRDBConfig):
        super().__init__()
        if config.layout != "esrgan":
            raise ValueError(f"ESRGAN is the 'esrgan' layout; use RRDBNet for {config.layout!r}")
        self.config, self.scale = config, config.scale
        c, g = config.features, config.growth
        trunk = [RRDB(c, g, "RDB", wrapped=True) for _ in range(config.blocks)]
        layers: list[nn.Module] = [_conv(config.in_channels * config.unshuffle ** 2, c),
                                   _Shortcut(nn.Sequential(*trunk, _conv(c, c)))]
        for _ in range(config.upsamples):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(c, c), nn.LeakyReLU(SLOPE)]
        layers += [_conv(c, c), nn.LeakyReLU(SLOPE), _conv(c, config.out_channels)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, size = _unshuffled(self, x)
        out = self.model(x)
        return out if size is None else out[..., :size[0], :size[1]]


class RRDBNet(nn.Module):
    """RRDBNet in the named layouts ("real-esrgan", "bsrgan")."""

    def __init__(self, config: RRDBConfig):
        super().__init__()
        if config.layout not in NAMED_LAYOUTS:
            raise ValueError(f"RRDBNet takes the layouts {tuple(NAMED_LAYOUTS)}; use ESRGAN for {config.layout!r}")
        self.config, self.scale = config, config.scale
        names = self.names = NAMED_LAYOUTS[config.layout]
        c, g = config.features, config.growth
        self.conv_first = _conv(config.in_channels * config.unshuffle ** 2, c)
        setattr(self, names["trunk"], nn.Sequential(*(RRDB(c, g, names["dense"], wrapped=False)
                                                      for _ in range(config.blocks))))
        setattr(self, names["trunk_conv"], _conv(c, c))
        for k in range(1, config.upsamples + 1):
            setattr(self, f"{names['up']}{k}", _conv(c, c))
        setattr(self, names["hr"], _conv(c, c))
        self.conv_last = _conv(c, config.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, size = _unshuffled(self, x)
        names = self.names
        feat = self.conv_first(x)
        feat = feat + getattr(self, names["trunk_conv"])(getattr(self, names["trunk"])(feat))
        for k in range(1, self.config.upsamples + 1):
            up = getattr(self, f"{names['up']}{k}")
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2, mode="nearest")), SLOPE)
        out = self.conv_last(F.leaky_relu(getattr(self, names["hr"])(feat), SLOPE))
        return out if size is None else out[..., :size[0], :size[1]]


def build(config: RRDBConfig) -> nn.Module:
    return ESRGAN(config) if config.layout == "esrgan" else RRDBNet(config)


def unshuffle_factor(in_channels: int, out_channels: int) -> int:
    """1 when the first conv sees the image itself, else the pixel-unshuffle factor its channel count implies."""
    for factor in (1, 2, 4):
        if in_channels == out_channels * factor * factor:
            return factor
    raise ValueError(f"a first conv with {in_channels} input channels does not fit a {out_channels}-channel image")


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
