"""Block weights for merging ("MBW", merge block weighted): one multiplier per UNet block (docs/formats.md, Checkpoint
tools).

The names are those of the A1111 block-merge extensions (merge-block-weighted, supermerger): ``IN00``…, ``M00``,
``OUT00``… for the UNet's input blocks, middle block and output blocks, and ``BASE`` for every key outside the UNet
(text encoders, VAE). SD 1.x/2.x have 12 input and 12 output blocks (25 weights), SDXL 9 and 9 (19 weights); the
count is read from the file, so reduced models get their own. The time embedding (and SDXL's ``label_emb``) follows
``IN00`` and the final ``out.`` layers follow the last output block, as merge-block-weighted assigns them.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

UNET = "model.diffusion_model."
_BLOCK = re.compile(r"^model\.diffusion_model\.(input_blocks|middle_block|output_blocks)\.(\d+)\.")


def block_count(keys: Iterable[str]) -> int:
    """Number of input blocks (= output blocks) of the UNet whose keys these are."""
    found = [int(m[2]) for k in keys if (m := _BLOCK.match(k)) and m[1] == "input_blocks"]
    return max(found) + 1 if found else 0


def block_names(count: int) -> list[str]:
    """``IN00``…``IN{count-1}``, ``M00``, ``OUT00``…: the order in which weights are given."""
    return [f"IN{i:02d}" for i in range(count)] + ["M00"] + [f"OUT{i:02d}" for i in range(count)]


def block_of(key: str, count: int) -> str:
    """The block a checkpoint key belongs to, ``BASE`` for keys outside the UNet."""
    if not key.startswith(UNET):
        return "BASE"
    m = _BLOCK.match(key)
    if m is not None:
        part, index = m[1], int(m[2])
        return {"input_blocks": f"IN{index:02d}", "middle_block": "M00"}.get(part, f"OUT{index:02d}")
    rest = key[len(UNET):]
    if rest.startswith(("time_embed.", "label_emb.")):
        return "IN00"
    if rest.startswith("out."):
        return f"OUT{count - 1:02d}"
    return "BASE"


def parse_blocks(weights: Sequence[float] | str, count: int) -> tuple[dict[str, float], float | None]:
    """Per-block weights from a list (or a comma-separated string) of ``2·count+1`` values, or ``2·count+2`` with
    the BASE weight first as supermerger writes them. Returns (block → weight, BASE weight or None)."""
    if isinstance(weights, str):
        try:
            weights = [float(w) for w in weights.replace(" ", "").split(",") if w]
        except ValueError:
            raise ValueError(f"block weights must be numbers separated by commas, got {weights!r}") from None
    names = block_names(count)
    weights = [float(w) for w in weights]
    if len(weights) == len(names) + 1:
        return dict(zip(names, weights[1:])), weights[0]
    if len(weights) != len(names):
        raise ValueError(f"this UNet has {len(names)} blocks ({names[0]}…{names[count - 1]}, M00, OUT00…"
                         f"{names[-1]}): give {len(names)} block weights, or {len(names) + 1} with BASE first; "
                         f"got {len(weights)}")
    return dict(zip(names, weights)), None
