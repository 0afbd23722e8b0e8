"""Line drawings for the lineart ControlNet: the generator of Chan, Durand & Isola 2022, "Learning to generate line
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
from torch import nn

from .resample import LINEAR, hwc3, resize, resize_image


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
def detect(net: LineartGenerator, image: np.ndarray, detect_resolution: int = 512,
           image_resolution: int = 512) -> np.ndarray:
    """The lineart map, uint8 [H, W, 3], white lines on black (controlnet_aux ``LineartDetector``)."""
    image = resize_image(hwc3(image), detect_resolution)
    param = next(net.parameters())
    x = (torch.from_numpy(image.copy()).to(param) / 255.0).permute(2, 0, 1)[None]
    line = net(x)[0, 0].float().cpu().numpy()
    line = hwc3((line * 255.0).clip(0, 255).astype(np.uint8))
    out_h, out_w = resize_image(image, image_resolution).shape[:2]
    return 255 - resize(line, out_w, out_h, LINEAR)
