"""The adaptation examples (sdlite.data.adapt): their training images read back as what they claim to be, and
shortened runs of each method on the built-in model (or the file ``SDLITE_SHAPES_MODEL`` names) change the pictures
the way the README's full runs measure."""

from __future__ import annotations

import os

import pytest

from sdlite.data import adapt, shapes
from sdlite.data.shapes import describe

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = os.environ.get("SDLITE_SHAPES_MODEL", "shapes")


# --- the training images ------------------------------------------------------------------------------------------

def _read(folder):
    from PIL import Image

    return {p.name: describe(Image.open(p)).scene for p in sorted(folder.glob("*.png"))}


def test_star_images_are_one_yellow_star_never_on_blue(tmp_path):
    scenes = _read(adapt.star_images(tmp_path / "star"))
    assert len(scenes) == 5 and not list((tmp_path / "star").glob("*.txt"))  # captioned by the instance prompt
    for scene in scenes.values():
        assert [(o.colour, o.shape) for o in scene.objects] == [adapt.SUBJECT] and scene.background != "blue"
    assert {s.background for s in scenes.values()} == set(adapt.SUBJECT_BACKGROUNDS)


def test_heart_images_name_the_token_and_leave_red_on_white_out(tmp_path):
    folder = adapt.heart_images(tmp_path / "heart")
    for name, scene in _read(folder).items():
        (obj,) = scene.objects
        assert obj.shape == "heart" and (obj.colour, scene.background) != ("red", "white")
        caption = (folder / name).with_suffix(".txt").read_text().strip()
        assert caption == f"a {obj.colour} <heart> on a {scene.background} background"


def test_measured_prompts_use_trained_combinations():
    assert not {c for c in adapt.CLASS_CHECK + adapt.OUTLINE_PROMPTS if c in shapes.HELD_OUT}
    assert {s for _, s, _ in adapt.CLASS_CHECK} == set(shapes.SHAPES)


# --- shortened runs on the model ----------------------------------------------------------------------------------

def test_textual_inversion_learns_heart(tmp_path):
    report = adapt.textual_inversion(MODEL, tmp_path, steps=150, seeds=4)
    rows = report.rows
    learnt, base = rows['"a red <heart> on a white background"'], rows['"a red heart on a white background"']
    assert report.files["embedding"].is_file()
    assert learnt["heart"] >= 0.5 and learnt["heart"] > base["heart"], report.table()


def test_lora_switches_outlines_on_with_its_tag(tmp_path):
    report = adapt.lora(MODEL, tmp_path, images=24, steps=100, seeds=2)
    on, off = report.rows["<lora:outline:1>"], report.rows["no tag"]
    assert (tmp_path / "loras" / "outline.safetensors").is_file()
    assert on["outlines"] >= 0.5 and off["outlines"] <= 0.25, report.table()


def test_dreambooth_draws_the_star_for_its_identifier(tmp_path):
    report = adapt.dreambooth(MODEL, tmp_path, steps=150, seeds=4, num_class_images=8, variants=("without prior",))
    star = 'star for "a sks shape on a blue background"'
    assert report.files["without prior"].is_file()
    assert report.rows["without prior"][star] >= 0.5 > report.rows["base model"][star], report.table()
