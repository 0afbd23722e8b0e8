"""The loaded model set of one checkpoint, and what every generation method builds on."""

from __future__ import annotations

import functools
import os
from dataclasses import fields, replace
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from .adapters import annotators
from .adapters.lora import LoraHandle, apply_lora
from .checkpoint.family_table import FAMILIES
from .checkpoint.load import load_components
from .adapters.embeddings import EmbeddingSet, load_embeddings
from .conditioning import Conditioning, encode_text
from .data import BUILTIN_MODELS, builtin_model
from . import upscalers
from .generate import Hires, Job, Result, generate
from .job import IMAGE_UPSCALERS, LATENT_UPSCALE_MODES
from .images import outpaint_canvas
from .infotext import model_hash
from .offload import Offload, Visit, move

class StableDiffusion:
    """A Stable Diffusion checkpoint loaded from its original single file.

    ``family`` is "sd1", "sd2", "sdxl" or "sdxl-refiner"; ``prediction`` is "eps" or "v"; ``unet``, ``vae`` and
    ``text_encoders`` are plain modules whose ``state_dict()`` keys are the file's keys minus the component prefix.
    ``metadata`` is the file's safetensors metadata (``modelspec.*``, ``ss_*``; empty for pickles).
    ``device`` is where generation computes: the UNet's device, or the execution device when offload is on
    (``enable_offload``).
    """

    def __init__(self, path: str, family: str, prediction: str, unet: nn.Module, vae: nn.Module,
                 text_encoders: list[nn.Module], set_aside: list[str] | None = None, unknown: list[str] | None = None,
                 metadata: dict[str, str] | None = None):
        self.path, self.family, self.prediction = path, family, prediction
        self.metadata = metadata or {}  # the file's safetensors metadata
        self.unet, self.vae, self.text_encoders = unet, vae, text_encoders
        self.set_aside, self.unknown = set_aside or [], unknown or []
        self.embeddings: EmbeddingSet | None = None
        self.lora_dirs: list[str | os.PathLike] = []  # where <lora:name:…> prompt tags are looked up
        self.hypernetwork_dirs: list[str | os.PathLike] = []  # where <hypernet:name:…> tags find name.pt
        self.annotator_dirs: list[str | os.PathLike] = []  # where ControlUnit preprocessors find their weights
        self.upscaler_dirs: list[str | os.PathLike] = []  # where Hires(upscaler="R-ESRGAN 4x+") finds its file
        self._loras: list[LoraHandle] = []
        self._offload: Offload | None = None

    @property
    def is_inpaint(self) -> bool:
        return self.unet.config.in_channels == 9

    @property
    def device(self) -> torch.device:
        """Where generation computes and creates its tensors: the execution device when offload is on (the weights
        then wait on the offload device), else the UNet's."""
        if self._offload is not None:
            return self._offload.device
        return self.unet.out[2].weight.device

    @property
    def offload(self) -> Offload | None:
        """The offload in force (``.device``, ``.offload_device``, ``.resident``), or None."""
        return self._offload

    def enable_offload(self, device: torch.device | str = "cuda",
                       offload_device: torch.device | str = "cpu") -> "StableDiffusion":
        """Keep the weights on ``offload_device`` and bring each component to ``device`` only while it runs.

        Every generation method then moves the text encoders to ``device`` for prompt encoding and back, the UNet
        and the ControlNets of ``controlnets=`` for sampling and back (an offloaded refiner's UNet takes the base
        UNet's place when it takes over), and the VAE for each encode/decode and back, so the device holds about one
        component's weights at a time, for a host-to-device copy of each component per use. ``pipe.device`` reports
        ``device``, and every tensor the generation creates lives there. ``encode_prompt`` works the same way. LoRAs
        merge into the weights where they are (``mode="inject"`` LoRAs added while offloaded keep their tensors on
        ``offload_device`` and compute their changes there at every step: merge them instead); ControlNets given to a
        generation are left on ``offload_device``. Returns the pipeline. ``disable_offload`` undoes it.
        """
        if self._offload is not None and self._offload.resident:
            raise RuntimeError("cannot change the offload while a component is on the execution device")
        self._offload = Offload(device, offload_device)
        for module in self._components():
            move(module, self._offload.offload_device)
        return self

    def disable_offload(self) -> "StableDiffusion":
        """Turn offload off: every component moves to the execution device and stays there. Returns the pipeline;
        a no-op when offload is off."""
        if self._offload is None:
            return self
        if self._offload.resident:
            raise RuntimeError("cannot turn offload off while a component is on the execution device")
        device, self._offload = self._offload.device, None
        for module in self._components():
            move(module, device)
        return self

    def using(self, *modules: nn.Module | None) -> Visit:
        """``with pipe.using(pipe.vae): ...`` — with offload on, ``modules`` (this pipeline's, or a ControlNet) are
        on the execution device inside the block and back on the offload device after it; without offload, nothing
        moves. The generation core wraps each stage in this."""
        return Visit(self._offload, modules)

    def _components(self) -> list[nn.Module]:
        return [self.unet, self.vae, *self.text_encoders]

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.out[2].weight.dtype

    @property
    def native_size(self) -> int:
        """The side the model was trained at, which generation defaults to: the file's ``modelspec.resolution``
        when it is square ("64x64"), else the family's (``family_table``): 1024 for SDXL, 768 for SD 2.x v-models,
        else 512."""
        width, _, height = self.metadata.get("modelspec.resolution", "").partition("x")
        if width.strip().isdigit() and width.strip() == height.strip():
            return int(width)
        return FAMILIES[self.family].size_for(self.prediction)

    @functools.cached_property
    def model_hash(self) -> str:
        """A1111's "Model hash" (first 10 hex digits of the file's sha256), computed once when first asked for."""
        return model_hash(self.path)

    @property
    def model_name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]

    def _run(self, prompt: str, options: dict) -> Result:
        options.setdefault("width", self.native_size)
        options.setdefault("height", self.native_size)
        if isinstance(options.get("hires"), dict):
            options["hires"] = Hires(**options["hires"])
        hires = options.get("hires")
        if hires is not None and hires.upscaler not in (*LATENT_UPSCALE_MODES, *IMAGE_UPSCALERS):
            # an upscaler file named as A1111 names it, found and loaded before any work starts
            options["hires"] = replace(hires, upscaler=upscalers.resolve(hires.upscaler, self.upscaler_dirs))
        if options.get("controlnets"):
            options["controlnets"] = [self._with_annotator(unit) for unit in options["controlnets"]]
        known = {f.name for f in fields(Job)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known - {'prompt'}))}")
        return generate(self, Job(prompt=prompt, **options))

    def _with_annotator(self, unit):
        """The unit with its annotator network loaded from ``annotator_dirs`` when its preprocessor needs one."""
        if getattr(unit, "annotator", False) is None and unit.preprocessor in annotators.PREPROCESSORS:
            return replace(unit, annotator=annotators.network_for(unit.preprocessor, self.annotator_dirs))
        return unit

    def txt2img(self, prompt: str, negative_prompt: str = "", **options) -> Result:
        """Text to image. Options (A1111 names in snake case): width, height, steps=20, cfg_scale=7, sampler="Euler a",
        scheduler="Automatic", seed=-1, subseed, subseed_strength, seed_resize_from, batch_size=1, clip_skip=1,
        eta_noise_seed_delta, rng="CPU"|"GPU"|"NV", hires=Hires(...) or dict, original_size, crop, controlnets,
        ip_adapters=[IPAdapterUnit(...)], refiner, refiner_switch_at, vae_tiling, cfg_batch, sampler_options, callback, emphasis ("Original", "No norm",
        "Ignore", "None"), use_old_scheduling.
        Returns Result(images=[PIL], infotexts=[str], seeds=[int], latents)."""
        return self._run(prompt, dict(options, negative_prompt=negative_prompt))

    def img2img(self, init_image: Image.Image, prompt: str, negative_prompt: str = "", strength: float = 0.75,
                **options) -> Result:
        """Image to image with A1111's step accounting: int(strength·steps)+1 steps at the end of the schedule.
        Extra options: resize_mode ("just resize", "crop and resize", "resize and fill"), and txt2img's."""
        return self._run(prompt, dict(options, negative_prompt=negative_prompt, init_image=init_image,
                                      denoising_strength=strength))

    def inpaint(self, image: Image.Image, mask: Image.Image, prompt: str, negative_prompt: str = "",
                strength: float = 0.75, **options) -> Result:
        """Regenerate the white part of ``mask``. Options: mask_blur=4, invert_mask, inpaint_fill ("original",
        "fill", "latent noise", "latent nothing"), only_masked, only_masked_padding=32, mask_weight=1, and img2img's.
        Latents are blended with the mask at every step; inpainting checkpoints also get the masked image as
        conditioning.
        Unmasked pixels of the result are the original's."""
        return self._run(prompt, dict(options, negative_prompt=negative_prompt, init_image=image, mask=mask,
                                      denoising_strength=strength))

    def outpaint(self, image: Image.Image, prompt: str, negative_prompt: str = "", *, left: int = 0, right: int = 0,
                 up: int = 0, down: int = 0, strength: float = 0.8, **options) -> Result:
        """Extend the canvas by the given pixels on each side and inpaint the new border (edge pixels stretched into
        it, then masked content "fill" unless told otherwise). The canvas must come out a multiple of 8."""
        canvas, mask = outpaint_canvas(image, left, right, up, down)
        options.setdefault("width", canvas.width)
        options.setdefault("height", canvas.height)
        options.setdefault("inpaint_fill", "fill")
        return self.inpaint(canvas, mask, prompt, negative_prompt, strength=strength, **options)

    def __repr__(self) -> str:
        offload = "" if self._offload is None else f", offload_device={self._offload.offload_device}"
        return (f"StableDiffusion({os.path.basename(self.path)!r}, family={self.family!r}, "
                f"prediction={self.prediction!r}, inpaint={self.is_inpaint}, dtype={self.dtype}, device={self.device}"
                f"{offload})")

    def compile(self, components: Sequence[str] = ("unet",), **options) -> "StableDiffusion":
        """Compile components with ``torch.compile`` in place and return the pipeline.

        ``components``: any of "unet", "vae" (its encoder and decoder), "text" (the text encoders). The modules are
        compiled with ``nn.Module.compile``, so their ``state_dict()`` keys, LoRA merges and ``.remove()`` work as
        before. ``options`` go to ``torch.compile``; the default is static shapes (``dynamic=False``) and, for the
        UNet, ``fullgraph=True``: its step is one graph, and a graph break is an error rather than a slowdown. On CUDA,
        ``mode="reduce-overhead"`` adds CUDA graphs (fixed shapes) and ``mode="max-autotune"`` tunes the kernels. The
        first call at each new shape compiles (seconds to minutes); later calls reuse it. Outputs match the eager
        modules to float rounding.
        """
        known = {"unet": [self.unet], "vae": [self.vae.encoder, self.vae.decoder], "text": list(self.text_encoders)}
        unknown = sorted(set(components) - set(known))
        if unknown:
            raise ValueError(f"cannot compile {', '.join(unknown)}; components are {', '.join(known)}")
        for name in components:
            for module in known[name]:
                module.compile(**{"dynamic": False, "fullgraph": name == "unet", **options})
        return self

    def add_lora(self, path: str | os.PathLike, weight: float = 1.0, te_weight: float | None = None,
                 mode: str = "merge", strict: bool = True) -> LoraHandle:
        """Apply a LoRA / LyCORIS / diffusers / PEFT file (``sdlite.adapters.lora``); ``.remove()`` takes it off.

        ``weight`` scales the UNet part, ``te_weight`` the text encoders (None: same as ``weight``). ``mode`` is
        "merge" (into the weights) or "inject" (computed live; ``handle.set_weight`` between images).
        """
        return apply_lora(self.unet, self.text_encoders, path, family=self.family, weight=weight, te_weight=te_weight,
                          mode=mode, strict=strict, applied=self._loras)

    @property
    def loras(self) -> list[LoraHandle]:
        """The LoRA handles applied with ``add_lora`` and not removed, oldest first."""
        return list(self._loras)

    def load_embeddings(self, *sources: str | os.PathLike) -> EmbeddingSet:
        """Textual-inversion embeddings from files or folders (.pt, .bin, .safetensors; SDXL clip_l/clip_g), used in
        prompts by file name. Embeddings that do not fit this model's text encoders are skipped with a warning."""
        self.embeddings = load_embeddings(list(sources), self.text_encoders)
        return self.embeddings

    @torch.no_grad()
    def encode_prompt(self, prompts: str | Sequence[str], clip_skip: int = 1) -> Conditioning:
        """Encode prompts as A1111 does: emphasis ``(word:1.2)``, 75-token chunks (``BREAK``), embeddings by name.

        SD 1.x: CLIP-L, the output of layer ``-clip_skip`` through the final LayerNorm. SD 2.x: OpenCLIP ViT-H,
        penultimate layer through ln_final. SDXL: CLIP-L and OpenCLIP bigG penultimate layers without final norm,
        concatenated to 2048 features, plus bigG's pooled projection (first chunk); the refiner uses bigG alone.
        clip_skip applies to SD 1.x only, as in A1111. Prompt editing and AND are resolved by the generation methods
        (see ``sdlite.conditioning.encode_schedule``).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("encode_prompt needs at least one prompt")
        if clip_skip < 1:
            raise ValueError(f"clip_skip counts from 1 (the last layer), got {clip_skip}")
        with self.using(*self.text_encoders):
            return encode_text(list(prompts), self.text_encoders, self.family, clip_skip=clip_skip,
                               embeddings=self.embeddings)


def load(path: str | os.PathLike = "shapes", device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
         prediction: str | None = None, offload: bool = False) -> StableDiffusion:
    """Load an original SD 1.x / 2.x / XL (base, refiner, inpainting) checkpoint, ``.safetensors`` or ``.ckpt``.

    ``"shapes"`` (the default) is sdlite's built-in model, packaged with it (``sdlite.data``); a file of that name
    in the working folder is ``"./shapes"``.

    The architecture is read from the tensor shapes; no config file and no network are used. ``prediction``
    ("eps" or "v") overrides the guess for SD 2.x 768-v models. ``offload=True`` loads the weights into CPU memory
    and computes on ``device``, moving each component there only while it runs (``StableDiffusion.enable_offload``).
    A half-precision VAE that overflows (SDXL's original VAE in float16) switches itself to float32 on its first
    inf/NaN result (``sdlite.vae.AutoencoderKL``); ``pipe.vae.float()`` chooses that up front.
    Errors are ``sdlite.errors.CheckpointError``.
    """
    if isinstance(path, str) and path in BUILTIN_MODELS:
        path = builtin_model(path)
    c = load_components(path, device="cpu" if offload else device, dtype=dtype, prediction=prediction)
    pipe = StableDiffusion(c.path, c.family, c.prediction, c.unet, c.vae, c.text_encoders, c.set_aside, c.unknown,
                           c.metadata)
    return pipe.enable_offload(device) if offload else pipe
