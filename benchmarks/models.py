"""The benchmarked architectures and their random checkpoints in the original single-file layout.

A ``ModelSpec`` says how sdlite builds each component (its original-layout configs) and how diffusers builds the same
architecture (its ``UNet2DConditionModel`` / ``AutoencoderKL`` configs); ``write_checkpoint`` saves random weights
for it under the original prefixes (``model.diffusion_model.``, ``first_stage_model.``, ``cond_stage_model.*`` /
``conditioner.embedders.*``), so that both implementations load the very same file with their own loaders.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPONENTS = ("unet", "vae", "text")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_SD15_UNET = dict(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4),
                  num_res_blocks=(2, 2, 2, 2), transformer_depth=(1, 1, 1, 1, 1, 1, 0, 0),
                  transformer_depth_output=(0, 0, 0) + (1,) * 9, transformer_depth_middle=1, context_dim=768,
                  use_linear_in_transformer=False, num_heads=8)
_SD_DIFFUSERS_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
# force_upcast=False: diffusers' SDXL pipeline would otherwise decode fp16 latents with an fp32 copy of the VAE (the
# released SDXL VAE overflows in fp16); sdlite decodes in the pipeline's dtype, and the suite times the same work.
DIFFUSERS_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                     block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                     up_block_types=["UpDecoderBlock2D"] * 4, force_upcast=False)
# Text towers: (layout, width, layers, activation, projection_dim); heads = width / 64 as released.
_CLIP_L = ("clip", 768, 12, "quick_gelu", None)
_OPENCLIP_H = ("openclip", 1024, 24, "gelu", 1024)
_OPENCLIP_BIGG = ("openclip", 1280, 32, "gelu", 1280)


@dataclass(frozen=True)
class ModelSpec:
    """One released architecture: how to write it and how each implementation builds it."""

    name: str
    family: str  # sdlite family name (SCALE_FACTORS key)
    size: int  # image side in pixels for the UNet step, the VAE decode and txt2img
    unet: dict  # sdlite UNetConfig fields
    diffusers_unet: dict  # diffusers UNet2DConditionModel config
    text: tuple[tuple, ...]  # (file prefix, *tower) per text encoder, in file order
    scale_factor: float = 0.18215
    adm: int | None = None  # SDXL's vector conditioning width (y / added_cond_kwargs)
    vae: dict = field(default_factory=dict)  # sdlite VAEConfig fields besides scale_factor; {}: the released VAE
    diffusers_vae: dict = field(default_factory=lambda: dict(DIFFUSERS_VAE))

    @property
    def pooled_width(self) -> int:
        """SDXL: width of the pooled text vector, the ADM vector less its six 256-wide size/crop embeddings."""
        return self.adm - 6 * 256


MODELS = {
    "sd15": ModelSpec(
        "sd15", "sd1", 512, _SD15_UNET,
        dict(_SD_DIFFUSERS_UNET, sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        (("cond_stage_model.transformer.", *_CLIP_L),)),
    "sd21": ModelSpec(
        "sd21", "sd2", 512,
        dict(_SD15_UNET, context_dim=1024, use_linear_in_transformer=True, num_heads=None, head_dim=64),
        dict(_SD_DIFFUSERS_UNET, sample_size=64, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
             use_linear_projection=True),
        (("cond_stage_model.model.", *_OPENCLIP_H),)),
    "sdxl": ModelSpec(
        "sdxl", "sdxl", 1024,
        dict(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2),
             transformer_depth=(0, 0, 2, 2, 10, 10), transformer_depth_output=(10, 10, 10, 2, 2, 2, 0, 0, 0),
             transformer_depth_middle=10, context_dim=2048, use_linear_in_transformer=True, head_dim=64,
             adm_in_channels=2816),
        dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
             down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
             use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
             projection_class_embeddings_input_dim=2816),
        (("conditioner.embedders.0.transformer.", *_CLIP_L), ("conditioner.embedders.1.model.", *_OPENCLIP_BIGG)),
        scale_factor=0.13025, adm=2816),
}


def _text_module(layout: str, width: int, layers: int, activation: str, projection_dim: int | None):
    from sdlite.clip import CLIPTextModel, OpenCLIPTextModel, TextEncoderConfig

    config = TextEncoderConfig(layout=layout, width=width, layers=layers, heads=width // 64, mlp_width=4 * width,
                               activation=activation, projection_dim=projection_dim)
    return (CLIPTextModel if layout == "clip" else OpenCLIPTextModel)(config)


def checkpoint_shapes(spec: ModelSpec, components: tuple[str, ...] = COMPONENTS) -> dict[str, torch.Size]:
    """File key -> shape of the full checkpoint in the original layout, from sdlite's modules built on meta."""
    from sdlite.unet import UNetConfig, UNetModel
    from sdlite.vae import AutoencoderKL, VAEConfig

    modules: list[tuple[str, torch.nn.Module]] = []
    with torch.device("meta"):
        if "unet" in components:
            modules.append((UNET_PREFIX, UNetModel(UNetConfig(**spec.unet))))
        if "vae" in components:
            modules.append((VAE_PREFIX, AutoencoderKL(VAEConfig(**spec.vae, scale_factor=spec.scale_factor))))
        if "text" in components:
            modules += [(prefix, _text_module(*tower)) for prefix, *tower in spec.text]
    return {prefix + k: v.shape for prefix, m in modules for k, v in m.state_dict().items()}


def write_checkpoint(path: str, spec: ModelSpec, components: tuple[str, ...] = COMPONENTS,
                     dtype: torch.dtype = torch.float16, seed: int = 0) -> None:
    """Random weights for ``components`` of ``spec``, saved as one .safetensors in the original layout.

    Matrices and kernels are N(0, 1/fan_in) so activations stay in range through the deep stacks; norm weights are
    1 + small noise, biases and other vectors small noise. Each tensor is drawn in fp32 and stored as ``dtype``.
    """
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in checkpoint_shapes(spec, components).items():
        ndim = len(shape)
        scale = (torch.Size(shape[1:]).numel() ** -0.5) if ndim > 1 else 0.1
        base = 1.0 if key.endswith("weight") and ndim == 1 else 0.0
        if key.endswith("logit_scale"):
            base, scale = 4.6, 0.0
        state[key] = (base + scale * torch.randn(shape, generator=g)).to(dtype)
    save_file(state, path)
