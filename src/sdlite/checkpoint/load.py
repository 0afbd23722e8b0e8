"""Original single-file checkpoints: read the file, identify the family, infer every component's architecture from
tensor shapes, check every key, then load each component strictly. Nothing is read before everything is checked,
so a bad file fails before any weights are loaded (docs/formats.md §1, §2)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..clip import CLIPTextModel, OpenCLIPTextModel, infer_clip_config, infer_openclip_config
from ..errors import CheckpointError
from ..unet import UNetConfig, UNetModel, infer_unet_config
from ..vae import AutoencoderKL, infer_vae_config
from .families import UNET, VAE, Identified, TextComponent, identify, is_set_aside
from .family_table import FAMILIES, heads_for_context
from .files import TensorFile, open_tensor_file
from .materialize import Plan, materialize, plan

__all__ = ["Components", "LoadPlan", "detect_prediction", "load_components", "plan_components"]

PREDICTIONS = ("eps", "v")


@dataclass
class Components:
    """The modules of one checkpoint and what was learnt about it while loading."""

    path: str
    family: str
    prediction: str
    unet: UNetModel
    vae: AutoencoderKL
    text_encoders: list[nn.Module]
    set_aside: list[str] = field(default_factory=list)  # known training leftovers, not loaded
    unknown: list[str] = field(default_factory=list)  # keys under no known prefix, not loaded (warned about)


def _text_plan(tf: TensorFile, comp: TextComponent):
    shapes = {comp.module_prefix + k: v for k, v in tf.meta(comp.file_prefix).items()}
    # Messages name file keys; old files lack the "text_model." level the module keys have, so name those by module.
    prefix = "" if comp.module_prefix else comp.file_prefix
    if comp.layout == "clip":
        config, cls = infer_clip_config(shapes, prefix=prefix), CLIPTextModel
    else:
        config, cls = infer_openclip_config(shapes, prefix=prefix), OpenCLIPTextModel
    return plan(tf, lambda: cls(config), comp.file_prefix, comp.module_prefix, name=f"text encoder {comp.file_prefix}*")


def _check_family(found: Identified, unet: UNetConfig, text_configs) -> None:
    widths = [c.width for c in text_configs]
    if unet.context_dim != sum(widths):
        raise CheckpointError(None, f"the UNet attends to a {unet.context_dim}-wide context but the text encoder(s) "
                                    f"give {' + '.join(map(str, widths))}")
    family = FAMILIES[found.family]
    if family.adm_fields:
        # The pooled vector of the last (OpenCLIP) tower, then the family's size/crop/score embeddings.
        expected = family.adm_width(text_configs[-1].projection_dim)
        if unet.adm_in_channels != expected:
            raise CheckpointError(None, f"{family.label} UNet takes a {unet.adm_in_channels}-wide ADM vector "
                                        f"({UNET}label_emb.0.0.weight), expected {expected}")


def detect_prediction(tf: TensorFile, family: str, unet: UNetConfig) -> str:
    """eps or v, guessed from the weights; ``prediction=`` on load overrides it.

    SD 2.x 768 models predict v and nothing in the file says so. As ComfyUI does, the norm1 bias of the last
    output transformer block is read: its population std is above 0.09 in the released v-models and below in the
    eps ones (A1111 instead runs the UNet once; both agree on the released files). Inpainting models are eps.
    SDXL-family files written by newer trainers mark v-prediction with a ``v_pred`` key.
    """
    if "v_pred" in tf:
        return "v"
    if not FAMILIES[family].guess_v or unet.in_channels != 4:
        return FAMILIES[family].prediction
    for i in reversed(range(len(unet.transformer_depth_output))):
        key = f"{UNET}output_blocks.{i}.1.transformer_blocks.0.norm1.bias"
        if key in tf:
            return "v" if tf.read(key, torch.float32).std(unbiased=False).item() > 0.09 else "eps"
    return FAMILIES[family].prediction


@dataclass
class LoadPlan:
    """Everything checked about a file before any weights are read."""

    found: Identified
    plans: list[Plan]
    prediction: str
    set_aside: list[str]
    unknown: list[str]


def plan_components(tf: TensorFile, prediction: str | None = None) -> LoadPlan:
    """Identify the file, infer every component from shapes and match every key; reads no weights (except the one
    tensor the v-prediction guess looks at)."""
    if prediction is not None and prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS} or None, not {prediction!r}")
    try:
        found = identify(tf)
        unet_config = infer_unet_config(tf.meta(UNET), heads_for_context, prefix=UNET)
        vae_config = infer_vae_config(tf.meta(VAE), scale_factor=FAMILIES[found.family].latent_scale, prefix=VAE)
        plans = [plan(tf, lambda: UNetModel(unet_config), UNET, name="UNet"),
                 plan(tf, lambda: AutoencoderKL(vae_config), VAE, name="VAE")]
        plans += [_text_plan(tf, comp) for comp in found.text]
        _check_family(found, unet_config, [p.module.config for p in plans[2:]])
        prediction = prediction or detect_prediction(tf, found.family, unet_config)
    except CheckpointError as e:
        if e.path is None:
            e.path = str(tf.path)
        raise
    loaded = {k for p in plans for k in p.sources.values()}
    rest = [k for k in tf.keys() if k not in loaded]
    return LoadPlan(found, plans, prediction, [k for k in rest if is_set_aside(k)],
                    [k for k in rest if not is_set_aside(k)])


def load_components(path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    prediction: str | None = None) -> Components:
    with open_tensor_file(path) as tf:
        p = plan_components(tf, prediction)
        if p.unknown:
            warnings.warn(f"{path}: {len(p.unknown)} keys belong to no component sdlite knows and were not loaded: "
                          f"{', '.join(sorted(p.unknown)[:8])}{' …' if len(p.unknown) > 8 else ''}", stacklevel=3)
        modules = [materialize(tf, each, dtype, device) for each in p.plans]
    return Components(path=str(path), family=p.found.family, prediction=p.prediction, unet=modules[0],
                      vae=modules[1], text_encoders=modules[2:], set_aside=p.set_aside, unknown=p.unknown)
