"""Classifier-free guidance around a k-diffusion-style denoiser, as AUTOMATIC1111's CFGDenoiser does it.

Cond and uncond go through the UNet as one batch; with composable prompts (AND) each part is a cond of its own and
denoised = uncond + Σᵢ wᵢ·cfg·(condᵢ − uncond) (Liu et al. 2022, "Compositional Visual Generation with Composable
Diffusion Models"). For inpainting the prediction is blended with the original latent outside the mask at every
step; inpainting checkpoints also get their masked-image conditioning concatenated to the UNet input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn


@dataclass
class Cond:
    """Conditioning of one batch: ``context`` [B, T, D] and, for SDXL-family models, the ADM vector ``y`` [B, A]."""

    context: torch.Tensor
    y: torch.Tensor | None = None


class UNetCall(nn.Module):
    """The UNet as the denoiser sees it: adds the inpainting conditioning channels and ControlNet residuals.

    ``image_cond`` [B, 5, h, w] is repeated over the CFG batch; ``control(x, t, context, y, cond_rows)`` computes
    ControlNet residuals from what the UNet is given and the mask of rows that carry a positive prompt.
    """

    def __init__(self, unet: nn.Module, image_cond: torch.Tensor | None = None,
                 control: Callable[..., Sequence[torch.Tensor] | None] | None = None):
        super().__init__()
        self.unet, self.image_cond, self.control = unet, image_cond, control

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
                cond_rows: torch.Tensor | None = None):
        residuals = self.control(x, t, context, y, cond_rows) if self.control is not None else None
        if self.image_cond is not None:
            reps = x.shape[0] // self.image_cond.shape[0]
            x = torch.cat([x, self.image_cond.repeat(reps, 1, 1, 1).to(x)], dim=1)
        return self.unet(x, t, context, y=y, control=residuals)


class GuidedDenoiser:
    """``denoised = model(x, sigma)`` with CFG over conds [(Cond, weight), …] and one uncond.

    ``cond_at(step)`` returns (conds, uncond) for the model call ``step`` (prompt editing changes them during
    sampling; A1111 counts model calls, so second-order samplers move through a prompt schedule twice as fast —
    reproduced here). ``mask``/``init_latent``: keep ``init_latent`` where mask is 0 (ordinary-model inpainting).
    ``batch``: cond and uncond in one UNet call (the default; False runs them one after the other).
    """

    def __init__(self, denoiser: Callable, cond_at: Callable[[int], tuple[list[tuple[Cond, float]], Cond]],
                 cfg_scale: float, *, mask: torch.Tensor | None = None, init_latent: torch.Tensor | None = None,
                 batch: bool = True):
        self.denoiser, self.cond_at, self.cfg_scale = denoiser, cond_at, cfg_scale
        self.mask, self.init_latent, self.batch = mask, init_latent, batch
        self.step = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
        conds, uncond = self.cond_at(self.step)
        self.step += 1
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
    """The base model's guided denoiser until ``switch_at`` of the sampler's model calls are done, then the
    refiner's. As in A1111 1.10 the sampler itself goes on (multistep history included); only the model changes,
    and the prompt-schedule step count carries over. ``on_switch`` runs once, just before the refiner's first call
    (the core moves offloaded UNets there)."""

    def __init__(self, base: GuidedDenoiser, refiner: GuidedDenoiser, switch_at: float, total_calls: int,
                 on_switch: Callable[[], None] | None = None):
        self.base, self.refiner, self.switch_at, self.total_calls = base, refiner, switch_at, total_calls
        self.on_switch, self.switched = on_switch, False
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        switched = self.calls / self.total_calls > self.switch_at
        if switched and not self.switched:
            self.switched = True
            if self.on_switch is not None:
                self.on_switch()
        model = self.refiner if switched else self.base
        model.step = self.calls
        self.calls += 1
        return model(x, sigma, **kwargs)
