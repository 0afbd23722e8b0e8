"""Every UNet layer behaves the same whether it is called or wrapped: a module replaced by a wrapper, a forward hook,
a parametrization and a PEFT LoRA each take effect wherever the layer sits (training wraps modules)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.nn.utils import parametrize

from sdlite.conv import Conv2d
from sdlite.unet import UNetConfig, UNetModel

from conftest import randomize_, rel_err
from test_unet import SD1, SDXL, adm_inputs, inputs

BLOCK = "input_blocks.1.1.transformer_blocks.0"  # SD1's first transformer block
XL_BLOCK = "input_blocks.4.1.transformer_blocks.0"
# One layer of each kind: (spec, module path, the kind we expect there)
LAYERS = [
    ("SD1", "time_embed.0", nn.Linear),
    ("SD1", "input_blocks.0.0", Conv2d),  # 3x3, sdlite's fast conv
    ("SD1", "input_blocks.1.0.in_layers.0", nn.GroupNorm),
    ("SD1", "input_blocks.1.0.in_layers.1", nn.SiLU),
    ("SD1", "input_blocks.1.0.in_layers.2", Conv2d),
    ("SD1", "input_blocks.4.0.emb_layers.1", nn.Linear),  # (at 32 channels GroupNorm would absorb it)
    ("SD1", "input_blocks.1.0.out_layers.2", nn.Dropout),
    ("SD1", "input_blocks.4.0.skip_connection", nn.Conv2d),  # 1x1
    ("SD1", "input_blocks.3.0.op", Conv2d),  # stride 2
    ("SD1", "output_blocks.2.1.conv", Conv2d),  # after the upsampling
    ("SD1", "input_blocks.1.1.norm", nn.GroupNorm),
    ("SD1", "input_blocks.1.1.proj_in", nn.Conv2d),  # 1x1 in SD 1.x
    ("SD1", "input_blocks.1.1.proj_out", nn.Conv2d),
    ("SD1", f"{BLOCK}.norm1", nn.LayerNorm),
    ("SD1", f"{BLOCK}.attn1.to_q", nn.Linear),
    ("SD1", f"{BLOCK}.attn1.to_k", nn.Linear),
    ("SD1", f"{BLOCK}.attn1.to_v", nn.Linear),
    ("SD1", f"{BLOCK}.attn2.to_k", nn.Linear),
    ("SD1", f"{BLOCK}.attn2.to_out.0", nn.Linear),
    ("SD1", f"{BLOCK}.ff.net.0.proj", nn.Linear),  # GEGLU's projection
    ("SD1", f"{BLOCK}.ff.net.2", nn.Linear),
    ("SD1", f"{BLOCK}.attn2", nn.Module),  # whole blocks, fed more than one argument
    ("SD1", f"{BLOCK}.ff", nn.Module),
    ("SD1", BLOCK, nn.Module),
    ("SD1", "input_blocks.1.1", nn.Module),
    ("SD1", "input_blocks.1.0", nn.Module),
    ("SD1", "out.2", Conv2d),
    ("SDXL", "label_emb.0.0", nn.Linear),
    ("SDXL", "input_blocks.4.1.proj_in", nn.Linear),  # Linear in SD 2.x/XL
    ("SDXL", "input_blocks.4.1.proj_out", nn.Linear),
    ("SDXL", f"{XL_BLOCK}.attn2.to_v", nn.Linear),
]


def delta_like(out: torch.Tensor) -> torch.Tensor:
    """The same change on every call: what a wrapper and a hook add to a layer's output."""
    return 0.1 * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))


class Wrapper(nn.Module):
    """A module standing in for another: calls it with whatever it is given, optionally changes its output."""

    def __init__(self, inner: nn.Module, change: bool):
        super().__init__()
        self.inner, self.change = inner, change

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        return out + delta_like(out) if self.change else out


class Shifted(nn.Module):
    """A parametrization: the weight plus a fixed random change (none with ``change=False``)."""

    def __init__(self, change: bool):
        super().__init__()
        self.change = change

    def forward(self, weight):
        return weight + 0.1 * delta_like(weight) if self.change else weight


@pytest.fixture(scope="module")
def models():
    out = {}
    for name, spec in (("SD1", SD1), ("SDXL", SDXL)):
        model = randomize_(UNetModel(UNetConfig(**spec)), 0).eval()
        x, t, context, g = inputs(model.config, batch=1, h=8, w=8)
        y = adm_inputs(model.config, 1, g)[0] if model.config.adm_in_channels else None
        out[name] = model, (x, t[:1], context), {"y": y}
    return out


@pytest.mark.parametrize("spec,path,kind", LAYERS, ids=[f"{s}:{p}" for s, p, _ in LAYERS])
@torch.no_grad()
def test_a_wrapped_hooked_or_parametrized_layer_takes_effect(models, one_thread, spec, path, kind):
    model, args, kwargs = models[spec]
    layer = model.get_submodule(path)
    assert isinstance(layer, kind)
    plain = model(*args, **kwargs)

    model.set_submodule(path, Wrapper(layer, change=False))
    try:
        assert torch.equal(model(*args, **kwargs), plain)  # a wrapper that changes nothing changes nothing
        model.set_submodule(path, Wrapper(layer, change=True))
        wrapped = model(*args, **kwargs)
    finally:
        model.set_submodule(path, layer)
    assert rel_err(wrapped, plain) > 1e-4

    handle = layer.register_forward_hook(lambda m, a, out: out + delta_like(out))
    try:
        assert torch.equal(model(*args, **kwargs), wrapped)  # a hook is seen exactly as the wrapper is
    finally:
        handle.remove()

    if isinstance(getattr(layer, "weight", None), nn.Parameter) and "norm" not in path:
        for change in (False, True):
            parametrize.register_parametrization(layer, "weight", Shifted(change))
            try:
                out = model(*args, **kwargs)
            finally:
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            if not change:
                assert torch.equal(out, plain)
            else:
                assert rel_err(out, plain) > 1e-4
    assert torch.equal(model(*args, **kwargs), plain)  # everything undone


@pytest.mark.parametrize("spec", ["SD1", "SDXL"])
@torch.no_grad()
def test_peft_lora_on_every_layer_equals_its_merged_weights(models, one_thread, spec):
    # peft's own merge is the reference: unmerged, each LoRA wrapper must be called where its layer sits.
    base, args, kwargs = models[spec]
    model = copy.deepcopy(base)
    targets = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    torch.manual_seed(0)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False), model)
    loras = [m for m in model.modules() if isinstance(m, LoraLayer)]
    wrapped = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert {"proj_in", "proj_out", "to_k", "skip_connection", "proj", "op", "conv"} <= wrapped
    for lora in loras:  # non-zero up matrices, small enough that 100+ of them keep the activations sane
        for b in lora.lora_B.values():
            randomize_(b, 7).weight.mul_(0.2)
    unmerged = model.eval()(*args, **kwargs)
    for lora in loras:
        lora.merge()
    merged = model(*args, **kwargs)
    assert rel_err(unmerged, merged) < 1e-5
    assert rel_err(unmerged, base(*args, **kwargs)) > 1e-3
