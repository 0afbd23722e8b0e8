"""Building blocks of the latent-diffusion UNet (openaimodel.py / attention.py of CompVis and Stability-AI).

Attribute names are the original ones (``in_layers``, ``emb_layers``, ``transformer_blocks``, ``to_q`` …) so that
``state_dict()`` keys are the checkpoint's keys; index gaps inside ``nn.Sequential`` hold parameter-free layers
exactly where the original has its SiLU or Dropout.

Every layer is called as a module, never read around: a layer wrapped for training (a PEFT LoRA wrapper, a forward
hook, a parametrization, a replaced module) takes effect wherever it sits. The attention layer and its extension
point (attention patches) are in ``attention.py``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..conv import Conv2d
from .attention import AttentionPatch, CrossAttention


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cosines first as in the original UNet."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def normalization(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=eps)


class ResBlock(nn.Module):
    """Residual block with the timestep embedding added between its two convolutions."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        # GroupNorm's output is a fresh tensor whose backward does not need it, so SiLU after it works in place:
        # one feature-map allocation fewer per SiLU. (A module standing in for the norm must return a new tensor,
        # as every layer with weights does.)
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(inplace=True), Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(inplace=True), nn.Dropout(0.0),
            Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # The convolutions' outputs are fresh tensors whose backward does not need them, so the embedding and the
        # residual are added in place.
        h = self.in_layers(x)
        h.add_(self.emb_layers(emb)[:, :, None, None])
        return self.out_layers(h).add_(self.skip_connection(x))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # Upsampling to the size of the skip connection (rather than exactly x2) lets latents that are not a
        # multiple of the total downsampling factor go through the UNet.
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class GEGLU(nn.Module):
    """Gated GELU projection of "GLU Variants Improve Transformer" (Shazeer 2020): value half times GELU(gate half)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


# Rows of tokens per feed-forward chunk on the CPU: the GEGLU projection of a chunk is at most this many bytes.
FF_CHUNK_BYTES = 8 << 20


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.hidden = dim * mult * 2  # width of the GEGLU projection, the largest activation
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return self.net(x)
        # The hidden activations are 8x the tokens' width (the GEGLU projection). At 64x64 latents they are 80 MiB,
        # and glibc gives blocks above 32 MiB fresh pages on every call, whose page faults cost as much as the
        # products. Chunks of tokens keep them small enough to be reused from the heap (and in cache).
        rows = x.shape[:-1].numel()
        step = max(1, FF_CHUNK_BYTES // (self.hidden * x.element_size()))
        if rows <= step:
            return self.net(x)
        flat = x.reshape(rows, x.shape[-1])
        first = self.net(flat[:step])
        out = first.new_empty(rows, first.shape[-1])
        out[:step] = first
        for i in range(step, rows, step):
            out[i:i + step] = self.net(flat[i:i + step])
        return out.view(*x.shape[:-1], -1)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention over the text context, GEGLU feed-forward; pre-norm residuals."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, head_dim, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, patches: Sequence[AttentionPatch] | None = None,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), None, patches, size)
        x = x + self.attn2(self.norm2(x), context, patches, size)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on the text context (LDM, Rombach et al. 2022)."""

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int, use_linear: bool):
        super().__init__()
        inner = heads * head_dim
        self.use_linear = use_linear
        self.norm = normalization(channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                patches: Sequence[AttentionPatch] | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        # SD 1.x projects with 1x1 convolutions, SD 2.x/XL with Linear layers: each is called on the input it is
        # made for (the feature map or the tokens), so that a wrapped projection behaves as the layer it wraps. On a
        # channels-last map (the CPU path) the convolution is the same matrix product and the layout changes below
        # are free views.
        h_in = self.norm(x)
        if not self.use_linear:
            h_in = self.proj_in(h_in)
        # [B, C, H, W] -> [B, H*W, C]
        tokens = h_in.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        if self.use_linear:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, patches, (h, w))
        if self.use_linear:
            tokens = self.proj_out(tokens)
        # [B, H*W, C] -> [B, C, H, W] as a channels-last view, added without a layout change
        out = tokens.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        if not self.use_linear:
            out = self.proj_out(out)
        return x + out


class TimestepBlock(nn.Sequential):
    """One entry of input_blocks/middle_block/output_blocks: layers fed the embedding, the context or neither.

    What each layer is fed is decided once, from the layers it is built with, so that a layer replaced later by a
    wrapper is still given the same arguments.
    """

    def __init__(self, *layers: nn.Module):
        super().__init__(*layers)
        kinds = {ResBlock: "emb", SpatialTransformer: "context", Upsample: "size"}
        self.inputs = tuple(kinds.get(type(layer), "x") for layer in layers)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
                size: tuple[int, int] | None = None,
                patches: Sequence[AttentionPatch] | None = None) -> torch.Tensor:
        for inputs, layer in zip(self.inputs, self):
            if inputs == "emb":
                x = layer(x, emb)
            elif inputs == "context":
                x = layer(x, context, patches)
            elif inputs == "size":
                x = layer(x, size)
            else:
                x = layer(x)
        return x
