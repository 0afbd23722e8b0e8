"""What the UNet is conditioned on during training: the captions' text context and, for SDXL, the ADM vector.

Captions are encoded with each family's layer rule, as at inference (SD1: last layer through the final norm; SD2:
penultimate through ln_final; SDXL: CLIP-L and bigG penultimate layers concatenated, bigG's pooled projection), in
chunks of 75 tokens, but as plain text: brackets are not read as emphasis, as kohya sd-scripts trains by default.
Gradients flow into the text encoders when any of their parameters train (text-encoder LoRA). SDXL's ADM vector
is built per image from its original size, its crop and its bucket (Podell et al. 2023, "micro-conditioning"),
with the same size embedding the generation code uses.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from ..conditioning import Conditioning, _encode, chunk_prompt
from ..generate import size_embedding


def encode_captions(pipe, captions: Sequence[str], *, clip_skip: int = 1) -> Conditioning:
    """Text context [B, 77·k, D] (and pooled [B, P] for SDXL) of training captions."""
    trains = any(p.requires_grad for encoder in pipe.text_encoders for p in encoder.parameters())
    rows = [chunk_prompt(c, emphasis="None") for c in captions]
    with contextlib.nullcontext() if trains else torch.no_grad(), pipe.using(*pipe.text_encoders):
        return _encode(rows, [1] * len(rows), pipe.text_encoders, pipe.family, clip_skip, None, "None")


def adm_vector(pipe, pooled: torch.Tensor | None, original_sizes: Sequence[tuple[int, int]],
               crops: Sequence[tuple[int, int]], target_size: tuple[int, int],
               aesthetic_score: float = 6.0) -> torch.Tensor | None:
    """SDXL's ADM vector per image: pooled ⊕ emb(original h, w) ⊕ emb(crop top, left) ⊕ emb(target h, w) (the
    refiner: ⊕ emb(aesthetic score) instead of the target size); None for families without one."""
    if pooled is None or not pipe.family.startswith("sdxl"):
        return None
    rows = []
    for (oh, ow), (top, left) in zip(original_sizes, crops):
        tail = [target_size[0], target_size[1]] if pipe.family == "sdxl" else [aesthetic_score]
        rows.append(size_embedding([oh, ow, top, left, *tail], 1))
    return torch.cat([pooled, torch.cat(rows).to(pooled)], dim=1)
