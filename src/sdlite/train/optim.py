"""Optimiser pieces of the training loop: the learning-rate schedules, the exponential moving average of the trained
weights, and gradient checkpointing of the UNet's blocks.

Schedules (as kohya sd-scripts and diffusers name them): "constant", "linear" (to 0 at the last step) and "cosine"
(half a cosine to 0, Loshchilov & Hutter 2017), each after ``warmup`` steps of linear warm-up from 0, with the
step counting of diffusers' ``get_scheduler`` (which kohya uses too).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """The learning-rate multiplier at optimiser step ``step`` (0-based) of ``total``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {SCHEDULES}, not {schedule!r}")
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total: int,
                 warmup: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(schedule, 0, total, warmup)  # validates the name before training starts
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(schedule, step, total, warmup))


class EMA:
    """Exponential moving average of parameters, shadow ← d·shadow + (1−d)·param, with the warm-up of diffusers'
    EMAModel: at the k-th update d = min(decay, k/(9 + k)), 0 at the first (the average starts at the first trained
    weights rather than at the initial ones)."""

    def __init__(self, named: Iterable[tuple[str, nn.Parameter]], decay: float):
        self.decay, self.updates = decay, 0
        self.params = dict(named)
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        n = self.updates - 1
        d = 0.0 if n == 0 else min(self.decay, (1 + n) / (10 + n))
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1 - d)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The averaged weights in place of the trained ones inside the block (for sampling and saving)."""
        saved = {name: p.detach().clone() for name, p in self.params.items()}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(saved[name])


def _checkpointed(forward, *args, **kwargs):
    # Non-reentrant checkpointing: keyword arguments work, and inputs need not require grad.
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def checkpointed_blocks(unet: nn.Module) -> Iterator[None]:
    """Gradient checkpointing (Chen et al. 2016) of every input, middle and output block of an original-layout UNet:
    inside the block, each block's activations are recomputed in the backward pass instead of kept.

    The UNet's code is left alone: each block's ``forward`` is shadowed for the duration by one that runs the class's
    own forward under ``torch.utils.checkpoint``, and the shadow is removed on exit."""
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    for block in blocks:
        block.forward = functools.partial(_checkpointed, type(block).forward.__get__(block))
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


@contextlib.contextmanager
def channels_last_kernels(module: nn.Module) -> Iterator[None]:
    """The module's 4-D tensors (convolution kernels) in channels-last memory order for the duration, on the CPU.

    The UNet's CPU convolutions write channels-last feature maps (sdlite.conv), and in training the layers that
    need no input gradient (those before the first trained layer) still take them, so the maps downstream are
    channels-last. oneDNN then convolves in that order, and a kernel stored in the default order is copied into it
    on every forward and every backward call: about half the time of a LoRA step at SD 1.5 sizes, spent on the
    1280-channel kernels. With the kernels in channels-last order those copies go away. The values do not change,
    only their order in memory, which is the default again on exit (the inference paths read kernels in place).

    Every tensor of the module is copied into memory of its own, not only the kernels: a loaded model's tensors
    are views of the mapped checkpoint file, and a mapping stays (with every page read through it counted in the
    process's resident memory) while any tensor read through it lives. Converting only the kernels kept both their
    mapped pages and their copies: 1.7 GB more peak RSS for SD 1.5's UNet.
    """
    if next(module.parameters()).device.type != "cpu":
        yield
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            t.data = t.data.clone(memory_format=torch.channels_last if t.dim() == 4 else torch.contiguous_format)
    try:
        yield
    finally:
        module.to(memory_format=torch.contiguous_format)
