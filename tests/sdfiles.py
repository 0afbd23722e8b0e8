"""Reduced, random-weight checkpoints in the original single-file layouts, and the reference text encoders.

The text encoders come from the reference libraries (transformers' CLIPTextModel, open_clip's CLIP without
`visual`), exactly as SD files carry them; the UNet and VAE come from sdlite modules whose layout test_unet.py and
test_vae.py check against diffusers' converters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import open_clip
import torch
import transformers
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from sdlite.unet import UNetConfig, UNetModel
from sdlite.vae import AutoencoderKL, VAEConfig

from conftest import randomize_

_UNET_BASE = dict(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2), num_res_blocks=(1, 1),
                  transformer_depth_middle=1, head_dim=64)
UNETS = {
    "sd1": dict(_UNET_BASE, transformer_depth=(1, 1), transformer_depth_output=(1, 1, 1, 1), context_dim=128,
                use_linear_in_transformer=False),
    "sd2": dict(_UNET_BASE, transformer_depth=(1, 1), transformer_depth_output=(1, 1, 1, 1), context_dim=128,
                use_linear_in_transformer=True),
    "sdxl": dict(_UNET_BASE, transformer_depth=(0, 2), transformer_depth_output=(2, 2, 0, 0), context_dim=64 + 128,
                 use_linear_in_transformer=True, transformer_depth_middle=2, adm_in_channels=128 + 6 * 256),
    "sdxl-refiner": dict(_UNET_BASE, transformer_depth=(0, 1), transformer_depth_output=(1, 1, 0, 0),
                         context_dim=128, use_linear_in_transformer=True, adm_in_channels=128 + 5 * 256),
}
VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=4, scale_factor=0.18215)  # 8x, as released


def clip_l(width: int = 128, seed: int = 0) -> transformers.CLIPTextModel:
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width,
                                         num_hidden_layers=3, num_attention_heads=width // 64,
                                         max_position_embeddings=77, hidden_act="quick_gelu")
    return randomize_(transformers.CLIPTextModel(config), seed).eval()


def open_clip_text(width: int = 128, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(embed_dim=width, quick_gelu=False,
                 vision_cfg=CLIPVisionCfg(layers=1, width=64, patch_size=16, image_size=32, head_width=64),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=width, heads=width // 64, layers=3))
    return randomize_(model, seed).eval()


def clip_state(model: transformers.CLIPTextModel) -> dict:
    """CLIPTextModel weights with the `text_model.` nesting files have (transformers 5 drops it in state_dict)."""
    sd = model.state_dict()
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in sd.items()}


def open_clip_state(model: CLIP) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("visual.") and k != "attn_mask"}


@dataclass
class Built:
    """A checkpoint's flat state dict and the reference text encoders it was made from."""

    family: str
    state: dict
    clip: transformers.CLIPTextModel | None = None
    openclip: CLIP | None = None
    extra: dict = field(default_factory=dict)


def build(family: str, *, inpaint: bool = False, seed: int = 0) -> Built:
    spec = dict(UNETS[family], in_channels=9 if inpaint else 4)
    unet = randomize_(UNetModel(UNetConfig(**spec)), seed)
    vae = randomize_(AutoencoderKL(VAE), seed + 1)
    state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    state |= {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    built = Built(family, state)
    if family == "sd1":
        built.clip = clip_l(128, seed + 2)
        state |= {f"cond_stage_model.transformer.{k}": v for k, v in clip_state(built.clip).items()}
    elif family == "sd2":
        built.openclip = open_clip_text(128, seed + 2)
        state |= {f"cond_stage_model.model.{k}": v for k, v in open_clip_state(built.openclip).items()}
    elif family == "sdxl":
        built.clip = clip_l(64, seed + 2)
        built.openclip = open_clip_text(128, seed + 3)
        state |= {f"conditioner.embedders.0.transformer.{k}": v for k, v in clip_state(built.clip).items()}
        state |= {f"conditioner.embedders.1.model.{k}": v for k, v in open_clip_state(built.openclip).items()}
    else:
        built.openclip = open_clip_text(128, seed + 2)
        state |= {f"conditioner.embedders.0.model.{k}": v for k, v in open_clip_state(built.openclip).items()}
    built.state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    return built


def open_clip_tokens(prompts: list[str]) -> torch.Tensor:
    """open_clip's own tokenizer: start, text, end, then zeros."""
    return open_clip.tokenize(prompts)


def open_clip_penultimate(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """Input of the last resblock, computed with open_clip's own modules."""
    x = model.token_embedding(tokens) + model.positional_embedding
    for block in model.transformer.resblocks[:-1]:
        x = block(x, attn_mask=model.attn_mask)
    return x


# --- full-size layouts of the released models -------------------------------------------------------------------

_SD15 = dict(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=(2, 2, 2, 2),
             transformer_depth=(1, 1, 1, 1, 1, 1, 0, 0), transformer_depth_output=(0, 0, 0) + (1,) * 9,
             transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False, num_heads=8)
_XL = dict(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2),
           transformer_depth=(0, 0, 2, 2, 10, 10), transformer_depth_output=(10, 10, 10, 2, 2, 2, 0, 0, 0),
           transformer_depth_middle=10, context_dim=2048, use_linear_in_transformer=True, head_dim=64,
           adm_in_channels=2816)
FULL_UNETS = {
    "sd15": _SD15,
    "sd21": dict(_SD15, context_dim=1024, use_linear_in_transformer=True, num_heads=None, head_dim=64),
    "sdxl": _XL,
    "sdxl_refiner": dict(_XL, model_channels=384, channel_mult=(1, 2, 4, 4), num_res_blocks=(2, 2, 2, 2),
                         transformer_depth=(0, 0, 4, 4, 4, 4, 0, 0),
                         transformer_depth_output=(0, 0, 0, 4, 4, 4, 4, 4, 4, 0, 0, 0), transformer_depth_middle=4,
                         context_dim=1280, adm_in_channels=2560),
}
FULL_VAE = VAEConfig(scale_factor=0.18215)


def _meta_shapes(module: torch.nn.Module, prefix: str) -> dict:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def full_key_set(release: str) -> dict[str, tuple[int, ...]]:
    """Key → shape of a released checkpoint (no data): sdlite's UNet/VAE layouts, the reference libraries'
    text encoders. ``release``: sd15, sd15-inpaint, sd21, sdxl, sdxl-inpaint, sdxl_refiner."""
    unet_name, _, variant = release.partition("-")
    with torch.device("meta"):
        unet = UNetModel(UNetConfig(**dict(FULL_UNETS[unet_name], in_channels=9 if variant == "inpaint" else 4)))
        shapes = _meta_shapes(unet, "model.diffusion_model.") | _meta_shapes(AutoencoderKL(FULL_VAE), "first_stage_model.")
        if unet_name in ("sd15", "sdxl"):
            clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(  # ViT-L/14
                hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                max_position_embeddings=77, hidden_act="quick_gelu"))
            prefix = "cond_stage_model.transformer." if unet_name == "sd15" else "conditioner.embedders.0.transformer."
            shapes |= {prefix + k: tuple(v.shape) for k, v in clip_state(clip).items()}
            shapes[prefix + "text_model.embeddings.position_ids"] = (1, 77)
        towers = {"sd21": ("ViT-H-14", "cond_stage_model.model."), "sdxl": ("ViT-bigG-14", "conditioner.embedders.1.model."),
                  "sdxl_refiner": ("ViT-bigG-14", "conditioner.embedders.0.model.")}
        if unet_name in towers:
            name, prefix = towers[unet_name]
            cfg = open_clip.get_model_config(name)
            model = CLIP(embed_dim=cfg["embed_dim"], text_cfg=CLIPTextCfg(**cfg["text_cfg"]),
                         vision_cfg=CLIPVisionCfg(layers=1, width=64, patch_size=16, image_size=32, head_width=64))
            shapes |= {prefix + k: tuple(v.shape) for k, v in open_clip_state(model).items()}
    return shapes
