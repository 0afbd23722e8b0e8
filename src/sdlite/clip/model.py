"""CLIP text encoders as Stable Diffusion checkpoints store them (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision"; open_clip's ViT-H/14 and ViT-bigG/14 text towers).

Both layouts are the same pre-LayerNorm causal transformer; only the attribute names (and so the state-dict keys)
and the activation differ. Attribute names mirror the checkpoint keys so that loading is a strict
``load_state_dict``; the modules hold no buffers (the causal mask comes from ``is_causal=True``, positions from
``arange``), so every key of a file that is not a parameter is set aside by the loader.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sdlite.clip.config import TextEncoderConfig


class TextEncoderOutput(NamedTuple):
    hidden: torch.Tensor  # [B, T, width]: the selected layer's output, optionally final-normed
    pooled: torch.Tensor | None  # [B, width] (clip) or [B, projection_dim] (openclip); None unless asked for


def _activation(name: str) -> nn.Module:
    # OpenAI CLIP was trained with the sigmoid approximation x·σ(1.702x); open_clip's ViT-H/bigG use exact GELU.
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head causal self-attention of [B, T, W] projections; SD never passes a padding mask."""
    b, t, w = q.shape
    q, k, v = (x.view(b, t, heads, w // heads).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(b, t, w)


class _TextTransformer(nn.Module):
    """The forward pass shared by both layouts; subclasses provide the modules under their original names."""

    config: TextEncoderConfig

    def _embed(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def _final_norm(self) -> nn.LayerNorm:
        raise NotImplementedError

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        layer: int = -1,
        final_norm: bool = True,
        pooled: bool = False,
        token_embeds: torch.Tensor | None = None,
    ) -> TextEncoderOutput:
        """Encode token ids [B, T] (T <= context_length).

        ``layer`` indexes the transformer layers' outputs Python-style: -1 is the last layer's output, -2 the
        penultimate ("clip skip 2"). ``final_norm`` applies the final LayerNorm to that output. Layers after
        ``layer`` run only when ``pooled`` is asked for, which is always taken from the last layer at the end-of-text
        position (the largest id in each row, since ``<|endoftext|>`` = 49407 is the last vocabulary entry).
        ``token_embeds`` [B, T, width], when given, stands in for the token-embedding lookup of ``input_ids``
        (position embeddings are still added): textual-inversion vectors are written into it.
        """
        blocks = self._blocks()
        n = len(blocks)
        if not -n <= layer < n:
            raise ValueError(f"layer {layer} out of range for a {n}-layer text encoder")
        if input_ids.ndim != 2 or input_ids.shape[1] > self.config.context_length:
            raise ValueError(
                f"input_ids must be [batch, <= {self.config.context_length}], got {list(input_ids.shape)}"
            )
        index = layer % n
        x = self._embed(input_ids, token_embeds)
        for block in blocks[: index + 1]:
            x = block(x)
        hidden = x
        if pooled:
            for block in blocks[index + 1 :]:
                x = block(x)
        norm = self._final_norm()
        if final_norm:
            hidden = norm(hidden)
        pooled_out = None
        if pooled:
            eot = input_ids.argmax(dim=-1)
            # LayerNorm acts per token, so normalising only the gathered end-of-text rows is the same and cheaper.
            pooled_out = self._project(norm(x[torch.arange(x.shape[0], device=x.device), eot]))
        return TextEncoderOutput(hidden, pooled_out)


# --- OpenAI CLIP in the Hugging Face transformers layout (SD1, SDXL CLIP-L) -----------------------------------------


class CLIPAttention(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.heads = config.heads
        self.q_proj = nn.Linear(config.width, config.width)
        self.k_proj = nn.Linear(config.width, config.width)
        self.v_proj = nn.Linear(config.width, config.width)
        self.out_proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(_causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class CLIPMLP(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_width)
        self.act = _activation(config.activation)
        self.fc2 = nn.Linear(config.mlp_width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.width)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.layers))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.context_length, config.width)

    def forward(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        # Positions come from arange rather than the files' position_ids buffer, so no buffer needs loading.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        tokens = self.token_embedding(input_ids) if token_embeds is None else token_embeds
        return tokens + self.position_embedding(positions)


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width)


class CLIPTextModel(_TextTransformer):
    """OpenAI CLIP ViT-L/14 text model with the HF transformers key names (``text_model.…``).

    Usage in the SD families (docs/formats.md §1.6; chosen by the pipeline, not here):
    SD1 uses ``layer=-1, final_norm=True`` (last_hidden_state); A1111's "clip skip n" is ``layer=-n, final_norm=True``.
    SDXL's CLIP-L uses ``layer=-2, final_norm=False`` and no pooled output. ``pooled`` here is HF's pooler_output,
    final_layer_norm(last layer) at the end-of-text token, [B, width].
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        if config.layout != "clip":
            raise ValueError(f"CLIPTextModel needs a config with layout 'clip', got {config.layout!r}")
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def _embed(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None) -> torch.Tensor:
        return self.text_model.embeddings(input_ids, token_embeds)

    def _blocks(self) -> nn.ModuleList:
        return self.text_model.encoder.layers

    def _final_norm(self) -> nn.LayerNorm:
        return self.text_model.final_layer_norm

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled  # CLIPTextModel has no projection; the SDXL pooled vector comes from bigG


# --- open_clip text tower (SD2 ViT-H/14, SDXL ViT-bigG/14) ---------------------------------------------------------


class OpenCLIPAttention(nn.Module):
    """Attention with torch.nn.MultiheadAttention's parameter names: q;k;v stacked in ``in_proj_weight`` [3W, W]."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        w = config.width
        self.heads = config.heads
        # Same initialisation as nn.MultiheadAttention; the loader replaces these values anyway.
        self.in_proj_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(3 * w, w)))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * w))
        self.out_proj = nn.Linear(w, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(_causal_attention(q, k, v, self.heads))


class OpenCLIPMLP(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.width, config.mlp_width)
        self.gelu = _activation(config.activation)
        self.c_proj = nn.Linear(config.mlp_width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width)
        self.attn = OpenCLIPAttention(config)
        self.ln_2 = nn.LayerNorm(config.width)
        self.mlp = OpenCLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.layers))


class OpenCLIPTextModel(_TextTransformer):
    """open_clip text tower with open_clip's key names, the part of an open_clip CLIP that SD files keep.

    Usage in the SD families (docs/formats.md §1.6; chosen by the pipeline, not here):
    SD2 (ViT-H/14) uses ``layer=-2, final_norm=True`` (penultimate layer, then ln_final).
    SDXL (ViT-bigG/14) uses ``layer=-2, final_norm=False, pooled=True``; the pooled vector is
    ln_final(last layer) at the end-of-text token @ text_projection, [B, projection_dim] (open_clip's encode_text
    without normalisation).
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        if config.layout != "openclip":
            raise ValueError(f"OpenCLIPTextModel needs a config with layout 'openclip', got {config.layout!r}")
        self.config = config
        w = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.randn(config.context_length, w) * 0.01)
        self.transformer = OpenCLIPTransformer(config)
        self.ln_final = nn.LayerNorm(w)
        self.text_projection = nn.Parameter(torch.randn(w, config.projection_dim) * w**-0.5)  # used as x @ P
        # Only the contrastive loss uses logit_scale; it is kept so that loading the file's keys stays strict.
        self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))

    def _embed(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None) -> torch.Tensor:
        tokens = self.token_embedding(input_ids) if token_embeds is None else token_embeds
        return tokens + self.positional_embedding[: input_ids.shape[1]]

    def _blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    def _final_norm(self) -> nn.LayerNorm:
        return self.ln_final

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled @ self.text_projection
