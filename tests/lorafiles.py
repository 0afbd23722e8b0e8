"""LoRA-family files for the reduced test models, written the way each trainer names layers and tensors, with the
weight each format should produce computed here from docs/formats.md §3.2-3.4 (einsum / kron), not by sdlite.

A model's layers are listed once with their names in every convention: the diffusers name comes from diffusers'
own UNet (built by its ldm converter from the same weights) and is matched to the sdlite module holding the same
random tensor, so the name mapping under test is not used to build its own test data.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import save_file
from torch import nn

import sdlite

from sdfiles import build
from test_unet import diffusers_config


@dataclass
class Layer:
    """One Linear/Conv2d weight of a loaded pipe, under its names in each convention."""

    component: str  # "unet", "te1", "te2"
    dotted: str  # diffusers / HF CLIP name (what diffusers, PEFT and kohya SD1 files use)
    ldm: str  # the original-layout name (kohya SDXL UNet files)
    module: nn.Module  # the sdlite module
    param: str = "weight"
    rows: tuple[int, int] | None = None

    @property
    def weight(self) -> torch.Tensor:
        w = getattr(self.module, self.param).detach()
        return w if self.rows is None else w[self.rows[0]:self.rows[1]]

    @property
    def bias(self) -> torch.Tensor | None:
        b = getattr(self.module, "in_proj_bias" if self.rows else "bias", None)
        return None if b is None else (b.detach() if self.rows is None else b.detach()[self.rows[0]:self.rows[1]])


def load_model(family: str, folder, inpaint: bool = False) -> SimpleNamespace:
    """A reduced checkpoint of ``family`` loaded by sdlite, with its layers listed under every naming."""
    built = build(family, inpaint=inpaint, seed=5)
    path = folder / "model.safetensors"
    save_file(built.state, str(path))
    pipe = sdlite.load(path)
    layers = unet_layers(pipe.unet)
    for i, encoder in enumerate(pipe.text_encoders):
        layers += text_layers(encoder, f"te{i + 1}")
    return SimpleNamespace(family=family, pipe=pipe, built=built, layers=layers)


def diffusers_unet(unet: nn.Module) -> UNet2DConditionModel:
    """diffusers' UNet with the same weights (copies: a LoRA merged into sdlite must not reach it)."""
    original = {f"model.diffusion_model.{k}": v.detach().clone() for k, v in unet.state_dict().items()}
    config = diffusers_config(unet.config)
    ref = UNet2DConditionModel(**config)
    ref.load_state_dict(convert_ldm_unet_checkpoint(original, config), strict=True)
    return ref.eval()


def _fingerprint(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.detach().contiguous().numpy().tobytes()


def unet_layers(unet: nn.Module) -> list[Layer]:
    ours = {_fingerprint(m.weight): (p, m) for p, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    layers = []
    for name, module in diffusers_unet(unet).named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            path, mine = ours.pop(_fingerprint(module.weight))
            layers.append(Layer("unet", name, path, mine))
    assert not ours, f"sdlite layers without a diffusers twin: {list(ours)}"
    return layers


def text_layers(encoder: nn.Module, component: str) -> list[Layer]:
    """The layers LoRA trainers adapt in a CLIP text model (q/k/v/out projections, MLP), under their HF names."""
    layers = []
    openclip = encoder.config.layout == "openclip"
    for n in range(encoder.config.layers):
        hf = f"text_model.encoder.layers.{n}"
        if not openclip:
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                         "mlp.fc1", "mlp.fc2"):
                layers.append(Layer(component, f"{hf}.{name}", f"{hf}.{name}", encoder.get_submodule(f"{hf}.{name}")))
            continue
        block = encoder.transformer.resblocks[n]
        w = encoder.config.width
        for i, proj in enumerate("qkv"):  # thirds of nn.MultiheadAttention's stacked in_proj_weight
            layers.append(Layer(component, f"{hf}.self_attn.{proj}_proj", f"transformer.resblocks.{n}.attn",
                                block.attn, "in_proj_weight", (i * w, (i + 1) * w)))
        for name, ours in (("self_attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            layers.append(Layer(component, f"{hf}.{name}", f"transformer.resblocks.{n}.{ours}",
                                block.get_submodule(ours)))
    return layers


# --- the formats: random tensors for a weight shape, and the weight they make ---------------------------------------

R = 4  # rank
ALPHA = 3.0


def _randn(g: torch.Generator, *shape: int, std: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std


def _factor(n: int, largest: int = 2) -> int:
    """The Kronecker factor of a dimension: the largest power of two up to ``largest`` dividing it."""
    while n % largest:
        largest //= 2
    return largest


def lora_tensors(fmt: str, shape: tuple[int, ...], g: torch.Generator) -> dict[str, torch.Tensor]:
    """Tensors of one layer in LyCORIS/kohya tensor naming (the layout writer renames them)."""
    out, inp, *k = shape
    kk = math.prod(k)
    conv3 = bool(k) and kk > 1
    ones = [1] * len(k)
    if fmt in ("lora", "dora", "dora_in") or (fmt == "locon_tucker" and not conv3):
        t = {"lora_down.weight": _randn(g, R, inp, *k, std=1 / math.sqrt(inp * kk)),
             "lora_up.weight": _randn(g, out, R, *ones), "alpha": torch.tensor(ALPHA)}
        # LyCORIS stores the magnitude as [out, 1(, 1, 1)] (wd_on_out) or [1, in(, 1, 1)].
        if fmt == "dora":
            t["dora_scale"] = 1 + _randn(g, out, 1, *ones)
        if fmt == "dora_in":
            t["dora_scale"] = 1 + _randn(g, 1, inp, *ones)
        return t
    if fmt == "locon_tucker":
        return {"lora_down.weight": _randn(g, R, inp, 1, 1), "lora_mid.weight": _randn(g, R, R, *k),
                "lora_up.weight": _randn(g, out, R, 1, 1), "alpha": torch.tensor(ALPHA)}
    if fmt == "loha" or (fmt == "loha_tucker" and not conv3):
        return {"hada_w1_a": _randn(g, out, R, std=1), "hada_w1_b": _randn(g, R, inp * kk),
                "hada_w2_a": _randn(g, out, R, std=1), "hada_w2_b": _randn(g, R, inp * kk),
                "alpha": torch.tensor(ALPHA)}
    if fmt == "loha_tucker":
        return {"hada_t1": _randn(g, R, R, *k, std=1), "hada_w1_a": _randn(g, R, out), "hada_w1_b": _randn(g, R, inp),
                "hada_t2": _randn(g, R, R, *k, std=1), "hada_w2_a": _randn(g, R, out), "hada_w2_b": _randn(g, R, inp),
                "alpha": torch.tensor(ALPHA)}
    a, c = _factor(out), _factor(inp)
    b, d = out // a, inp // c
    if fmt == "lokr":  # both factors whole: no rank, scale 1 whatever alpha says
        return {"lokr_w1": _randn(g, a, c, std=1), "lokr_w2": _randn(g, b, d, *k), "alpha": torch.tensor(ALPHA)}
    if fmt == "lokr_lowrank" or (fmt == "lokr_tucker" and not conv3):
        return {"lokr_w1": _randn(g, a, c, std=1), "lokr_w2_a": _randn(g, b, R), "lokr_w2_b": _randn(g, R, d * kk),
                "alpha": torch.tensor(ALPHA)}
    if fmt == "lokr_both":  # LyCORIS factorises W1 only when it is large next to the rank: bigger factors, rank 2
        a, c = _factor(out, 8), _factor(inp, 8)
        b, d = out // a, inp // c
        return {"lokr_w1_a": _randn(g, a, 2, std=1), "lokr_w1_b": _randn(g, 2, c, std=1),
                "lokr_w2_a": _randn(g, b, 2), "lokr_w2_b": _randn(g, 2, d * kk), "alpha": torch.tensor(ALPHA)}
    if fmt == "lokr_tucker":
        return {"lokr_w1": _randn(g, a, c, std=1), "lokr_t2": _randn(g, R, R, *k), "lokr_w2_a": _randn(g, R, b),
                "lokr_w2_b": _randn(g, R, d), "alpha": torch.tensor(ALPHA)}
    if fmt == "full":
        return {"diff": _randn(g, *shape, std=0.02), "diff_b": _randn(g, out, std=0.02)}
    raise ValueError(fmt)


def expected_weight(t: dict[str, torch.Tensor], w: torch.Tensor, m: float) -> torch.Tensor:
    """The weight W' a file's tensors make of ``w`` at user weight ``m``, from docs/formats.md §3.2-3.4."""
    shape = w.shape
    t = {k: v.double() for k, v in t.items()}
    w = w.double()
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "lora_mid.weight" in t:
        up, down = t["lora_up.weight"][:, :, 0, 0], t["lora_down.weight"][:, :, 0, 0]
        delta = torch.einsum("pi,ijkl,jq->pqkl", up, t["lora_mid.weight"], down) * (alpha or R) / R
    elif "lora_down.weight" in t:
        up, down = t["lora_up.weight"].flatten(1), t["lora_down.weight"]
        delta = torch.einsum("or,r...->o...", up, down).reshape(shape) * (alpha or R) / R
    elif "hada_t1" in t:
        w1 = torch.einsum("ijkl,ip,jq->pqkl", t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        w2 = torch.einsum("ijkl,ip,jq->pqkl", t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        delta = w1 * w2 * ALPHA / R
    elif "hada_w1_a" in t:
        delta = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(shape) * ALPHA / R
    elif any(k.startswith("lokr") for k in t):
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2, scale = t["lokr_w2"], (ALPHA / t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else 1.0)
        elif "lokr_t2" in t:
            w2, scale = torch.einsum("ijkl,ip,jq->pqkl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]), ALPHA / R
        else:
            b, d = t["lokr_w2_a"].shape[0], shape[1] // w1.shape[1]
            w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"]).reshape(b, d, *shape[2:])
            scale = ALPHA / (t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else R)
        w1 = w1.reshape(*w1.shape, *[1] * (len(shape) - 2))
        delta = torch.kron(w1.contiguous(), w2.contiguous()) * scale
    else:
        delta = t["diff"]
    if "dora_scale" not in t:
        return w + m * delta
    v = w + delta
    s = t["dora_scale"]
    if s.shape[0] == shape[0]:  # the norm of each output row
        norm = v.reshape(shape[0], -1).norm(dim=1).reshape(s.shape)
    else:  # the norm of each input column
        norm = v.transpose(0, 1).reshape(shape[1], -1).norm(dim=1).reshape(s.shape)
    return w + m * (s * v / norm - w)


# --- writing files in each layout -----------------------------------------------------------------------------------

_KOHYA_PREFIX = {"te1": "lora_te1_", "te2": "lora_te2_"}
_DIFFUSERS_PREFIX = {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}
# The tensor names of each layout for LoRA's two matrices.
_LAYOUT_SUFFIX = {
    "diffusers": {"lora_down.weight": "lora.down.weight", "lora_up.weight": "lora.up.weight"},
    "diffusers_te_mlp": {"lora_down.weight": "lora_linear_layer.down.weight",
                         "lora_up.weight": "lora_linear_layer.up.weight"},
    "peft": {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"},
}


def layer_name(layer: Layer, layout: str, family: str) -> str | None:
    """The name a file of ``layout`` gives ``layer`` (None: that layout cannot name it)."""
    if layout == "kohya":
        if layer.component == "unet":
            # kohya trains SD 1.x/2.x on diffusers' UNet and SDXL on the original one (docs/formats.md §3.1).
            return "lora_unet_" + (layer.ldm if family.startswith("sdxl") else layer.dotted).replace(".", "_")
        prefix = "lora_te_" if family in ("sd1", "sd2") else _KOHYA_PREFIX[layer.component]
        return prefix + layer.dotted.replace(".", "_")
    if layout == "processor":  # old diffusers attention processors: attention projections only
        head, _, proj = layer.dotted.rpartition(".")
        if layer.component == "unet":
            if not re.search(r"\.attn[12](\.to_out)?$", head) or proj not in ("to_q", "to_k", "to_v", "0"):
                return None
            return f"{head.removesuffix('.to_out')}.processor.{'to_out' if proj == '0' else proj}_lora"
        if "self_attn" not in head:
            return None
        return f"{_DIFFUSERS_PREFIX[layer.component]}{head}.to_{proj.removesuffix('_proj')}_lora"
    return _DIFFUSERS_PREFIX[layer.component] + layer.dotted


def write_file(path, layers: list[Layer], fmt: str, family: str, layout: str = "kohya", seed: int = 0,
               metadata: dict | None = None) -> dict[str, tuple[Layer, dict]]:
    """Write a file adapting every layer the layout can name; returns {name: (layer, tensors)}."""
    g = torch.Generator().manual_seed(seed)
    state, written = {}, {}
    for layer in layers:
        name = layer_name(layer, layout, family)
        if name is None:
            continue
        t = lora_tensors(fmt, tuple(layer.weight.shape), g)
        if fmt == "full" and layer.bias is None:
            del t["diff_b"]
        if layout == "processor":  # no alpha in this layout: scale 1
            del t["alpha"]
        written[name] = (layer, t)
        for role, tensor in t.items():
            if layout == "kohya":
                state[f"{name}.{role}"] = tensor
            elif role == "alpha":
                if layout == "diffusers":
                    state[f"{name}.alpha"] = tensor
            elif layout == "processor":
                state[f"{name}.{role.removeprefix('lora_')}"] = tensor
            else:
                style = "diffusers_te_mlp" if layout == "diffusers" and ".mlp." in name else layout
                state[f"{name}.{_LAYOUT_SUFFIX[style][role]}"] = tensor
    if layout == "peft":  # alpha lives in the adapter config diffusers stores in the metadata
        config = {f"{c}lora_alpha": ALPHA for c in ("unet.", "text_encoder.", "text_encoder_2.")}
        config |= {f"{c}r": R for c in ("unet.", "text_encoder.", "text_encoder_2.")}
        metadata = dict(metadata or {}, lora_adapter_metadata=json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return written


