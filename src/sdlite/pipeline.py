"""The loaded model set of one checkpoint, and what every generation method builds on."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .checkpoint import load_components
from .clip import EOS, get_tokenizer

# Pad id and the transformer output each family feeds the UNet (FORMATS.md 1.2-1.4).
_OPENCLIP_PAD = 0


@dataclass
class Conditioning:
    """Text conditioning: ``context`` [B, T, D] for cross-attention; ``pooled`` [B, 1280] (SDXL family) or None."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None


class StableDiffusion:
    """A Stable Diffusion checkpoint loaded from its original single file.

    ``family`` is "sd1", "sd2", "sdxl" or "sdxl-refiner"; ``prediction`` is "eps" or "v"; ``unet``, ``vae`` and
    ``text_encoders`` are plain modules whose ``state_dict()`` keys are the file's keys minus the component prefix.
    """

    def __init__(self, path: str, family: str, prediction: str, unet: nn.Module, vae: nn.Module,
                 text_encoders: list[nn.Module], set_aside: list[str] | None = None, unknown: list[str] | None = None):
        self.path, self.family, self.prediction = path, family, prediction
        self.unet, self.vae, self.text_encoders = unet, vae, text_encoders
        self.set_aside, self.unknown = set_aside or [], unknown or []
        self.tokenizer = get_tokenizer()

    @property
    def is_inpaint(self) -> bool:
        return self.unet.config.in_channels == 9

    @property
    def device(self) -> torch.device:
        return self.unet.out[2].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.out[2].weight.dtype

    def __repr__(self) -> str:
        return (f"StableDiffusion({os.path.basename(self.path)!r}, family={self.family!r}, "
                f"prediction={self.prediction!r}, inpaint={self.is_inpaint}, dtype={self.dtype}, device={self.device})")

    @torch.no_grad()
    def encode_prompt(self, prompts: str | Sequence[str], clip_skip: int = 1) -> Conditioning:
        """Encode plain prompts (77 tokens each, longer ones truncated) as the family's original code does.

        SD 1.x: CLIP-L, the output of layer ``-clip_skip`` through the final LayerNorm. SD 2.x: OpenCLIP ViT-H,
        penultimate layer through ln_final. SDXL: CLIP-L and OpenCLIP bigG penultimate layers without final norm,
        concatenated to 2048 features, plus bigG's pooled projection; the refiner uses bigG alone. clip_skip applies
        to SD 1.x only: the other families have a fixed layer, as in A1111.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("encode_prompt needs at least one prompt")
        if clip_skip < 1:
            raise ValueError(f"clip_skip counts from 1 (the last layer), got {clip_skip}")
        contexts, pooled = [], None
        for encoder in self.text_encoders:
            is_openclip = encoder.config.layout == "openclip"
            tokens = self.tokenizer(list(prompts), pad_id=_OPENCLIP_PAD if is_openclip else EOS).to(self.device)
            if self.family == "sd1":
                out = encoder(tokens, layer=-clip_skip, final_norm=True)
            elif self.family == "sd2":
                out = encoder(tokens, layer=-2, final_norm=True)
            else:
                out = encoder(tokens, layer=-2, final_norm=False, pooled=is_openclip)
                pooled = out.pooled if is_openclip else pooled
            contexts.append(out.hidden)
        return Conditioning(torch.cat(contexts, dim=-1), pooled)


def load(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
         prediction: str | None = None) -> StableDiffusion:
    """Load an original SD 1.x / 2.x / XL (base, refiner, inpainting) checkpoint, ``.safetensors`` or ``.ckpt``.

    The architecture is read from the tensor shapes; no config file and no network are used. ``prediction``
    ("eps" or "v") overrides the guess for SD 2.x 768-v models. Errors are ``sdlite.errors.CheckpointError``.
    """
    c = load_components(path, device=device, dtype=dtype, prediction=prediction)
    return StableDiffusion(c.path, c.family, c.prediction, c.unet, c.vae, c.text_encoders, c.set_aside, c.unknown)
