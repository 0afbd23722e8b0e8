"""LoRA-family key names → sdlite modules: the one rule-based mapping (docs/formats.md §3.1, §3.4, §3.5).

Files name a layer in one of these conventions, followed by a tensor suffix:

* kohya-ss / LyCORIS: ``lora_unet_<path>``, ``lora_te_<path>``, SDXL ``lora_te1_`` / ``lora_te2_``, with every "."
  of the path written as "_". SD 1.x/2.x UNet paths are diffusers names, SDXL ones the original (sgm) names; text
  encoder paths are Hugging Face CLIP names, for the open_clip towers of SD 2.x and SDXL too.
* diffusers / PEFT: dotted diffusers paths under ``unet.``, ``text_encoder.``, ``text_encoder_2.`` (old UNet
  attention-processor files have no prefix), including the old processor form ``attn1.processor.to_q_lora``.
* the original layout itself (``diffusion_model.input_blocks…``, open_clip ``transformer.resblocks…``).

Every path is brought to kohya's flat form and looked up among the model's own Linear/Conv2d layers. diffusers
UNet paths and HF CLIP paths of open_clip towers are first rewritten by the rules below, which read the block
structure (res blocks per level, where the upsampler and the middle transformer sit) from the model, so reduced
and distilled UNets map as well as the released ones. HF q/k/v projections land on thirds of open_clip's
``in_proj_weight``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from torch import nn
from torch.nn.utils import parametrize

from ..unet.blocks import ResBlock, SpatialTransformer, Upsample

# Tensor suffix of every layout → the role of that tensor. The longest suffix that ends a key wins, so the PEFT
# ``.lora_A.default.weight`` beats ``.weight`` forms and the old processor ``to_q_lora.down.weight`` is told apart
# from diffusers' ``proj_in.lora.down.weight`` by the character before "lora".
SUFFIXES: dict[str, str] = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    "_lora.down.weight": "down", "_lora.up.weight": "up",
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
    ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.default": "magnitude",
    ".alpha": "alpha", ".dora_scale": "dora_scale", ".diff": "diff", ".diff_b": "diff_b",
    ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a", ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1", ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2", ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b", ".lokr_t2": "lokr_t2",
}
_BY_LENGTH = sorted(SUFFIXES, key=len, reverse=True)

# Component prefixes: "te1" is the first text encoder (CLIP-L in SDXL, the only one elsewhere), "te2" the second.
_PREFIXES = (
    ("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te1"),
    ("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te1"),
    ("model.diffusion_model.", "unet"), ("diffusion_model.", "unet"),
)
# Old diffusers attention-processor files name UNet layers without a prefix.
_BARE_UNET = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.")
BUNDLED_EMBEDDING = "bundle_emb."


@dataclass(frozen=True)
class LoraKey:
    """One file key, split: the component it addresses, the layer path in flat (kohya) form, the tensor role."""

    component: str  # "unet", "te1" or "te2"
    path: str  # e.g. "down_blocks_0_attentions_0_proj_in" or "input_blocks_4_1_proj_in"
    role: str  # "down", "up", "alpha", "hada_w1_a", … (the values of SUFFIXES)
    dotted: str  # the layer path as the file writes it, without component prefix (PEFT alpha patterns use it)


def parse_key(key: str) -> LoraKey | None:
    """Split a file key, or None when it is not a LoRA-family layer tensor of a known layout."""
    suffix = next((s for s in _BY_LENGTH if key.endswith(s)), None)
    if suffix is None:
        return None
    name = key[: -len(suffix)]
    component = None
    for prefix, comp in _PREFIXES:
        if name.startswith(prefix):
            component, name = comp, name[len(prefix):]
            break
    name = name.removeprefix("base_model.model.")  # raw PEFT state dicts
    if component is None:
        if not name.startswith(_BARE_UNET):
            return None
        component = "unet"
    if suffix.startswith("_lora"):
        name = _old_processor_name(name, component)
    return LoraKey(component, name.replace(".", "_"), SUFFIXES[suffix], name)


def _old_processor_name(name: str, component: str) -> str:
    """diffusers' attention-processor LoRAs (``attn1.processor.to_out_lora``) → the layer path they modify."""
    head, _, proj = name.rpartition(".")
    if component == "unet":
        return head.removesuffix(".processor") + (".to_out.0" if proj == "to_out" else f".{proj}")
    return f"{head}.{proj.removeprefix('to_')}_proj"  # text encoder: self_attn.to_q → self_attn.q_proj


@dataclass(frozen=True, eq=False)
class Target:
    """A weight a LoRA layer changes: ``module.<weight>`` (rows ``rows`` of it, for open_clip's stacked q;k;v)."""

    component: str
    path: str
    module: nn.Module
    weight: str = "weight"
    bias: str | None = "bias"
    rows: tuple[int, int] | None = None
    pads_inpaint_input: bool = False  # the 9-channel conv_in of an inpainting UNet (A1111 zero-pads 4-channel deltas)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(stored_parameter(self.module, self.weight).shape)
        return shape if self.rows is None else (self.rows[1] - self.rows[0],) + shape[1:]

    @property
    def bias_shape(self) -> tuple[int, ...] | None:
        bias = None if self.bias is None else stored_parameter(self.module, self.bias)
        if bias is None:
            return None
        return tuple(bias.shape) if self.rows is None else (self.rows[1] - self.rows[0],)

    def __str__(self) -> str:
        rows = "" if self.rows is None else f".{self.weight}[{self.rows[0]}:{self.rows[1]}]"
        return f"{self.component}:{self.path}{rows}"


def stored_parameter(module: nn.Module, name: str) -> nn.Parameter | None:
    """The parameter itself, also while a parametrization (LoRA injection) computes what ``module.<name>`` gives."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name, None)


def _layer_index(root: nn.Module, component: str) -> dict[str, Target]:
    """Every Linear/Conv2d under ``root`` by its flat name (the dotted path with "." → "_")."""
    return {path.replace(".", "_"): Target(component, path, module)
            for path, module in root.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))}


Rule = tuple[re.Pattern, Callable[[re.Match], str | None]]


class _UNetNames:
    """Flat names of a UNet's layers; diffusers names are rewritten to original ones (docs/formats.md §3.5)."""

    _RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
               "conv_shortcut": "skip_connection"}

    def __init__(self, unet: nn.Module):
        self.index = _layer_index(unet, "unet")
        if unet.config.in_channels == 9 and "input_blocks_0_0" in self.index:
            t = self.index["input_blocks_0_0"]
            self.index["input_blocks_0_0"] = Target(t.component, t.path, t.module, pads_inpaint_input=True)
        counts = unet.config.num_res_blocks
        # First input block of each level (after conv_in) and first output block of each diffusers up block.
        self.down_start = [1 + sum(n + 1 for n in counts[:i]) for i in range(len(counts))]
        ups = list(reversed(counts))
        self.up_start = [sum(n + 1 for n in ups[:i]) for i in range(len(ups))]
        self.counts, self.up_counts = counts, ups
        self.output_blocks = unet.output_blocks
        middle = list(unet.middle_block)
        self.mid_resnets = [i for i, m in enumerate(middle) if isinstance(m, ResBlock)]
        self.mid_attention = next((i for i, m in enumerate(middle) if isinstance(m, SpatialTransformer)), None)
        self.rules: list[Rule] = [(re.compile(p), f) for p, f in (
            (r"conv_in", lambda m: "input_blocks_0_0"),
            (r"conv_out", lambda m: "out_2"),
            (r"time_embedding_linear_([12])", lambda m: f"time_embed_{2 * int(m[1]) - 2}"),
            (r"add_embedding_linear_([12])", lambda m: f"label_emb_0_{2 * int(m[1]) - 2}"),
            (r"down_blocks_(\d+)_(resnets|attentions)_(\d+)_(.+)", self._down),
            (r"down_blocks_(\d+)_downsamplers_0_conv", self._downsampler),
            (r"mid_block_resnets_(\d+)_(.+)", self._mid_resnet),
            (r"mid_block_attentions_0_(.+)", self._mid_attention),
            (r"up_blocks_(\d+)_(resnets|attentions)_(\d+)_(.+)", self._up),
            (r"up_blocks_(\d+)_upsamplers_0_conv", self._upsampler),
        )]

    def _inner(self, kind: str, rest: str) -> str | None:
        if kind == "attentions":
            return f"1_{rest}"
        return f"0_{self._RESNET[rest]}" if rest in self._RESNET else None

    def _down(self, m: re.Match) -> str | None:
        level, j = int(m[1]), int(m[3])
        if level >= len(self.counts) or j >= self.counts[level] or (inner := self._inner(m[2], m[4])) is None:
            return None
        return f"input_blocks_{self.down_start[level] + j}_{inner}"

    def _downsampler(self, m: re.Match) -> str | None:
        level = int(m[1])
        if level >= len(self.counts) - 1:
            return None
        return f"input_blocks_{self.down_start[level] + self.counts[level]}_0_op"

    def _up(self, m: re.Match) -> str | None:
        level, j = int(m[1]), int(m[3])
        if level >= len(self.up_counts) or j > self.up_counts[level] or (inner := self._inner(m[2], m[4])) is None:
            return None
        return f"output_blocks_{self.up_start[level] + j}_{inner}"

    def _upsampler(self, m: re.Match) -> str | None:
        level = int(m[1])
        if level >= len(self.up_counts) - 1:
            return None
        block = self.up_start[level] + self.up_counts[level]
        # The upsampler is the last layer of its block: index 1 after a res block alone, 2 after a transformer.
        position = next(i for i, layer in enumerate(self.output_blocks[block]) if isinstance(layer, Upsample))
        return f"output_blocks_{block}_{position}_conv"

    def _mid_resnet(self, m: re.Match) -> str | None:
        j = int(m[1])
        if j >= len(self.mid_resnets) or m[2] not in self._RESNET:
            return None
        return f"middle_block_{self.mid_resnets[j]}_{self._RESNET[m[2]]}"

    def _mid_attention(self, m: re.Match) -> str | None:
        return None if self.mid_attention is None else f"middle_block_{self.mid_attention}_{m[1]}"

    def resolve(self, path: str) -> Target | None:
        if path in self.index:
            return self.index[path]
        for pattern, rewrite in self.rules:
            if (m := pattern.fullmatch(path)) is not None:
                name = rewrite(m)
                return None if name is None else self.index.get(name)
        return None


class _TextEncoderNames:
    """Flat names of a text encoder's layers; HF CLIP names also address open_clip towers."""

    _OPENCLIP = {"self_attn_out_proj": "attn_out_proj", "mlp_fc1": "mlp_c_fc", "mlp_fc2": "mlp_c_proj"}
    _HF_LAYER = re.compile(r"text_model_encoder_layers_(\d+)_(.+)")

    def __init__(self, encoder: nn.Module, component: str):
        self.component = component
        self.index = _layer_index(encoder, component)
        self.openclip = encoder.config.layout == "openclip"
        self.blocks = encoder.transformer.resblocks if self.openclip else None

    def resolve(self, path: str) -> Target | None:
        if path.startswith("encoder_layers_"):  # transformers 5 dropped the text_model level
            path = "text_model_" + path
        if path in self.index or not self.openclip:
            return self.index.get(path)
        m = self._HF_LAYER.fullmatch(path)
        if m is None or int(m[1]) >= len(self.blocks):
            return None
        n, rest = int(m[1]), m[2]
        if rest in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj"):
            attn = self.blocks[n].attn
            width = attn.in_proj_weight.shape[1]
            third = "qkv".index(rest[len("self_attn_")])
            return Target(self.component, f"transformer.resblocks.{n}.attn", attn, "in_proj_weight", "in_proj_bias",
                          (third * width, (third + 1) * width))
        return self.index.get(f"transformer_resblocks_{n}_{self._OPENCLIP[rest]}") if rest in self._OPENCLIP else None


class KeyMap:
    """Resolves the layers a LoRA file names to the modules of one loaded model."""

    def __init__(self, unet: nn.Module, text_encoders: Sequence[nn.Module]):
        self._unet = _UNetNames(unet)
        self._text = [_TextEncoderNames(te, f"te{i + 1}") for i, te in enumerate(text_encoders)]

    def resolve(self, component: str, path: str) -> Target | None:
        if component == "unet":
            return self._unet.resolve(path)
        index = int(component[2:]) - 1
        return self._text[index].resolve(path) if index < len(self._text) else None


# --- which family a LoRA was made for, asked only when it does not fit the model -----------------------------------

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl-refiner": "SDXL refiner"}
# Cross-attention context width of the released models: what attn2.to_k / to_v of a UNet LoRA take in.
_CONTEXT_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}
_METADATA_FAMILIES = (  # kohya's ss_base_model_version and the modelspec architecture, by substring
    ("xl-v1-refiner", "sdxl-refiner"), ("sdxl", "sdxl"), ("stable-diffusion-xl", "sdxl"), ("sd_v2", "sd2"),
    ("stable-diffusion-v2", "sd2"), ("sd_v1", "sd1"), ("stable-diffusion-v1", "sd1"),
)


@dataclass(frozen=True)
class FamilyGuess:
    families: frozenset[str]  # the families the evidence allows (a name outside FAMILY_NAMES: another model kind)
    reason: str

    def describe(self) -> str:
        return " or ".join(FAMILY_NAMES.get(f, f) for f in sorted(self.families))


def guess_family(keys: Iterable[str], shapes: Mapping[str, Sequence[int]],
                 metadata: Mapping[str, str]) -> FamilyGuess | None:
    """The model family a LoRA file was made for, from its metadata, key names or tensor widths; None if unclear."""
    for field in ("ss_base_model_version", "modelspec.architecture"):
        value = metadata.get(field, "")
        if value:
            family = next((f for pattern, f in _METADATA_FAMILIES if pattern in value), value)
            return FamilyGuess(frozenset([family]), f"its metadata says {field}={value}")
    if metadata.get("ss_v2") == "True":
        return FamilyGuess(frozenset(["sd2"]), "its metadata says ss_v2=True")
    keys = list(keys)
    if (key := next((k for k in keys if k.startswith(("lora_te2_", "text_encoder_2."))), None)) is not None:
        return FamilyGuess(frozenset(["sdxl"]), f"it has a second text encoder ({key})")
    for key in keys:
        parsed = parse_key(key)
        if parsed is not None and parsed.role == "down" and re.search(r"attn2_to_[kv]$", parsed.path):
            width = shapes[key][1]
            if width in _CONTEXT_WIDTHS:
                return FamilyGuess(frozenset([_CONTEXT_WIDTHS[width]]),
                                   f"its cross-attention takes a {width}-wide text context ({key})")
    if any(k.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_")) for k in keys):
        return FamilyGuess(frozenset(["sdxl", "sdxl-refiner"]),
                           "kohya names its UNet layers the SDXL way (input_blocks_…)")
    if any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_transformer_")) for k in keys):
        return FamilyGuess(frozenset(["a transformer model (Flux, SD3)"]), "its layers are transformer blocks")
    if any(k.startswith("lora_te_") for k in keys):
        return FamilyGuess(frozenset(["sd1", "sd2"]), "kohya writes one text encoder (lora_te_…)")
    return None
