"""IP-Adapter files (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion
Models") and InstantID's adapter, as tencent-ailab and InstantX publish them (docs/formats.md §15).

A file has two parts. ``image_proj`` turns image features into extra context tokens; its variant is told by its
keys: a linear projection of ``image_embeds`` to 4 tokens (ip-adapter, _light, _vit-h), a Perceiver resampler over the
penultimate CLIP hidden states to 16 tokens (plus, plus-face; InstantID's resampler reads a 512-d face embedding
instead), an MLP over all penultimate tokens (full-face), or an MLP over a 512-d face embedding (FaceID).
``ip_adapter.{n}.to_k_ip/to_v_ip`` are the key/value projections of those tokens for the n-th attention layer in
diffusers' processor order (input blocks, output blocks, middle block; attn1 then attn2 of each transformer
block), so only odd n (the cross-attention layers) carry weights. Attention then adds
``scale · Attention(q, to_k_ip(tokens), to_v_ip(tokens))`` to each cross-attention output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..checkpoint.files import open_tensor_file
from ..checkpoint.materialize import materialize, plan
from ..clip.vision import VisionEncoder, preprocess
from ..errors import CheckpointError
from ..unet.attention import AttentionPatch, AttentionSite, ExtraTokens

HEAD_DIM = 64  # the resampler's attention heads are 64 wide in every released file
FACE_EMBED_DIM = 512  # insightface's (buffalo_l / antelopev2) identity embedding


class LinearProjection(nn.Module):
    """ip-adapter: ``image_embeds`` [B, E] → LayerNorm(Linear(E → T·D)) as T tokens."""

    def __init__(self, embed_dim: int, dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(embed_dim, tokens * dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.tokens, -1))


class FaceIDProjection(nn.Module):
    """FaceID: the face embedding [B, 512] → MLP (GELU) → T tokens, LayerNorm."""

    def __init__(self, embed_dim: int, hidden: int, dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, tokens * dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.tokens, -1))


class TokenMLP(nn.Module):
    """full-face: every penultimate token [B, N, W] → Linear, GELU, Linear → D, LayerNorm (N tokens out)."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, dim), nn.LayerNorm(dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


class PerceiverAttention(nn.Module):
    """Latents attend to [features; latents] (Jaegle et al. 2021, as Flamingo's resampler does)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.heads = inner // HEAD_DIM
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        # [B, T, heads*d] -> [B, heads, T, d]
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class Resampler(nn.Module):
    """plus / plus-face / InstantID: learned queries refined by Perceiver attention + feed-forward layers."""

    def __init__(self, in_dim: int, dim: int, inner: int, queries: int, depth: int, ff_dim: int, out_dim: int):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, queries, dim))
        self.proj_in = nn.Linear(in_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, inner),
                           nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_dim, bias=False), nn.GELU(),
                                         nn.Linear(ff_dim, dim, bias=False))])
            for _ in range(depth))
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim == 2:  # one face embedding per image: a sequence of one token
            features = features[:, None]
        x = self.proj_in(features)
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))


class KVProjection(nn.Module):
    """One cross-attention layer's projections of the image tokens."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.to_k_ip = nn.Linear(dim, hidden, bias=False)
        self.to_v_ip = nn.Linear(dim, hidden, bias=False)


# What each variant reads: "image_embeds" (CLIP projected embedding), "penultimate" (CLIP hidden states[-2]) or
# "face" (a 512-d insightface embedding given by the caller).
INPUTS = {"base": "image_embeds", "plus": "penultimate", "full-face": "penultimate", "faceid": "face",
          "instantid": "face"}


class IPAdapter(nn.Module):
    """``image_proj`` + ``ip_adapter`` in the file's layout. ``variant`` names the projection, ``input`` what it reads,
    ``context_dim`` the UNet context width it serves (768 for SD1, 2048 for SDXL)."""

    def __init__(self, variant: str, image_proj: nn.Module, layers: dict[int, tuple[int, int]]):
        super().__init__()
        self.variant, self.input = variant, INPUTS[variant]
        self.image_proj = image_proj
        self.ip_adapter = nn.ModuleDict({str(n): KVProjection(dim, hidden) for n, (dim, hidden) in layers.items()})
        self.context_dim = next(iter(layers.values()))[0]

    @property
    def feature_width(self) -> int:
        """The width of the features ``image_tokens`` reads (the encoder's projection or hidden width, or 512)."""
        proj = self.image_proj
        first = {LinearProjection: lambda: proj.proj, FaceIDProjection: lambda: proj.proj[0],
                 TokenMLP: lambda: proj.proj[0], Resampler: lambda: proj.proj_in}[type(proj)]()
        return first.in_features

    @property
    def image_proj_dtype(self) -> torch.dtype:
        return next(self.image_proj.parameters()).dtype

    def image_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Image features (what ``self.input`` names) [B, …] → context tokens [B, T, context_dim]."""
        return self.image_proj(features.to(self.image_proj_dtype))

    def layer_projections(self, attention_keys: list[str]) -> dict[str, KVProjection]:
        """This file's k/v projections by the UNet attention key they belong to. ``attention_keys``: every attention
        layer of the UNet (attn1 and attn2) in diffusers' processor order (see :func:`processor_order`)."""
        numbered = {str(n): key for n, key in enumerate(attention_keys)}
        missing = [n for n in self.ip_adapter if n not in numbered or not numbered[n].endswith("attn2")]
        expected = [str(n) for n, key in enumerate(attention_keys) if key.endswith("attn2")]
        if missing or sorted(expected, key=int) != sorted(self.ip_adapter, key=int):
            raise CheckpointError(None, f"this IP-Adapter has k/v projections for {len(self.ip_adapter)} "
                                        f"cross-attention layers, the UNet has {len(expected)}: it was made for "
                                        "another model family")
        return {numbered[n]: module for n, module in self.ip_adapter.items()}


def processor_order(unet: nn.Module) -> list[str]:
    """The UNet's attention keys in diffusers' attn_processors order: input blocks, output blocks, middle block."""
    keys = [name for name, _ in unet.named_modules() if name.endswith(("attn1", "attn2"))]
    rank = {"input_blocks": 0, "output_blocks": 1, "middle_block": 2}
    return sorted(keys, key=lambda k: rank[k.split(".")[0]])  # stable: within a part, module order


def _count(keys, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})


def _build_projection(shapes: dict[str, tuple[int, ...]], path) -> tuple[str, Callable[[], nn.Module]]:
    """The variant and a builder of its ``image_proj`` module, from the shapes of the ``image_proj.`` keys."""
    s = {k[len("image_proj."):]: v for k, v in shapes.items() if k.startswith("image_proj.")}
    if "latents" in s:
        _, queries, dim = s["latents"]
        in_dim = s["proj_in.weight"][1]
        out_dim = s["proj_out.weight"][0]
        inner = s["layers.0.0.to_q.weight"][0]
        variant = "instantid" if in_dim == FACE_EMBED_DIM else "plus"
        depth, ff_dim = _count(s, "layers."), s["layers.0.1.1.weight"][0]
        return variant, lambda: Resampler(in_dim, dim, inner, queries, depth, ff_dim, out_dim)
    if "proj.3.weight" in s:
        return "full-face", lambda: TokenMLP(s["proj.0.weight"][1], s["proj.2.weight"][0])
    if "proj.0.weight" in s and "norm.weight" in s:
        dim = s["norm.weight"][0]
        hidden, embed = s["proj.0.weight"]
        return "faceid", lambda: FaceIDProjection(embed, hidden, dim, s["proj.2.weight"][0] // dim)
    if "proj.weight" in s and "norm.weight" in s:
        dim = s["norm.weight"][0]
        out, embed = s["proj.weight"]
        if out % dim:
            raise CheckpointError(path, f"image_proj.proj.weight has {out} outputs, not a whole number of "
                                        f"tokens of image_proj.norm.weight's width {dim}")
        return "base", lambda: LinearProjection(embed, dim, out // dim)
    if any(k.startswith("perceiver_resampler.") for k in s):
        raise CheckpointError(path, "IP-Adapter FaceID-Plus files (perceiver_resampler.*) are not supported yet")
    raise CheckpointError(path, f"image_proj has none of the known IP-Adapter layouts (keys: {sorted(s)[:6]})")


def load(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> IPAdapter:
    """Read an IP-Adapter / InstantID adapter file (``.bin`` as a torch dict of the two parts, or flat
    ``.safetensors``), its variant inferred from the keys. FaceID's LoRA, when a file carries it inside the
    ``ip_adapter`` part, is set aside: apply the companion LoRA file with ``pipe.add_lora``."""
    with open_tensor_file(path) as tf:
        if not any(k.startswith("image_proj.") for k in tf.keys()) or \
                not any(k.startswith("ip_adapter.") for k in tf.keys()):
            raise CheckpointError(tf.path, "not an IP-Adapter file: expected image_proj.* and ip_adapter.* keys")
        variant, image_proj = _build_projection(tf.shapes, tf.path)
        layers = {}
        for key, shape in tf.shapes.items():
            parts = key.split(".")
            if len(parts) == 4 and parts[0] == "ip_adapter" and parts[2] == "to_k_ip":
                hidden, dim = shape
                layers[int(parts[1])] = (dim, hidden)
        if not layers:
            raise CheckpointError(tf.path, "ip_adapter has no to_k_ip/to_v_ip projections")
        p = plan(tf, lambda: IPAdapter(variant, image_proj(), dict(sorted(layers.items()))), "", name="IP-Adapter",
                 only=lambda k: k.startswith("image_proj.") or k.endswith(("to_k_ip.weight", "to_v_ip.weight")))
        return materialize(tf, p, dtype, device)


# --- at generation time ------------------------------------------------------------------------------------------


class IPAdapterPatch(AttentionPatch):
    """The decoupled cross-attention of one adapter: every cross-attention layer the file has projections for also
    attends to ``tokens`` [B or 1, T, context_dim] (one row per row of the UNet batch, or one for all), the result
    times ``scale`` added to its output."""

    def __init__(self, projections: dict[str, KVProjection], tokens: torch.Tensor, scale: float | torch.Tensor = 1.0):
        self.projections, self.tokens, self.scale = projections, tokens, scale

    def extra_tokens(self, site: AttentionSite) -> list[ExtraTokens]:
        proj = self.projections.get(site.key)
        if proj is None:
            return []
        tokens = self.tokens.to(proj.to_k_ip.weight.dtype)
        return [ExtraTokens(proj.to_k_ip(tokens), proj.to_v_ip(tokens), self.scale)]


@dataclass
class IPAdapterUnit:
    """One image prompt: ``pipe.txt2img(..., ip_adapters=[IPAdapterUnit(adapter, image, encoder=enc)])``.

    ``image``: a PIL image or a list of them (their tokens are concatenated) for the CLIP-based variants, read
    through ``encoder`` (``sdlite.clip.load_vision``); ``face_embedding`` [512] or [N, 512] for FaceID/InstantID.
    ``weight`` scales the image attention; the unit acts while ``start <= progress <= end`` (fractions of the
    sampling steps, as ControlNet units)."""

    adapter: IPAdapter
    image: Image.Image | Sequence[Image.Image] | None = None
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    encoder: VisionEncoder | None = None
    face_embedding: torch.Tensor | None = None

    def __post_init__(self):
        needs = self.adapter.input
        if needs == "face":
            if self.face_embedding is None:
                raise ValueError(f"a {self.adapter.variant} IP-Adapter reads a 512-d face embedding: give "
                                 "face_embedding= (insightface's embedding of the face)")
            if self.face_embedding.shape[-1] != FACE_EMBED_DIM:
                raise ValueError(f"face_embedding must end in {FACE_EMBED_DIM}, got {list(self.face_embedding.shape)}")
        else:
            if self.image is None or self.encoder is None:
                raise ValueError(f"a {self.adapter.variant} IP-Adapter reads CLIP image features: give image= and "
                                 "encoder= (sdlite.clip.load_vision)")
            width = self.encoder.config.projection_dim if needs == "image_embeds" else self.encoder.config.width
            expected = self.adapter.feature_width
            if width != expected:
                raise ValueError(f"this IP-Adapter reads {needs} of width {expected}; the image encoder gives "
                                 f"{width} (a ViT-H/14 adapter needs the ViT-H encoder, an SDXL one often bigG)")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"start/end must satisfy 0 <= start <= end <= 1, got {self.start}, {self.end}")

    def active(self, progress: float) -> bool:
        return self.weight != 0 and self.start <= progress <= self.end

    @torch.no_grad()
    def tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) image tokens [T, context_dim], as the reference pipelines make the negative one:
        the projection of zeros (image embeds, face embeddings) or of the encoder's features of an all-zero
        (normalised) image (penultimate-state variants)."""
        adapter = self.adapter
        if adapter.input == "face":
            features = self.face_embedding.reshape(-1, FACE_EMBED_DIM).float()
            negative = torch.zeros_like(features)
        else:
            images = [self.image] if isinstance(self.image, Image.Image) else list(self.image)
            enc = self.encoder
            param = next(enc.parameters())
            pixels = preprocess(images).to(param.device, param.dtype)
            out = enc.encode_image(pixels)
            if adapter.input == "image_embeds":
                features = out.image_embeds
                negative = torch.zeros_like(features)
            else:
                features = out.penultimate
                negative = enc.encode_image(torch.zeros_like(pixels[:1])).penultimate.expand_as(features)
        pos, neg = adapter.image_tokens(features), adapter.image_tokens(negative)
        # One token sequence per unit: several images (or faces) are concatenated along the tokens.
        return pos.reshape(-1, pos.shape[-1]), neg.reshape(-1, neg.shape[-1])


def patch_hook(units: Sequence[IPAdapterUnit], unet: nn.Module):
    """The ``patches(cond_rows, step)`` hook of a sampling pass: each active unit's tokens, the positive ones on the
    rows that carry a prompt and the negative ones on the uncond rows; every image of a batch gets the same."""
    order = processor_order(unet)
    prepared = []
    for unit in units:
        projections = unit.adapter.layer_projections(order)
        weight = next(unit.adapter.parameters())
        pos, neg = (t.to(weight.device, weight.dtype) for t in unit.tokens())
        prepared.append((unit, projections, pos, neg))

    def patches(cond_rows: torch.Tensor | None, step) -> list[IPAdapterPatch] | None:
        out = []
        for unit, projections, pos, neg in prepared:
            if not unit.active(step.progress):
                continue
            if cond_rows is None:
                tokens = pos[None]
            else:
                tokens = torch.where(cond_rows.to(pos.device)[:, None, None], pos[None], neg[None])
            out.append(IPAdapterPatch(projections, tokens, unit.weight))
        return out or None

    return patches
