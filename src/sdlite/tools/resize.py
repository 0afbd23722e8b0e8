"""Changing LoRA files: a lower rank by SVD (kohya's ``resize_lora.py``), several LoRAs merged into one (kohya's
``merge_lora.py``, by concatenated ranks or by SVD) — docs/formats.md §13.

A layer's ΔW is rebuilt from its factors (``adapters.lora_formats``), factored again (``tools.svd``) and written as a
kohya LoRA layer. Resizing keeps each layer's scale alpha/rank (new alpha = scale · new rank), as kohya does; merged
layers carry their weights and scales in ``up`` and get alpha = rank (scale 1). Concatenation is exact:
Σ wᵢ·sᵢ·upᵢ·downᵢ = [w₁s₁up₁ | w₂s₂up₂ | …] · [down₁; down₂; …]. Layer names are kept as the files write them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from ..adapters.lora import LoraFile, read_lora
from ..adapters.lora_formats import LayerUpdate
from ..adapters.lora_keys import FAMILY_NAMES, guess_family
from ..checkpoint.write import check_output, save_safetensors
from .common import Progress, ToolError, dtype_of, with_progress, written
from .extract import LoraWritten
from .svd import decompose, parse_dynamic

_PREFIXES = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}


def _name(lora: LoraFile, layer: LayerUpdate, component: str, path: str) -> str:
    """The layer's kohya name: as the file writes it, or built from its component and flat path."""
    key = next(iter(layer.keys.values()))
    if key.startswith("lora_"):
        for suffix in (".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".alpha"):
            if key.endswith(suffix):
                return key[: -len(suffix)]
    one_encoder = not any(c == "te2" for c, _ in lora.layers)
    return ("lora_te_" if component == "te1" and one_encoder else _PREFIXES[component]) + path


def _weight_shape(layer: LayerUpdate, where: Path) -> tuple[int, ...]:
    """The shape of the weight a LoRA/LoCon layer changes, from its factors."""
    if layer.algorithm != "lora" or layer.dora or layer.problem():
        kind = layer.algorithm + ("+dora" if layer.dora else "")
        raise ToolError(where, f"layer {layer.name!r} is {kind}: only LoRA/LoCon layers (lora_up/lora_down) can be "
                               "resized or merged")
    down = layer.tensors["down"]
    kernel = tuple(layer.tensors["mid"].shape[2:]) if "mid" in layer.tensors else tuple(down.shape[2:])
    return (layer.tensors["up"].shape[0], down.shape[1]) + kernel


def _family(lora: LoraFile) -> str | None:
    guess = guess_family(lora.shapes, lora.shapes, lora.metadata)
    return next(iter(guess.families)) if guess is not None and len(guess.families) == 1 else None


def resize_lora(path: str | os.PathLike, *, output: str | os.PathLike, rank: int,
                dynamic: str | tuple[str, float] | None = None, dtype: str | torch.dtype | None = None,
                progress: Progress | None = None) -> LoraWritten:
    """``path``'s LoRA/LoCon layers at rank ≤ ``rank`` (or a dynamic rank capped at it), written to ``output``."""
    method = parse_dynamic(dynamic) if isinstance(dynamic, str) else dynamic
    check_output(output, [path])
    lora = read_lora(path)
    tensors, report = {}, {}
    for (component, flat), layer in with_progress(lora.layers.items(), len(lora.layers), progress):
        shape = _weight_shape(layer, lora.path)
        f = decompose(layer.matrix().reshape(shape), min(rank, layer.rank), method)
        out_dtype = dtype_of(dtype) or layer.tensors["down"].dtype
        name = _name(lora, layer, component, flat)
        tensors |= {f"{name}.lora_up.weight": f.up.to(out_dtype), f"{name}.lora_down.weight": f.down.to(out_dtype),
                    f"{name}.alpha": torch.tensor(layer.scale * f.rank)}
        report[name] = (f.rank, f.kept)
    metadata = dict(lora.metadata) | {"ss_network_dim": "Dynamic" if method else str(rank),
                                      "ss_network_alpha": "Dynamic", "ss_output_name": Path(output).stem}
    metadata = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}  # hashes of the old file
    save_safetensors(output, tensors, metadata, inputs=[path])
    result = written(output, len(tensors), [])
    return LoraWritten(result.path, result.tensors, result.notes, result.sha256, report)


def merge_loras(loras: Sequence[tuple], *, output: str | os.PathLike, rank: int | None = None,
                dynamic: str | tuple[str, float] | None = None, dtype: str | torch.dtype | None = None,
                progress: Progress | None = None) -> LoraWritten:
    """One LoRA holding Σ weight·ΔW of ``loras`` ((path, weight) pairs): ranks concatenated (exact) when ``rank``
    is None, else factored again by SVD at ``rank`` (or a dynamic rank capped at it)."""
    method = parse_dynamic(dynamic) if isinstance(dynamic, str) else dynamic
    paths = [Path(p) for p, _ in loras]
    check_output(output, paths)
    files = [(read_lora(p), float(w)) for p, w in loras]
    families = {lora.path.name: f for lora, _ in files if (f := _family(lora)) is not None}
    if len(set(families.values())) > 1:
        raise ToolError(None, "the LoRAs are for different models: "
                              + ", ".join(f"{n} is for {FAMILY_NAMES.get(f, f)}" for n, f in families.items()))
    layers: dict[tuple[str, str], list] = {}
    for lora, weight in files:
        for where, layer in lora.layers.items():
            shape = _weight_shape(layer, lora.path)
            parts = layers.setdefault(where, [])
            if parts and parts[0][2] != shape:
                raise ToolError(lora.path, f"layer {layer.name!r} changes a weight of shape {list(shape)}, "
                                           f"{parts[0][0].path.name} has it as {list(parts[0][2])}")
            parts.append((lora, layer, shape, weight))
    tensors, report = {}, {}
    for (component, flat), parts in with_progress(layers.items(), len(layers), progress):
        lora, layer, shape, _ = parts[0]
        name = _name(lora, layer, component, flat)
        out_dtype = dtype_of(dtype) or layer.tensors["down"].dtype
        if rank is None:
            if any("mid" in p[1].tensors for p in parts):
                raise ToolError(lora.path, f"layer {layer.name!r} has a Tucker core (lora_mid): merge it with a rank")
            up = torch.cat([w * l.scale * l.tensors["up"].float() for _, l, _, w in parts], dim=1)
            down = torch.cat([l.tensors["down"].float() for _, l, _, _ in parts], dim=0)
            kept = 1.0
        else:
            delta = sum(w * l.scale * l.matrix() for _, l, _, w in parts).reshape(shape)
            f = decompose(delta, rank, method)
            up, down, kept = f.up, f.down, f.kept
        tensors |= {f"{name}.lora_up.weight": up.to(out_dtype), f"{name}.lora_down.weight": down.to(out_dtype),
                    f"{name}.alpha": torch.tensor(float(down.shape[0]))}
        report[name] = (down.shape[0], kept)
    ranks = {r for r, _ in report.values()}
    metadata = {"ss_network_module": "networks.lora", "ss_output_name": Path(output).stem,
                "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
                "ss_network_alpha": "Dynamic",
                "sdlite_merged_loras": ", ".join(f"{p.name}:{w}" for p, (_, w) in zip(paths, files))}
    for field in ("ss_base_model_version", "ss_v2", "modelspec.architecture"):
        if field in files[0][0].metadata:
            metadata[field] = files[0][0].metadata[field]
    save_safetensors(output, tensors, metadata, inputs=paths)
    result = written(output, len(tensors), [f"{len(layers)} layers from {len(files)} files"])
    return LoraWritten(result.path, result.tensors, result.notes, result.sha256, report)
