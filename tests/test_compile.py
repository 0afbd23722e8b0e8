"""pipe.compile(): the torch.compile'd modules agree with the eager ones, and stay the same modules."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import sdlite

from conftest import rel_err
from sdfiles import build


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    # SDXL exercises every UNet input: context, the ADM vector y and the ControlNet residuals.
    path = tmp_path_factory.mktemp("compile") / "sdxl.safetensors"
    save_file(build("sdxl", seed=5).state, str(path))
    return path


def unet_inputs(pipe, dtype):
    """Latents, fractional timesteps, context and the ADM vector for a batch of two."""
    g = torch.Generator().manual_seed(0)
    cfg = pipe.unet.config
    x = torch.randn(2, cfg.in_channels, 16, 24, generator=g)
    context = torch.randn(2, 77, cfg.context_dim, generator=g)
    y = torch.randn(2, cfg.adm_in_channels, generator=g)
    return x.to(dtype), torch.tensor([999.0, 321.5]), context.to(dtype), y.to(dtype)


@torch.no_grad()
def test_compiled_unet_matches_eager_fp32(sdxl_file):
    pipe = sdlite.load(sdxl_file)
    inputs = unet_inputs(pipe, torch.float32)
    eager = pipe.unet(*inputs)
    keys = list(pipe.unet.state_dict())
    pipe.compile()  # fullgraph=True: a graph break in the UNet step would raise here
    compiled = pipe.unet(*inputs)
    assert list(pipe.unet.state_dict()) == keys
    assert rel_err(compiled, eager) < 1e-5
    # the compiled module reads the live parameters: a change to the weights (a LoRA merge) shows at once
    pipe.unet.out[2].bias.add_(0.5)
    assert rel_err(pipe.unet(*inputs), eager + 0.5) < 1e-5


@torch.no_grad()
def test_compiled_unet_matches_eager_fp16(sdxl_file):
    # Each fp16 path is about 7e-4 away from the float32 result of the same fp16 weights (eager rounds every op's
    # output, the compiled kernels fewer of them), so the two are compared with that result as the yardstick: the
    # compiled path is within 1e-3 of it and no less accurate than eager, and the two within 2e-3 of each other.
    pipe = sdlite.load(sdxl_file, dtype=torch.float16)
    inputs = unet_inputs(pipe, torch.float16)
    eager = pipe.unet(*inputs)
    exact = pipe.unet.float()(*(t.float() for t in inputs))
    pipe.unet.half().compile(dynamic=False, fullgraph=True)
    compiled = pipe.unet(*inputs)
    assert compiled.dtype == torch.float16 and torch.isfinite(compiled).all()
    assert rel_err(compiled, exact) < 1e-3
    assert rel_err(compiled, exact) < 1.2 * rel_err(eager, exact)
    assert rel_err(compiled, eager) < 2e-3


@torch.no_grad()
def test_compiled_txt2img_matches_eager(sdxl_file):
    pipe = sdlite.load(sdxl_file)
    job = dict(width=128, height=96, steps=3, seed=7, sampler="DPM++ 2M", scheduler="Karras")
    eager = pipe.txt2img("a red bicycle", **job)
    pipe.compile(components=("unet", "vae"))
    compiled = pipe.txt2img("a red bicycle", **job)
    assert rel_err(compiled.latents, eager.latents) < 1e-5
    assert compiled.infotexts == eager.infotexts


def test_compile_rejects_unknown_component(sdxl_file):
    pipe = sdlite.load(sdxl_file)
    with pytest.raises(ValueError, match="components are unet, vae, text"):
        pipe.compile(components=("unet", "refiner"))
