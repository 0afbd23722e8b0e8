"""Trainable LoRA layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on the original
modules, which keep their class, name and place.

A LoRA adds (α/r)·up·down to a layer, down [r, in(, k, k)] starting kaiming-uniform (a = √5) and up [out, r(, 1, 1)]
at zero, as kohya initialises them, so training starts from the unchanged model. Two ways of adding it, one result:

* on the layer's output, y + (α/r)·up(down(x)), by a forward hook, for layers that are called as modules: the
  low-rank path costs a few small products, and no weight-sized tensor is made or kept for the backward pass;
* on the weight, W + (α/r)·up·down, by a ``torch.nn.utils.parametrize`` parametrization, for weights that code reads
  directly: the UNet's ``pointwise`` takes proj_in/proj_out's weights (unet/blocks.py), open_clip's attention its
  stacked q;k;v ``in_proj_weight`` (one LoRA per third). A parametrization acts however the weight is used, so these
  stay right if that code comes to call the modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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
        self.hook = None  # the forward hook's handle, when the LoRA acts on the layer's output

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        # [out, r] @ [r, in·k·k] → the weight's shape (a 3x3 down with a 1x1 up is the conv-of-conv kohya merges)
        return (self.up.flatten(1) @ self.down.flatten(1)).view(self.shape) * self.scale

    def forward(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """The change to ``layer``'s output for input ``x``: (α/r)·up(down(x)), the down with the layer's geometry."""
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if isinstance(layer, nn.Conv2d):
            h = F.conv2d(x, down, None, layer.stride, layer.padding, layer.dilation, layer.groups)
            return F.conv2d(h, up) * self.scale
        return F.linear(F.linear(x, down), up.flatten(1)) * self.scale


# Weights read by code rather than through their module's call (see the module docstring).
_READ_DIRECTLY = (".proj_in", ".proj_out")


def _on_output(lora: LoraWeights):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + lora(args[0], module).to(output.dtype)

    return hook


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
    """A new trainable LoRA on ``target`` (float32, on the weight's device), as a forward hook or a parametrization
    (see the module docstring)."""
    module, name = target.module, target.weight
    weight = stored_parameter(module, name)
    lora = LoraWeights(target.shape, rank, alpha).to(weight.device)
    if target.rows is None and not target.path.endswith(_READ_DIRECTLY):
        lora.hook = module.register_forward_hook(_on_output(lora))
        return lora
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


def detach_all(layers: list[tuple[Target, LoraWeights]]) -> None:
    """Take every LoRA off its layer (hooks and parametrizations), leaving the original weights untouched."""
    for target, lora in layers:
        if lora.hook is not None:
            lora.hook.remove()
            continue
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
