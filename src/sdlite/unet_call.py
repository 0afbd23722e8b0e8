"""The UNet as a sampling pass calls it: the innermost link of the generation chain (see ``sdlite.guidance``).

Everything that changes one UNet evaluation without changing the guidance lives here, each as a hook built once per
pass and called per evaluation with what the UNet is given, the rows of the batch that carry a positive prompt, and
the pass's :class:`~sdlite.guidance.StepState`:

- ``image_cond`` [B, 5, h, w]: an inpainting UNet's mask and masked-image latent, concatenated to its input;
- ``control(x, t, context, y, cond_rows, step)`` → ControlNet residuals or None (``UNetModel.forward(control=)``);
- ``features(rows, step)`` → T2I-Adapter features by input block or None (``UNetModel.forward(features=)``);
- ``patches(cond_rows, step)`` → the attention patches of this evaluation or None (``UNetModel.forward(patches=)``,
  the cross-attention extension point: IP-Adapter tokens, regional masks, …), built per call because they depend
  on the step (start/end ranges) and on which rows are conditional.

When the batch holds windows of the latent (MultiDiffusion, ``sdlite.composition.tiles``), ``windows`` says which:
the image conditioning is cropped to them here, and the control hook is given them to crop its hints.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from .guidance import StepState

ControlHook = Callable[..., Sequence[torch.Tensor] | None]
PatchHook = Callable[[torch.Tensor | None, StepState], Any]


class UNetCall(nn.Module):
    """``unet(x, t, context, y=y, control=…, patches=…)`` with the pass's hooks applied.

    ``cond_rows`` (bool [B], given by the guided denoiser through the :class:`~sdlite.schedulers.Denoiser`) marks the
    rows of the CFG batch that carry a positive prompt; None means all of them. ``patches`` is passed to the UNet
    only when the hook returns something, so a UNet without the keyword keeps working.
    """

    def __init__(self, unet: nn.Module, step: StepState | None = None, *, image_cond: torch.Tensor | None = None,
                 control: ControlHook | None = None, patches: PatchHook | None = None,
                 features: Callable[[int, StepState], Any] | None = None):
        super().__init__()
        if (control is not None or patches is not None or features is not None) and step is None:
            raise ValueError("control, patch and feature hooks read the pass's step: give UNetCall its StepState")
        self.unet, self.step, self.image_cond = unet, step, image_cond
        self.control, self.patches, self.features = control, patches, features

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
                cond_rows: torch.Tensor | None = None, windows=None) -> torch.Tensor:
        residuals = None
        if self.control is not None:
            where = {} if windows is None else {"windows": windows}
            residuals = self.control(x, t, context, y, cond_rows, self.step, **where)
        extra = {}
        if self.patches is not None:
            patches = self.patches(cond_rows, self.step)
            if patches is not None:
                extra["patches"] = patches
        if self.features is not None:
            features = self.features(x.shape[0], self.step)
            if features:
                extra["features"] = features
        if self.image_cond is not None:
            if windows is not None:
                image_cond = windows.crop(self.image_cond, x.shape[0])
            else:
                image_cond = self.image_cond.repeat(x.shape[0] // self.image_cond.shape[0], 1, 1, 1)
            x = torch.cat([x, image_cond.to(x)], dim=1)
        return self.unet(x, t, context, y=y, control=residuals, **extra)
