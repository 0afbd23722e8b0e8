"""What sdlite knows about each Stable Diffusion family, in one table (docs/formats.md §1, §2).

Loading, prompt encoding, the generation core, the schedulers and the coming training and merge tools read these
facts here rather than keeping copies. Which family a file holds is decided from its keys by ``families.identify``;
this module knows nothing about files and imports nothing of sdlite, so that any module may read it.

Sources: the original inference configs (CompVis ``v1-inference.yaml``, Stability-AI ``v2-inference(-v).yaml``,
generative-models ``sd_xl_base.yaml`` / ``sd_xl_refiner.yaml``), A1111's and ComfyUI's readings of them, and
NVIDIA's Align Your Steps tables (Sabour et al. 2024, arXiv:2404.14507).
"""

from __future__ import annotations

from dataclasses import dataclass

ADM_EMBED_DIM = 256  # each number of SDXL's vector conditioning becomes a 256-wide sinusoidal embedding

# Align Your Steps 10-step schedules (11 σ, the last being SD's σ_min), from NVIDIA's published "how to" page
# (https://research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html). A1111 uses the SD 1.5 table for SD 2.x.
_AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
_AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


@dataclass(frozen=True, kw_only=True)
class TextEncoderRule:
    """One text encoder of a family and how its hidden states become the UNet's context.

    ``layer`` is the hidden layer read (-1 the last, -2 the penultimate); ``final_norm`` whether the tower's final
    LayerNorm is applied to it; ``pooled`` whether this tower gives the pooled vector (final LayerNorm at the end
    token, then the text projection); ``clip_skip`` whether A1111's "Clip skip n" replaces ``layer`` by -n.
    ``width`` is the released tower's.
    """

    layout: str  # "clip" (Hugging Face CLIPTextModel key names) or "openclip"
    width: int
    layer: int
    final_norm: bool
    pooled: bool = False
    clip_skip: bool = False

    def read(self, clip_skip: int = 1) -> tuple[int, bool, bool]:
        """(layer, final_norm, pooled) for a prompt encoded with A1111's clip-skip setting ``clip_skip`` (1 = off)."""
        return (-clip_skip if self.clip_skip else self.layer), self.final_norm, self.pooled


_CLIP_L_LAST = TextEncoderRule(layout="clip", width=768, layer=-1, final_norm=True, clip_skip=True)
_OPENCLIP_H = TextEncoderRule(layout="openclip", width=1024, layer=-2, final_norm=True)
_CLIP_L_SGM = TextEncoderRule(layout="clip", width=768, layer=-2, final_norm=False)
_OPENCLIP_BIGG = TextEncoderRule(layout="openclip", width=1280, layer=-2, final_norm=False, pooled=True)


@dataclass(frozen=True, kw_only=True)
class Family:
    """The facts of one family. ``adm_fields`` name the numbers that follow the pooled text vector in the UNet's
    ADM vector ``y``, in order (each embedded ``ADM_EMBED_DIM`` wide); empty for families without ``y``."""

    name: str  # "sd1", "sd2", "sdxl", "sdxl-refiner": pipe.family
    label: str  # for messages
    text_encoders: tuple[TextEncoderRule, ...]
    latent_scale: float  # z_unet = latent_scale · z_vae
    native_size: int  # the image side the family was trained at
    native_size_v: int | None = None  # the side of its v-prediction release, where that differs (SD 2.x 768-v)
    prediction: str = "eps"  # what a file of this family predicts unless the weights or a marker say otherwise
    guess_v: bool = False  # whether v-prediction is guessed from the UNet's weights (nothing in SD 2.x files says)
    adm_fields: tuple[str, ...] = ()
    num_heads: int | None = None  # attention heads: a fixed count (SD 1.x) …
    head_dim: int | None = None  # … or a fixed width per head (the others)
    zero_empty_negative: bool = False  # an empty negative prompt encodes to zeros (sgm's force_zero_embeddings)
    ays_sigmas: tuple[float, ...] = _AYS_SD15

    @property
    def context_dim(self) -> int:
        """The width of the cross-attention context: the text encoders' widths side by side."""
        return sum(t.width for t in self.text_encoders)

    @property
    def heads(self) -> dict[str, int]:
        """The head rule as UNet config fields: ``{"num_heads": n}`` or ``{"head_dim": d}``."""
        return {"num_heads": self.num_heads} if self.num_heads is not None else {"head_dim": self.head_dim}

    def adm_width(self, pooled_width: int) -> int | None:
        """``y``'s width (the UNet's ``label_emb.0.0.weight`` input) for a pooled vector ``pooled_width`` wide, or
        None for families without ``y``."""
        return pooled_width + ADM_EMBED_DIM * len(self.adm_fields) if self.adm_fields else None

    def adm_values(self, *, original_size: tuple[int, int], crop: tuple[int, int], target_size: tuple[int, int],
                   aesthetic_score: float) -> list[float]:
        """The numbers of ``adm_fields``, in order, from (width, height) sizes and a (left, top) crop; sgm and A1111
        give height before width and top before left."""
        values = {"original_height": original_size[1], "original_width": original_size[0], "crop_top": crop[1],
                  "crop_left": crop[0], "target_height": target_size[1], "target_width": target_size[0],
                  "aesthetic_score": aesthetic_score}
        return [float(values[f]) for f in self.adm_fields]

    def size_for(self, prediction: str) -> int:
        """The native image side of a model of this family that predicts ``prediction``."""
        return self.native_size_v if prediction == "v" and self.native_size_v else self.native_size


_SDXL_SIZES = ("original_height", "original_width", "crop_top", "crop_left")

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(name="sd1", label="SD 1.x", text_encoders=(_CLIP_L_LAST,), latent_scale=0.18215, native_size=512,
           num_heads=8),
    Family(name="sd2", label="SD 2.x", text_encoders=(_OPENCLIP_H,), latent_scale=0.18215, native_size=512,
           native_size_v=768, guess_v=True, head_dim=64),
    Family(name="sdxl", label="SDXL", text_encoders=(_CLIP_L_SGM, _OPENCLIP_BIGG), latent_scale=0.13025,
           native_size=1024, adm_fields=_SDXL_SIZES + ("target_height", "target_width"), head_dim=64,
           zero_empty_negative=True, ays_sigmas=_AYS_SDXL),
    Family(name="sdxl-refiner", label="SDXL refiner", text_encoders=(_OPENCLIP_BIGG,), latent_scale=0.13025,
           native_size=1024, adm_fields=_SDXL_SIZES + ("aesthetic_score",), head_dim=64, zero_empty_negative=True,
           ays_sigmas=_AYS_SDXL),
)}


def get_family(name: str) -> Family:
    """The table entry of ``name``, or a ValueError listing the known families."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}, not {name!r}") from None


def by_context_dim(width: int | None) -> Family | None:
    """The family whose cross-attention context is ``width`` wide (each released family's is distinct), or None."""
    return next((f for f in FAMILIES.values() if f.context_dim == width), None)


def heads_for_context(width: int | None) -> dict[str, int]:
    """The attention-head rule of a UNet whose context is ``width`` wide, as UNet config fields.

    The files do not store it. A UNet (or ControlNet) with a released family's context width gets that family's
    rule, as ComfyUI matches them; any other width gets 64 channels per head, sgm's default.
    """
    found = by_context_dim(width)
    return found.heads if found is not None else {"head_dim": 64}
