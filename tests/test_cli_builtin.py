"""The ``sdlite`` command without a model argument: the built-in model draws, and ``MODEL PROMPT`` works as before.

The positional words are ``[MODEL] INPUTS... PROMPT`` (sdlite.cli.assign_positionals); these tests pin down each
reading, on a random-weight model of the built-in architecture put where the package's model file goes.
"""

from __future__ import annotations

import numpy as np
import torch
import pytest
from PIL import Image

import sdlite
import sdlite.data
from sdlite.cli import main
from sdlite.data import recipe

from conftest import randomize_

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A built-in model folder holding shapes.safetensors, and another model file with other weights."""
    folder = tmp_path_factory.mktemp("builtin")
    for name, seed in (("shapes", 0), ("other", 1)):
        modules = recipe.build(seed=seed)
        for i, module in enumerate(modules):
            randomize_(module, 10 * seed + i)  # weights that keep activations finite, output layers included
        recipe.save(folder / f"{name}.safetensors", *modules)
    return folder


@pytest.fixture
def loads(monkeypatch, files):
    """The model files the command loads, in order (the real load runs)."""
    monkeypatch.setattr(sdlite.data, "MODELS_DIR", files)
    seen, real = [], sdlite.load

    def spy(path="shapes", **kw):
        seen.append(str(path))
        return real(path, **kw)

    monkeypatch.setattr(sdlite, "load", spy)
    return seen


def _run(argv, tmp_path, name="out.png"):
    out = tmp_path / name
    code = main([str(a) for a in argv] + ["--steps", "1", "--seed", "3", "-o", str(out)])
    return code, out


def test_a_lone_prompt_draws_with_the_builtin_model(loads, tmp_path):
    code, out = _run(["txt2img", PROMPT], tmp_path)
    assert code == 0 and loads == ["shapes"]
    image = Image.open(out)
    assert image.size == (64, 64)  # the built-in model's native size
    assert sdlite.read_infotext(out)["Prompt"] == PROMPT


def test_model_and_prompt_as_before(loads, files, tmp_path):
    code, out = _run(["txt2img", files / "other.safetensors", PROMPT], tmp_path)
    assert code == 0 and loads == [str(files / "other.safetensors")]
    assert sdlite.read_infotext(out)["Prompt"] == PROMPT
    code, _ = _run(["txt2img", "shapes", PROMPT], tmp_path, "named.png")  # the built-in model by name
    assert code == 0 and loads[-1] == "shapes"
    code, _ = _run(["txt2img", "--model", files / "other.safetensors", PROMPT], tmp_path, "flag.png")
    assert code == 0 and loads[-1] == str(files / "other.safetensors")


def test_from_png_reads_the_prompt_with_either_model(loads, files, tmp_path):
    _, first = _run(["txt2img", PROMPT], tmp_path, "first.png")
    code, again = _run(["txt2img", "--from-png", first], tmp_path, "again.png")  # built-in, same settings
    assert code == 0 and loads[-1] == "shapes"
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))
    code, other = _run(["txt2img", files / "other.safetensors", "--from-png", first], tmp_path, "other.png")
    assert code == 0 and loads[-1] == str(files / "other.safetensors")  # one word with --from-png: the model
    assert sdlite.read_infotext(other)["Prompt"] == PROMPT
    code, new = _run(["txt2img", "--model", "shapes", "--from-png", first, "a blue square"], tmp_path, "new.png")
    assert code == 0 and loads[-1] == "shapes" and sdlite.read_infotext(new)["Prompt"] == "a blue square"


def test_img2img_and_inpaint_without_a_model(loads, files, tmp_path):
    photo, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 64), (35, 80, 210)).save(photo)
    Image.new("L", (64, 64), 255).save(mask)
    code, _ = _run(["img2img", photo, PROMPT, "--strength", "0.5"], tmp_path, "i2i.png")
    assert code == 0 and loads[-1] == "shapes"
    code, _ = _run(["img2img", files / "other.safetensors", photo, PROMPT], tmp_path, "i2i-other.png")
    assert code == 0 and loads[-1] == str(files / "other.safetensors")
    code, out = _run(["inpaint", photo, mask, PROMPT], tmp_path, "inpaint.png")
    assert code == 0 and loads[-1] == "shapes" and Image.open(out).size == (64, 64)
    code, _ = _run(["inpaint", files / "other.safetensors", photo, mask, PROMPT], tmp_path, "inpaint-other.png")
    assert code == 0 and loads[-1] == str(files / "other.safetensors")


@pytest.mark.parametrize("argv, message", [
    (["txt2img"], "needs a PROMPT"),
    (["txt2img", "a", "b", "c"], "txt2img takes [MODEL] PROMPT; got 3"),
    (["txt2img", "--model", "shapes", "m.safetensors", "a prompt"], "txt2img takes PROMPT; got 2"),
    (["img2img", "a prompt"], "img2img needs a PROMPT"),
    (["inpaint", "a prompt"], "inpaint takes [MODEL] IMAGE MASK PROMPT; got 1"),
])
def test_unreadable_arguments_are_refused_before_loading(loads, tmp_path, capsys, argv, message):
    code, _ = _run(argv, tmp_path)
    assert code == 2 and not loads
    assert message in capsys.readouterr().err


def test_a_checkpoint_file_is_not_taken_for_a_prompt(loads, files, tmp_path, capsys):
    code, _ = _run(["txt2img", files / "other.safetensors"], tmp_path)
    assert code == 2 and not loads
    assert "is a checkpoint file, not a prompt" in capsys.readouterr().err


def test_lora_tags_and_embeddings_from_the_command_line(loads, files, tmp_path, capsys):
    """``--lora-dir`` is where ``<lora:name:w>`` is looked up, ``--embeddings`` what names a prompt may use."""
    from safetensors.torch import save_file

    from sdlite.tools.extract import extract_lora

    loras = tmp_path / "loras"
    loras.mkdir()
    extract_lora(files / "other.safetensors", files / "shapes.safetensors", output=loras / "style.safetensors",
                 rank=4)
    emb = tmp_path / "thing.safetensors"
    save_file({"emb_params": torch.randn(2, 64, generator=torch.Generator().manual_seed(0))}, str(emb))

    def pixels(argv, name):
        code, out = _run(argv, tmp_path, name)
        assert code == 0, capsys.readouterr().err
        return np.asarray(Image.open(out), dtype=np.int16)

    plain = pixels(["txt2img", PROMPT], "plain.png")
    tagged = pixels(["txt2img", PROMPT + " <lora:style:1>", "--lora-dir", loras], "lora.png")
    off = pixels(["txt2img", PROMPT + " <lora:style:0>", "--lora-dir", loras], "lora0.png")
    assert np.abs(tagged - plain).max() > 0 and np.abs(off - plain).max() <= 1
    assert "style" in Image.open(tmp_path / "lora.png").info["parameters"]  # the tag stays in the infotext
    word = pixels(["txt2img", "a thing", "--embeddings", emb], "emb.png")
    assert np.abs(word - pixels(["txt2img", "a thing"], "word.png")).max() > 0
    code, _ = _run(["txt2img", PROMPT + " <lora:style:1>"], tmp_path, "nodir.png")  # not looked up anywhere
    assert code == 2 and "<lora:style>" in capsys.readouterr().err
    n = len(loads)
    code, _ = _run(["txt2img", PROMPT, "--lora-dir", tmp_path / "nowhere"], tmp_path, "missing.png")
    assert code == 2 and len(loads) == n and "nowhere" in capsys.readouterr().err  # refused before loading
