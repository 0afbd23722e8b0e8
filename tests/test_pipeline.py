"""pipe.encode_prompt and the loaded modules against the reference text encoders the test files were made from."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import sdlite

from conftest import rel_err
from sdfiles import build, open_clip_penultimate, open_clip_tokens

PROMPTS = ["a cat drinking a pint of beer", "portrait of an old sailor, oil painting, dramatic light, highly detailed"]


def eos_padded(tokens: torch.Tensor) -> torch.Tensor:
    """open_clip pads with 0 after the end token; SD 1.x and SDXL's CLIP-L pad with the end token itself."""
    tokens = tokens.clone()
    tokens[tokens == 0] = 49407
    return tokens


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    out = {}
    for family in ("sd1", "sd2", "sdxl", "sdxl-refiner"):
        b = build(family, seed=3)
        path = tmp_path_factory.mktemp(family) / "model.safetensors"
        save_file(b.state, str(path))
        out[family] = (sdlite.load(path), b)
    return out


@torch.no_grad()
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sd1_conditioning_matches_transformers(pipes, clip_skip):
    pipe, b = pipes["sd1"]
    cond = pipe.encode_prompt(PROMPTS, clip_skip=clip_skip)
    ref = b.clip(eos_padded(open_clip_tokens(PROMPTS)), output_hidden_states=True)
    expected = ref.last_hidden_state if clip_skip == 1 else b.clip.final_layer_norm(ref.hidden_states[-2])
    assert cond.context.shape == (2, 77, 128) and cond.pooled is None
    assert rel_err(cond.context, expected) < 1e-4


@torch.no_grad()
def test_sd2_conditioning_matches_open_clip(pipes):
    pipe, b = pipes["sd2"]
    cond = pipe.encode_prompt(PROMPTS)
    expected = b.openclip.ln_final(open_clip_penultimate(b.openclip, open_clip_tokens(PROMPTS)))
    assert rel_err(cond.context, expected) < 1e-4
    assert cond.pooled is None
    assert torch.equal(pipe.encode_prompt(PROMPTS, clip_skip=2).context, cond.context)  # fixed layer, as in A1111


@torch.no_grad()
def test_sdxl_conditioning_matches_references(pipes):
    pipe, b = pipes["sdxl"]
    cond = pipe.encode_prompt(PROMPTS)
    tokens = open_clip_tokens(PROMPTS)
    clip_l = b.clip(eos_padded(tokens), output_hidden_states=True).hidden_states[-2]
    big_g = open_clip_penultimate(b.openclip, tokens)
    assert cond.context.shape == (2, 77, 64 + 128)
    assert rel_err(cond.context, torch.cat([clip_l, big_g], dim=-1)) < 1e-4
    assert rel_err(cond.pooled, b.openclip.encode_text(tokens)) < 1e-4


@torch.no_grad()
def test_refiner_conditioning_matches_open_clip(pipes):
    pipe, b = pipes["sdxl-refiner"]
    cond = pipe.encode_prompt(PROMPTS)
    tokens = open_clip_tokens(PROMPTS)
    assert rel_err(cond.context, open_clip_penultimate(b.openclip, tokens)) < 1e-4
    assert rel_err(cond.pooled, b.openclip.encode_text(tokens)) < 1e-4


@torch.no_grad()
def test_loaded_unet_and_vae_run(pipes):
    pipe, _ = pipes["sdxl"]
    cond = pipe.encode_prompt(PROMPTS)
    x = torch.randn(2, 4, 8, 8)
    y = torch.cat([cond.pooled, torch.zeros(2, 6 * 256)], dim=1)
    assert pipe.unet(x, torch.tensor([999, 500]), cond.context, y=y).shape == x.shape
    image = pipe.vae.decode(pipe.vae.encode(torch.rand(1, 3, 16, 16) * 2 - 1).mean)
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


def test_encode_prompt_input_checks(pipes):
    pipe, _ = pipes["sd1"]
    assert pipe.encode_prompt("one prompt").context.shape[0] == 1
    with pytest.raises(ValueError, match="at least one"):
        pipe.encode_prompt([])
    with pytest.raises(ValueError, match="clip_skip"):
        pipe.encode_prompt("x", clip_skip=0)
