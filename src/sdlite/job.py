"""What one generation is asked to do: the :class:`Job` the pipeline methods fill from their keyword arguments (A1111's
names in snake case), hires-fix settings, and the :class:`Result` they return."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image

from . import images as im
from .composition import check_composition
from .conditioning import EMPHASIS_MODES
from .rng import SOURCES
from .schedulers import resolve_schedule

FILL_MODES = ("fill", "original", "latent noise", "latent nothing")
LATENT_UPSCALE_MODES = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                        "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
                        "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}
IMAGE_UPSCALERS = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST,
                   "Bicubic": Image.Resampling.BICUBIC}


@dataclass
class Hires:
    """Hires fix: upscale by ``scale`` (or to ``width``×``height``) then a second pass."""

    scale: float = 2.0
    width: int = 0
    height: int = 0
    # a latent mode ("Latent", …), an image filter ("Lanczos", …), an upscaler file by A1111 name or stem ("R-ESRGAN
    # 4x+", "4x-UltraSharp"; looked up in pipe.upscaler_dirs) or a module from sdlite.upscalers.load
    upscaler: str | torch.nn.Module = "Latent"
    steps: int = 0  # 0 = same as the first pass
    denoising_strength: float = 0.7

    def size(self, width: int, height: int) -> tuple[int, int]:
        if self.width and self.height:
            return self.width, self.height
        return int(width * self.scale) // 8 * 8, int(height * self.scale) // 8 * 8


@dataclass
class Job:
    """Everything one generation needs; the pipeline methods fill it from their keyword arguments."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "Euler a"
    scheduler: str = "Automatic"
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] = (0, 0)
    batch_size: int = 1
    clip_skip: int = 1
    eta_noise_seed_delta: int = 0
    rng: str = "CPU"
    sampler_options: dict = field(default_factory=dict)
    # img2img / inpaint
    init_image: Image.Image | None = None
    denoising_strength: float = 0.75
    resize_mode: str = "just resize"
    mask: Image.Image | None = None
    mask_blur: int = 4
    invert_mask: bool = False
    inpaint_fill: str = "original"
    only_masked: bool = False
    only_masked_padding: int = 32
    mask_weight: float = 1.0
    # hires fix and SDXL size conditioning
    hires: Hires | None = None
    original_size: tuple[int, int] | None = None  # (width, height); default: the generation size
    crop: tuple[int, int] = (0, 0)  # (left, top)
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    controlnets: list = field(default_factory=list)
    # sdlite.IPAdapterUnit / InstantIDUnit: image prompts on the base model's UNet (InstantID also adds its IdentityNet)
    ip_adapters: list = field(default_factory=list)
    t2i_adapters: list = field(default_factory=list)  # sdlite.T2IAdapterUnit: features added to the UNet encoder
    refiner: object | None = None  # a loaded "sdxl-refiner" StableDiffusion: takes over after refiner_switch_at
    refiner_switch_at: float = 0.8
    refiner_switch_by_steps: bool = False  # A1111's option: the share of model calls done, not the call's timestep
    cfg_batch: bool = True  # cond and uncond in one UNet call; False halves the activation memory
    callback: Callable[[dict], None] | None = None
    # A1111's "Emphasis mode" setting ("Original", "No norm", "Ignore", "None"; sdlite.conditioning) and its "Use
    # old prompt editing timelines" compatibility option (sdlite.prompt.schedules); both are written to the infotext.
    emphasis: str = "Original"
    use_old_scheduling: bool = False
    # VAE in overlapping tiles (sdlite.vae.tiling): True for the default tiles, an int for a tile of that many
    # latents (that many times the downsample factor in pixels when encoding), a multiple of 4 for the 1/4 overlap.
    vae_tiling: bool | int = False
    # Composition (sdlite.composition): MultiDiffusion windows (sdlite.Tiles), regional prompts (sdlite.Region) and
    # the share of the first sampler steps whose regions see a bootstrapping background (MultiDiffusion §4.2).
    tiling: object | None = None
    regions: list = field(default_factory=list)
    region_bootstrap: float = 0.0

    def check(self) -> None:
        im.check_size(self.width, self.height)
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        resolve_schedule(self.scheduler, self.sampler)
        if self.emphasis not in EMPHASIS_MODES:
            raise ValueError(f"unknown emphasis mode {self.emphasis!r}; known: {', '.join(EMPHASIS_MODES)}")
        if not 0.0 <= self.denoising_strength <= 1.0:
            raise ValueError(f"denoising strength must lie in [0, 1], got {self.denoising_strength}")
        if self.rng not in SOURCES:
            raise ValueError(f"unknown noise source {self.rng!r}; known: {', '.join(SOURCES)}")
        if self.inpaint_fill not in FILL_MODES:
            raise ValueError(f"unknown masked-content mode {self.inpaint_fill!r}; known: {', '.join(FILL_MODES)}")
        if self.mask is not None and self.init_image is not None and self.mask.size != self.init_image.size:
            raise ValueError(f"the mask is {self.mask.size[0]}x{self.mask.size[1]} but the image is "
                             f"{self.init_image.size[0]}x{self.init_image.size[1]}")
        if self.refiner is not None and not 0.0 < self.refiner_switch_at < 1.0:
            raise ValueError(f"refiner_switch_at must lie in (0, 1), got {self.refiner_switch_at}")
        check_composition(self)
        if self.hires is not None:
            upscaler = self.hires.upscaler
            if not isinstance(upscaler, torch.nn.Module) and upscaler not in LATENT_UPSCALE_MODES \
                    and upscaler not in IMAGE_UPSCALERS:
                known = ", ".join([*LATENT_UPSCALE_MODES, *IMAGE_UPSCALERS])
                raise ValueError(f"unknown hires upscaler {upscaler!r}; known: {known}, or an upscaler module "
                                 "(the pipeline methods load names found in pipe.upscaler_dirs)")
            im.check_size(*self.hires.size(self.width, self.height))


@dataclass
class Result:
    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    latents: torch.Tensor  # the final latents, as the UNet sees them (scaled)


def resolve_seed(seed: int) -> int:
    """A1111: -1 (or None) picks a random seed in [0, 2³²)."""
    return random.randrange(2**32) if seed is None or int(seed) == -1 else int(seed)
