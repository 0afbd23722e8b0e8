"""Textual inversion end to end on tiny SD1 and SDXL checkpoints: only the new vectors train (every token-embedding
row bit-identical afterwards), the loss goes down on a fixed batch, and the saved file gives the same prompt
encodings in sdlite (pipe.load_embeddings) as in diffusers' load_textual_inversion on transformers' CLIP models with
the file's weights (SDXL: clip_l into text_encoder, clip_g into text_encoder_2)."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.loaders import TextualInversionLoaderMixin
from safetensors.torch import load_file

import sdlite.train
from sdlite.adapters.embeddings import load_embedding
from sdlite.conditioning import token_table
from sdlite.train.api import build_run
from sdlite.train.data import DataError
from sdlite.train.textual_inversion import TextualInversionMethod

from conftest import rel_err
from lorafiles import load_model
from test_clip_tokenizer import reference  # noqa: F401  (transformers' CLIPTokenizer fixture)
from test_lora_references import hf_twin
from test_train_lora import write_images

pytestmark = pytest.mark.usefixtures("one_thread")
TOKEN = "sksdog"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {family: load_model(family, tmp_path_factory.mktemp(family)) for family in ("sd1", "sdxl")}


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory):
    data = write_images(tmp_path_factory.mktemp("ti-images"), n=1)
    out = {}
    for family, model in models.items():
        tables = [token_table(e).weight.detach().clone() for e in model.pipe.text_encoders]
        path = tmp_path_factory.mktemp(f"{family}-out") / f"{TOKEN}.safetensors"
        result = sdlite.train.textual_inversion(model.pipe, data, output=path, token=TOKEN, init_word="dog",
                                                vectors=3, template="a photo of {}", prompt="unused", resolution=64,
                                                steps=8, lr=5e-2, max_grad_norm=None, weight_decay=0.0)
        out[family] = (result, tables)
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_only_new_vectors_train(models, trained, family):
    result, tables = trained[family]
    for before, encoder in zip(tables, models[family].pipe.text_encoders):
        assert torch.equal(token_table(encoder).weight, before)  # every row bit-identical
    saved = load_file(str(result.output))
    assert set(saved) == ({"emb_params"} if family == "sd1" else {"clip_l", "clip_g"})
    first = next(iter(saved.values()))
    assert first.shape[0] == 3 and not torch.allclose(first[0], first[1])  # started equal (one-token init), moved


class FixedTI(TextualInversionMethod):
    """The same noise and timesteps at every step: the loss on this fixed batch must fall."""

    def loss(self, r, batch):
        r.generator = torch.Generator().manual_seed(0)
        return super().loss(r, batch)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_loss_goes_down_on_a_fixed_batch(models, tmp_path, family):
    images = write_images(tmp_path / "img", n=1)
    run = build_run(models[family].pipe, images, FixedTI(TOKEN, "dog", 2, "a photo of {}"), tmp_path / "f.safetensors",
                    prompt="", resolution=64, steps=8, lr=5e-2, max_grad_norm=None, weight_decay=0.0)
    losses = run.execute().losses
    # two vectors can move a random model's loss only a little: it must fall at every step
    assert losses[-1] < 0.97 * losses[0] and all(b < a for a, b in zip(losses, losses[1:])), losses


def _diffusers_encode(tokenizer, encoder, path_or_tensor, prompt, layer):
    class Loader(TextualInversionLoaderMixin):
        hf_device_map = None
        components = {}

    tokenizer, encoder = copy.deepcopy(tokenizer), copy.deepcopy(encoder)
    Loader().load_textual_inversion(path_or_tensor, token=TOKEN, tokenizer=tokenizer, text_encoder=encoder)
    text = Loader().maybe_convert_prompt(prompt, tokenizer)
    ids = tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
    out = encoder(ids, output_hidden_states=True)
    return (out.last_hidden_state if layer == -1 else out.hidden_states[layer]), ids


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_file_matches_diffusers_loader(models, trained, reference, family):  # noqa: F811
    model, (result, _) = models[family], trained[family]
    pipe, prompt = model.pipe, f"a photo of {TOKEN} on grass"
    pipe.load_embeddings(result.output)
    try:
        ours = pipe.encode_prompt(prompt).context
        plain = pipe.encode_prompt("a photo of dog on grass").context
    finally:
        pipe.embeddings = None
    if family == "sd1":
        ref, _ = _diffusers_encode(reference, model.built.clip, str(result.output), prompt, -1)
    else:
        saved = load_file(str(result.output))
        ref_l, ids = _diffusers_encode(reference, model.built.clip, saved["clip_l"], prompt, -2)
        ref_g, _ = _diffusers_encode(reference, hf_twin(pipe.text_encoders[1]), saved["clip_g"], prompt, -2)
        end = int((ids[0] == 49407).nonzero()[0]) + 1  # open_clip pads with 0, diffusers' tokenizer with <end>
        ours, ref = ours[:, :end], torch.cat([ref_l, ref_g], dim=-1)[:, :end]
    assert rel_err(ours, ref) < 1e-4
    assert rel_err(plain[:, :ours.shape[1]], ref) > 1e-2  # the embedding is what makes them equal


def test_a1111_pt_loads(models, trained, tmp_path):
    images = write_images(tmp_path / "img", n=1)
    out = tmp_path / "emb.pt"
    sdlite.train.textual_inversion(models["sd1"].pipe, images, output=out, token=TOKEN, init_word="dog", vectors=2,
                                   template="a photo of {}", resolution=64, steps=1)
    raw = torch.load(out, weights_only=True)
    assert raw["name"] == "emb" and raw["step"] == 1 and list(raw["string_to_token"]) == ["*"]
    assert raw["string_to_param"]["*"].shape == (2, 128) and len(raw["sd_checkpoint"]) == 8
    assert torch.equal(load_embedding(out).vectors[""], raw["string_to_param"]["*"])


def test_captions_must_name_the_token(models, tmp_path):
    images = write_images(tmp_path / "img", n=1)
    with pytest.raises(DataError, match="no caption names the token"):
        sdlite.train.textual_inversion(models["sd1"].pipe, images, output=tmp_path / "x.safetensors", token=TOKEN,
                                       prompt="a photo", resolution=64, steps=1)


def test_cli(models, tmp_path):
    from safetensors.torch import save_file

    import sdlite.cli

    model = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in models["sd1"].built.state.items()}, str(model))
    images = write_images(tmp_path / "img", n=1)
    out = tmp_path / "sks.safetensors"
    code = sdlite.cli.main(["train", "textual-inversion", str(model), str(images), "--token", TOKEN, "--init-word",
                            "dog", "--vectors", "2", "--template", "a photo of {}", "--steps", "1", "--resolution",
                            "64", "--output", str(out)])
    assert code == 0 and load_file(str(out))["emb_params"].shape == (2, 128)
