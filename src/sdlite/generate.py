"""The one generation core behind txt2img, img2img, inpaint and hires fix (AUTOMATIC1111 1.10 processing rules).

The four differ only in the initial latent, the sigma range and the mask: txt2img starts from noise at the first
sigma; img2img from the encoded image plus noise at a later sigma (A1111's step accounting for denoising strength);
inpaint adds a mask (latent blending at every step; inpainting checkpoints also get masked-image conditioning); hires
fix is a txt2img pass followed by an img2img pass on the upscaled latent.
"""

from __future__ import annotations

import functools
import os
import random
import re
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
import numpy as np
from PIL import Image, ImageOps

from . import images as im
from .conditioning import encode_schedule
from .guidance import Cond, GuidedDenoiser, Handoff, UNetCall, pad_parts
from .prompt import extract_networks, split_and
from .rng import SOURCES, ImageNoise
from .schedulers import get_sampler, get_sampler_and_sigmas
from .schedulers.sigmas import find_schedule
from .unet.blocks import timestep_embedding
from .vae.tiling import decode_tiled, encode_tiled

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
    upscaler: str = "Latent"
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
    refiner: object | None = None  # a loaded "sdxl-refiner" StableDiffusion: takes over after refiner_switch_at
    refiner_switch_at: float = 0.8
    cfg_batch: bool = True  # cond and uncond in one UNet call; False halves the activation memory
    callback: Callable[[dict], None] | None = None
    # VAE in overlapping tiles (sdlite.vae.tiling): True for the default tiles, an int for a tile of that many
    # latents (that many times the downsample factor in pixels when encoding), a multiple of 4 for the 1/4 overlap.
    vae_tiling: bool | int = False

    def check(self) -> None:
        im.check_size(self.width, self.height)
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        get_sampler(self.sampler)
        find_schedule(self.scheduler)
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
        if self.hires is not None:
            if self.hires.upscaler not in LATENT_UPSCALE_MODES and self.hires.upscaler not in IMAGE_UPSCALERS:
                known = ", ".join([*LATENT_UPSCALE_MODES, *IMAGE_UPSCALERS])
                raise ValueError(f"unknown hires upscaler {self.hires.upscaler!r}; known: {known}")
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


def size_embedding(values: list[float], batch: int) -> torch.Tensor:
    """SDXL's size/crop/aesthetic conditioning: each number as a 256-wide sinusoidal embedding, concatenated."""
    emb = timestep_embedding(torch.tensor(values, dtype=torch.float32), 256)
    return emb.reshape(1, -1).expand(batch, -1)


class Generation:
    """One call of the pipeline: conditioning, noise, sampling, decoding, for a whole batch."""

    def __init__(self, pipe, job: Job):
        job.check()
        self.pipe, self.job = pipe, job
        self.seed = resolve_seed(job.seed)
        self.seeds = [self.seed + i for i in range(job.batch_size)]
        self.subseed = resolve_seed(job.subseed) if job.subseed_strength else job.subseed
        self.subseeds = [self.subseed + i for i in range(job.batch_size)] if job.subseed_strength else None
        self.device, self.dtype = pipe.device, pipe.dtype
        self.loras = self._resolve_loras()
        if job.refiner is not None and not (pipe.family.startswith("sdxl") and job.refiner.family.startswith("sdxl")):
            raise ValueError(f"a refiner hands over latents, so both models must be SDXL-family; got {pipe.family} "
                             f"and {job.refiner.family}")

    # --- extra networks ---

    def _resolve_loras(self) -> list[tuple[str, str, float, float]]:
        """``<lora:name:te:unet>`` tags of the prompt as (name, file, te weight, unet weight), files found by name
        (file stem) in ``pipe.lora_dirs``; a name that is not found is an error, not a silent no-op."""
        found = []
        for tag in extract_networks(self.job.prompt)[1]:
            if tag.kind not in ("lora", "lyco"):
                raise ValueError(f"<{tag.kind}:{tag.name}> extra networks are not supported (only lora)")
            te, unet, _ = tag.lora_weights()
            path = find_lora(self.pipe.lora_dirs, tag.name)
            if path is None:
                raise ValueError(f"<lora:{tag.name}>: no {tag.name}.safetensors/.pt/.ckpt/.bin in pipe.lora_dirs "
                                 f"{list(map(str, self.pipe.lora_dirs))}")
            found.append((tag.name, path, te, unet))
        return found

    # --- conditioning ---------------------------------------------------------------------------------------------

    def _adm(self, pooled: torch.Tensor, width: int, height: int, negative: bool, family: str) -> torch.Tensor | None:
        if family not in ("sdxl", "sdxl-refiner"):
            return None
        ow, oh = self.job.original_size or (width, height)
        left, top = self.job.crop
        if family == "sdxl":
            extra = [oh, ow, top, left, height, width]
        else:
            extra = [oh, ow, top, left, self.job.negative_aesthetic_score if negative else self.job.aesthetic_score]
        return torch.cat([pooled, size_embedding(extra, pooled.shape[0]).to(pooled)], dim=1)

    def _cond(self, c, width: int, height: int, negative: bool, family: str) -> Cond:
        b = self.job.batch_size
        y = None if c.pooled is None else self._adm(c.pooled.expand(b, -1), width, height, negative, family)
        return Cond(c.context.expand(b, -1, -1), y)

    def conditioning(self, width: int, height: int, steps: int, hires_steps: int | None = None, pipe=None):
        """``cond_at(model_call)`` over the prompt's AND parts and prompt-editing schedule (A1111 rules), for
        ``pipe`` (default: this generation's model; the refiner has its own encoders)."""
        job, pipe = self.job, pipe or self.pipe
        kw = dict(hires_steps=hires_steps, clip_skip=job.clip_skip, embeddings=pipe.embeddings)
        encode = functools.partial(encode_schedule, encoders=pipe.text_encoders, family=pipe.family, steps=steps)
        # Every text of the pass is encoded here, up front, so offloaded encoders visit the device once.
        with pipe.using(*pipe.text_encoders):
            parts = [(encode(text, **kw), weight) for text, weight in split_and(extract_networks(job.prompt)[0])]
            negative = encode(extract_networks(job.negative_prompt)[0], negative=True, **kw)
        cache: dict = {}

        def cond_at(step: int):
            key = (tuple(id(s.cond_at(step)) for s, _ in parts), id(negative.cond_at(step)))
            if key not in cache:
                conds = [(self._cond(s.cond_at(step), width, height, False, pipe.family), w) for s, w in parts]
                cache[key] = (pad_parts(conds), self._cond(negative.cond_at(step), width, height, True, pipe.family))
            return cache[key]

        return cond_at

    def schedule_steps(self, steps: int) -> int:
        """The step count prompt schedules are laid over: A1111 counts model calls, two per step for second-order
        samplers."""
        return get_sampler(self.job.sampler).total_steps(steps)

    # --- latents --------------------------------------------------------------------------------------------------

    def noise(self, width: int, height: int) -> ImageNoise:
        job = self.job
        f = self.pipe.vae.config.downsample_factor
        return ImageNoise((4, height // f, width // f), self.seeds, subseeds=self.subseeds,
                          subseed_strength=job.subseed_strength, seed_resize_from=job.seed_resize_from,
                          source=job.rng, device=self.device, eta_noise_seed_delta=job.eta_noise_seed_delta)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] → scaled latents; the posterior sample uses a CPU generator seeded with the
        first seed, so that img2img is reproducible (A1111 draws it from torch's global generator)."""
        vae = self.pipe.vae
        pixels = (images * 2 - 1).to(self.device, self.dtype)
        tile = self.job.vae_tiling
        with self.pipe.using(vae):
            if tile:
                kw = {} if tile is True else {"tile": tile * vae.config.downsample_factor}
                posterior = encode_tiled(vae, pixels, **kw)
            else:
                posterior = vae.encode(pixels)
        return posterior.sample(torch.Generator().manual_seed(self.seed)) * vae.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents, tile = (latents / vae.scale_factor).to(self.dtype), self.job.vae_tiling
        with self.pipe.using(vae):
            if tile:
                return decode_tiled(vae, latents, **({} if tile is True else {"tile": tile}))
            return vae.decode(latents)

    # --- sampling -------------------------------------------------------------------------------------------------

    def sample(self, x_init: torch.Tensor | None, noise: ImageNoise, cond_at, *, total_steps: int, run_steps: int,
               image_cond: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the sampler from ``x_init`` (None: pure noise) over the last ``run_steps`` of a ``total_steps``
        schedule, which is how A1111 accounts for denoising strength."""
        job = self.job
        state = {"step": 0}
        unet_call = UNetCall(self.pipe.unet, image_cond, self._control(x_init, noise, state, run_steps))
        denoiser = get_sampler(job.sampler).make_denoiser(unet_call, self.pipe.prediction)
        sampler, sigmas, options = get_sampler_and_sigmas(job.sampler, job.scheduler, total_steps, run_steps,
                                                          denoiser, seeds=self.seeds, txt2img=x_init is None,
                                                          **job.sampler_options)
        sigmas = sigmas.to(self.device)
        first = noise.first()
        x = first * sigmas[0] if x_init is None else x_init + first * sigmas[0]
        model = GuidedDenoiser(denoiser, cond_at, job.cfg_scale, mask=mask, init_latent=x_init, batch=job.cfg_batch)
        # The UNet and its ControlNets are on the device for the sampling loop alone (offload); the refiner's prompts
        # are encoded before it starts, and its UNet replaces the base one when it takes over.
        visit = self.pipe.using(self.pipe.unet, *(u.net for u in job.controlnets))
        if job.refiner is not None:
            model = self._handoff(model, x_init, mask, total_steps, run_steps,
                                  on_switch=lambda: visit.switch(job.refiner.offload, [job.refiner.unet]))
        if "noise_sampler" not in options:  # SDE samplers come with their Brownian tree (None = build it)
            options["noise_sampler"] = noise.noise_sampler
        with visit, torch.inference_mode():
            samples = sampler(model, x, sigmas, callback=self._progress(len(sigmas) - 1, state), **options)
        if mask is not None:
            samples = x_init * (1 - mask) + samples * mask
        return samples

    def _handoff(self, base: GuidedDenoiser, x_init, mask, total_steps: int, run_steps: int,
                 on_switch: Callable[[], None]) -> Handoff:
        job, refiner = self.job, self.job.refiner
        f = self.pipe.vae.config.downsample_factor
        width, height = (x_init.shape[3] * f, x_init.shape[2] * f) if x_init is not None else (job.width, job.height)
        steps = self.schedule_steps(total_steps)
        cond_at = self.conditioning(width, height, steps, pipe=refiner)
        denoiser = get_sampler(job.sampler).make_denoiser(UNetCall(refiner.unet), refiner.prediction)
        model = GuidedDenoiser(denoiser, cond_at, job.cfg_scale, mask=mask, init_latent=x_init, batch=job.cfg_batch)
        return Handoff(base, model, job.refiner_switch_at, self.schedule_steps(run_steps), on_switch=on_switch)

    def _control(self, x_init, noise: ImageNoise, state: dict, run_steps: int):
        """The ControlNet hook: hints prepared once for this pass's size; units gated by the step progress."""
        units = self.job.controlnets
        if not units:
            return None
        from .adapters.controlnet import control_residuals, prepare_hint

        f = self.pipe.vae.config.downsample_factor
        height, width = noise.shape[1] * f, noise.shape[2] * f
        hints = [prepare_hint(u, width, height, device=self.device, dtype=self.dtype) for u in units]

        def control(x, t, context, y, cond_rows):
            return control_residuals(units, hints, x, t, context, y, progress=state["step"] / run_steps,
                                     cond=cond_rows)

        return control

    def _progress(self, total: int, state: dict):
        """The sampler callback: advances the step count ControlNet gating reads, and reports to the user's."""
        callback, start = self.job.callback, time.perf_counter()

        def report(info: dict) -> None:
            state["step"] = info["i"] + 1
            if callback is not None:
                callback({**info, "total": total, "elapsed": time.perf_counter() - start})

        return report

    # --- the four modes -------------------------------------------------------------------------------------------

    def run(self) -> Result:
        # Merged, not injected: no cost per step, and removal restores the original bits exactly.
        handles = [self.pipe.add_lora(path, weight=unet, te_weight=te, mode="merge")
                   for _, path, te, unet in self.loras]
        # Hashed once per generation (each handle hashes its file once), not once per image of the batch.
        self.lora_hashes = ", ".join(f"{re.sub('[:,]', '', name)}: {h.hash}"
                                     for (name, *_), h in zip(self.loras, handles)) or None
        try:
            return self._run()
        finally:
            for handle in reversed(handles):
                handle.remove()

    def _run(self) -> Result:
        job = self.job
        if job.init_image is None:
            samples = self.txt2img()
        else:
            samples, finish = self.img2img()
        if job.hires is not None:
            samples = self.hires(samples)
        decoded = self.decode(samples)
        pictures = im.to_pil(decoded)
        if job.init_image is not None and job.mask is not None:
            pictures = [finish(p) for p in pictures]
        return Result(pictures, [self.infotext(i) for i in range(len(pictures))], self.seeds, samples)

    def txt2img(self) -> torch.Tensor:
        job = self.job
        cond_at = self.conditioning(job.width, job.height, self.schedule_steps(job.steps))
        return self.sample(None, self.noise(job.width, job.height), cond_at, total_steps=job.steps,
                           run_steps=job.steps, image_cond=self._blank_inpaint_conditioning(job.width, job.height))

    def _blank_inpaint_conditioning(self, width: int, height: int) -> torch.Tensor | None:
        """Inpainting models without an image: a grey image, fully masked (A1111 txt2img_image_conditioning)."""
        if not self.pipe.is_inpaint:
            return None
        latent = self.encode(torch.full((self.job.batch_size, 3, height, width), 0.5))
        return torch.cat([torch.ones_like(latent[:, :1]), latent], dim=1)

    def img2img(self):
        job = self.job
        prep = self._prepare_image()
        pixels = im.to_tensor(prep["image"])[None].repeat(job.batch_size, 1, 1, 1)
        init_latent = self.encode(pixels)
        noise = self.noise(job.width, job.height)
        mask = None
        if prep["latent_mask"] is not None:
            mask = im.latent_mask(prep["latent_mask"], init_latent.shape[3], init_latent.shape[2], 4)
            mask = mask[None].to(init_latent)
            if job.inpaint_fill == "latent noise":
                fresh = ImageNoise(init_latent.shape[1:], self.seeds, source=job.rng, device=self.device).first()
                init_latent = init_latent * (1 - mask) + fresh.to(init_latent) * mask
            elif job.inpaint_fill == "latent nothing":
                init_latent = init_latent * (1 - mask)
        image_cond = self._inpaint_conditioning(pixels, prep["cond_mask"]) if self.pipe.is_inpaint else None
        cond_at = self.conditioning(job.width, job.height, self.schedule_steps(job.steps))
        # A1111's step accounting: the last int(strength·steps) + 1 steps of a `steps`-step schedule.
        run_steps = int(min(job.denoising_strength, 0.999) * job.steps) + 1
        # A1111 blends the original latent back at every step for inpainting checkpoints too (its CFGDenoiser gets
        # the mask whenever there is one), and once more after sampling (inside ``sample``).
        samples = self.sample(init_latent, noise, cond_at, total_steps=job.steps, run_steps=run_steps,
                              image_cond=image_cond, mask=mask)
        return samples, prep["finish"]

    def _prepare_image(self) -> dict:
        """Resize/crop the init image and mask as A1111 does; returns what sampling and the final overlay need."""
        job = self.job
        original = im.flatten(job.init_image)
        out = {"latent_mask": None, "cond_mask": None, "finish": None}
        if job.mask is None:
            out["image"] = im.resize_image(job.resize_mode, original, job.width, job.height)
            return out
        mask = im.binary_mask(job.mask)
        if job.invert_mask:
            mask = ImageOps.invert(mask)
        if job.mask_blur > 0:
            mask = im.blur_mask(mask, job.mask_blur, job.mask_blur)
        paste_to = None
        if job.only_masked:
            overlay_mask = mask
            region = im.expand_region(im.crop_region(mask, job.only_masked_padding), job.width, job.height,
                                      mask.width, mask.height)
            x1, y1, x2, y2 = region
            work_mask = im.resize_image("resize and fill", mask.crop(region), job.width, job.height)
            image = im.resize_image("resize and fill", original.crop(region), job.width, job.height)
            paste_to = (x1, y1, x2 - x1, y2 - y1)
            base = original
        else:
            work_mask = im.resize_image(job.resize_mode, mask, job.width, job.height)
            overlay_mask = work_mask.point(lambda v: min(255, v * 2))
            image = im.resize_image(job.resize_mode, original, job.width, job.height)
            base = image
        if job.inpaint_fill != "original":
            image = im.fill_masked(image, work_mask)
        out.update(image=image, latent_mask=work_mask, cond_mask=work_mask,
                   finish=lambda generated: im.overlay_original(generated, base, overlay_mask, paste_to))
        return out

    def _inpaint_conditioning(self, pixels: torch.Tensor, mask_image: Image.Image | None) -> torch.Tensor:
        """[mask | masked-image latent] for 9-channel UNets; the image is lerped towards its masked version by the
        "conditional mask weight" (A1111 inpainting_image_conditioning)."""
        b, _, h, w = pixels.shape
        if mask_image is None:
            mask = torch.ones(b, 1, h, w)
        else:
            mask = torch.from_numpy(np.around(np.asarray(mask_image.convert("L"), dtype=np.float32) / 255.0))
            mask = mask[None, None].expand(b, 1, h, w)
        masked = torch.lerp(pixels, pixels * (1.0 - mask), self.job.mask_weight)
        latent = self.encode(masked)
        mask_small = F.interpolate(mask.to(latent), size=latent.shape[-2:])
        return torch.cat([mask_small, latent], dim=1)

    def hires(self, samples: torch.Tensor) -> torch.Tensor:
        job, hr = self.job, self.job.hires
        width, height = hr.size(job.width, job.height)
        if hr.upscaler in LATENT_UPSCALE_MODES:
            mode, antialias = LATENT_UPSCALE_MODES[hr.upscaler]
            f = self.pipe.vae.config.downsample_factor
            upscaled = F.interpolate(samples.float(), size=(height // f, width // f), mode=mode,
                                     antialias=antialias).to(samples)
        else:
            resample = IMAGE_UPSCALERS[hr.upscaler]
            pictures = [p.resize((width, height), resample) for p in im.to_pil(self.decode(samples))]
            upscaled = self.encode(torch.stack([im.to_tensor(p) for p in pictures]))
        image_cond = self._blank_inpaint_conditioning(width, height)
        # A1111 runs exactly the hires steps: the schedule is stretched to steps/strength and its tail is used.
        steps = hr.steps or job.steps
        total = int(steps / min(hr.denoising_strength, 0.999)) if hr.denoising_strength > 0 else steps
        cond_at = self.conditioning(width, height, self.schedule_steps(job.steps), self.schedule_steps(steps))
        return self.sample(upscaled, self.noise(width, height), cond_at,
                           total_steps=total, run_steps=steps, image_cond=image_cond)

    # --- infotext -------------------------------------------------------------------------------------------------

    def infotext(self, index: int) -> str:
        from .infotext import create_infotext

        job, pipe = self.job, self.pipe
        params = {
            "Steps": job.steps, "Sampler": job.sampler, "Schedule type": job.scheduler,
            "CFG scale": float(job.cfg_scale),
            "Seed": self.seeds[index], "Size": f"{job.width}x{job.height}", "Model hash": pipe.model_hash,
            "Model": pipe.model_name,
            "Variation seed": self.subseeds[index] if self.subseeds else None,
            "Variation seed strength": float(job.subseed_strength) if job.subseed_strength else None,
            "Seed resize from": "{}x{}".format(*job.seed_resize_from) if all(job.seed_resize_from) else None,
            "Denoising strength": float(job.denoising_strength) if job.init_image is not None or job.hires else None,
            "Clip skip": job.clip_skip if job.clip_skip > 1 else None,
            "ENSD": job.eta_noise_seed_delta or None,
            "RNG": job.rng if job.rng != "GPU" else None,
        }
        if job.hires is not None:
            hr = job.hires
            if hr.width and hr.height:
                params["Hires resize"] = f"{hr.width}x{hr.height}"
            else:
                params["Hires upscale"] = float(hr.scale)
            params["Hires steps"] = hr.steps or None
            params["Hires upscaler"] = hr.upscaler
            params["Denoising strength"] = float(hr.denoising_strength)
        if job.mask is not None:
            params["Mask blur"] = job.mask_blur
        if job.refiner is not None:
            params["Refiner"] = f"{job.refiner.model_name} [{job.refiner.model_hash}]"
            params["Refiner switch at"] = float(job.refiner_switch_at)
        params["Lora hashes"] = self.lora_hashes
        params["Version"] = f"sdlite {__import__('sdlite').__version__}"
        return create_infotext(job.prompt, job.negative_prompt, params)


LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


def find_lora(folders, name: str) -> str | None:
    """The file called ``name`` (+ a LoRA suffix) in ``folders`` or their subfolders, first match in sorted order."""
    for folder in folders:
        for root, dirs, files in sorted(os.walk(folder)):
            dirs.sort()
            for suffix in LORA_SUFFIXES:
                if name + suffix in files:
                    return os.path.join(root, name + suffix)
    return None


def generate(pipe, job: Job) -> Result:
    return Generation(pipe, replace(job)).run()
