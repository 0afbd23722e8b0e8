"""IP-Adapter files (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion
Models") and InstantID's adapter, as tencent-ailab and InstantX publish them (docs/formats.md §15).

A file has two parts. ``image_proj`` turns image features into extra context tokens; its variant is told by its
keys (``image_proj.py``): a linear projection of ``image_embeds`` to 4 tokens (ip-adapter, _light, _vit-h), a
Perceiver resampler over the penultimate CLIP hidden states to 16 tokens (plus, plus-face; InstantID's resampler
reads a 512-d face embedding instead), an MLP over all penultimate tokens (full-face), an MLP over a 512-d face
embedding (FaceID), or that MLP refined by a Perceiver over the face crop's penultimate CLIP states (FaceID-Plus).
``ip_adapter.{n}.to_k_ip/to_v_ip`` are the key/value projections of those tokens for the n-th attention layer in
diffusers' processor order (input blocks, output blocks, middle block; attn1 then attn2 of each transformer
block), so only odd n (the cross-attention layers) carry weights. Attention then adds
``scale · Attention(q, to_k_ip(tokens), to_v_ip(tokens))`` to each cross-attention output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from ..checkpoint.files import open_tensor_file
from ..checkpoint.materialize import materialize, plan
from ..clip.vision import VisionEncoder, preprocess
from ..errors import CheckpointError
from ..unet.attention import AttentionPatch, AttentionSite, ExtraTokens
from .image_proj import FACE_EMBED_DIM, INPUTS, from_shapes


class KVProjection(nn.Module):
    """One cross-attention layer's projections of the image tokens."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.to_k_ip = nn.Linear(dim, hidden, bias=False)
        self.to_v_ip = nn.Linear(dim, hidden, bias=False)


class IPAdapter(nn.Module):
    """``image_proj`` + ``ip_adapter`` in the file's layout. ``variant`` names the projection, ``input`` what it reads,
    ``context_dim`` the UNet context width it serves (768 for SD1, 2048 for SDXL)."""

    def __init__(self, variant: str, image_proj: nn.Module, layers: dict[int, tuple[int, int]]):
        super().__init__()
        self.variant, self.input = variant, INPUTS[variant]
        self.image_proj = image_proj
        self.ip_adapter = nn.ModuleDict({str(n): KVProjection(dim, hidden) for n, (dim, hidden) in layers.items()})
        self.context_dim = next(iter(layers.values()))[0]
        # FaceID-Plus v2's shortcut scale (None: v1, or another variant); ``load`` sets 1.0 for "plusv2" files.
        self.shortcut_scale: float | None = None

    @property
    def feature_width(self) -> int:
        """The width of the CLIP features ``image_tokens`` reads (the encoder's projection or hidden width), or 512
        for the face embedding of FaceID and InstantID."""
        return self.image_proj.feature_width

    @property
    def image_proj_dtype(self) -> torch.dtype:
        return next(self.image_proj.parameters()).dtype

    def image_tokens(self, features: torch.Tensor, penultimate: torch.Tensor | None = None) -> torch.Tensor:
        """Image features (what ``self.input`` names) [B, …] → context tokens [B, T, context_dim]. FaceID-Plus reads
        the face embeddings [B, 512] and the CLIP penultimate states of the face crops [B, N, W], and applies v2's
        shortcut when ``self.shortcut_scale`` is set."""
        dtype = self.image_proj_dtype
        if self.variant == "faceid-plus":
            if penultimate is None:
                raise ValueError("a FaceID-Plus adapter reads the face embedding and the CLIP penultimate states")
            return self.image_proj(features.to(dtype), penultimate.to(dtype), self.shortcut_scale)
        return self.image_proj(features.to(dtype))

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


def load(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> IPAdapter:
    """Read an IP-Adapter / InstantID adapter file (``.bin`` as a torch dict of the two parts, or flat
    ``.safetensors``), its variant inferred from the keys. FaceID's LoRA, when a file carries it inside the
    ``ip_adapter`` part, is set aside: apply the companion LoRA file with ``pipe.add_lora``.

    FaceID-Plus v1 and v2 files have the same keys; v2 is run with a shortcut (``adapter.shortcut_scale``, the
    reference's ``s_scale``). It is set to 1.0 when the file name says "plusv2", as tencent-ailab names v2 files
    (``ip-adapter-faceid-plusv2_sd15.bin``); set it yourself for a renamed file (None runs v1's formula)."""
    with open_tensor_file(path) as tf:
        if not any(k.startswith("image_proj.") for k in tf.keys()) or \
                not any(k.startswith("ip_adapter.") for k in tf.keys()):
            raise CheckpointError(tf.path, "not an IP-Adapter file: expected image_proj.* and ip_adapter.* keys")
        variant, image_proj = from_shapes(tf.shapes, tf.path)
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
        adapter = materialize(tf, p, dtype, device)
    if variant == "faceid-plus" and "plusv2" in os.path.basename(str(path)).lower():
        adapter.shortcut_scale = 1.0
    return adapter


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
    through ``encoder`` (``sdlite.clip.load_vision``); ``face_embedding`` [512] or [N, 512] for FaceID/InstantID;
    FaceID-Plus reads both: the face embedding and ``image``, the face crop (one per embedding).
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
        if needs.startswith("face"):
            if self.face_embedding is None:
                raise ValueError(f"a {self.adapter.variant} IP-Adapter reads a 512-d face embedding: give "
                                 "face_embedding= (insightface's embedding of the face)")
            self.face_embedding = torch.as_tensor(self.face_embedding)
            if self.face_embedding.shape[-1] != FACE_EMBED_DIM:
                raise ValueError(f"face_embedding must end in {FACE_EMBED_DIM}, got {list(self.face_embedding.shape)}")
        if needs != "face":
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
        (normalised) image (penultimate-state variants; FaceID-Plus: both)."""
        adapter = self.adapter
        if adapter.input == "face":
            features = self.face_embedding.reshape(-1, FACE_EMBED_DIM).float()
            pos, neg = adapter.image_tokens(features), adapter.image_tokens(torch.zeros_like(features))
        else:
            images = [self.image] if isinstance(self.image, Image.Image) else list(self.image)
            enc = self.encoder
            param = next(enc.parameters())
            pixels = preprocess(images).to(param.device, param.dtype)
            out = enc.encode_image(pixels)
            if adapter.input == "image_embeds":
                features = out.image_embeds
                pos, neg = adapter.image_tokens(features), adapter.image_tokens(torch.zeros_like(features))
            else:
                features = out.penultimate
                blank = enc.encode_image(torch.zeros_like(pixels[:1])).penultimate.expand_as(features)
                if adapter.input == "penultimate":
                    pos, neg = adapter.image_tokens(features), adapter.image_tokens(blank)
                else:  # FaceID-Plus: each face embedding with its crop; zeros with the blank image's states
                    faces = self.face_embedding.reshape(-1, FACE_EMBED_DIM).float()
                    if len(faces) != len(features):
                        raise ValueError(f"FaceID-Plus pairs each face embedding with its face crop: got "
                                         f"{len(faces)} embeddings and {len(features)} images")
                    pos = adapter.image_tokens(faces, features)
                    neg = adapter.image_tokens(torch.zeros_like(faces), blank)
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
