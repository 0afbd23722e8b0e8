"""The layers a kohya-style LoRA trains, under the names kohya's ``networks/lora.py`` gives them (docs/formats.md
"Training").

kohya names a layer ``lora_unet_<path>`` / ``lora_te_<path>`` (SDXL: ``lora_te1_`` CLIP-L, ``lora_te2_`` bigG) with
the dots of the path written as "_". The path is the module path in the model kohya trains: diffusers' UNet for SD
1.x/2.x, the original (sgm) UNet for SDXL, Hugging Face CLIP for every text encoder (open_clip towers included: their
stacked q;k;v is named as three projections). Targets: the Linear and 1x1 Conv2d layers of the UNet's transformer
blocks (proj_in, proj_out, attn1/attn2 to_q/k/v/out, ff), the attention and MLP linears of the text encoders, and
with LoCon the layers of the res blocks, downsamplers and upsamplers (3x3 convs at the conv rank).

sdlite modules carry the original names, so the names are found with the one mapping the LoRA reader uses
(``sdlite.adapters.lora_keys.KeyMap``), in the other direction: every name the convention can produce for the
model's block structure is resolved by the reader, and a layer gets the name that resolves to it. A name is thus
exactly what sdlite reads back, and any layer the reader cannot name is reported rather than saved under a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..adapters.lora_keys import KeyMap, Target
from ..unet.blocks import Downsample, ResBlock, SpatialTransformer, Upsample

# diffusers' names of a res block's layers and of a sampler's convolution (kohya's SD1/SD2 LoCon names).
_RESNET_LAYERS = ("conv1", "conv2", "time_emb_proj", "conv_shortcut")
_SAMPLER_LAYER = "conv"
# Hugging Face CLIP's names of the layers kohya adapts in each encoder layer.
_TEXT_LAYERS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


@dataclass(frozen=True)
class LoraTarget:
    name: str  # kohya's layer name, e.g. "lora_unet_down_blocks_0_attentions_0_proj_in"
    target: Target  # the sdlite module (and rows of its weight) it changes
    conv3x3: bool  # a 3x3 convolution (trained at the conv rank)


def _diffusers_unet_names(unet: nn.Module, keymap: KeyMap) -> dict[int, str]:
    """id(module) → its diffusers flat path, for every layer of the SD1/SD2 UNet's blocks."""
    counts = list(unet.config.num_res_blocks)
    blocks: list[tuple[str, str]] = []  # (diffusers block path, kind)
    for level, n in enumerate(counts):
        blocks += [(f"down_blocks_{level}_{kind}_{j}", kind) for j in range(n) for kind in ("attentions", "resnets")]
        blocks.append((f"down_blocks_{level}_downsamplers_0", "sampler"))
    blocks += [("mid_block_attentions_0", "attentions")] + [(f"mid_block_resnets_{j}", "resnets") for j in range(2)]
    for level, n in enumerate(reversed(counts)):
        blocks += [(f"up_blocks_{level}_{kind}_{j}", kind) for j in range(n + 1) for kind in ("attentions", "resnets")]
        blocks.append((f"up_blocks_{level}_upsamplers_0", "sampler"))
    owner = {id(m): name for name, m in unet.named_modules()}
    names: dict[int, str] = {}
    for block, kind in blocks:
        if kind == "attentions":
            probe = keymap.resolve("unet", f"{block}_proj_in")
            if probe is None:
                continue
            transformer = unet.get_submodule(owner[id(probe.module)].rpartition(".")[0])
            for rest, layer in transformer.named_modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    names[id(layer)] = f"{block}_{rest.replace('.', '_')}"
        else:
            for layer_name in (_RESNET_LAYERS if kind == "resnets" else (_SAMPLER_LAYER,)):
                found = keymap.resolve("unet", f"{block}_{layer_name}")
                if found is not None:
                    names[id(found.module)] = f"{block}_{layer_name}"
    return names


def _unet_layers(unet: nn.Module, conv: bool):
    """(original path, module, 3x3?) of the UNet layers a LoRA (LoCon with ``conv``) trains, in module order."""
    inside = []
    for path, block in unet.named_modules():
        if isinstance(block, SpatialTransformer) or (conv and isinstance(block, (ResBlock, Downsample, Upsample))):
            inside.append((path, block))
    for path, block in inside:
        for rest, layer in block.named_modules():
            if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                continue
            is_3x3 = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
            if is_3x3 and not conv:
                continue
            yield f"{path}.{rest}", layer, is_3x3


def lora_targets(pipe, *, unet: bool = True, text_encoder: bool = False, conv: bool = False) -> list[LoraTarget]:
    """The layers of ``pipe`` a kohya LoRA trains, with their kohya names (UNet first, then each text encoder)."""
    keymap = KeyMap(pipe.unet, pipe.text_encoders)
    sgm = pipe.family.startswith("sdxl")
    out: list[LoraTarget] = []
    if unet:
        diffusers = {} if sgm else _diffusers_unet_names(pipe.unet, keymap)
        for path, layer, is_3x3 in _unet_layers(pipe.unet, conv):
            flat = path.replace(".", "_") if sgm else diffusers.get(id(layer))
            found = None if flat is None else keymap.resolve("unet", flat)
            if found is None or found.module is not layer:
                raise RuntimeError(f"no kohya name reads back as UNet layer {path} (a gap in the key mapping)")
            out.append(LoraTarget(f"lora_unet_{flat}", found, is_3x3))
    if text_encoder:
        single = len(pipe.text_encoders) == 1
        for index, encoder in enumerate(pipe.text_encoders):
            component = f"te{index + 1}"
            prefix = "lora_te_" if single else f"lora_{component}_"
            for n in range(encoder.config.layers):
                for layer_name in _TEXT_LAYERS:
                    flat = f"text_model_encoder_layers_{n}_{layer_name}"
                    found = keymap.resolve(component, flat)
                    if found is None:
                        raise RuntimeError(f"no kohya name reads back as {component} layer {n} {layer_name}")
                    out.append(LoraTarget(prefix + flat, found, False))
    return out
