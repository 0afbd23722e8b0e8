"""Building blocks of the latent-diffusion UNet (openaimodel.py / attention.py of CompVis and Stability-AI).

Attribute names are the original ones (``in_layers``, ``emb_layers``, ``transformer_blocks``, ``to_q`` …) so that
``state_dict()`` keys are the checkpoint's keys; index gaps inside ``nn.Sequential`` hold parameter-free layers
exactly where the original has its SiLU or Dropout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..conv import Conv2d


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


def pointwise(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a Linear or a 1x1 Conv2d to tokens [B, N, C_in] as one matrix product.

    SD 1.x stores proj_in/proj_out as 1x1 convolutions, SD 2.x/XL as Linear layers; on tokens both are the same
    product, and doing it on tokens saves two layout changes of the whole feature map.
    """
    return F.linear(x, layer.weight.flatten(1), layer.bias)


class ResBlock(nn.Module):
    """Residual block with the timestep embedding added between its two convolutions."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(0.0), Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # GroupNorm's and the convolutions' outputs are fresh tensors whose backward does not need them, so SiLU,
        # the embedding and the residual are applied in place: three feature-map allocations fewer per block.
        norm, _, conv = self.in_layers
        h = conv(F.silu(norm(x), inplace=True))
        h.add_(self.emb_layers(emb)[:, :, None, None])
        norm, _, _, conv = self.out_layers
        return conv(F.silu(norm(h), inplace=True)).add_(self.skip_connection(x))


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


class CrossAttention(nn.Module):
    """Multi-head attention of queries from ``x`` over ``context`` (or over ``x`` itself), bias-free q/k/v."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        # [B, N, heads*d] -> [B, heads, N, d]
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.to_k(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


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
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return self.net(x)
        # The hidden activations are 8x the tokens' width (the GEGLU projection). At 64x64 latents they are 80 MiB,
        # and glibc gives blocks above 32 MiB fresh pages on every call, whose page faults cost as much as the
        # products. Chunks of tokens keep them small enough to be reused from the heap (and in cache).
        rows = x.shape[:-1].numel()
        step = max(1, FF_CHUNK_BYTES // (self.net[0].proj.out_features * x.element_size()))
        if rows <= step:
            return self.net(x)
        flat = x.reshape(rows, x.shape[-1])
        out = x.new_empty(rows, self.net[2].out_features)
        for i in range(0, rows, step):
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

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on the text context (LDM, Rombach et al. 2022)."""

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int, use_linear: bool):
        super().__init__()
        inner = heads * head_dim
        self.norm = normalization(channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # [B, C, H, W] -> [B, H*W, C]: a free view when x is channels-last
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        tokens = pointwise(self.proj_in, tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        tokens = pointwise(self.proj_out, tokens)
        # [B, H*W, C] -> [B, C, H, W] as a channels-last view, added without a layout change
        return x + tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)


class TimestepBlock(nn.Sequential):
    """One entry of input_blocks/middle_block/output_blocks: layers fed the embedding, the context or neither."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x
