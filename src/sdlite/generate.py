"""The one generation core behind txt2img, img2img, inpaint and hires fix (AUTOMATIC1111 1.10 processing rules).

The four differ only in the initial latent, the sigma range and the mask: txt2img starts from noise at the first
sigma; img2img from the encoded image plus noise at a later sigma (A1111's step accounting for denoising strength);
inpaint adds a mask (latent blending at every step; inpainting checkpoints also get masked-image conditioning);
hires fix is a txt2img pass followed by an img2img pass on the upscaled latent. Each mode returns :class:`Latents`.

Every pass runs the same chain (``sdlite.guidance`` draws it): a :class:`~sdlite.schedulers.SamplingPass` calls a
:class:`~sdlite.guidance.GuidedDenoiser` (or a :class:`~sdlite.guidance.Handoff` between the base model's and the
refiner's), which calls the sampler's :class:`~sdlite.schedulers.Denoiser`, which calls a
:class:`~sdlite.unet_call.UNetCall`, which calls the UNet; all of them read one
:class:`~sdlite.guidance.StepState` per pass (:meth:`Generation.sample` builds it).
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from . import images as im
from . import upscalers
from .composition.record import infotext_params as composition_params
from .composition.regions import RegionalConds, RegionalPrompts
from .composition.tiles import TiledDenoiser
from .guidance import GuidedDenoiser, Handoff, StepState
from .init_image import masked_pixels, prepare_image
from .job import IMAGE_UPSCALERS, LATENT_UPSCALE_MODES, Hires, Job, Result, resolve_seed
from .prompting import Prompts, size_embedding
from .rng import ImageNoise
from .schedulers import get_sampler, get_sampler_and_sigmas
from .unet_call import UNetCall
from .vae.tiling import decode_tiled, encode_tiled

# Hires, Job, Result, size_embedding: re-exported for the pipeline, sdlite's front and the benchmarks.
__all__ = ["Generation", "Hires", "Job", "Latents", "Result", "generate", "size_embedding"]


@dataclass
class Latents:
    """What every mode returns: the scaled latents and, for inpainting, the overlay that puts the original's
    unmasked pixels back into each decoded picture."""

    samples: torch.Tensor
    finish: Callable[[Image.Image], Image.Image] | None = None


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
        self.sampler = get_sampler(job.sampler)
        self.prompts = RegionalPrompts(job) if job.regions else Prompts(job)
        self.loras = self.prompts.loras(pipe.lora_dirs)
        self.hypernetworks = self.prompts.hypernetworks(pipe.hypernetwork_dirs)
        self.lora_hashes: str | None = None
        self._patch_hook = None  # built on first use: IP-Adapter tokens and hypernetworks (attention patches)
        if job.refiner is not None and not (pipe.family.startswith("sdxl") and job.refiner.family.startswith("sdxl")):
            raise ValueError(f"a refiner hands over latents, so both models must be SDXL-family; got {pipe.family} "
                             f"and {job.refiner.family}")

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

    # --- the chain ------------------------------------------------------------------------------------------------

    def calls(self, steps: int) -> int:
        """The model calls prompt schedules are laid over for ``steps`` sampler steps (A1111 counts calls: two per
        step for second-order samplers)."""
        return self.sampler.total_steps(steps)

    def sample(self, x_init: torch.Tensor | None, noise: ImageNoise, cond_at, *, total_steps: int, run_steps: int,
               image_cond: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the sampler from ``x_init`` (None: pure noise) over the last ``run_steps`` of a ``total_steps``
        schedule, which is how A1111 accounts for denoising strength."""
        job, pipe = self.job, self.pipe
        table = self.sampler.make_denoiser(None, pipe.prediction)  # the σ table the schedule is read from
        # The model's family picks the Align Your Steps table, as A1111 does (SDXL's or SD 1.5's).
        sp = get_sampler_and_sigmas(job.sampler, job.scheduler, total_steps, run_steps, table, seeds=self.seeds,
                                    txt2img=x_init is None, **{"family": pipe.family, **job.sampler_options})
        step = StepState(sp.grid, sp.steps, sp.model_calls)
        control = self._control(noise)
        model = self._guided(pipe, step, cond_at, image_cond=image_cond, control=control, mask=mask, x_init=x_init,
                             features=self._adapter_features(noise))
        first, sigma = noise.first(), sp.sigmas[0].to(self.device)
        x = first * sigma if x_init is None else x_init + first * sigma
        # The UNet and its ControlNets are on the device for the sampling loop alone (offload); the refiner's prompts
        # are encoded before it starts, and its UNet replaces the base one when it takes over.
        from .adapters.instantid import networks

        visit = pipe.using(pipe.unet, *(u.net for u in job.controlnets), *networks(job.ip_adapters))
        if job.refiner is not None:
            refiner = job.refiner
            f = pipe.vae.config.downsample_factor
            size = (x_init.shape[3] * f, x_init.shape[2] * f) if x_init is not None else (job.width, job.height)
            refined = self._guided(refiner, step, self.prompts.cond_at(refiner, *size, self.calls(total_steps)),
                                   mask=mask, x_init=x_init)
            completed = None if job.refiner_switch_by_steps else timestep_progress(table)
            model = Handoff(model, refined, job.refiner_switch_at, completed,
                            on_switch=lambda: visit.switch(refiner.offload, [refiner.unet]))
        with visit, torch.inference_mode():
            samples = sp(model, x, noise_sampler=noise.noise_sampler, callback=self._progress(len(sp.sigmas) - 1))
        if mask is not None:
            samples = x_init * (1 - mask) + samples * mask
        return samples

    def _guided(self, pipe, step: StepState, cond_at, *, image_cond=None, control=None, mask=None,
                x_init=None, features=None) -> GuidedDenoiser:
        """sampler → GuidedDenoiser → Denoiser → UNetCall → ``pipe.unet``, for one model of the pass; with
        ``tiling`` a TiledDenoiser wraps the Denoiser, with regions a RegionalDenoiser fuses one GuidedDenoiser per
        region (``sdlite.composition``)."""
        # Image prompts are the base model's: their projections fit its UNet, not a refiner's.
        patches = self._attention_patches() if pipe is self.pipe else None
        unet_call = UNetCall(pipe.unet, step, image_cond=image_cond, control=control, patches=patches,
                             features=features)
        denoiser = self.sampler.make_denoiser(unet_call, pipe.prediction)
        if self.job.tiling is not None:  # MultiDiffusion: the prediction fused over windows (sdlite.composition)
            denoiser = TiledDenoiser(denoiser, self.job.tiling)
        guided = functools.partial(GuidedDenoiser, denoiser, cfg_scale=self.job.cfg_scale, step=step, mask=mask,
                                   init_latent=x_init, batch=self.job.cfg_batch)
        if isinstance(cond_at, RegionalConds):  # regional prompts: one guided denoiser per region, fused
            return self.prompts.denoiser(guided, cond_at, step, seed=self.seed, encode=self.encode)
        return guided(cond_at)

    def _attention_patches(self):
        """The attention patches of ``UNetCall``: the IP-Adapter units (their image tokens computed once per
        generation, every pass sharing them) and the prompt's hypernetworks."""
        if not self.job.ip_adapters and not self.hypernetworks:
            return None
        if self._patch_hook is None:
            from .adapters import hypernetwork
            from .adapters.instantid import image_prompts
            from .adapters.ip_adapter import patch_hook

            units = image_prompts(self.job.ip_adapters)  # InstantID units: their adapter half

            images = patch_hook(units, self.pipe.unet) if units else (lambda rows, step: None)
            hyper = None
            if self.hypernetworks:
                hyper = hypernetwork.HypernetworkPatch(
                    hypernetwork.load(path, multiplier, device=self.device, dtype=self.dtype)
                    for _, path, multiplier in self.hypernetworks)

            def patches(rows, step):
                found = (images(rows, step) or []) + ([hyper] if hyper is not None else [])
                return found or None

            self._patch_hook = patches
        return self._patch_hook

    def _adapter_features(self, noise: ImageNoise):
        """The T2I-Adapter hook of ``UNetCall``: each unit's features computed once for this pass's size."""
        if not self.job.t2i_adapters:
            return None
        from .adapters.t2i_adapter import feature_hook

        f = self.pipe.vae.config.downsample_factor
        return feature_hook(self.job.t2i_adapters, self.pipe.unet, noise.shape[2] * f, noise.shape[1] * f, f,
                            self.device, self.dtype)

    def _control(self, noise: ImageNoise):
        """The ControlNet hook of ``UNetCall``: hints prepared once for this pass's size; units gated by the sampling
        progress of the step object. InstantID's IdentityNets add their residuals (their context: the face tokens)."""
        from .adapters.controlnet import control_residuals, prepare_hint
        from .adapters.instantid import control_hook

        units = self.job.controlnets
        f = self.pipe.vae.config.downsample_factor
        height, width = noise.shape[1] * f, noise.shape[2] * f
        identity = control_hook(self.job.ip_adapters, width, height, self.device, self.dtype,
                                (self.job.width, self.job.height))
        if not units and identity is None:
            return None
        hints = [prepare_hint(u, width, height, device=self.device, dtype=self.dtype) for u in units]

        def control(x, t, context, y, cond_rows, step: StepState, windows=None):
            cut = hints if windows is None else [windows.crop(h, x.shape[0]) for h in hints]
            total = control_residuals(units, cut, x, t, context, y, progress=step.progress, cond=cond_rows)
            extra = identity(x, t, y, cond_rows, step, windows) if identity is not None else None
            if total is None or extra is None:
                return total if extra is None else extra
            return [a + b.to(a.dtype) for a, b in zip(total, extra)]

        return control

    def _progress(self, total: int):
        """The sampler callback, for the user's: sampler step, ``total`` steps and elapsed seconds."""
        callback, start = self.job.callback, time.perf_counter()
        if callback is None:
            return None
        return lambda info: callback({**info, "total": total, "elapsed": time.perf_counter() - start})

    # --- the four modes -------------------------------------------------------------------------------------------

    def run(self) -> Result:
        # Merged, not injected: no cost per step, and removal restores the original bits exactly.
        handles = [self.pipe.add_lora(path, weight=unet, te_weight=te, mode="merge")
                   for _, path, te, unet in self.loras]
        # Hashed once per generation (each handle hashes its file once), not once per image of the batch.
        self.lora_hashes = ", ".join(f"{re.sub('[:,]', '', name)}: {h.hash}"
                                     for (name, *_), h in zip(self.loras, handles)) or None
        try:
            if isinstance(self.prompts, RegionalPrompts):  # region LoRAs: injected at strength 0, switched per call
                handles += self.prompts.attach(self.pipe)
            return self._run()
        finally:
            for handle in reversed(handles):
                handle.remove()

    def _run(self) -> Result:
        job = self.job
        latents = self.txt2img() if job.init_image is None else self.img2img()
        if job.hires is not None:
            latents = self.hires(latents)
        pictures = im.to_pil(self.decode(latents.samples))
        if latents.finish is not None:
            pictures = [latents.finish(p) for p in pictures]
        return Result(pictures, [self.infotext(i) for i in range(len(pictures))], self.seeds, latents.samples)

    def txt2img(self) -> Latents:
        job = self.job
        cond_at = self.prompts.cond_at(self.pipe, job.width, job.height, self.calls(job.steps))
        return Latents(self.sample(None, self.noise(job.width, job.height), cond_at, total_steps=job.steps,
                                   run_steps=job.steps,
                                   image_cond=self._blank_inpaint_conditioning(job.width, job.height)))

    def _blank_inpaint_conditioning(self, width: int, height: int) -> torch.Tensor | None:
        """Inpainting models without an image: a grey image, fully masked (A1111 txt2img_image_conditioning)."""
        if not self.pipe.is_inpaint:
            return None
        latent = self.encode(torch.full((self.job.batch_size, 3, height, width), 0.5))
        return torch.cat([torch.ones_like(latent[:, :1]), latent], dim=1)

    def img2img(self) -> Latents:
        job = self.job
        prep = prepare_image(job)
        pixels = im.to_tensor(prep.image)[None].repeat(job.batch_size, 1, 1, 1)
        init_latent = self.encode(pixels)
        noise = self.noise(job.width, job.height)
        mask = None
        if prep.mask is not None:
            mask = im.latent_mask(prep.mask, init_latent.shape[3], init_latent.shape[2], 4)
            mask = mask[None].to(init_latent)
            if job.inpaint_fill == "latent noise":
                fresh = ImageNoise(init_latent.shape[1:], self.seeds, source=job.rng, device=self.device).first()
                init_latent = init_latent * (1 - mask) + fresh.to(init_latent) * mask
            elif job.inpaint_fill == "latent nothing":
                init_latent = init_latent * (1 - mask)
        image_cond = self._inpaint_conditioning(pixels, prep.mask) if self.pipe.is_inpaint else None
        cond_at = self.prompts.cond_at(self.pipe, job.width, job.height, self.calls(job.steps))
        # A1111's step accounting: the last int(strength·steps) + 1 steps of a `steps`-step schedule.
        run_steps = int(min(job.denoising_strength, 0.999) * job.steps) + 1
        # A1111 blends the original latent back at every step for inpainting checkpoints too (its CFGDenoiser gets
        # the mask whenever there is one), and once more after sampling (inside ``sample``).
        samples = self.sample(init_latent, noise, cond_at, total_steps=job.steps, run_steps=run_steps,
                              image_cond=image_cond, mask=mask)
        return Latents(samples, prep.finish)

    def _inpaint_conditioning(self, pixels: torch.Tensor, mask_image: Image.Image | None) -> torch.Tensor:
        """[mask | masked-image latent] for 9-channel UNets (A1111 inpainting_image_conditioning)."""
        mask, masked = masked_pixels(pixels, mask_image, self.job.mask_weight)
        latent = self.encode(masked)
        return torch.cat([F.interpolate(mask.to(latent), size=latent.shape[-2:]), latent], dim=1)

    def hires(self, first: Latents) -> Latents:
        job, hr = self.job, self.job.hires
        width, height = hr.size(job.width, job.height)
        if hr.upscaler in LATENT_UPSCALE_MODES:
            mode, antialias = LATENT_UPSCALE_MODES[hr.upscaler]
            f = self.pipe.vae.config.downsample_factor
            upscaled = F.interpolate(first.samples.float(), size=(height // f, width // f), mode=mode,
                                     antialias=antialias).to(first.samples)
        else:
            decoded = im.to_pil(self.decode(first.samples))
            if isinstance(hr.upscaler, torch.nn.Module):  # A1111's resize_image(1, …) with the upscaler network
                pictures = [upscalers.fit(p, hr.upscaler, width, height) for p in decoded]
            else:
                pictures = [p.resize((width, height), IMAGE_UPSCALERS[hr.upscaler]) for p in decoded]
            upscaled = self.encode(torch.stack([im.to_tensor(p) for p in pictures]))
        image_cond = self._blank_inpaint_conditioning(width, height)
        # A1111 runs exactly the hires steps: the schedule is stretched to steps/strength and its tail is used.
        steps = hr.steps or job.steps
        total = int(steps / min(hr.denoising_strength, 0.999)) if hr.denoising_strength > 0 else steps
        cond_at = self.prompts.cond_at(self.pipe, width, height, self.calls(job.steps), self.calls(steps))
        samples = self.sample(upscaled, self.noise(width, height), cond_at, total_steps=total, run_steps=steps,
                              image_cond=image_cond)
        return Latents(samples, first.finish)

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
            params["Hires upscaler"] = hr.upscaler if isinstance(hr.upscaler, str) else upscalers.name_of(hr.upscaler)
            params["Denoising strength"] = float(hr.denoising_strength)
        if job.mask is not None:
            params["Mask blur"] = job.mask_blur
        if job.refiner is not None:
            params["Refiner"] = f"{job.refiner.model_name} [{job.refiner.model_hash}]"
            params["Refiner switch at"] = float(job.refiner_switch_at)
            params["Refiner switch by sampling steps"] = True if job.refiner_switch_by_steps else None
        params["Lora hashes"] = self.lora_hashes
        if self.hypernetworks:  # A1111's Hypernet / Hypernet strength (the strength only when it is not 1)
            params["Hypernet"] = ", ".join(name for name, _, _ in self.hypernetworks)
            strengths = [m for _, _, m in self.hypernetworks]
            params["Hypernet strength"] = None if all(m == 1 for m in strengths) else \
                ", ".join(format(m, "g") for m in strengths)
        params.update(composition_params(job))
        params.update(self.prompts.infotext_params())
        params["Version"] = f"sdlite {__import__('sdlite').__version__}"
        return create_infotext(job.prompt, job.negative_prompt, params)


def generate(pipe, job: Job) -> Result:
    return Generation(pipe, replace(job)).run()


def timestep_progress(table) -> Callable[[torch.Tensor], float]:
    """A1111's default refiner progress at σ: (999 − t)/1000, t the index of the model's σ nearest max(σ)."""
    sigmas = table.schedule.sigmas

    def completed(sigma: torch.Tensor) -> float:
        t = int(torch.argmin((sigmas.to(sigma.device) - sigma.max()).abs()))
        return (999 - t) / 1000

    return completed
