"""Classifier-free guidance around a k-diffusion-style denoiser, as AUTOMATIC1111's CFGDenoiser does it, and the one
step object every part of a sampling pass reads.

The chain of one pass, outermost first::

    sampler (pure function)  →  GuidedDenoiser / Handoff  →  Denoiser (ε/v → D(x; σ))  →  UNetCall  →  UNet
                                CFG over conds, mask        schedulers.denoiser           image cond, control,
                                blending, model switch                                    attention patches

Cond and uncond go through the UNet as one batch; with composable prompts (AND) each part is a cond of its own and
denoised = uncond + Σᵢ wᵢ·cfg·(condᵢ − uncond) (Liu et al. 2022, "Compositional Visual Generation with Composable
Diffusion Models"). When there is a mask the prediction is blended with the original latent outside it at every step,
for inpainting checkpoints too, which also get their masked-image conditioning concatenated to the UNet input
(``UNetCall``).

A wrapper that changes how the prediction is formed (MultiDiffusion windows, regional prompts) takes the place of
the ``denoiser`` a :class:`GuidedDenoiser` is given: it receives ``(x, sigma, context=, y=, cond_rows=)`` and
returns D(x; σ) for those rows, and reads the pass's :class:`StepState` when it varies over the steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Cond:
    """Conditioning of one batch: ``context`` [B, T, D] and, for SDXL-family models, the ADM vector ``y`` [B, A]."""

    context: torch.Tensor
    y: torch.Tensor | None = None


class StepState:
    """Where a sampling pass is, for everything that changes over the steps; one object per pass, advanced once per
    model call by the outermost model of the chain (:class:`GuidedDenoiser` or :class:`Handoff`), never by the
    sampler's callback.

    ``call``: the index of the current model call (0-based; A1111's CFGDenoiser.step, which prompt schedules and the
    refiner switch count). ``calls``: the calls A1111 budgets for the pass (two per step for second-order samplers).
    ``step``: the sampler step the call belongs to, read off its σ: the number of values of ``grid`` (the σ the
    sampler steps through) above it, so the calls inside a step count with the step they lead to, whatever the
    sampler and whether or not it reports progress. ``progress`` = step / steps, the fraction ControlNet's guidance
    range is given in.
    """

    def __init__(self, grid: torch.Tensor, steps: int, calls: int):
        self.grid, self.steps, self.calls = grid.detach().cpu(), steps, calls
        self.call = -1
        self.sigma: torch.Tensor | None = None
        self._step: int | None = None

    def advance(self, sigma: torch.Tensor) -> None:
        """A model call at ``sigma`` begins."""
        self.call += 1
        self.sigma, self._step = sigma, None

    @property
    def step(self) -> int:
        if self.sigma is None:
            return 0
        if self._step is None:  # on demand: reading σ waits for the device, which most calls need not do
            # Compared in σ's own dtype, so that a call at a grid value does not count that value.
            self._step = int((self.grid.to(self.sigma.dtype) > float(self.sigma.max())).sum())
        return self._step

    @property
    def progress(self) -> float:
        return self.step / self.steps

    @property
    def call_fraction(self) -> float:
        """The share of the pass's budgeted model calls done before this one."""
        return self.call / self.calls

    def __repr__(self) -> str:
        return f"StepState(call={self.call}/{self.calls}, steps={self.steps})"


class GuidedDenoiser:
    """``denoised = model(x, sigma)`` with CFG over conds [(Cond, weight), …] and one uncond.

    ``cond_at(call)`` returns (conds, uncond) for model call ``call`` (prompt editing changes them during sampling;
    A1111 counts model calls, so second-order samplers move through a prompt schedule twice as fast — reproduced
    here). ``step``: the pass's :class:`StepState`, advanced here. ``mask``/``init_latent``: keep ``init_latent``
    where mask is 0 (ordinary-model inpainting). ``batch``: cond and uncond in one UNet call (the default; False runs
    them one after the other).
    """

    def __init__(self, denoiser: Callable, cond_at: Callable[[int], tuple[list[tuple[Cond, float]], Cond]],
                 cfg_scale: float, step: StepState, *, mask: torch.Tensor | None = None,
                 init_latent: torch.Tensor | None = None, batch: bool = True):
        self.denoiser, self.cond_at, self.cfg_scale, self.step = denoiser, cond_at, cfg_scale, step
        self.mask, self.init_latent, self.batch = mask, init_latent, batch

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
        self.step.advance(sigma)
        return self.guide(x, sigma)

    def guide(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The guided prediction for the model call the step object is at."""
        conds, uncond = self.cond_at(self.step.call)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        skip_uncond = self.cfg_scale == 1.0 and len(conds) == 1
        outs = self._run(x, sigma, [c for c, _ in conds] + ([] if skip_uncond else [uncond]), len(conds))
        if skip_uncond:
            denoised = outs[0]
        else:
            denoised = outs[-1].clone()
            for out, (_, weight) in zip(outs, conds):
                denoised += (out - outs[-1]) * (weight * self.cfg_scale)
        if self.mask is not None:
            denoised = self.init_latent * (1 - self.mask) + self.mask * denoised
        return denoised

    def _run(self, x: torch.Tensor, sigma: torch.Tensor, parts: list[Cond], n_cond: int) -> list[torch.Tensor]:
        """One UNet call per context length: conds and uncond share a batch when their token counts agree, as in
        A1111 without "pad prompt/negative prompt". The first ``n_cond`` parts carry positive prompts."""
        outs: list[torch.Tensor | None] = [None] * len(parts)
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(parts):
            # batch=False: one UNet call per part, for when a doubled batch does not fit in memory.
            groups.setdefault(p.context.shape[1] if self.batch else i, []).append(i)
        for members in groups.values():
            group = [parts[i] for i in members]
            context = torch.cat([p.context for p in group])
            y = torch.cat([p.y for p in group]) if group[0].y is not None else None
            n = len(group)
            cond_rows = torch.tensor([i < n_cond for i in members], device=x.device).repeat_interleave(x.shape[0])
            out = self.denoiser(x.repeat(n, 1, 1, 1), sigma.repeat(n), context=context, y=y, cond_rows=cond_rows)
            for i, chunk in zip(members, out.chunk(n)):
                outs[i] = chunk
        return outs


def pad_parts(conds: list[tuple[Cond, float]]) -> list[tuple[Cond, float]]:
    """AND parts of different lengths are brought to the longest by repeating their last token vector, as A1111's
    reconstruct_multicond_batch does."""
    longest = max(c.context.shape[1] for c, _ in conds)
    padded = []
    for c, w in conds:
        missing = longest - c.context.shape[1]
        if missing:
            c = Cond(torch.cat([c.context, c.context[:, -1:].expand(-1, missing, -1)], dim=1), c.y)
        padded.append((c, w))
    return padded


class Handoff:
    """The base model's guided denoiser until more than ``switch_at`` of the pass's budgeted model calls are done,
    then the refiner's. As in A1111 1.10 the sampler itself goes on (multistep history included); only the model
    changes, and both read the one step object, so the prompt-schedule count carries over. ``on_switch`` runs once,
    just before the refiner's first call (the core moves offloaded UNets there)."""

    def __init__(self, base: GuidedDenoiser, refiner: GuidedDenoiser, switch_at: float,
                 on_switch: Callable[[], None] | None = None):
        if base.step is not refiner.step:
            raise ValueError("the base and refiner denoisers must share the pass's step object")
        self.base, self.refiner, self.switch_at, self.step = base, refiner, switch_at, base.step
        self.on_switch, self.switched = on_switch, False

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
        self.step.advance(sigma)
        if self.step.call_fraction > self.switch_at and not self.switched:
            self.switched = True
            if self.on_switch is not None:
                self.on_switch()
        return (self.refiner if self.switched else self.base).guide(x, sigma)
