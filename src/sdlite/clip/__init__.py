"""CLIP text side of Stable Diffusion: the BPE tokenizer and the CLIP-L / OpenCLIP text encoders in their
checkpoint layouts (docs/formats.md §1.6)."""

from __future__ import annotations

from sdlite.clip.config import TextEncoderConfig, infer_clip_config, infer_openclip_config
from sdlite.clip.model import CLIPTextModel, OpenCLIPTextModel, TextEncoderOutput
from sdlite.clip.tokenizer import BOS, CONTEXT_LENGTH, EOS, CLIPTokenizer, get_tokenizer

__all__ = [
    "BOS",
    "CONTEXT_LENGTH",
    "EOS",
    "CLIPTextModel",
    "CLIPTokenizer",
    "OpenCLIPTextModel",
    "TextEncoderConfig",
    "TextEncoderOutput",
    "get_tokenizer",
    "infer_clip_config",
    "infer_openclip_config",
]
