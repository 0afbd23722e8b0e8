"""Merging checkpoints the way AUTOMATIC1111's Checkpoint Merger does, one tensor at a time (docs/formats.md,
Checkpoint tools).

* "Weighted sum": A·(1−M) + B·M.  "Add difference": A + (B−C)·M.  "No interpolation": A alone (to bake LoRAs in
  or change the dtype).
* As A1111: only keys containing "model" are merged; keys only in A are kept, keys only in B dropped; in add
  difference a key of B missing from C contributes nothing. An inpainting (9-channel) or instruct-pix2pix
  (8-channel) A merged with an ordinary B merges the first 4 input channels of the UNet's first convolution and
  keeps the rest from A; the other way round is refused. sdlite also leaves CLIP's ``position_ids`` (an index
  table) as A has them.
* Per-block weights (``blocks``) replace M block by block (``tools.blocks``); ``base_multiplier`` is M for the keys
  outside the UNet.
* LoRAs are merged into the result at their weights, through sdlite's LoRA code (``adapters.lora``).
* The file carries A1111's ``sd_merge_recipe`` and ``sd_merge_models`` metadata.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch

from ..adapters.lora import lora_hash, match_lora
from ..checkpoint import identify, open_tensor_file
from ..checkpoint.load import plan_components
from ..checkpoint.files import SafetensorsFile, TensorFile
from ..checkpoint.write import check_output, stream_safetensors
from ..errors import CheckpointError
from ..infotext import model_hash, old_model_hash
from .blocks import UNET, block_count, block_of, parse_blocks
from .common import Progress, ToolError, Written, dtype_of, listing, with_progress, written

MODES = {"weighted-sum": "Weighted sum", "add-difference": "Add difference", "no-interpolation": "No interpolation"}
FIRST_CONV = UNET + "input_blocks.0.0.weight"


def merges(key: str) -> bool:
    """Whether A1111's merger combines this key (sdlite also keeps every ``position_ids`` table from A)."""
    return "model" in key and not key.endswith("position_ids")


def family_of(tf: TensorFile) -> str:
    try:
        return identify(tf).family
    except CheckpointError as e:
        raise ToolError(tf.path, f"cannot be merged: {e.detail}") from None


def _check_shapes(fa: TensorFile, fb: TensorFile, fc: TensorFile | None) -> list[str]:
    """Refuse shape mismatches before anything is written; return notes about inpainting merges."""
    notes = []
    for key in fa.keys():
        if not merges(key) or key not in fb:
            continue
        a, b = fa.shapes[key], fb.shapes[key]
        if fc is not None and key in fc and fc.shapes[key] != b:
            raise ToolError(fc.path, f"tensor {key!r} has shape {list(fc.shapes[key])}, B ({fb.path}) has "
                                     f"{list(b)}: B − C needs equal shapes")
        if a == b:
            continue
        if len(a) == len(b) == 4 and a[0] == b[0] and a[2:] == b[2:] and a[1] in (8, 9) and b[1] == 4:
            kind = "inpainting" if a[1] == 9 else "instruct-pix2pix"
            notes.append(f"A is an {kind} model: only the first 4 input channels of {key} are merged")
            continue
        hint = (" (an inpainting/instruct-pix2pix model must be A, the ordinary model B)"
                if len(a) == len(b) == 4 and a[1] == 4 and b[1] in (8, 9) else "")
        raise ToolError(fb.path, f"tensor {key!r} has shape {list(b)}, A ({fa.path}) has {list(a)}{hint}")
    return notes


def _lora_changes(fa: TensorFile, loras: Sequence[tuple]) -> tuple[dict[str, list], list[str]]:
    """File key of A → the LoRA layers changing it, (layer, target, is_bias, multiplier); and report lines."""
    p = plan_components(fa)
    unet, encoders = p.plans[0].module, [plan.module for plan in p.plans[2:]]
    sources = {"unet": p.plans[0].sources} | {f"te{i + 1}": plan.sources for i, plan in enumerate(p.plans[2:])}
    changes: dict[str, list] = defaultdict(list)
    notes = []
    for path, weight, te_weight in loras:
        lora, plan, report = match_lora(unet, encoders, path, family=p.found.family)
        for layer, target in plan:
            m = weight if target.component == "unet" else (weight if te_weight is None else te_weight)
            source = sources[target.component]
            changes[source[f"{target.path}.{target.weight}"]].append((layer, target, False, m))
            if "diff_b" in layer.tensors:
                changes[source[f"{target.path}.{target.bias}"]].append((layer, target, True, m))
        notes.append(f"LoRA {lora.path.name} at {weight}: {report}")
    return changes, notes


def _apply_loras(value: torch.Tensor, changes: list) -> torch.Tensor:
    for layer, target, is_bias, m in changes:
        rows = slice(*target.rows) if target.rows else slice(None)
        if is_bias:
            value[rows] = value[rows] + m * layer.tensors["diff_b"].to(value)
        else:
            value[rows] = layer.update(value[rows], m, target.pads_inpaint_input)
    return value


def _recipe(paths: list[Path | None], files: list[TensorFile | None], recipe: dict) -> dict[str, str]:
    """A1111's merge metadata: the recipe with the inputs' sha256, and every input's own recipe by sha256."""
    models: dict = {}
    hashes = []
    for path, tf in zip(paths, files):
        if path is None:
            hashes.append(None)
            continue
        sha = model_hash(path, full=True)
        hashes.append(sha)
        own = tf.metadata.get("sd_merge_recipe")
        models[sha] = {"name": path.name, "legacy_hash": old_model_hash(path),
                       "sd_merge_recipe": json.loads(own) if own else None}
        models.update(json.loads(tf.metadata.get("sd_merge_models", "{}")))
    recipe = {"type": "sdlite", "primary_model_hash": hashes[0], "secondary_model_hash": hashes[1],
              "tertiary_model_hash": hashes[2]} | recipe
    return {"sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(models)}


def merge_checkpoints(a: str | os.PathLike, b: str | os.PathLike | None = None, c: str | os.PathLike | None = None, *,
                      output: str | os.PathLike, mode: str = "weighted-sum", multiplier: float = 0.5,
                      blocks: Sequence[float] | str | None = None, base_multiplier: float | None = None,
                      loras: Sequence[tuple] = (), dtype: str | torch.dtype | None = None, metadata: bool = True,
                      progress: Progress | None = None) -> Written:
    """Merge checkpoints A, B (and C) into ``output`` (.safetensors), reading and writing one tensor at a time.

    ``loras``: (path, weight) or (path, weight, te_weight) to merge into the result. ``dtype`` ("fp16", "bf16",
    "fp32") converts every floating-point tensor of the result; by default each keeps A's dtype.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, not {mode!r}")
    needed = {"weighted-sum": 2, "add-difference": 3, "no-interpolation": 1}[mode]
    given = [Path(p) for p in (a, b, c) if p is not None]
    if len(given) != needed:
        raise ValueError(f"{mode} takes {needed} checkpoint(s), got {len(given)}")
    out_dtype = dtype_of(dtype)
    loras = [tuple(x) + (None,) * (3 - len(x)) for x in loras]
    check_output(output, given + [Path(x[0]) for x in loras])
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open_tensor_file(p)) for p in given] + [None] * (3 - len(given))
        fa, fb, fc = files
        families = {tf.path: family_of(tf) for tf in files[:len(given)]}
        if len(set(families.values())) > 1:
            raise ToolError(None, "the models are of different families: "
                                  + ", ".join(f"{p} is {f}" for p, f in families.items()))
        notes = _check_shapes(fa, fb, fc) if fb is not None else []
        count = block_count(fa.keys())
        weights, base = parse_blocks(blocks, count) if blocks is not None else (None, None)
        base = base_multiplier if base_multiplier is not None else base
        changes, lora_notes = _lora_changes(fa, loras) if loras else ({}, [])

        def factor(key: str) -> float:
            block = block_of(key, count)
            if block == "BASE":
                return multiplier if base is None else base
            return multiplier if weights is None else weights[block]

        if fb is not None:
            only_a = [k for k in fa.keys() if merges(k) and k not in fb]
            only_b = [k for k in fb.keys() if k not in fa]
            notes += [f"{len(only_a)} keys only in A, kept: {listing(only_a)}"] if only_a else []
            notes += [f"{len(only_b)} keys only in B, dropped: {listing(only_b)}"] if only_b else []
        if fc is not None:
            no_c = [k for k in fa.keys() if merges(k) and k in fb and k not in fc]
            notes += [f"{len(no_c)} keys of B missing in C, A kept: {listing(no_c)}"] if no_c else []

        def result_dtype(key: str) -> torch.dtype:
            own = fa.dtypes[key]
            return out_dtype if out_dtype is not None and own.is_floating_point else own

        def tensors():
            for key in fa.keys():
                value = fa.read(key)
                merged = fb is not None and value.is_floating_point() and merges(key) and key in fb
                if merged or key in changes:
                    value = value.to(torch.promote_types(value.dtype, torch.float32), copy=True)
                if merged and not (fc is not None and key not in fc):
                    m = factor(key)
                    other = fb.read(key, value.dtype)
                    if not isinstance(fb, SafetensorsFile):  # a pickle's tensors are the file's own: keep them
                        other = other.clone()
                    part = value[:, :4] if other.shape != value.shape else value
                    # In place, one float32 copy of B besides A's: the same operations as A + M·(B − C) and
                    # (1 − M)·A + M·B, so the same bits, with less memory at the largest tensors.
                    if fc is not None:
                        part.add_(other.sub_(fc.read(key, value.dtype)).mul_(m))
                    else:
                        part.mul_(1 - m).add_(other.mul_(m))
                if key in changes:
                    value = _apply_loras(value, changes[key])
                yield value.to(result_dtype(key))

        inpaint = fa.shapes.get(FIRST_CONV, (0, 0))[1]
        recipe = {"interp_method": MODES[mode], "multiplier": multiplier, "save_as_half": out_dtype == torch.float16,
                  "is_inpainting": inpaint == 9 and fb is not None, "is_instruct_pix2pix": inpaint == 8 and fb is not None,
                  "block_weights": weights, "base_multiplier": base,
                  "loras": [{"name": Path(p).name, "hash": lora_hash(p), "weight": w, "te_weight": t}
                            for p, w, t in loras]}
        meta = _recipe(given + [None] * (3 - len(given)), files, recipe) if metadata else None
        entries = [(k, fa.shapes[k], result_dtype(k)) for k in fa.keys()]
        stream_safetensors(output, entries, with_progress(tensors(), len(entries), progress), meta,
                           inputs=given + [Path(x[0]) for x in loras])
    return written(output, len(entries), notes + lora_notes)
