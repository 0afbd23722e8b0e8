"""The line-map annotators: soft edges (HED) and line drawings (lineart).

Soft edges for the HED / softedge ControlNets: lllyasviel's ControlNetHED_Apache2 (``ControlNetHED.pth`` in
lllyasviel/Annotators, the network of ControlNet 1.1's "softedge_hed"), an RGB re-training of Xie & Tu 2015,
"Holistically-Nested Edge Detection".

Network: the image in 0..255 minus a learned per-channel offset (``norm`` [1, 3, 1, 1]), five VGG-style blocks of
3x3 conv + ReLU (64x2, 128x2, 256x3, 512x3, 512x3; 2x2 max-pool before every block but the first), each with a 1x1
``projection`` to one side-output channel. Keys: ``norm``, ``block{1..5}.convs.{i}``, ``block{1..5}.projection``.

Map: every side output bilinearly resized to the detection size, averaged, sigmoid, ×255 truncated to uint8;
"safe" mode quantises the probability first (``safe_step``).

Line drawings for the lineart ControlNet: the generator of Chan, Durand & Isola 2022, "Learning to generate line
drawings that convey geometry and semantics" (informative-drawings), as lllyasviel's annotator uses it:
``sk_model.pth`` ("lineart_realistic") and ``sk_model2.pth`` ("lineart_coarse").

Network (a CycleGAN-style ResNet generator, instance norm without affine parameters): reflect-pad 3 + 7x7 conv to
64 (``model0.1``), two stride-2 3x3 convs to 128 and 256 (``model1.0``, ``model1.3``), ``blocks`` residual blocks
of (reflect-pad, 3x3 conv, norm, ReLU, reflect-pad, 3x3 conv, norm) (``model2.N.conv_block.1`` / ``.5``), two
stride-2 transposed 3x3 convs back to 128 and 64 (``model3.0``, ``model3.3``), reflect-pad 3 + 7x7 conv to one channel
and a sigmoid (``model4.1``). Indices are those of the original ``nn.Sequential`` layers, kept here.

Map: input RGB / 255, output ×255 truncated to uint8, bilinearly resized, then inverted (white lines on black).
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .resample import LINEAR, hwc3, resize, resize_image, safe_step

HED_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))  # (width, convs) of each block


class _HEDBlock(nn.Module):
    def __init__(self, cin: int, cout: int, convs: int):
        super().__init__()
        self.convs = nn.Sequential(*(nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(convs)))
        self.projection = nn.Conv2d(cout, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class ControlNetHED(nn.Module):
    """forward(x [B, 3, H, W] RGB in 0..255) → the five side outputs, [B, 1, H / 2**i, W / 2**i]."""

    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        cin = 3
        for i, (width, convs) in enumerate(HED_BLOCKS, start=1):
            setattr(self, f"block{i}", _HEDBlock(cin, width, convs))
            cin = width

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x - self.norm
        sides = []
        for i in range(1, len(HED_BLOCKS) + 1):
            if i > 1:
                h = F.max_pool2d(h, 2, 2)
            h, side = getattr(self, f"block{i}")(h)
            sides.append(side)
        return sides


@torch.no_grad()
def detect_hed(net: ControlNetHED, image: np.ndarray, detect_resolution: int = 512, image_resolution: int = 512,
           safe: bool = False) -> np.ndarray:
    """The soft-edge map, uint8 [H, W, 3] at ``image_resolution`` (controlnet_aux ``HEDdetector``)."""
    image = resize_image(hwc3(image), detect_resolution)
    h, w = image.shape[:2]
    param = next(net.parameters())
    x = torch.from_numpy(image.copy()).to(param).permute(2, 0, 1)[None]
    sides = [s[0, 0].float().cpu().numpy() for s in net(x)]
    mean = np.stack([resize(s, w, h, LINEAR) for s in sides], axis=2).mean(axis=2)
    edge = 1.0 / (1.0 + np.exp(-mean.astype(np.float64)))
    if safe:
        edge = safe_step(edge)
    edge = hwc3((edge * 255.0).clip(0, 255).astype(np.uint8))
    out_h, out_w = resize_image(image, image_resolution).shape[:2]
    return resize(edge, out_w, out_h, LINEAR)


def _norm(channels: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(channels)


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv_block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), _norm(c), nn.ReLU(),
                                        nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), _norm(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineartGenerator(nn.Module):
    """forward(x [B, 3, H, W] RGB in [0, 1]) → [B, 1, H, W] line darkness in [0, 1] (H, W multiples of 4)."""

    def __init__(self, blocks: int = 3):
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 64, 7), _norm(64), nn.ReLU())
        self.model1 = nn.Sequential(nn.Conv2d(64, 128, 3, stride=2, padding=1), _norm(128), nn.ReLU(),
                                    nn.Conv2d(128, 256, 3, stride=2, padding=1), _norm(256), nn.ReLU())
        self.model2 = nn.Sequential(*(_Residual(256) for _ in range(blocks)))
        self.model3 = nn.Sequential(
            nn.ConvTranspose2d(256, 128, 3, stride=2, padding=1, output_padding=1), _norm(128), nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=1), _norm(64), nn.ReLU())
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, 1, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in (self.model0, self.model1, self.model2, self.model3, self.model4):
            x = stage(x)
        return x


def residual_blocks(keys) -> int:
    """The number of residual blocks, from the ``model2.N.`` keys."""
    found = {int(m.group(1)) for k in keys if (m := re.match(r"model2\.(\d+)\.", k))}
    if not found or found != set(range(len(found))):
        raise ValueError(f"model2.N residual block indices {sorted(found)[:8]} are not 0..N-1")
    return len(found)


@torch.no_grad()
def detect_lineart(net: LineartGenerator, image: np.ndarray, detect_resolution: int = 512,
           image_resolution: int = 512) -> np.ndarray:
    """The lineart map, uint8 [H, W, 3], white lines on black (controlnet_aux ``LineartDetector``)."""
    image = resize_image(hwc3(image), detect_resolution)
    param = next(net.parameters())
    x = (torch.from_numpy(image.copy()).to(param) / 255.0).permute(2, 0, 1)[None]
    line = net(x)[0, 0].float().cpu().numpy()
    line = hwc3((line * 255.0).clip(0, 255).astype(np.uint8))
    out_h, out_w = resize_image(image, image_resolution).shape[:2]
    return 255 - resize(line, out_w, out_h, LINEAR)
