"""The built-in model's architecture (sdlite.data.recipe) and its loading: a random-weight file of those shapes goes
through the ordinary ``sdlite.load`` path, each component matches its reference library (transformers' CLIPTextModel,
diffusers' UNet and VAE through their own ldm converters), and generation defaults to the file's resolution."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

import sdlite
import sdlite.data
from sdlite.checkpoint.write import save_safetensors
from sdlite.data import recipe, shapes
from sdlite.errors import CheckpointError

from conftest import randomize_, rel_err
from test_unet import diffusers_config
from test_vae import diffusers_reference


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A random-weight built-in model written by the recipe's ``save`` (float16, modelspec metadata)."""
    unet, vae, text = recipe.build(seed=0)
    for i, module in enumerate((unet, vae, text)):
        randomize_(module, i)  # zero-initialised output layers get weights too
    path = tmp_path_factory.mktemp("shapes") / "shapes.safetensors"
    recipe.save(path, unet, vae, text)
    return path, (unet, vae, text)


def test_sizes_fit_the_issue(model_file):
    unet, vae, text = recipe.build()
    assert 1.0e6 <= _params(unet) <= 2.0e6
    assert 2 <= recipe.TEXT_ENCODER.layers <= 4 and recipe.TEXT_ENCODER.context_length == 77
    assert recipe.TEXT_ENCODER.vocab_size == sdlite.clip.tokenizer.CLIPTokenizer().vocab_size
    assert vae.config.downsample_factor == 8 and vae.config.z_channels == 4
    assert model_file[0].stat().st_size <= 16 * 2 ** 20


def test_loads_through_the_ordinary_path_and_generates_at_its_resolution(model_file):
    path, modules = model_file
    pipe = sdlite.load(path)
    assert pipe.family == "sd1" and pipe.prediction == "eps"
    assert pipe.unet.config == recipe.UNET and pipe.vae.config == recipe.VAE
    assert pipe.text_encoders[0].config == recipe.TEXT_ENCODER
    for ours, loaded in zip(modules, (pipe.unet, pipe.vae, pipe.text_encoders[0])):
        for (key, a), (key2, b) in zip(ours.state_dict().items(), loaded.state_dict().items()):
            assert key == key2 and torch.equal(a.half().float(), b), key
    assert pipe.metadata["modelspec.resolution"] == "64x64" and pipe.native_size == 64
    result = pipe.txt2img("a red circle on a blue background", steps=2, seed=3)
    assert result.images[0].size == (64, 64) and "Size: 64x64" in result.infotexts[0]


def test_text_encoder_is_clip_l_layout(model_file):
    """transformers' CLIPTextModel with the same weights gives the same last hidden state."""
    _, (_, _, text) = model_file
    c = recipe.TEXT_ENCODER
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_width, num_hidden_layers=c.layers,
        num_attention_heads=c.heads, max_position_embeddings=c.context_length, hidden_act="quick_gelu")).eval()
    state = text.state_dict()
    missing, unexpected = ref.load_state_dict(state, strict=False)
    if missing:  # transformers 5 drops the text_model. level that files keep
        missing, unexpected = ref.load_state_dict({k.removeprefix("text_model."): v for k, v in state.items()},
                                                  strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    ids = torch.tensor([[49406, 320, 736, 7117, 525, 320, 1746, 5994, 49407] + [49407] * 68])
    with torch.no_grad():
        assert rel_err(text(ids).hidden, ref(input_ids=ids).last_hidden_state) < 1e-4


def test_unet_and_vae_match_diffusers(model_file):
    _, (unet, vae, _) = model_file
    dcfg = diffusers_config(recipe.UNET)
    original = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    ref = UNet2DConditionModel(**dcfg).eval()
    ref.load_state_dict(convert_ldm_unet_checkpoint(original, dcfg), strict=True)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
    t = torch.tensor([999.0, 261.0])
    with torch.no_grad():
        assert rel_err(unet.eval()(x, t, context), ref(x, t, encoder_hidden_states=context).sample) < 1e-4
        images = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        reference = diffusers_reference(vae.eval())
        assert rel_err(vae.encode(images).mean, reference.encode(images).latent_dist.mean) < 1e-4
        latents = torch.randn(1, 4, 8, 8, generator=g)
        assert rel_err(vae.decode(latents), reference.decode(latents).sample) < 1e-4


def test_fit_latent_scale_changes_the_latent_unit_not_the_images():
    torch.manual_seed(0)
    vae = randomize_(recipe.build()[1], 5).eval()
    data = shapes.dataset(8, seed=0)
    images = torch.stack([torch.from_numpy(np.array(item.image)).permute(2, 0, 1).float() / 127.5 - 1 for item in data])
    with torch.no_grad():
        before = vae.encode(images).sample(torch.Generator().manual_seed(1))
        decoded = vae.decode(before)
        k = recipe.fit_latent_scale(vae, images, seed=1)  # measured on the same draw as `before`
        after = vae.encode(images).sample(torch.Generator().manual_seed(1))
        assert rel_err(after, k * before) < 1e-5  # mean and std both scaled by k: the same draw, k times larger
        assert abs((after * 0.18215).std().item() - 1) < 1e-3  # what SD 1.x's fixed factor expects
        assert rel_err(vae.decode(after), decoded) < 1e-5


def test_builtin_model_not_trained_yet_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(sdlite.data, "MODELS_DIR", tmp_path)
    for call in (lambda: sdlite.load(), lambda: sdlite.load("shapes")):
        with pytest.raises(CheckpointError, match="not trained yet") as info:
            call()
        assert "python -m sdlite.data.shapes train --out" in str(info.value)
        assert str(tmp_path / "shapes.safetensors") in str(info.value)


def test_cli_names_the_builtin_model(monkeypatch, tmp_path, capsys, model_file):
    from sdlite.cli import main

    monkeypatch.setattr(sdlite.data, "MODELS_DIR", tmp_path)
    assert main(["txt2img", "shapes", "a red circle on a blue background", "-o", str(tmp_path / "a.png")]) == 2
    assert "not trained yet" in capsys.readouterr().err
    monkeypatch.setattr(sdlite.data, "MODELS_DIR", model_file[0].parent)
    assert main(["txt2img", "shapes", "a red circle", "--steps", "1", "-o", str(tmp_path / "b.png")]) == 0
    assert Image.open(tmp_path / "b.png").size == (64, 64)


def test_builtin_model_loads_from_the_package_folder(monkeypatch, model_file):
    monkeypatch.setattr(sdlite.data, "MODELS_DIR", model_file[0].parent)
    pipe = sdlite.load()
    assert Path(pipe.path) == model_file[0] and pipe.native_size == 64


@pytest.mark.parametrize("resolution, expected", [("64x64", 64), ("96x64", 512), ("large", 512), (None, 512)])
def test_native_size_reads_modelspec_resolution(tmp_path, model_file, resolution, expected):
    from safetensors.torch import load_file

    tensors = load_file(model_file[0])
    path = tmp_path / "m.safetensors"
    save_safetensors(path, tensors, {} if resolution is None else {"modelspec.resolution": resolution})
    pipe = sdlite.load(path)
    assert pipe.native_size == expected  # a non-square or unreadable resolution leaves the family's default


def test_package_data_ships_the_model_file():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "data/*.safetensors" in pyproject["tool"]["setuptools"]["package-data"]["sdlite"]
