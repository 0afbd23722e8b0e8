"""A Stable Diffusion pipeline assembled from the reference libraries, for the reference tests of every generation mode.

Nothing here comes from sdlite except the tiny files' architecture (tests/sdfiles.py): the UNet and VAE are diffusers'
UNet2DConditionModel / AutoencoderKL loaded from the checkpoint file through diffusers' own original-checkpoint
converters, the text encoders are the transformers / open_clip models the file was written from, the ε/v wrappers and
samplers are k-diffusion's, and the rules around them (seeds, noise, CFG, step accounting, SDXL size conditioning,
decoding to 8 bits) are AUTOMATIC1111 1.10's as its modules/processing.py, rng.py, sd_samplers_*.py and
prompt_parser.py state them. Tests build the conditioning and call :func:`sample` with the pieces their mode needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import k_diffusion.external as kext
import k_diffusion.sampling as ks
import numpy as np
import open_clip
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from PIL import Image
from safetensors.torch import load_file, save_file

from sdlite.unet import UNetConfig

from sdfiles import UNETS, VAE, Built, build, open_clip_penultimate
from test_unet import diffusers_config

EOS = 49407


class LDM(torch.nn.Module):
    """What k-diffusion's CompVis wrappers wrap: the LDM schedule (float64 betas, float32 ᾱ as the ldm code keeps it)
    and ``apply_model(x, t, cond)``; ``cond`` holds the context, SDXL's pooled text and time ids, and the inpainting
    models' concatenated channels."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())

    def apply_model(self, x, t, cond):
        if "concat" in cond:
            x = torch.cat([x, cond["concat"]], dim=1)
        added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]} if "time_ids" in cond else None
        return self.unet(x, t, encoder_hidden_states=cond["context"], added_cond_kwargs=added).sample


@dataclass
class Reference:
    """One tiny checkpoint file and its reference models."""

    built: Built
    path: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    prediction: str = "eps"
    wrapped: torch.nn.Module = field(init=False)

    def __post_init__(self):
        ldm = LDM(self.unet)
        self.wrapped = kext.CompVisVDenoiser(ldm) if self.prediction == "v" else kext.CompVisDenoiser(ldm)

    @property
    def scale(self) -> float:
        """The latent scale: sgm's SDXL configs use 0.13025, ldm's SD 1.x/2.x configs 0.18215."""
        return 0.13025 if self.built.family.startswith("sdxl") else 0.18215

    # --- text (A1111's chunk of 77: start, tokens, end, then padding) ---

    def weighted_tokens(self, fragments: list[tuple[str, float]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A1111 tokenizes each emphasis fragment on its own and gives its tokens the fragment's weight."""
        ids, weights = [], []
        for text, weight in fragments:
            row = open_clip.tokenize([text])[0]
            toks = row[1:(row == EOS).nonzero()[0, 0]].tolist()
            ids += toks
            weights += [weight] * len(toks)
        ids = [EOS - 1] + ids + [EOS] + [pad] * (75 - len(ids))
        return torch.tensor(ids), torch.tensor([1.0] + weights + [1.0] * (76 - len(weights)))

    @torch.no_grad()
    def encode(self, prompts: list, negative: bool = False) -> dict:
        """Conditioning of a batch of prompts encoded together (A1111 encodes the texts of one prompt schedule as one
        batch, and the "Original" emphasis restores the mean of that whole batch). A prompt is a string or a list of
        (fragment, weight) pairs. Returns {"context", and for SDXL-family "pooled"}."""
        b = self.built
        pairs = [[(p, 1.0)] if isinstance(p, str) else p for p in prompts]
        family = b.family
        if family in ("sdxl", "sdxl-refiner") and negative and all(p == "" for p in prompts):
            cond = self.encode([" "] * len(prompts))  # shapes only: sgm's force_zero_embeddings
            return {k: torch.zeros_like(v) for k, v in cond.items()}
        out = {}
        if family in ("sd1", "sdxl"):
            ids, w = zip(*(self.weighted_tokens(p, EOS) for p in pairs))
            ids, w = torch.stack(ids), torch.stack(w)
            if family == "sd1":
                z = b.clip(ids).last_hidden_state
            else:
                z = b.clip(ids, output_hidden_states=True).hidden_states[-2]
            out["l"] = self._emphasis(z, w)
        if family != "sd1":
            ids, w = zip(*(self.weighted_tokens(p, 0) for p in pairs))
            ids, w = torch.stack(ids), torch.stack(w)
            model = b.openclip
            z = open_clip_penultimate(model, ids)
            if family == "sd2":
                z = model.ln_final(z)
            else:
                last = model.transformer.resblocks[-1](z, attn_mask=model.attn_mask)
                final = model.ln_final(last)
                out["pooled"] = final[torch.arange(len(ids)), ids.argmax(dim=-1)] @ model.text_projection
            out["g"] = self._emphasis(z, w)
        context = torch.cat([out.pop(k) for k in ("l", "g") if k in out], dim=-1)
        return {"context": context, **out}

    @staticmethod
    def _emphasis(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        weighted = z * w[..., None]
        return weighted * (z.mean() / weighted.mean())

    # --- VAE ---

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor, seed: int) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] → scaled latents; the posterior sample from a CPU generator seeded with the seed
        (sdlite's documented choice; A1111 draws it from torch's global generator)."""
        posterior = self.vae.encode(pixels * 2 - 1).latent_dist
        return posterior.sample(generator=torch.Generator().manual_seed(seed)) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scale).sample

    def to_images(self, latents: torch.Tensor) -> list[Image.Image]:
        """A1111: clamp((x+1)/2), ×255, truncated to uint8."""
        x = torch.clamp((self.decode(latents) + 1.0) / 2.0, 0.0, 1.0)
        return [Image.fromarray((255.0 * np.moveaxis(a.numpy(), 0, 2)).astype(np.uint8)) for a in x]

    # --- schedules ---

    def sigmas(self, steps: int, karras: bool = False, discard_penultimate: bool = False) -> torch.Tensor:
        """A1111's KDiffusionSampler.get_sigmas: "Automatic" is the model's own (uniform in t) schedule or Karras
        over the model's σ range; some samplers compute one step more and drop the next-to-last σ."""
        n = steps + 1 if discard_penultimate else steps
        if karras:
            sigmas = ks.get_sigmas_karras(n, self.wrapped.sigmas[0].item(), self.wrapped.sigmas[-1].item())
        else:
            sigmas = self.wrapped.get_sigmas(n)
        return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard_penultimate else sigmas


def load_reference(path, built: Built, prediction: str = "eps") -> Reference:
    """diffusers' UNet and VAE from the checkpoint file, through diffusers' own converters, strict."""
    state = load_file(str(path))
    spec = dict(UNETS[built.family], in_channels=state["model.diffusion_model.input_blocks.0.0.weight"].shape[1])
    dcfg = diffusers_config(UNetConfig(**spec))
    unet = UNet2DConditionModel(**dcfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, dcfg), strict=True)
    levels = len(VAE.ch_mult)
    vcfg = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * levels,
                up_block_types=["UpDecoderBlock2D"] * levels, block_out_channels=[VAE.ch * m for m in VAE.ch_mult],
                layers_per_block=VAE.num_res_blocks, latent_channels=VAE.z_channels, norm_num_groups=32,
                scaling_factor=VAE.scale_factor)
    vae = AutoencoderKL(**vcfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, vcfg), strict=True)
    return Reference(built, str(path), unet.eval(), vae.eval(), prediction)


def write_model(folder, family: str, seed: int, *, inpaint: bool = False, name: str | None = None):
    """A tiny checkpoint file of ``family`` and its Built record."""
    built = build(family, inpaint=inpaint, seed=seed)
    path = folder / f"{name or 'tiny-' + family}.safetensors"
    save_file(built.state, str(path))
    return path, built


# --- A1111's noise (modules/rng.py) -------------------------------------------------------------------------------


class Noise:
    """Per-image CPU generators seeded with the image seeds: the first draw is the initial noise, later draws the
    ancestral samplers' noise; ENSD reseeds each generator with seed + delta after the first draw."""

    def __init__(self, shape, seeds, ensd: int = 0, make=None):
        self.shape, self.seeds, self.ensd = tuple(shape), list(seeds), ensd
        self.make = make or (lambda seed: torch.Generator().manual_seed(seed))
        self.generators = [self.make(s) for s in self.seeds]

    def draw(self, generator) -> torch.Tensor:
        if hasattr(generator, "randn"):  # NVIDIA's Philox port
            return generator.randn(self.shape)
        return torch.randn(self.shape, generator=generator)

    def first(self) -> torch.Tensor:
        x = torch.stack([self.draw(g) for g in self.generators])
        if self.ensd:
            self.generators = [self.make(s + self.ensd) for s in self.seeds]
        return x

    def next(self, *_) -> torch.Tensor:
        return torch.stack([self.draw(g) for g in self.generators])


# --- classifier-free guidance (sd_samplers_cfg_denoiser.CFGDenoiser) ------------------------------------------------


class CFG:
    """denoised = uncond + Σ wᵢ·cfg·(condᵢ − uncond), then, with a mask, the original latent put back where the mask
    is 0. ``conds(step)`` gives [(cond dict, weight), …] and ``uncond(step)`` a cond dict for the model call ``step``
    (A1111 counts calls: ``step`` is that count)."""

    def __init__(self, wrapped, conds, uncond, cfg: float, *, mask=None, init=None, image_cond=None):
        self.wrapped, self.conds, self.uncond, self.cfg = wrapped, conds, uncond, cfg
        self.mask, self.init, self.image_cond = mask, init, image_cond
        self.step = 0

    def __call__(self, x, sigma, **_):
        conds, uncond = self.conds(self.step), self.uncond(self.step)
        self.step += 1
        parts = [c for c, _ in conds] + [uncond]
        n = len(parts)
        cond = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if self.image_cond is not None:
            cond["concat"] = self.image_cond.repeat(n, 1, 1, 1)
        out = self.wrapped(x.repeat(n, 1, 1, 1), sigma.repeat(n), cond=cond).chunk(n)
        denoised = out[-1].clone()
        for o, (_, weight) in zip(out, conds):
            denoised += (o - out[-1]) * (weight * self.cfg)
        if self.mask is not None:
            denoised = self.init * (1 - self.mask) + denoised * self.mask
        return denoised


def batch(cond: dict, n: int) -> dict:
    return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}


@torch.no_grad()
def sample(sampler, model, x, sigmas, noise: Noise | None = None, **options):
    """A k-diffusion sampler run as A1111 runs it: ancestral noise from the per-image generators."""
    if noise is not None:
        options["noise_sampler"] = noise.next
    return sampler(model, x, sigmas, disable=True, **options)


def a1111_img2img_steps(steps: int, strength: float) -> int:
    """sd_samplers_common.setup_img2img_steps: t_enc = int(min(strength, 0.999)·steps); the σ list is
    sigmas[steps − t_enc − 1:], so the pass runs t_enc + 1 steps."""
    return int(min(strength, 0.999) * steps) + 1


def max_pixel_diff(a: Image.Image, b: Image.Image) -> int:
    x, y = np.asarray(a).astype(int), np.asarray(b).astype(int)
    assert x.shape == y.shape, (x.shape, y.shape)
    return int(np.abs(x - y).max())
