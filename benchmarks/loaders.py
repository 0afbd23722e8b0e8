"""Loading one component of a benchmark checkpoint, with sdlite's loader or through diffusers' converters.

sdlite reads only the component's tensors from the file, straight into the requested dtype and device. diffusers
takes the whole file's state dict and converts it with its ldm converters (``diffusers.loaders.single_file_utils``),
as its own single-file loading does; the result is loaded into diffusers' / transformers' modules built on meta.
"""

from __future__ import annotations

import torch

from benchmarks.models import UNET_PREFIX, VAE_PREFIX, ModelSpec


def read_state(path: str) -> dict:
    """The whole file's state dict, the input diffusers' converters take."""
    from safetensors.torch import load_file

    return load_file(path)


def _assign(model: torch.nn.Module, state: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_sdlite(component: str, spec: ModelSpec, path: str, device: str, dtype: torch.dtype):
    """sdlite's component(s), read from ``path`` by sdlite's own loader straight into ``dtype`` on ``device``."""
    from sdlite.checkpoint import open_tensor_file
    from sdlite.checkpoint.family_table import heads_for_context
    from sdlite.checkpoint.load import plan_components
    from sdlite.checkpoint.materialize import materialize, plan
    from sdlite.unet import UNetModel, infer_unet_config
    from sdlite.vae import AutoencoderKL, infer_vae_config

    with open_tensor_file(path) as tf:
        if component == "unet":
            config = infer_unet_config(tf.meta(UNET_PREFIX), heads_for_context)
            return materialize(tf, plan(tf, lambda: UNetModel(config), UNET_PREFIX), dtype, device)
        if component == "vae":
            config = infer_vae_config(tf.meta(VAE_PREFIX), scale_factor=spec.scale_factor)
            return materialize(tf, plan(tf, lambda: AutoencoderKL(config), VAE_PREFIX), dtype, device)
        # The pipeline's own plan of the whole file; only the text encoders are read.
        return [materialize(tf, p, dtype, device) for p in plan_components(tf).plans[2:]]


def load_diffusers(component: str, spec: ModelSpec, path: str, device: str, dtype: torch.dtype,
                   checkpoint: dict | None = None):
    """The diffusers / transformers model(s) for the component, loaded through diffusers' ldm converters.

    ``checkpoint``: the file's state dict when the caller has read it already (a pipeline converts every component
    from one read, as diffusers' ``from_single_file`` does); by default the file is read here."""
    from diffusers.loaders import single_file_utils as sfu

    checkpoint = read_state(path) if checkpoint is None else checkpoint
    if component == "unet":
        from diffusers import UNet2DConditionModel

        state = sfu.convert_ldm_unet_checkpoint(checkpoint, spec.diffusers_unet)
        with torch.device("meta"):
            model = UNet2DConditionModel(**spec.diffusers_unet)
        return _assign(model, state, device, dtype)
    if component == "vae":
        from diffusers import AutoencoderKL

        config = dict(spec.diffusers_vae, sample_size=spec.size, scaling_factor=spec.scale_factor)
        state = sfu.convert_ldm_vae_checkpoint(checkpoint, config)
        with torch.device("meta"):
            model = AutoencoderKL(**config)
        return _assign(model, state, device, dtype)
    return _diffusers_text_encoders(spec, checkpoint, device, dtype)


def _diffusers_text_encoders(spec: ModelSpec, checkpoint: dict, device: str, dtype: torch.dtype) -> list:
    """transformers' text models as diffusers' pipelines hold them, converted by diffusers' ldm converters.

    SD1.5: CLIPTextModel (ViT-L). SD2.1: CLIPTextModel with 23 of ViT-H's 24 layers (diffusers' pipelines take the
    last hidden state, the file's penultimate layer). SDXL: CLIPTextModel (ViT-L) and CLIPTextModelWithProjection
    (bigG), both read at hidden_states[-2].
    """
    import transformers
    from diffusers.loaders import single_file_utils as sfu

    models = []
    for prefix, layout, width, layers, activation, projection_dim in spec.text:
        if spec.family == "sd2":
            layers -= 1
        config = transformers.CLIPTextConfig(
            hidden_size=width, intermediate_size=4 * width, num_attention_heads=width // 64, num_hidden_layers=layers,
            max_position_embeddings=77, hidden_act=activation, projection_dim=projection_dim or 768)
        with_projection = spec.adm is not None and layout == "openclip"  # SDXL's bigG
        cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
        with torch.device("meta"):
            model = cls(config)
        if layout == "clip":
            state = sfu.convert_ldm_clip_checkpoint(checkpoint, remove_prefix=prefix)
        else:
            state = sfu.convert_open_clip_checkpoint(model, checkpoint, prefix=prefix)
        expected = model.state_dict().keys()
        if not any(k.startswith("text_model.") for k in expected):  # transformers 5 drops the nesting in state_dict
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        # Drop what the model does not hold: position_ids (a non-persistent buffer now), SD2.1's last layer.
        model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True, assign=True)
        for module in model.modules():  # non-persistent buffers built on meta get real values here
            if isinstance(getattr(module, "position_ids", None), torch.Tensor):
                module.register_buffer("position_ids", torch.arange(77).unsqueeze(0), persistent=False)
        models.append(model.to(device=device, dtype=dtype).eval().requires_grad_(False))
    return models
