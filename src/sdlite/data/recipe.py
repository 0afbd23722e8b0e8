"""The built-in "shapes" model: its architecture, and the plan for training it within the CPU budget.

Architecture: the SD 1.x layout (CompVis ldm key names, loaded by the ordinary ``sdlite.load`` path, whose config
inference reads every size below from the tensor shapes) at a reduced size, for 64x64 images (8x8x4 latents):

=============  =======================================================================================  ========
component      configuration                                                                            params
=============  =======================================================================================  ========
VAE            ch 32, ch_mult (1, 1, 2, 2), 1 res block per level, 4 latent channels, f = 8             1.03 M
text encoder   CLIP-L layout: width 64 (one 64-wide head), 3 layers, MLP 256, the standard CLIP         3.32 M
               tokenizer and 77-token context (the 49408 x 64 token embedding is 3.16 M of it)
UNet           model_channels 64, channel_mult (1, 1), 1 res block per level, a transformer in every    1.71 M
               block (8x8 and 4x4 tokens are cheap to attend over) and in the middle, context 64
=============  =======================================================================================  ========

In float16 the file is about 12 MB (the issue's limit is 16 MB). The text width is 64 because sdlite infers CLIP
heads as width / 64 and the token embedding dominates the size; the UNet's levels are 64 wide because SD 1.x-layout
inference gives context widths other than 768 heads of 64 channels. ``channel_mult`` starts at 1 (rather than
model_channels 32 with (2, 2), 10% fewer parameters at the same speed) because diffusers' UNet2DConditionModel, and
so its ``from_single_file``, cannot express a first level wider than ``model_channels``.

Measured throughput (this 2-core machine, shared with other jobs at load average 11-14, so each step was run on one
thread and timed in process CPU time; "2 cores" doubles the per-CPU-second rate, which assumes two data-parallel
workers and no contention): plain ``torch.optim.AdamW``, shapes data, fp32.

==================================================  ======  =====================  ===================
step                                                batch   CPU time per step      samples/s, 2 cores
==================================================  ======  =====================  ===================
VAE, 64x64 images (L1 + MSE + 1e-4 KL)              32      1.9 s                  34
VAE, 64x64 images                                   64      6.0 s                  21
VAE, 32x32 crops                                    64      0.95 s                 135 (crops)
VAE 0.37 M (ch_mult (1, 1, 1, 1)), 64x64            32      1.6 s                  41
UNet 1.71 M + text encoder, 8x8 latents (eps MSE)   32      0.38 s                 169
UNet 1.71 M + text encoder                          64      0.62 s                 207
UNet 1.54 M (model_channels 32, mult (2, 2))        32      0.38 s                 170
UNet 1.54 M (model_channels 32, mult (2, 2))        64      0.64 s                 200
UNet 2.33 M (mult (2, 2), 2 res blocks per level)   32      0.52 s                 123
drawing one sample (``shapes.sample``)              1       0.27 ms                -
==================================================  ======  =====================  ===================

With two threads in one process at that load, the steps ran 4-10x slower than on one thread (oversubscription);
on an idle machine the two-thread rate should be measured again before fixing the step counts.

The recipe as it was run to make the shipped file is ``sdlite.data.pretrain`` (phases, settings, the command); the
README's "The built-in model" section has its times, losses and the quality it reached.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Mapping

import torch
from torch import nn

from ..checkpoint.families import UNET as UNET_PREFIX, VAE as VAE_PREFIX
from ..checkpoint.family_table import FAMILIES
from ..checkpoint.write import save_safetensors
from ..clip import CLIPTextModel
from ..clip.config import TextEncoderConfig
from ..unet import UNetConfig, UNetModel
from ..vae import AutoencoderKL, VAEConfig

TEXT_PREFIX = "cond_stage_model.transformer."  # SD 1.x's CLIP-L, HF layout with the text_model. level
RESOLUTION = 64

TEXT_ENCODER = TextEncoderConfig(layout="clip", width=64, layers=3, heads=1, mlp_width=256,
                                 activation="quick_gelu")
UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 1), num_res_blocks=(1, 1),
                  transformer_depth=(1, 1), transformer_depth_output=(1, 1, 1, 1), transformer_depth_middle=1,
                  context_dim=TEXT_ENCODER.width, use_linear_in_transformer=False, head_dim=64)
VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=4, scale_factor=FAMILIES["sd1"].latent_scale)

METADATA = {
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.architecture": "stable-diffusion-v1-shapes",  # SD 1.x keys at reduced sizes: not SD 1.x's yaml
    "modelspec.implementation": "https://github.com/CompVis/stable-diffusion",
    "modelspec.title": "sdlite shapes",
    "modelspec.description": "A tiny SD 1.x-layout model trained from scratch by sdlite on its procedural shapes "
                             "data set (sdlite.data.shapes): flat-coloured circles, squares and triangles.",
    "modelspec.resolution": f"{RESOLUTION}x{RESOLUTION}",
    "modelspec.prediction_type": "epsilon",
    "modelspec.license": "MIT",
}


def build(seed: int = 0) -> tuple[UNetModel, AutoencoderKL, CLIPTextModel]:
    """The three modules with PyTorch's default initialisation, seeded."""
    torch.manual_seed(seed)
    return UNetModel(UNET), AutoencoderKL(VAE), CLIPTextModel(TEXT_ENCODER)


def checkpoint_state(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The modules' weights under the SD 1.x single-file prefixes."""
    state = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    state |= {VAE_PREFIX + k: v for k, v in vae.state_dict().items()}
    state |= {TEXT_PREFIX + k: v for k, v in text_encoder.state_dict().items()}
    return state


def save(path: str | os.PathLike, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, *,
         dtype: torch.dtype = torch.float16, metadata: Mapping[str, str] | None = None) -> None:
    """Write the model as one SD 1.x-layout ``.safetensors`` file with its ``modelspec.*`` metadata."""
    tensors = {k: v.detach().to(dtype) if v.is_floating_point() else v
               for k, v in checkpoint_state(unet, vae, text_encoder).items()}
    meta = dict(METADATA, **{"modelspec.date": datetime.date.today().isoformat()}, **(metadata or {}))
    save_safetensors(path, tensors, meta)


@torch.no_grad()
def fit_latent_scale(vae: AutoencoderKL, images: torch.Tensor, seed: int = 0) -> float:
    """Rescale ``vae``'s latent space in place so that ``vae.scale_factor`` (SD 1.x's fixed 0.18215) gives latents
    of unit standard deviation on ``images`` ([B, 3, H, W] in [-1, 1]); returns the factor k applied.

    Latent diffusion (Rombach et al. 2022) instead measures 1 / std of a first batch's posterior samples and keeps
    it as the model's scale factor (``scale_by_std``); SD 1.x files carry no factor, so the latents are made to fit
    the fixed one: the posterior's mean (``quant_conv``'s first half) and standard deviation are multiplied by k
    (log-variance + 2 ln k) and ``post_quant_conv`` divides its input by k, so decode(k·z) equals the old decode(z).
    """
    z = vae.config.z_channels
    generator = torch.Generator(device=images.device).manual_seed(seed)
    std = vae.encode(images).sample(generator).std().item()
    k = 1.0 / (vae.scale_factor * std)
    vae.quant_conv.weight[:z] *= k
    vae.quant_conv.bias[:z] *= k
    vae.quant_conv.bias[z:] += 2 * math.log(k)
    vae.post_quant_conv.weight /= k
    return k
