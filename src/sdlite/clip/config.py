"""Configuration of the CLIP text encoders used by Stable Diffusion, inferred from checkpoint tensor shapes.

Two on-disk layouts exist (docs/formats.md §1.6):

* ``"clip"``: OpenAI CLIP ViT-L/14 text model in the Hugging Face transformers layout
  (``text_model.encoder.layers.N…``), as SD1 stores it under ``cond_stage_model.transformer.`` and SDXL under
  ``conditioner.embedders.0.transformer.``.
* ``"openclip"``: the open_clip text tower (``transformer.resblocks.N…``, ``text_projection``), as SD2 stores ViT-H/14
  under ``cond_stage_model.model.`` and SDXL stores ViT-bigG/14 under ``conditioner.embedders.{0,1}.model.``.

The inference functions receive a state dict whose component prefix has already been removed and read only shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from sdlite.checkpoint.shapes import ShapeReader
from sdlite.errors import CheckpointError

LAYOUTS = ("clip", "openclip")
ACTIVATIONS = ("quick_gelu", "gelu")

# Every released CLIP/OpenCLIP text tower uses 64 channels per head (ViT-L 768/12, ViT-H 1024/16, bigG 1280/20);
# the head count is not stored in the files, so it is derived from the width with this constant.
HEAD_DIM = 64


@dataclass(frozen=True, kw_only=True)
class TextEncoderConfig:
    """Architecture of one CLIP text transformer (Radford et al. 2021, "Learning Transferable Visual Models From
    Natural Language Supervision"; open_clip for the ViT-H/bigG towers)."""

    layout: str  # "clip" (HF transformers key names) or "openclip" (open_clip key names)
    width: int
    layers: int
    heads: int
    mlp_width: int
    vocab_size: int = 49408
    context_length: int = 77
    projection_dim: int | None = None  # open_clip text_projection.shape[1]; None for the clip layout
    activation: str  # "quick_gelu" (OpenAI CLIP) or "gelu" (open_clip ViT-H / bigG)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        for name in ("width", "layers", "heads", "mlp_width", "vocab_size", "context_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.layout == "clip" and self.projection_dim is not None:
            raise ValueError("the clip layout has no text projection; projection_dim must be None")
        if self.layout == "openclip" and (self.projection_dim is None or self.projection_dim <= 0):
            raise ValueError(f"the openclip layout needs a positive projection_dim, got {self.projection_dim}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


def infer_clip_config(sd: Mapping[str, torch.Tensor], *, prefix: str = "") -> TextEncoderConfig:
    """Config of an HF-layout CLIP text model (keys ``text_model.…``, the file's ``prefix`` removed; it only names
    keys in messages) from its tensor shapes."""
    shape, p = ShapeReader(sd, "text encoder", prefix), "text_model."
    vocab, width = shape(p + "embeddings.token_embedding.weight", ndim=2)
    context, _ = shape(p + "embeddings.position_embedding.weight", expected=(None, width))
    layers = shape.count(p + "encoder.layers.", "mlp.fc1.weight")
    mlp_width, _ = shape(p + "encoder.layers.0.mlp.fc1.weight", expected=(None, width))
    shape(p + "encoder.layers.0.mlp.fc2.weight", expected=(width, mlp_width))
    shape(p + "encoder.layers.0.self_attn.q_proj.weight", expected=(width, width))
    shape(p + "final_layer_norm.weight", expected=(width,))
    return TextEncoderConfig(
        layout="clip",
        width=width,
        layers=layers,
        heads=_heads(width, shape.file_key(p + "embeddings.token_embedding.weight")),
        mlp_width=mlp_width,
        vocab_size=vocab,
        context_length=context,
        projection_dim=None,
        activation="quick_gelu",
    )


def infer_openclip_config(sd: Mapping[str, torch.Tensor], *, prefix: str = "") -> TextEncoderConfig:
    """Config of an open_clip text tower (keys ``token_embedding.weight``, ``transformer.resblocks.N…``,
    ``text_projection``; the file's ``prefix`` removed, it only names keys in messages) from its tensor shapes."""
    shape = ShapeReader(sd, "text encoder", prefix)
    vocab, width = shape("token_embedding.weight", ndim=2)
    context, _ = shape("positional_embedding", expected=(None, width))
    layers = shape.count("transformer.resblocks.", "mlp.c_fc.weight")
    mlp_width, _ = shape("transformer.resblocks.0.mlp.c_fc.weight", expected=(None, width))
    shape("transformer.resblocks.0.mlp.c_proj.weight", expected=(width, mlp_width))
    shape("transformer.resblocks.0.attn.in_proj_weight", expected=(3 * width, width))
    shape("ln_final.weight", expected=(width,))
    _, projection_dim = shape("text_projection", expected=(width, None))
    return TextEncoderConfig(
        layout="openclip",
        width=width,
        layers=layers,
        heads=_heads(width, shape.file_key("token_embedding.weight")),
        mlp_width=mlp_width,
        vocab_size=vocab,
        context_length=context,
        projection_dim=projection_dim,
        activation="gelu",
    )


def _heads(width: int, key: str) -> int:
    if width % HEAD_DIM:
        raise CheckpointError(
            None, f"tensor {key!r} has width {width}, expected a multiple of {HEAD_DIM} (64 channels per head)"
        )
    return width // HEAD_DIM
