"""CLIP for Stable Diffusion: the BPE tokenizer, the CLIP-L / OpenCLIP text encoders in their checkpoint layouts
(docs/formats.md §1.6), and the CLIP vision towers image-prompt adapters use (docs/formats.md §15)."""

from __future__ import annotations

from sdlite.clip.config import TextEncoderConfig, infer_clip_config, infer_openclip_config
from sdlite.clip.model import CLIPTextModel, OpenCLIPTextModel, TextEncoderOutput
from sdlite.clip.tokenizer import BOS, CONTEXT_LENGTH, EOS, CLIPTokenizer, get_tokenizer
from sdlite.clip.vision import VisionConfig, VisionEncoder, VisionOutput, load_vision, preprocess

__all__ = [
    "BOS",
    "CONTEXT_LENGTH",
    "EOS",
    "CLIPTextModel",
    "CLIPTokenizer",
    "OpenCLIPTextModel",
    "TextEncoderConfig",
    "TextEncoderOutput",
    "VisionConfig",
    "VisionEncoder",
    "VisionOutput",
    "get_tokenizer",
    "infer_clip_config",
    "infer_openclip_config",
    "load_vision",
    "preprocess",
]
