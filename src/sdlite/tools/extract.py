"""A LoRA from the difference between a fine-tuned checkpoint and its original, as kohya's
``extract_lora_from_models.py`` makes it (docs/formats.md §13).

The modules are those kohya's LoRA trains: every Linear and 1x1 convolution inside the UNet's transformer blocks and
the text encoders' attention and MLP layers (rank ``rank``); with ``conv_rank``, also the res blocks, down- and
upsamplers (LoCon: 3x3 convolutions at ``conv_rank``, their Linear/1x1 layers at ``rank``). Each module's ΔW is
factored by SVD (``tools.svd``) and saved under kohya's name with alpha = rank (scale 1), so a full-rank extraction
reproduces ΔW to float precision. The report says, per module, which fraction of ‖ΔW‖_F the kept rank holds.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..adapters.lora_keys import kohya_name
from ..checkpoint import open_tensor_file
from ..checkpoint.load import plan_components
from ..checkpoint.write import check_output, save_safetensors
from ..unet.blocks import Downsample, ResBlock, SpatialTransformer, Upsample
from .common import Progress, ToolError, Written, dtype_of, with_progress, written
from .merge import family_of
from .svd import decompose, parse_dynamic

BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl-v1-base",
                 "sdxl-refiner": "stable-diffusion-xl-v1-refiner"}


@dataclass(frozen=True)
class Module:
    """One layer a LoRA can hold: its component, module path, file key of its weight, rows (open_clip q/k/v)."""

    component: str
    path: str
    key: str
    third: str | None = None
    conv3: bool = False


@dataclass
class LoraWritten(Written):
    """The LoRA file written, with each module's rank and kept fraction of ‖ΔW‖_F."""

    modules: dict[str, tuple[int, float]] = field(default_factory=dict)

    def __str__(self) -> str:
        text = super().__str__()
        if self.modules:
            worst = min(self.modules, key=lambda n: self.modules[n][1])
            mean = sum(k for _, k in self.modules.values()) / len(self.modules)
            text += (f"\n  {len(self.modules)} modules; ‖ΔW‖ kept: mean {mean:.4f}, lowest {self.modules[worst][1]:.4f}"
                     f" ({worst}, rank {self.modules[worst][0]})")
        return text


def lora_modules(unet: nn.Module, encoders: list[nn.Module], sources: dict[str, dict[str, str]],
                 conv: bool) -> list[Module]:
    """The layers kohya's LoRA (and, with ``conv``, LoCon) adapts, with the file keys of their weights."""
    found: list[Module] = []
    kinds = (SpatialTransformer,) + ((ResBlock, Downsample, Upsample) if conv else ())
    for name, parent in unet.named_modules():
        if not isinstance(parent, kinds):
            continue
        for sub, layer in parent.named_modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                path = f"{name}.{sub}"
                conv3 = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
                found.append(Module("unet", path, sources["unet"][f"{path}.weight"], conv3=conv3))
    for i, encoder in enumerate(encoders):
        component = f"te{i + 1}"
        for path, layer in encoder.named_modules():
            if path.endswith((".self_attn", ".mlp")) and not hasattr(layer, "in_proj_weight"):
                found += [Module(component, f"{path}.{sub}", sources[component][f"{path}.{sub}.weight"])
                          for sub, child in layer.named_children() if isinstance(child, nn.Linear)]
            elif path.endswith(".attn") and hasattr(layer, "in_proj_weight"):  # open_clip: stacked q;k;v
                key = sources[component][f"{path}.in_proj_weight"]
                found += [Module(component, path, key, third=t) for t in "qkv"]
                found.append(Module(component, f"{path}.out_proj", sources[component][f"{path}.out_proj.weight"]))
    return found


def extract_lora(tuned: str | os.PathLike, original: str | os.PathLike, *, output: str | os.PathLike,
                 rank: int = 32, conv_rank: int | None = None, clamp_quantile: float | None = None,
                 dynamic: str | tuple[str, float] | None = None, dtype: str | torch.dtype | None = "fp32",
                 progress: Progress | None = None) -> LoraWritten:
    """Extract a kohya-format LoRA (``output``, .safetensors) holding tuned − original.

    ``rank`` caps Linear/1x1 layers, ``conv_rank`` 3x3 convolutions (None: no convolutions, as kohya's default).
    ``dynamic``: "sv_ratio:V", "sv_cumulative:V" or "sv_fro:V" picks each module's rank (capped at the rank above).
    ``clamp_quantile`` (kohya uses 0.99) clamps the factors' outliers; off, a full rank reproduces ΔW exactly.
    """
    method = parse_dynamic(dynamic) if isinstance(dynamic, str) else dynamic
    out_dtype = dtype_of(dtype) or torch.float32
    check_output(output, [tuned, original])
    with contextlib.ExitStack() as stack:
        ft, fo = (stack.enter_context(open_tensor_file(p)) for p in (tuned, original))
        family = family_of(fo)
        if family_of(ft) != family:
            raise ToolError(ft.path, f"is {family_of(ft)}, the original {fo.path} is {family}")
        p = plan_components(fo)
        sources = {"unet": p.plans[0].sources} | {f"te{i + 1}": pl.sources for i, pl in enumerate(p.plans[2:])}
        unet = p.plans[0].module
        modules = lora_modules(unet, [pl.module for pl in p.plans[2:]], sources, conv_rank is not None)
        for m in modules:
            if m.key not in ft or ft.shapes[m.key] != fo.shapes[m.key]:
                found = list(ft.shapes[m.key]) if m.key in ft else "nothing"
                raise ToolError(ft.path, f"tensor {m.key!r}: the original has {list(fo.shapes[m.key])}, "
                                         f"the tuned model {found}")
        tensors: dict[str, torch.Tensor] = {}
        report: dict[str, tuple[int, float]] = {}
        unchanged = []
        cached: tuple[str, torch.Tensor] | None = None
        for m in with_progress(modules, len(modules), progress):
            if cached is None or cached[0] != m.key:
                cached = (m.key, ft.read(m.key, torch.float32) - fo.read(m.key, torch.float32))
            delta = cached[1]
            if m.third is not None:
                width = delta.shape[1]
                delta = delta["qkv".index(m.third) * width:("qkv".index(m.third) + 1) * width]
            name = kohya_name(family, m.component, m.path, third=m.third, num_res_blocks=unet.config.num_res_blocks)
            if not delta.any():
                unchanged.append(name)
                continue
            f = decompose(delta, conv_rank if m.conv3 else rank, method, clamp_quantile)
            tensors |= {f"{name}.lora_up.weight": f.up.to(out_dtype), f"{name}.lora_down.weight": f.down.to(out_dtype),
                        f"{name}.alpha": torch.tensor(float(f.rank))}
            report[name] = (f.rank, f.kept)
        if not tensors:
            raise ToolError(ft.path, f"does not differ from {fo.path} in any layer a LoRA holds")
        metadata = lora_metadata(family, p.prediction, rank, conv_rank, method, Path(output).stem)
        save_safetensors(output, tensors, metadata, inputs=[tuned, original])
    notes = [f"{len(unchanged)} modules unchanged, left out"] if unchanged else []
    result = written(output, len(tensors), notes)
    return LoraWritten(result.path, result.tensors, result.notes, result.sha256, report)


def lora_metadata(family: str, prediction: str, rank: int | str, conv_rank: int | None,
                  dynamic: tuple[str, float] | None, name: str) -> dict[str, str]:
    """kohya's ``ss_*`` fields for a LoRA with alpha = rank, and the modelspec architecture."""
    args = {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))} if conv_rank else {}
    if dynamic is not None:
        args |= {"dynamic_method": dynamic[0], "dynamic_param": str(dynamic[1])}
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "Dynamic" if dynamic else str(rank),
            "ss_network_alpha": "Dynamic" if dynamic else str(float(rank)), "ss_network_args": json.dumps(args),
            "ss_v2": str(family == "sd2"), "ss_output_name": name,
            "modelspec.architecture": f"{ARCHITECTURES[family]}/lora"}
    if family in BASE_MODEL_VERSIONS:
        meta["ss_base_model_version"] = BASE_MODEL_VERSIONS[family] + ("_v" if family == "sd2" and prediction == "v"
                                                                      else "")
    return meta
