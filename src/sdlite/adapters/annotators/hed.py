"""Soft edges for the HED / softedge ControlNets: lllyasviel's ControlNetHED_Apache2 (``ControlNetHED.pth`` in
lllyasviel/Annotators, the network of ControlNet 1.1's "softedge_hed"), an RGB re-training of Xie & Tu 2015,
"Holistically-Nested Edge Detection".

Network: the image in 0..255 minus a learned per-channel offset (``norm`` [1, 3, 1, 1]), five VGG-style blocks of
3x3 conv + ReLU (64x2, 128x2, 256x3, 512x3, 512x3; 2x2 max-pool before every block but the first), each with a 1x1
``projection`` to one side-output channel. Keys: ``norm``, ``block{1..5}.convs.{i}``, ``block{1..5}.projection``.

Map: every side output bilinearly resized to the detection size, averaged, sigmoid, ×255 truncated to uint8;
"safe" mode quantises the probability first (``safe_step``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .resample import LINEAR, hwc3, resize, resize_image, safe_step

BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))  # (width, convs) of each block


class _Block(nn.Module):
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
        for i, (width, convs) in enumerate(BLOCKS, start=1):
            setattr(self, f"block{i}", _Block(cin, width, convs))
            cin = width

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x - self.norm
        sides = []
        for i in range(1, len(BLOCKS) + 1):
            if i > 1:
                h = F.max_pool2d(h, 2, 2)
            h, side = getattr(self, f"block{i}")(h)
            sides.append(side)
        return sides


@torch.no_grad()
def detect(net: ControlNetHED, image: np.ndarray, detect_resolution: int = 512, image_resolution: int = 512,
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
