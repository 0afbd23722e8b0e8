"""Regional prompts: MultiDiffusion's region formulation (Bar-Tal et al. 2023, §4.2), each region with its own prompt,
negative prompt and LoRAs.

Every region i has a mask m_i (a PIL image or a box) and a weight w_i; the base prompt covers what the regions leave,
b = max(0, 1 − Σ m_i). At every model call each region's guided prediction D_i (CFG with its own prompts) is computed
on the whole latent and the predictions are fused per pixel::

    D(x; σ) = (b · D_base + Σ_i w_i m_i · D_i) / (b + Σ_i w_i m_i)

The base prompt is evaluated only where b > 0 somewhere. Bootstrapping (MultiDiffusion's option for tight masks):
during the first ``region_bootstrap`` share of the sampler steps, region i sees m_i·x + (1 − m_i)·(c + σ·ε)
instead of x, c the latent of a random solid colour (a new draw at every call) and ε one fixed noise image.

A region's LoRAs (``loras=[(file, weight)]`` and ``<lora:…>`` tags in its prompt) are injected at strength 0 for the
generation and switched on only while its prompt is encoded and while its own UNet evaluations run. Cost: one UNet
evaluation (cond and uncond batched) per region per model call, plus one for the base prompt when it shows, and the
region LoRAs' weights recomputed at every evaluation while they are injected.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..prompting import Prompts, find_lora

Box = tuple[float, float, float, float]


@dataclass
class Region:
    """One region of a regional-prompt generation: ``Region(prompt, mask_or_box, weight=1.0, negative=None,
    loras=None)``.

    The area is a PIL mask (white = the region; resized to the latent, soft values blend) or an (x, y, w, h) box in
    pixels of the generation size, or in fractions of it when every number is at most 1. ``negative``: the region's
    negative prompt (None: the base one). ``loras``: [(file or name in ``pipe.lora_dirs``, weight), …] for this
    region's evaluations only.
    """

    prompt: str
    mask: Image.Image | Box | None = None
    weight: float = 1.0
    negative: str | None = None
    loras: Sequence[tuple[str, float]] | None = None
    box: Box | None = None

    def __post_init__(self):
        if isinstance(self.mask, (tuple, list)):
            self.mask, self.box = None, self.mask
        if self.box is not None:
            self.box = tuple(float(v) for v in self.box)

    def check(self, width: int, height: int) -> None:
        if (self.mask is None) == (self.box is None):
            raise ValueError(f"Region {self.prompt!r}: give a mask image or an (x, y, w, h) box, exactly one")
        if self.box is not None:
            if len(self.box) != 4 or self.box[2] <= 0 or self.box[3] <= 0 or min(self.box[:2]) < 0:
                raise ValueError(f"Region {self.prompt!r}: a box is (x, y, w, h) with w, h > 0 and x, y >= 0, "
                                 f"got {self.box}")
            x, y, w, h = self.fractions(width, height)
            if x + w > 1 + 1e-6 or y + h > 1 + 1e-6:
                raise ValueError(f"Region {self.prompt!r}: the box {self.box} reaches outside the {width}x{height} "
                                 "image")
        elif not isinstance(self.mask, Image.Image):
            raise TypeError(f"Region {self.prompt!r}: the mask must be a PIL image or a box, got {type(self.mask)}")
        if not self.weight > 0:
            raise ValueError(f"Region {self.prompt!r}: the weight must be positive, got {self.weight}")
        for entry in self.loras or ():
            if len(entry) != 2:
                raise ValueError(f"Region {self.prompt!r}: loras are (file, weight) pairs, got {entry!r}")

    def fractions(self, width: int, height: int) -> Box:
        """The box as fractions of the image (pixels when any number exceeds 1)."""
        x, y, w, h = self.box
        if max(self.box) > 1:
            return x / width, y / height, w / width, h / height
        return x, y, w, h

    def latent_mask(self, rows: int, columns: int, width: int, height: int) -> torch.Tensor:
        """The area at latent size [rows, columns] in [0, 1] for a ``width``×``height`` generation."""
        if self.mask is not None:
            small = self.mask.convert("L").resize((columns, rows), Image.Resampling.BILINEAR)
            return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255)
        x, y, w, h = self.fractions(width, height)
        left, top = round(x * columns), round(y * rows)
        right, bottom = max(round((x + w) * columns), left + 1), max(round((y + h) * rows), top + 1)
        mask = torch.zeros(rows, columns)
        mask[top:bottom, left:right] = 1
        return mask


class LoraSwitch:
    """A region's injected LoRA handles with their (UNet, text encoder) strengths, off (0) except inside
    :meth:`unet` or :meth:`text`."""

    def __init__(self):
        self.entries: list[tuple[object, float, float]] = []

    @contextlib.contextmanager
    def unet(self):
        for handle, unet, _ in self.entries:
            handle.set_weight(unet, 0.0)
        try:
            yield
        finally:
            for handle, _, _ in self.entries:
                handle.set_weight(0.0, 0.0)

    @contextlib.contextmanager
    def text(self):
        for handle, _, te in self.entries:
            handle.set_weight(0.0, te)
        try:
            yield
        finally:
            for handle, _, _ in self.entries:
                handle.set_weight(0.0, 0.0)


class RegionalConds:
    """The base prompt's ``cond_at(call)`` with each region's beside it (``regions``)."""

    def __init__(self, base: Callable, regions: list[Callable]):
        self.base, self.regions = base, regions

    def __call__(self, call: int):
        return self.base(call)


class RegionalPrompts(Prompts):
    """A job's prompts when it has ``regions``: the base prompt as :class:`~sdlite.prompting.Prompts` handles it,
    each region's encoded beside it (with its LoRAs' text-encoder part), and the regional denoiser built from them."""

    def __init__(self, job):
        super().__init__(job)
        self.regional = [Prompts(replace(job, prompt=r.prompt, regions=[],
                                         negative_prompt=job.negative_prompt if r.negative is None else r.negative))
                         for r in job.regions]
        self.switches = [LoraSwitch() for _ in job.regions]
        self.pipe = None

    def attach(self, pipe) -> list:
        """Inject every region's LoRAs into ``pipe`` at strength 0; returns the handles (the caller removes them)."""
        self.pipe = pipe
        handles = []
        try:
            for region, prompts, switch in zip(self.job.regions, self.regional, self.switches):
                if prompts.hypernetworks(pipe.hypernetwork_dirs):
                    raise ValueError(f"Region {region.prompt!r}: hypernetworks apply to the whole image; put the "
                                     "<hypernet:…> tag in the base prompt")
                entries = [(path, unet, te) for _, path, te, unet in prompts.loras(pipe.lora_dirs)]
                entries += [(_lora_file(name, pipe.lora_dirs), float(w), float(w)) for name, w in region.loras or ()]
                for path, unet, te in entries:
                    handle = pipe.add_lora(path, weight=0.0, te_weight=0.0, mode="inject")
                    handles.append(handle)
                    switch.entries.append((handle, unet, te))
        except BaseException:
            for handle in reversed(handles):
                handle.remove()
            raise
        return handles

    def cond_at(self, pipe, width: int, height: int, calls: int, hires_calls: int | None = None):
        base = super().cond_at(pipe, width, height, calls, hires_calls)
        if pipe is not self.pipe:  # a refiner: the base prompt over the whole image
            return base
        regions = []
        for prompts, switch in zip(self.regional, self.switches):
            with switch.text():  # encoded now, up front, with the region's LoRAs on its text encoders
                regions.append(prompts.cond_at(pipe, width, height, calls, hires_calls))
        return RegionalConds(base, regions)

    def denoiser(self, guided: Callable, conds: RegionalConds, step, *, seed: int, encode: Callable):
        """The regional denoiser of a pass; ``guided(cond_at)`` builds a guided denoiser for one prompt set."""
        job = self.job
        regions = [(guided(c), r, s) for c, r, s in zip(conds.regions, job.regions, self.switches)]
        return RegionalDenoiser(guided(conds.base), regions, step, size=(job.width, job.height),
                                bootstrap=job.region_bootstrap, seed=seed, encode=encode)


def _lora_file(name: str, folders) -> str:
    if os.path.isfile(name):
        return name
    found = find_lora(folders, os.path.splitext(os.path.basename(name))[0])
    if found is None:
        raise FileNotFoundError(f"Region LoRA {name!r}: no such file, and not found in pipe.lora_dirs "
                                f"{list(map(str, folders))}")
    return found


class RegionalDenoiser:
    """The fused prediction of the base prompt and the regions (see the module); used where a
    :class:`~sdlite.guidance.GuidedDenoiser` is (it advances the pass's step object and offers ``guide``)."""

    def __init__(self, base, regions: list[tuple[Callable, Region, LoraSwitch]], step, *, size: tuple[int, int],
                 bootstrap: float = 0.0, seed: int = 0, encode: Callable | None = None):
        self.base, self.regions, self.step, self.size = base, regions, step, size
        self.bootstrap_steps = round(bootstrap * step.steps)
        self.generator = torch.Generator().manual_seed(seed)
        self.encode = encode
        self._masks: tuple | None = None
        self._colours: torch.Tensor | None = None
        self._noise: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
        self.step.advance(sigma)
        return self.guide(x, sigma)

    def masks(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(base mask, region masks), each [1, 1, h, w] at ``x``'s size, made once per size."""
        rows, columns = x.shape[-2:]
        if self._masks is None or self._masks[0] != (rows, columns):
            masks = [r.latent_mask(rows, columns, *self.size)[None, None].to(x.device) for _, r, _ in self.regions]
            base = (1 - torch.stack(masks).sum(0)).clamp(min=0)
            self._masks = ((rows, columns), base, masks)
        return self._masks[1], self._masks[2]

    def guide(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        base_mask, masks = self.masks(x)
        bootstrapping = self.step.step < self.bootstrap_steps
        parts = [(self.base, base_mask, None, contextlib.nullcontext)] if base_mask.any() else []
        parts += [(g, m * r.weight, m if bootstrapping else None, s.unet) for (g, r, s), m in zip(self.regions, masks)]
        value = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        count = torch.zeros_like(value[:1, :1])
        for guided, weight, keep, switch in parts:
            seen = x if keep is None else keep * x + (1 - keep) * self.background(x, sigma)
            with switch():
                value += weight * guided.guide(seen.to(x.dtype), sigma).float()
            count += weight
        return (value / count).to(x.dtype)

    def background(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """A random solid colour's latent noised to σ (MultiDiffusion's bootstrapping background)."""
        if self._colours is None:
            colours = torch.rand(8, 3, 1, 1, generator=self.generator).expand(8, 3, 64, 64)
            self._colours = self.encode(colours).float().mean(dim=(2, 3), keepdim=True).to(x.device)
        if self._noise is None or self._noise.shape[-2:] != x.shape[-2:]:  # one ε per pass size
            self._noise = torch.randn(x.shape[1:], generator=self.generator)[None].to(x.device)
        pick = int(torch.randint(len(self._colours), (1,), generator=self.generator))
        s = (sigma if sigma.ndim else sigma.expand(x.shape[0])).reshape(-1, 1, 1, 1).float()
        return self._colours[pick:pick + 1] + s * self._noise
