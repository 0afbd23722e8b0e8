"""Trainable LoRA layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") as parametrizations of
the original modules' weights.

Each adapted weight W is replaced, through ``torch.nn.utils.parametrize``, by W + (α/r)·up·down, where down [r, in(, k,
k)] starts kaiming-uniform (a = √5) and up [out, r(, 1, 1)] at zero, as kohya initialises them, so training starts from
the unchanged model. A parametrization changes what ``module.weight`` returns, so the LoRA acts however the layer is
used: called as a module, or read by code that takes its weight directly (the UNet's ``pointwise``), and the module
keeps its class, its name and its place. open_clip's stacked q;k;v ``in_proj_weight`` gets one LoRA per third.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..adapters.lora_keys import Target, stored_parameter


class LoraWeights(nn.Module):
    """down/up of one LoRA layer and its scale α/r; ``delta()`` is the weight change it makes."""

    def __init__(self, shape: tuple[int, ...], rank: int, alpha: float):
        super().__init__()
        out, inp, *kernel = shape
        self.shape, self.rank, self.alpha = tuple(shape), rank, float(alpha)
        self.down = nn.Parameter(torch.empty(rank, inp, *kernel))
        self.up = nn.Parameter(torch.zeros(out, rank, *[1] * len(kernel)))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        # [out, r] @ [r, in·k·k] → the weight's shape (a 3x3 down with a 1x1 up is the conv-of-conv kohya merges)
        return (self.up.flatten(1) @ self.down.flatten(1)).view(self.shape) * self.scale


class AddLora(nn.Module):
    """The parametrization W ↦ W + Σ ΔW of one weight; each ΔW covers the whole weight or a block of its rows."""

    def __init__(self):
        super().__init__()
        self.parts = nn.ModuleList()
        self.rows: list[tuple[int, int] | None] = []

    def add(self, weights: LoraWeights, rows: tuple[int, int] | None) -> None:
        self.parts.append(weights)
        self.rows.append(rows)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        whole = [p.delta() for p, r in zip(self.parts, self.rows) if r is None]
        for d in whole:
            weight = weight + d.to(weight.dtype)
        blocks = sorted(((r, p) for p, r in zip(self.parts, self.rows) if r is not None), key=lambda x: x[0])
        if not blocks:
            return weight
        pieces, position = [], 0
        for (start, end), part in blocks:
            if start > position:
                pieces.append(weight.new_zeros(start - position, *weight.shape[1:]))
            pieces.append(part.delta().to(weight.dtype))
            position = end
        if position < weight.shape[0]:
            pieces.append(weight.new_zeros(weight.shape[0] - position, *weight.shape[1:]))
        return weight + torch.cat(pieces)


def attach(target: Target, rank: int, alpha: float) -> LoraWeights:
    """A new trainable LoRA on ``target`` (float32, on the weight's device), registered as a parametrization."""
    module, name = target.module, target.weight
    weight = stored_parameter(module, name)
    lora = LoraWeights(target.shape, rank, alpha).to(weight.device)
    existing = _own_parametrization(module, name)
    if existing is None:
        existing = AddLora()
        parametrize.register_parametrization(module, name, existing, unsafe=True)
    existing.add(lora, target.rows)
    return lora


def _own_parametrization(module: nn.Module, name: str) -> AddLora | None:
    if not parametrize.is_parametrized(module, name):
        return None
    return next((p for p in module.parametrizations[name] if isinstance(p, AddLora)), None)


def detach_all(targets: list[Target]) -> None:
    """Remove the training parametrizations from every target, leaving the original weights untouched."""
    for target in targets:
        module, name = target.module, target.weight
        own = _own_parametrization(module, name)
        if own is None:
            continue
        chain = module.parametrizations[name]
        if len(chain) == 1:
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        else:
            index = next(i for i, p in enumerate(chain) if p is own)
            del chain[index]
