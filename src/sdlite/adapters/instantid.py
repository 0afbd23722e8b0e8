"""InstantID (Wang et al. 2024, "InstantID: Zero-shot Identity-Preserving Generation in Seconds") as InstantX's
reference pipeline runs it: one face embedding drives two networks (docs/formats.md, "InstantID and FaceID").

* The adapter (``ip-adapter.bin``): a Perceiver resampler turns the 512-d insightface embedding into 16 face
  tokens, which the UNet's cross-attention layers attend to as an IP-Adapter's image tokens (``ip_weight``).
* The IdentityNet (``ControlNetModel/diffusion_pytorch_model.safetensors``, a ControlNet in diffusers' layout): its
  control image is the five facial keypoints drawn by ``draw_kps``, and its cross-attention context is the same
  face tokens instead of the text; its residuals are scaled by ``control_weight``.

On a CFG batch the unconditional rows get the projection of a zero embedding, for both networks, as the reference
does. A generation takes the unit among its image prompts::

    unit = sdlite.InstantIDUnit("ip-adapter.bin", "ControlNetModel", face_embedding, keypoints)
    pipe.txt2img("a photo of a woman in a garden", ip_adapters=[unit], width=1024, height=1024)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from . import controlnet as controlnet_files
from . import ip_adapter
from .controlnet import ControlNet
from .ip_adapter import FACE_EMBED_DIM, IPAdapter, IPAdapterUnit
from .keypoints import draw_kps

__all__ = ["InstantIDUnit", "control_hook", "draw_kps", "image_prompts", "networks"]


def _context_dim(net: ControlNet) -> int:
    attn2 = next(m for name, m in net.named_modules() if name.endswith("attn2"))
    return attn2.to_k.in_features


@dataclass
class InstantIDUnit:
    """One identity: ``pipe.txt2img(..., ip_adapters=[InstantIDUnit(adapter, controlnet, face_embedding, kps)])``.

    ``adapter``: InstantID's adapter file or its loaded :class:`~sdlite.adapters.ip_adapter.IPAdapter` (variant
    "instantid"); ``controlnet``: the IdentityNet file or a loaded ControlNet. ``face_embedding``: the face's 512-d
    insightface embedding ([512] or [1, 512]; ``sdlite.adapters.face`` computes it). ``keypoints``: the five facial
    keypoints (5 × (x, y) pixels, drawn with ``draw_kps`` on a ``keypoints_size`` canvas, by default the generation's
    width × height) or a keypoint image already drawn; an image or canvas of another size (a hires pass's, say) is
    resized to the pass's size (Lanczos, as the reference pipeline's control image processor does). ``ip_weight``
    scales the face tokens' attention, ``control_weight`` the IdentityNet's residuals; both act while
    ``start <= progress <= end``. Files given by path are loaded on the CPU in float32; for another device or dtype
    load them with ``ip_adapter.load`` / ``controlnet.load`` (``device=``, ``dtype=``) and pass the modules."""

    adapter: IPAdapter | str | os.PathLike
    controlnet: ControlNet | str | os.PathLike
    face_embedding: Any
    keypoints: Any
    ip_weight: float = 0.8
    control_weight: float = 0.8
    start: float = 0.0
    end: float = 1.0
    keypoints_size: tuple[int, int] | None = None

    def __post_init__(self):
        if not isinstance(self.adapter, IPAdapter):
            self.adapter = ip_adapter.load(self.adapter)
        if not isinstance(self.controlnet, ControlNet):
            self.controlnet = controlnet_files.load(self.controlnet)
        if self.adapter.variant != "instantid":
            raise ValueError(f"InstantID needs InstantID's adapter (a resampler over the {FACE_EMBED_DIM}-d face "
                             f"embedding); this one is a {self.adapter.variant!r} IP-Adapter")
        if _context_dim(self.controlnet) != self.adapter.context_dim:
            raise ValueError(f"the IdentityNet attends to {_context_dim(self.controlnet)}-wide context tokens but "
                             f"the adapter makes {self.adapter.context_dim}-wide face tokens: they were made for "
                             "different models")
        face = torch.as_tensor(np.asarray(self.face_embedding, dtype=np.float32))
        if face.numel() != FACE_EMBED_DIM:
            raise ValueError(f"face_embedding must hold one {FACE_EMBED_DIM}-d embedding, got shape "
                             f"{list(face.shape)}")
        self.face_embedding = face.reshape(1, FACE_EMBED_DIM)
        if not isinstance(self.keypoints, Image.Image) and np.asarray(self.keypoints).shape != (5, 2):
            raise ValueError("keypoints must be 5 (x, y) points or a keypoint image, got an array of shape "
                             f"{list(np.asarray(self.keypoints).shape)}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"start/end must satisfy 0 <= start <= end <= 1, got {self.start}, {self.end}")

    def active(self, progress: float) -> bool:
        return self.start <= progress <= self.end

    @property
    def image_prompt(self) -> IPAdapterUnit:
        """The adapter half: an IP-Adapter unit over the face embedding (its tokens also feed the IdentityNet)."""
        return IPAdapterUnit(self.adapter, weight=self.ip_weight, start=self.start, end=self.end,
                             face_embedding=self.face_embedding)

    def keypoint_image(self, width: int, height: int, canvas: tuple[int, int] | None = None) -> Image.Image:
        """The IdentityNet's control image for a ``width`` x ``height`` pass; keypoints are drawn on
        ``keypoints_size``, else on ``canvas`` (the generation's size), else on the pass's size."""
        image = self.keypoints
        if not isinstance(image, Image.Image):
            image = draw_kps(self.keypoints_size or canvas or (width, height), self.keypoints)
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        return image


def image_prompts(units: Sequence) -> list[IPAdapterUnit]:
    """The IP-Adapter units of a generation's ``ip_adapters``: InstantID units give their adapter half."""
    return [u.image_prompt if isinstance(u, InstantIDUnit) else u for u in units]


def networks(units: Sequence) -> list[ControlNet]:
    """The IdentityNets among ``ip_adapters`` (the generation moves them to the device with the UNet)."""
    return [u.controlnet for u in units if isinstance(u, InstantIDUnit)]


def control_hook(units: Sequence, width: int, height: int, device, dtype, canvas: tuple[int, int] | None = None):
    """The IdentityNets' part of a pass's ControlNet hook, or None when ``units`` has no InstantID unit:
    ``hook(x, t, y, cond_rows, step, windows=None)`` → the summed residuals of the active units, or None (``windows``:
    MultiDiffusion's tiles, whose crops of the keypoint image go with the rows). ``width`` x ``height``: the pass's
    size; ``canvas``: the generation's, where keypoints given as points are drawn."""
    identities = [u for u in units if isinstance(u, InstantIDUnit)]
    if not identities:
        return None
    prepared = []
    for unit in identities:
        pixels = np.asarray(unit.keypoint_image(width, height, canvas), dtype=np.float32) / 255.0
        hint = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device, dtype)
        pos, neg = (t.to(device, dtype) for t in unit.image_prompt.tokens())
        prepared.append((unit, hint, pos, neg))

    def hook(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, cond_rows: torch.Tensor | None, step,
             windows=None):
        total = None
        for unit, hint, pos, neg in prepared:
            if unit.control_weight == 0 or not unit.active(step.progress):
                continue
            net, batch = unit.controlnet, x.shape[0]
            if cond_rows is None:
                tokens = pos[None].expand(batch, -1, -1)
            else:
                tokens = torch.where(cond_rows.to(pos.device)[:, None, None], pos[None], neg[None])
            adm = y if net.config.adm_in_channels is not None else None
            rows = hint.expand(batch, -1, -1, -1) if windows is None else windows.crop(hint, batch)
            outs = net(x[:, :net.config.in_channels], rows, t, tokens, adm)
            outs = [out * unit.control_weight for out in outs]
            total = outs if total is None else [a + b.to(a.dtype) for a, b in zip(total, outs)]
        return total

    return hook
