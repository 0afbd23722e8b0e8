"""The built-in model's pretraining recipe (sdlite.data.pretrain) on a few steps: it produces a model that the
ordinary ``sdlite.load`` reads at its recorded resolution, and a run cut into pieces by its time limit continues
where it stopped and ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

import sdlite
from sdlite.checkpoint.files import open_tensor_file
from sdlite.data import pretrain, recipe
from sdlite.train.loop import StateError

TINY = pretrain.Recipe(images=48, vae_steps=2, vae_full_steps=1, vae_batch=8, unet_steps=3, unet_batch=4,
                       eval_every=0, save_every=100, decoder_steps=2, decoder_full_steps=1, decoder_batch=8)


def _tensors(path):
    with open_tensor_file(path) as tf:
        return {k: tf.read(k) for k in tf.keys()}, dict(tf.metadata or {})


def test_pretrain_writes_a_loadable_model(tmp_path):
    out = pretrain.pretrain(tmp_path / "shapes.safetensors", r=TINY, say=lambda s: None)
    assert out == tmp_path / "shapes.safetensors"
    tensors, meta = _tensors(out)
    assert all(t.dtype == torch.float16 for t in tensors.values() if t.is_floating_point())
    assert json.loads(meta["sdlite.recipe"])["unet_steps"] == 3
    assert meta["sdlite.device"] == "cpu" and meta["sdlite.command"].endswith("--seed 0")  # no --device on the CPU
    assert meta["modelspec.resolution"] == f"{recipe.RESOLUTION}x{recipe.RESOLUTION}"
    assert (tmp_path / "shapes.csv").read_text().count("\n") == 1 + TINY.unet_steps  # header + one row per step
    assert (tmp_path / "shapes.png").stat().st_size > 0
    pipe = sdlite.load(out)
    assert pipe.native_size == recipe.RESOLUTION
    assert pipe.txt2img("a red circle on a blue background", steps=2, seed=1).images[0].size == (64, 64)


def test_interrupted_runs_continue_to_the_same_weights(tmp_path):
    whole = pretrain.pretrain(tmp_path / "a" / "m.safetensors", r=TINY, say=lambda s: None)
    pieces, runs = None, 0
    while pieces is None:  # a zero time limit stops every run after its first step, state saved
        runs += 1
        assert runs < 20
        pieces = pretrain.pretrain(tmp_path / "b" / "m.safetensors", r=TINY, max_minutes=0, say=lambda s: None)
    steps = TINY.vae_steps + TINY.vae_full_steps + TINY.unet_steps + TINY.decoder_steps + TINY.decoder_full_steps
    assert runs == steps - 2  # a run that completes a phase goes on to the next phase's first step
    a, _ = _tensors(whole)
    b, _ = _tensors(pieces)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_state_from_another_recipe_is_refused(tmp_path):
    pretrain.pretrain(tmp_path / "m.safetensors", r=TINY, max_minutes=0, say=lambda s: None)
    other = pretrain.Recipe(**{**TINY.__dict__, "vae_lr": 5e-4})
    with pytest.raises(StateError, match="was saved for shape"):
        pretrain.pretrain(tmp_path / "m.safetensors", r=other, say=lambda s: None)


def test_the_command_line_chooses_the_device(monkeypatch, tmp_path):
    from sdlite.data import shapes

    calls = []
    monkeypatch.setattr(pretrain, "pretrain", lambda out, **kw: calls.append(kw) or out)
    assert shapes.main(["train", "--out", str(tmp_path / "m.safetensors"), "--device", "cuda:1"]) == 0
    assert shapes.main(["train", "--out", str(tmp_path / "m.safetensors")]) == 0
    assert calls[0]["device"] == "cuda:1"
    assert calls[1]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_device_that_is_not_there_is_refused_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        pretrain.pretrain(tmp_path / "m.safetensors", r=TINY, device="cuda", say=lambda s: None)
    with pytest.raises(RuntimeError, match="device"):
        pretrain.pretrain(tmp_path / "m.safetensors", r=TINY, device="gpu0", say=lambda s: None)
    assert not any(tmp_path.iterdir())  # nothing drawn, trained or written
