"""What a file is, from its keys alone: which SD family, which components under which prefixes, or what else.

The key prefixes are those of the original training code (CompVis/Stability-AI ldm for SD 1.x/2.x, Stability-AI
sgm for SDXL); docs/formats.md §1 describes them. What sdlite knows about each family once identified is in
``family_table``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import CheckpointError
from .files import TensorFile

UNET = "model.diffusion_model."
VAE = "first_stage_model."

# Keys that training leaves in checkpoints and inference does not use: EMA shadows, the DDPM schedule buffers
# (sdlite computes the schedule itself), sgm's denoiser sigmas, CLIP's position ids.
_SET_ASIDE = re.compile(
    r"^(model_ema\..*|betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|lvlb_weights|logvar|scale_factor"
    r"|denoiser\.sigmas|.*\.position_ids|v_pred|ztsnr|edm_mean|edm_std|edm_vpred\.sigma_max|edm_vpred\.sigma_min)$"
)


def is_set_aside(key: str) -> bool:
    return _SET_ASIDE.match(key) is not None


@dataclass(frozen=True)
class TextComponent:
    """One text encoder: keys ``file_prefix + rest`` in the file are ``module_prefix + rest`` in the module."""

    layout: str  # "clip" (HF CLIPTextModel layout) or "openclip"
    file_prefix: str
    module_prefix: str = ""


@dataclass(frozen=True)
class Identified:
    family: str
    text: tuple[TextComponent, ...]

    @property
    def prefixes(self) -> tuple[str, ...]:
        return (UNET, VAE) + tuple(t.file_prefix for t in self.text)


def _has_prefix(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _clip_component(keys, prefix: str) -> TextComponent:
    # Files written with old transformers lack the "text_model." level; the module keys keep it.
    if not _has_prefix(keys, prefix + "text_model.") and f"{prefix}embeddings.token_embedding.weight" in keys:
        return TextComponent("clip", prefix, "text_model.")
    return TextComponent("clip", prefix)


def identify(tf: TensorFile) -> Identified:
    """The SD family of a full checkpoint, or a CheckpointError saying what the file is instead."""
    keys = tf.keys()
    if _has_prefix(keys, UNET) and not _has_prefix(keys, "control_model."):
        if "conditioner.embedders.1.model.ln_final.weight" in keys:
            text = (_clip_component(keys, "conditioner.embedders.0.transformer."),
                    TextComponent("openclip", "conditioner.embedders.1.model."))
            return _complete(tf, Identified("sdxl", text))
        if "conditioner.embedders.0.model.ln_final.weight" in keys:
            # sgm layout with one OpenCLIP tower: the SDXL refiner (bigG, ADM vector), or an SD 2.1 model such as
            # SD2.1-turbo saved by sgm (ViT-H, no ADM vector).
            family = "sdxl-refiner" if f"{UNET}label_emb.0.0.weight" in keys else "sd2"
            return _complete(tf, Identified(family, (TextComponent("openclip", "conditioner.embedders.0.model."),)))
        if "cond_stage_model.model.ln_final.weight" in keys:
            return _complete(tf, Identified("sd2", (TextComponent("openclip", "cond_stage_model.model."),)))
        if _has_prefix(keys, "cond_stage_model.transformer."):
            return _complete(tf, Identified("sd1", (_clip_component(keys, "cond_stage_model.transformer."),)))
        if _has_prefix(keys, "cond_stage_model.roberta") or _has_prefix(keys, "cond_stage_model.model.transformer"):
            raise CheckpointError(tf.path, "this checkpoint's text encoder is not CLIP or OpenCLIP (AltDiffusion or "
                                           "similar), which sdlite does not support")
        raise CheckpointError(tf.path, f"has a UNet ({UNET}*) but no text encoder under cond_stage_model.* or "
                                       "conditioner.embedders.*: a UNet-only file cannot be loaded as a model")
    raise CheckpointError(tf.path, describe(tf))


def _complete(tf: TensorFile, found: Identified) -> Identified:
    missing = [p for p in found.prefixes if not _has_prefix(tf.keys(), p)]
    if missing:
        names = {UNET: "UNet", VAE: "VAE"}
        listed = ", ".join(f"{p}* ({names.get(p, 'text encoder')})" for p in missing)
        raise CheckpointError(tf.path, f"looks like an {found.family} checkpoint but has no keys under {listed}; "
                                       "sdlite needs a full checkpoint with UNet, VAE and text encoder(s)")
    return found


def describe(tf: TensorFile) -> str:
    """A one-line account of what a file that is not a full SD checkpoint holds."""
    keys = list(tf.keys())
    if not keys:
        return "holds no tensors"
    joined = "\n".join(keys)
    if re.search(r"lora_down|lora_up|lora_A\.|lora_B\.|\.lora\.down|hada_w1|lokr_w1|^lora_(unet|te)", joined, re.M):
        return f"this is a LoRA/LyCORIS file ({len(keys)} tensors), not a model: apply it with pipe.add_lora(path)"
    if re.search(r"^(control_model\.)?(zero_convs\.0\.0\.weight|input_hint_block\.0\.weight)$|"
                 r"^controlnet_cond_embedding\.", joined, re.M):
        return "this is a ControlNet, not a model: load it with sdlite.adapters.controlnet.load(path)"
    if re.search(r"^(adapter\.)?body\.0\.(block1|resnets)", joined, re.M):
        return "this is a T2I-Adapter, not a model"
    if re.search(r"^(image_proj|ip_adapter)\.", joined, re.M):
        return "this is an IP-Adapter, not a model"
    if re.search(r"^(string_to_param\.|emb_params$|clip_[lg]$)", joined, re.M) or (
            len(keys) == 1 and len(tf.shapes[keys[0]]) == 2):
        return "this is a textual-inversion embedding, not a model: use it by name in a prompt"
    if re.search(r"^(first_stage_model\.|vae\.)?(encoder\.conv_in|decoder\.conv_out)\.weight$", joined, re.M):
        return "this is a standalone VAE, not a full model"
    if re.search(r"^(unet\.)?(down_blocks\.0\.|time_embedding\.linear_1)", joined, re.M):
        return ("this is a UNet in the diffusers layout; sdlite reads the original single-file checkpoints "
                "(model.diffusion_model.* keys)")
    if re.search(r"^(text_model\.|cond_stage_model\.|conditioner\.embedders\.)", joined, re.M):
        return "this holds only a text encoder, not a full model"
    sample = ", ".join(keys[:5])
    return f"not a Stable Diffusion checkpoint: none of the known key prefixes (first keys: {sample})"
