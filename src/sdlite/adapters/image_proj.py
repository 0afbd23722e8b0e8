"""The ``image_proj`` part of IP-Adapter files (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter
for Text-to-Image Diffusion Models"), InstantID's and FaceID's: modules that turn image or face features into
context tokens, in the files' key layout, and the reading of their variant from the key shapes (docs/formats.md
§15 and "InstantID and FaceID").

=============  ===========================================  ==========================================
variant        reads                                        module (keys under ``image_proj.``)
=============  ===========================================  ==========================================
base           CLIP ``image_embeds`` [B, E]                 LinearProjection (``proj``, ``norm``)
plus           CLIP penultimate states [B, N, W]            Resampler (``latents``, ``proj_in``, ``layers``…)
full-face      CLIP penultimate states [B, N, W]            TokenMLP (``proj.0/2/3``)
faceid         face embedding [B, 512]                      FaceIDProjection (``proj.0/2``, ``norm``)
faceid-plus    face embedding + CLIP penultimate states     FaceIDPlusProjection (``proj``, ``norm``,
                                                            ``perceiver_resampler.*``)
instantid      face embedding [B, 512]                      Resampler with a 512-wide ``proj_in``
=============  ===========================================  ==========================================
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError

HEAD_DIM = 64  # the resamplers' attention heads are 64 wide in every released file
FACE_EMBED_DIM = 512  # insightface's (buffalo_l / antelopev2) identity embedding

# What each variant reads: "image_embeds" (CLIP projected embedding), "penultimate" (CLIP hidden states[-2]),
# "face" (a 512-d insightface embedding given by the caller) or "face+penultimate" (both).
INPUTS = {"base": "image_embeds", "plus": "penultimate", "full-face": "penultimate", "faceid": "face",
          "instantid": "face", "faceid-plus": "face+penultimate"}


class LinearProjection(nn.Module):
    """ip-adapter: ``image_embeds`` [B, E] → LayerNorm(Linear(E → T·D)) as T tokens."""

    def __init__(self, embed_dim: int, dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(embed_dim, tokens * dim)
        self.norm = nn.LayerNorm(dim)

    @property
    def feature_width(self) -> int:
        return self.proj.in_features

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.tokens, -1))


class FaceIDProjection(nn.Module):
    """FaceID: the face embedding [B, 512] → MLP (GELU) → T tokens, LayerNorm."""

    def __init__(self, embed_dim: int, hidden: int, dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, tokens * dim))
        self.norm = nn.LayerNorm(dim)

    @property
    def feature_width(self) -> int:
        return self.proj[0].in_features

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.tokens, -1))


class TokenMLP(nn.Module):
    """full-face: every penultimate token [B, N, W] → Linear, GELU, Linear → D, LayerNorm (N tokens out)."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, dim), nn.LayerNorm(dim))

    @property
    def feature_width(self) -> int:
        return self.proj[0].in_features

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


class Perceiver(nn.Module):
    """Given latents refined by Perceiver attention + feed-forward layers over projected features, then projected
    out (FaceID-Plus's ``perceiver_resampler``; the Resampler below with learned latents)."""

    def __init__(self, in_dim: int, dim: int, inner: int, depth: int, ff_dim: int, out_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, inner),
                           nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_dim, bias=False), nn.GELU(),
                                         nn.Linear(ff_dim, dim, bias=False))])
            for _ in range(depth))
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    @property
    def feature_width(self) -> int:
        return self.proj_in.in_features

    def refine(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(features)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))

    forward = refine


class Resampler(Perceiver):
    """plus / plus-face / InstantID: learned queries (``latents``) refined over the features."""

    def __init__(self, in_dim: int, dim: int, inner: int, queries: int, depth: int, ff_dim: int, out_dim: int):
        super().__init__(in_dim, dim, inner, depth, ff_dim, out_dim)
        self.latents = nn.Parameter(torch.zeros(1, queries, dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim == 2:  # one face embedding per image: a sequence of one token
            features = features[:, None]
        return self.refine(self.latents.expand(features.shape[0], -1, -1), features)


class FaceIDPlusProjection(nn.Module):
    """FaceID-Plus (v1, v2): FaceID's tokens of the face embedding, refined by a Perceiver over the CLIP penultimate
    states of the face crop. v2 adds a shortcut: ``tokens + shortcut_scale · refined`` (the reference's ``s_scale``);
    ``shortcut_scale=None`` is v1 (the refined tokens alone)."""

    def __init__(self, embed_dim: int, hidden: int, dim: int, tokens: int, clip_width: int, inner: int, depth: int,
                 ff_dim: int, out_dim: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, tokens * dim))
        self.norm = nn.LayerNorm(dim)
        self.perceiver_resampler = Perceiver(clip_width, dim, inner, depth, ff_dim, out_dim)

    @property
    def feature_width(self) -> int:
        """The CLIP encoder's hidden width it reads (the face embedding is always 512-d)."""
        return self.perceiver_resampler.feature_width

    def forward(self, face: torch.Tensor, penultimate: torch.Tensor,
                shortcut_scale: float | None = None) -> torch.Tensor:
        tokens = self.norm(self.proj(face).reshape(face.shape[0], self.tokens, -1))
        refined = self.perceiver_resampler(tokens, penultimate)
        return refined if shortcut_scale is None else tokens + shortcut_scale * refined


def _count(keys, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})


def _perceiver_shapes(s: dict[str, tuple[int, ...]], prefix: str = "") -> dict[str, int]:
    """A Perceiver's sizes from the shapes of its keys under ``prefix``."""
    return dict(in_dim=s[prefix + "proj_in.weight"][1], dim=s[prefix + "proj_in.weight"][0],
                inner=s[prefix + "layers.0.0.to_q.weight"][0], depth=_count(s, prefix + "layers."),
                ff_dim=s[prefix + "layers.0.1.1.weight"][0], out_dim=s[prefix + "proj_out.weight"][0])


def from_shapes(shapes: dict[str, tuple[int, ...]], path) -> tuple[str, Callable[[], nn.Module]]:
    """The variant and a builder of its ``image_proj`` module, from the shapes of a file's ``image_proj.`` keys."""
    s = {k[len("image_proj."):]: v for k, v in shapes.items() if k.startswith("image_proj.")}
    if "perceiver_resampler.proj_in.weight" in s and "proj.0.weight" in s and "norm.weight" in s:
        p = _perceiver_shapes(s, "perceiver_resampler.")
        dim, (hidden, embed) = s["norm.weight"][0], s["proj.0.weight"]
        if s["proj.2.weight"][0] % dim or dim != p["dim"]:
            raise CheckpointError(path, f"image_proj.proj.2.weight has {s['proj.2.weight'][0]} outputs, not a whole "
                                        f"number of tokens of the resampler's width {p['dim']}")
        return "faceid-plus", lambda: FaceIDPlusProjection(embed, hidden, dim, s["proj.2.weight"][0] // dim,
                                                           p["in_dim"], p["inner"], p["depth"], p["ff_dim"],
                                                           p["out_dim"])
    if "latents" in s:
        p = _perceiver_shapes(s)
        _, queries, _ = s["latents"]
        variant = "instantid" if p["in_dim"] == FACE_EMBED_DIM else "plus"
        return variant, lambda: Resampler(p["in_dim"], p["dim"], p["inner"], queries, p["depth"], p["ff_dim"],
                                          p["out_dim"])
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
    raise CheckpointError(path, f"image_proj has none of the known IP-Adapter layouts (keys: {sorted(s)[:6]})")
