"""CLIP vision towers (ViT, Dosovitskiy et al. 2021, as trained by CLIP, Radford et al. 2021 and open_clip) in the
layouts image-prompt adapters are distributed with (docs/formats.md §15).

* ``"clip"``: transformers' ``CLIPVisionModelWithProjection`` (``vision_model.…`` + ``visual_projection.weight``), the
  usual ``image_encoder/model.safetensors`` of IP-Adapter releases (ViT-H/14, ViT-bigG/14).
* ``"openclip"``: open_clip's ``visual.…`` tower (``conv1``, ``ln_pre``, ``transformer.resblocks``, ``ln_post``,
  ``proj``), found in open_clip checkpoints next to their text tower.

Both are the same pre-LayerNorm ViT: patch embedding without bias, a class token, learned positions, a LayerNorm
before the blocks, and the class token after the final LayerNorm projected to ``image_embeds``. Image-prompt adapters
read either ``image_embeds`` or ``penultimate``, the hidden states after all blocks but the last (transformers'
``hidden_states[-2]``), without the final LayerNorm. The encoder blocks are the text towers' blocks without the
causal mask.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..checkpoint.files import open_tensor_file
from ..checkpoint.materialize import materialize, plan
from ..errors import CheckpointError
from .model import CLIPEncoder, OpenCLIPTransformer

# CLIP's image normalisation (the statistics of its training set) and input size.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224

# Neither the head count nor the activation is stored in the files. The released towers by width: OpenAI's ViT-B
# (768) and ViT-L (1024) use QuickGELU and 64-wide heads; LAION's ViT-H (1280, heads of 80) and ViT-bigG (1664,
# heads of 104) use exact GELU and 16 heads.
KNOWN_WIDTHS = {768: (12, "quick_gelu"), 1024: (16, "quick_gelu"), 1280: (16, "gelu"), 1664: (16, "gelu")}


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    layout: str  # "clip" (transformers key names) or "openclip"
    width: int
    layers: int
    heads: int
    mlp_width: int
    patch_size: int
    image_size: int
    projection_dim: int
    activation: str  # "quick_gelu" or "gelu"

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class VisionOutput(NamedTuple):
    image_embeds: torch.Tensor  # [B, projection_dim]: the class token after the final LayerNorm, projected
    penultimate: torch.Tensor  # [B, tokens, width]: hidden states after all blocks but the last
    last_hidden: torch.Tensor  # [B, tokens, width]: after every block, before the final LayerNorm


class _Embeddings(nn.Module):
    """transformers' ``vision_model.embeddings``: class token, bias-free patch convolution, positions."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(c.width))
        self.patch_embedding = nn.Conv2d(3, c.width, c.patch_size, stride=c.patch_size, bias=False)
        self.position_embedding = nn.Embedding(c.tokens, c.width)


class _VisionTransformer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.embeddings = _Embeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.width)  # sic: the transformers attribute name
        self.encoder = CLIPEncoder(c, causal=False)
        self.post_layernorm = nn.LayerNorm(c.width)


class VisionEncoder(nn.Module):
    """A CLIP image encoder; ``encode_image(pixels)`` on pixels already preprocessed by :func:`preprocess`."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = c = config
        if c.layout == "clip":
            self.vision_model = _VisionTransformer(c)
            self.visual_projection = nn.Linear(c.width, c.projection_dim, bias=False)
        elif c.layout == "openclip":
            self.conv1 = nn.Conv2d(3, c.width, c.patch_size, stride=c.patch_size, bias=False)
            self.class_embedding = nn.Parameter(torch.zeros(c.width))
            self.positional_embedding = nn.Parameter(torch.zeros(c.tokens, c.width))
            self.ln_pre = nn.LayerNorm(c.width)
            self.transformer = OpenCLIPTransformer(c, causal=False)
            self.ln_post = nn.LayerNorm(c.width)
            self.proj = nn.Parameter(torch.zeros(c.width, c.projection_dim))  # used as x @ proj
        else:
            raise ValueError(f"unknown CLIP vision layout {c.layout!r}")

    def _parts(self):
        """(patch conv, class token, positions [T, W], pre-norm, blocks, post-norm, projection) in either layout."""
        if self.config.layout == "clip":
            v = self.vision_model
            return (v.embeddings.patch_embedding, v.embeddings.class_embedding, v.embeddings.position_embedding.weight,
                    v.pre_layrnorm, v.encoder.layers, v.post_layernorm, lambda x: self.visual_projection(x))
        return (self.conv1, self.class_embedding, self.positional_embedding, self.ln_pre, self.transformer.resblocks,
                self.ln_post, lambda x: x @ self.proj)

    def encode_image(self, pixels: torch.Tensor) -> VisionOutput:
        c = self.config
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, c.image_size, c.image_size):
            raise ValueError(f"pixels must be [B, 3, {c.image_size}, {c.image_size}] (see sdlite.clip.preprocess), "
                             f"got {list(pixels.shape)}")
        conv, cls, positions, pre, blocks, post, project = self._parts()
        x = conv(pixels.to(cls.dtype)).flatten(2).transpose(1, 2)  # [B, W, h, w] -> [B, h*w, W]
        x = torch.cat([cls.expand(x.shape[0], 1, -1), x], dim=1) + positions
        x = pre(x)
        for block in blocks[:-1]:
            x = block(x)
        penultimate = x
        x = blocks[-1](x)
        return VisionOutput(project(post(x[:, 0])), penultimate, x)

    forward = encode_image


def preprocess(images: Image.Image | Sequence[Image.Image], size: int = IMAGE_SIZE) -> torch.Tensor:
    """CLIP's preprocessing: shortest side to ``size`` (bicubic), centre crop, /255, CLIP mean/std → [B, 3, s, s]."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    out = []
    for image in images:
        image = image.convert("RGB")
        w, h = image.size
        scale = size / min(w, h)
        # Rounded as transformers' get_resize_output_image_size does (int of the scaled long side).
        rw, rh = (size, int(h * scale)) if w <= h else (int(w * scale), size)
        image = image.resize((rw, rh), Image.Resampling.BICUBIC)
        left, top = int(round((rw - size) / 2.0)), int(round((rh - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
    pixels = torch.stack(out)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def _count(keys, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})


def infer_vision_config(shapes: dict[str, tuple[int, ...]], path=None, heads: int | None = None,
                        activation: str | None = None) -> tuple[VisionConfig, str]:
    """The architecture and the key prefix of the vision tower in a file, from tensor shapes."""
    keys = shapes.keys()
    if "vision_model.embeddings.patch_embedding.weight" in shapes:
        layout, prefix = "clip", ""
        width, _, patch, _ = shapes["vision_model.embeddings.patch_embedding.weight"]
        tokens = shapes["vision_model.embeddings.position_embedding.weight"][0]
        layers = _count(keys, "vision_model.encoder.layers.")
        mlp = shapes["vision_model.encoder.layers.0.mlp.fc1.weight"][0]
        if "visual_projection.weight" not in shapes:
            raise CheckpointError(path, "a CLIP vision model without visual_projection.weight (transformers' "
                                        "CLIPVisionModel); image prompts need CLIPVisionModelWithProjection")
        projection = shapes["visual_projection.weight"][0]
    elif any(k.endswith("visual.conv1.weight") or k == "conv1.weight" for k in keys):
        layout = "openclip"
        prefix = next(k for k in keys if k.endswith("conv1.weight"))[: -len("conv1.weight")]
        width, _, patch, _ = shapes[prefix + "conv1.weight"]
        tokens = shapes[prefix + "positional_embedding"][0]
        layers = _count(keys, prefix + "transformer.resblocks.")
        mlp = shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0]
        projection = shapes[prefix + "proj"][1]
    else:
        raise CheckpointError(path, "not a CLIP vision model: expected transformers' vision_model.* keys or "
                                    "open_clip's visual.* keys")
    grid = round((tokens - 1) ** 0.5)
    if grid * grid != tokens - 1:
        raise CheckpointError(path, f"{tokens} position embeddings are not a square grid plus a class token")
    known_heads, known_act = KNOWN_WIDTHS.get(width, (None, None))
    heads = heads or known_heads
    if heads is None:
        raise CheckpointError(path, f"a width-{width} vision tower is none of the released ones "
                                    f"({sorted(KNOWN_WIDTHS)}); pass heads= (and activation=) to load it")
    config = VisionConfig(layout=layout, width=width, layers=layers, heads=heads, mlp_width=mlp, patch_size=patch,
                          image_size=grid * patch, projection_dim=projection,
                          activation=activation or known_act or "gelu")
    return config, prefix


def load_vision(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                *, heads: int | None = None, activation: str | None = None) -> VisionEncoder:
    """Load a CLIP image encoder (transformers or open_clip layout) with its architecture inferred from shapes.

    Keys outside the vision tower (an open_clip checkpoint's text tower, transformers' ``position_ids``) are set
    aside; every key of the tower itself must match."""
    with open_tensor_file(path) as tf:
        config, prefix = infer_vision_config(tf.shapes, tf.path, heads, activation)
        tower = ("vision_model.", "visual_projection.") if config.layout == "clip" else prefix
        p = plan(tf, lambda: VisionEncoder(config), prefix, name="CLIP vision model",
                 only=lambda k: k.startswith(tower) and not k.endswith("position_ids"))
        return materialize(tf, p, dtype, device)
