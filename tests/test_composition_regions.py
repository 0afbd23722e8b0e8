"""Regional prompts (sdlite.composition.regions): a region over the whole image is the plain prompt, the fusion is
MultiDiffusion's masked average written out, bootstrapping shows the region a noised solid colour outside its mask,
and a region's LoRA changes only its own region (one Euler step from σ_max to 0 returns the denoiser's prediction
itself, so the latents are the fused prediction)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import sdlite
from sdlite.composition.regions import LoraSwitch, Region, RegionalDenoiser
from sdlite.guidance import StepState

from conftest import rel_err
from lorafiles import load_model, write_file

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(width=64, height=48, steps=3, cfg_scale=5.0, sampler="DPM++ 2M", seed=11, batch_size=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("regions")
    model = load_model("sd1", folder)
    write_file(folder / "man.safetensors", model.layers, "lora", "sd1", seed=3)
    model.folder = folder
    return model


@pytest.mark.parametrize("area", [(0, 0, 1, 1), (0, 0, 64, 48), Image.new("L", (64, 48), 255)])
def test_one_region_over_the_whole_image_is_the_plain_prompt(model, area):
    pipe = model.pipe
    plain = pipe.txt2img("a red circle AND a blue square", "fog", **KW)
    regional = pipe.txt2img("something else entirely", "grain",
                            regions=[Region("a red circle AND a blue square", area, negative="fog")], **KW)
    assert torch.equal(regional.latents, plain.latents)
    assert '"prompt": "a red circle AND a blue square"' in regional.infotexts[0].replace('\\"', '"')


class Toy:
    """A stand-in for a guided denoiser: a fixed nonlinear function of the input, different per prompt."""

    def __init__(self, seed):
        self.scale = torch.randn(4, 1, 1, generator=torch.Generator().manual_seed(seed))
        self.inputs = []

    def guide(self, x, sigma):
        self.inputs.append(x.clone())
        return torch.tanh(x * self.scale) + self.scale


def step_state(steps=4):
    step = StepState(torch.linspace(10, 0, steps + 1), steps, steps)
    step.advance(torch.tensor(10.0))
    return step


def test_fusion_is_multidiffusions_masked_average():
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 4, 6, 8, generator=g), torch.tensor(3.0)
    soft = Image.fromarray((torch.rand(48, 64, generator=g) * 255).byte().numpy())
    regions = [Region("a", (0, 0, 40, 48), weight=2.0), Region("b", (24, 0, 40, 24)), Region("c", soft, weight=0.5)]
    toys = [Toy(i) for i in range(4)]
    fused = RegionalDenoiser(toys[0], [(t, r, LoraSwitch()) for t, r in zip(toys[1:], regions)], step_state(),
                             size=(64, 48))
    got = fused.guide(x, sigma)
    # the masks at latent size (8 columns, 6 rows): a = columns 0-4, b = columns 3-7 of rows 0-2, c = soft
    a, b = torch.zeros(6, 8), torch.zeros(6, 8)
    a[:, :5], b[:3, 3:] = 1, 1
    c = torch.from_numpy(np.asarray(soft.resize((8, 6), Image.Resampling.BILINEAR), dtype=np.float32) / 255)
    base = (1 - a - b - c).clamp(min=0)
    predictions = [t.guide(x, sigma) for t in toys]
    weights = [base, 2 * a, b, 0.5 * c]
    expected = sum(w * p for w, p in zip(weights, predictions)) / sum(weights)
    assert rel_err(got, expected) < 1e-6


def test_bootstrapping_shows_a_noised_solid_colour_outside_the_mask():
    x, sigma = torch.randn(1, 4, 6, 8), torch.tensor(2.0)
    toy = Toy(1)
    encode = lambda images: images[:, :1].repeat(1, 4, 1, 1) * torch.tensor([1.0, 2, 3, 4]).reshape(1, 4, 1, 1)
    step = step_state(steps=4)
    fused = RegionalDenoiser(Toy(0), [(toy, Region("a", (0, 0, 0.5, 1)), LoraSwitch())], step, size=(64, 48),
                             bootstrap=0.5, seed=3, encode=encode)
    fused.guide(x, sigma)
    seen = toy.inputs[-1]
    assert torch.equal(seen[..., :4], x[..., :4])  # inside the region: the latent itself
    colour = seen[..., 4:] - sigma * fused._noise[..., 4:]
    assert torch.allclose(colour, colour[..., :1, :1].expand_as(colour), atol=1e-6)  # a solid colour
    assert torch.allclose(colour[0, :, 0, 0] / colour[0, 0, 0, 0], torch.tensor([1.0, 2, 3, 4]))
    step.advance(torch.tensor(1.0))  # step 3 of 4: past the bootstrapping share
    fused.guide(x, sigma)
    assert torch.equal(toy.inputs[-1], x)


def test_a_regions_lora_changes_only_its_region(model):
    """Left half "a man" with the LoRA, right half "a woman" without. One Euler step from σ_max to 0 returns the
    fused prediction, so the left half must be the prediction for "a man" with the LoRA on the whole UNet and text
    encoder, and the right half that for "a woman" without it."""
    pipe = model.pipe
    kw = dict(width=64, height=48, steps=1, cfg_scale=5.0, sampler="Euler", seed=2)
    lora = str(model.folder / "man.safetensors")
    regions = [Region("a man", (0, 0, 32, 48), loras=[(lora, 0.8)]), Region("a woman", (32, 0, 32, 48))]
    got = pipe.txt2img("a man and a woman on the street", **kw, regions=regions).latents
    assert pipe.loras == []
    without = pipe.txt2img("a man and a woman on the street", **kw,
                           regions=[Region("a man", (0, 0, 32, 48)), Region("a woman", (32, 0, 32, 48))]).latents
    assert torch.equal(got[..., 4:], without[..., 4:])  # the right region is untouched by the left one's LoRA
    assert rel_err(got[..., :4], without[..., :4]) > 1e-3
    handle = pipe.add_lora(lora, weight=0.8, mode="inject")
    man = pipe.txt2img("a man", **kw).latents
    handle.remove()
    woman = pipe.txt2img("a woman", **kw).latents
    assert rel_err(got[..., :4], man[..., :4]) < 1e-5
    assert torch.equal(got[..., 4:], woman[..., 4:])
    again = pipe.txt2img("a man and a woman on the street", **kw, regions=regions).latents
    assert torch.equal(again, got)  # nothing left behind between generations


def test_region_input_checks(model):
    pipe = model.pipe
    for bad, message in [(Region("x"), "exactly one"), (Region("x", (0, 0, 80, 48)), "outside"),
                         (Region("x", (0, 0, 1, 1), weight=0), "positive"),
                         (Region("x", (0, 0, 1, 1), loras=["a.safetensors"]), "pairs")]:
        with pytest.raises(ValueError, match=message):
            pipe.txt2img("p", width=64, height=48, steps=1, regions=[bad])
    with pytest.raises(FileNotFoundError, match="nope"):
        pipe.txt2img("p", width=64, height=48, steps=1, regions=[Region("x", (0, 0, 1, 1), loras=[("nope", 1)])])
    assert pipe.loras == []


def test_cli_tiles_and_regions_round_trip_through_the_infotext(model, tmp_path):
    from sdlite.cli import main as cli_main
    from sdlite.infotext import read_infotext

    path, first, again = str(model.folder / "model.safetensors"), tmp_path / "a.png", tmp_path / "b.png"
    assert cli_main(["txt2img", path, "a street", "--width", "96", "--height", "48", "--steps", "2", "--seed", "5",
                     "--tile", "6:4:gaussian", "--region", "0,0,48,48:a man", "--region", "0.5,0,0.5,1:a woman",
                     "--region-bootstrap", "0.5", "-o", str(first)]) == 0
    params = read_infotext(first)
    assert (params["Tile size"], params["Tile stride"], params["Tile weights"]) == ("6", "4", "gaussian")
    assert params["Region bootstrap"] == "0.5"
    assert json.loads(params["Regions"]) == [{"prompt": "a man", "box": [0, 0, 48, 48]},
                                             {"prompt": "a woman", "box": [0.5, 0, 0.5, 1]}]
    assert cli_main(["txt2img", path, "--from-png", str(first), "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert cli_main(["txt2img", path, "x", "--tile", "64", "--region", "1,2:oops", "-o", str(again)]) == 2


def test_regions_compose_with_tiles(model):
    """Regions wrap the guided denoisers, tiles the denoiser inside them: one whole-image region over a tiled
    generation is the tiled plain prompt."""
    pipe = model.pipe
    tiles = sdlite.Tiles(size=4, stride=3, batch=2)
    plain = pipe.txt2img("a red circle", "fog", tiling=tiles, **KW)
    regional = pipe.txt2img("anything", regions=[Region("a red circle", (0, 0, 1, 1), negative="fog")],
                            tiling=tiles, **KW)
    assert torch.equal(regional.latents, plain.latents)
