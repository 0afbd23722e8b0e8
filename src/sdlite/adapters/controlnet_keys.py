"""The diffusers layout of a ControlNet (``ControlNetModel`` state dict, as diffusers-format single files such as
diffusers_xl_canny_full.safetensors hold it) renamed to the original cldm.py layout, by rules rather than a table:
ControlNet of Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"."""

from __future__ import annotations

import re
from typing import Iterable

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    layer, _, param = rest.partition(".")
    return f"{_RESNET.get(layer, layer)}.{param}"


def from_diffusers(keys: Iterable[str]) -> dict[str, str]:
    """Original-layout name → file key for the keys of a diffusers ``ControlNetModel`` state dict.

    diffusers numbers res blocks and downsamplers per level (``down_blocks.L.resnets.j``, ``…downsamplers.0``) where
    the original numbers all input blocks in one sequence (each level's res blocks, then its downsampler); inside
    the transformers the names are the same in both. Keys no rule knows keep their name, so loading reports them.
    """
    keys = list(keys)
    resnets: dict[int, int] = {}
    for key in keys:
        if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.", key):
            resnets[int(m[1])] = max(resnets.get(int(m[1]), 0), int(m[2]) + 1)
    first, index = {}, 1  # input block number of each level's first res block
    for level in sorted(resnets):
        first[level] = index
        index += resnets[level] + 1
    middle_step = 2 if any(k.startswith("mid_block.attentions.") for k in keys) else 1
    hint_blocks = len({m[1] for m in map(re.compile(r"controlnet_cond_embedding\.blocks\.(\d+)\.").match, keys) if m})
    rules = [
        (r"time_embedding\.linear_([12])\.(.+)", lambda m: f"time_embed.{2 * int(m[1]) - 2}.{m[2]}"),
        (r"add_embedding\.linear_([12])\.(.+)", lambda m: f"label_emb.0.{2 * int(m[1]) - 2}.{m[2]}"),
        (r"conv_in\.(.+)", lambda m: f"input_blocks.0.0.{m[1]}"),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"input_blocks.{first[int(m[1])] + int(m[2])}.0.{_resnet(m[3])}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda m: f"input_blocks.{first[int(m[1])] + int(m[2])}.1.{m[3]}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
         lambda m: f"input_blocks.{first[int(m[1])] + resnets[int(m[1])]}.0.op.{m[2]}"),
        (r"mid_block\.resnets\.(\d+)\.(.+)", lambda m: f"middle_block.{int(m[1]) * middle_step}.{_resnet(m[2])}"),
        (r"mid_block\.attentions\.0\.(.+)", lambda m: f"middle_block.1.{m[1]}"),
        (r"controlnet_cond_embedding\.conv_in\.(.+)", lambda m: f"input_hint_block.0.{m[1]}"),
        (r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", lambda m: f"input_hint_block.{2 * int(m[1]) + 2}.{m[2]}"),
        (r"controlnet_cond_embedding\.conv_out\.(.+)", lambda m: f"input_hint_block.{2 * hint_blocks + 2}.{m[1]}"),
        (r"controlnet_down_blocks\.(\d+)\.(.+)", lambda m: f"zero_convs.{m[1]}.0.{m[2]}"),
        (r"controlnet_mid_block\.(.+)", lambda m: f"middle_block_out.0.{m[1]}"),
    ]

    def rename(key: str) -> str:
        for pattern, rule in rules:
            if m := re.fullmatch(pattern, key):
                try:
                    return rule(m)
                except KeyError:  # a level without res blocks: leave the key for the strict check to report
                    return key
        return key

    return {rename(k): k for k in keys}
