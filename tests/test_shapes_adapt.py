"""The adaptation examples (sdlite.data.adapt): their training images read back as what they claim to be.

The training runs themselves are not repeated here: the DreamBooth example needs its 1 500 steps (about 100 s on
two cores) before stars appear, and textual inversion and the outline LoRA do not yet change what the detector reads
(README, "Adapting it"). The decoder inversion the examples rely on is tested on the built-in model in
test_vae_refine.py."""

from __future__ import annotations

import pytest

from sdlite.data import adapt, shapes
from sdlite.data.shapes import describe

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the training images ------------------------------------------------------------------------------------------

def _read(folder):
    from PIL import Image

    return {p.name: describe(Image.open(p)).scene for p in sorted(folder.glob("*.png"))}


def test_star_images_are_one_yellow_star_never_on_blue(tmp_path):
    scenes = _read(adapt.star_images(str(tmp_path / "star")))  # a str as in the README
    assert len(scenes) == 5 and not list((tmp_path / "star").glob("*.txt"))  # captioned by the instance prompt
    for scene in scenes.values():
        assert [(o.colour, o.shape, o.size) for o in scene.objects] == [(*adapt.SUBJECT, "large")]
        assert scene.background != "blue"
    assert {s.background for s in scenes.values()} == set(adapt.SUBJECT_BACKGROUNDS)


def test_heart_images_name_the_token_and_leave_red_on_white_out(tmp_path):
    folder = adapt.heart_images(tmp_path / "heart")
    for name, scene in _read(folder).items():
        (obj,) = scene.objects
        assert obj.shape == "heart" and obj.size == "large" and (obj.colour, scene.background) != ("red", "white")
        caption = (folder / name).with_suffix(".txt").read_text().strip()
        assert caption == f"a {obj.colour} <heart> on a {scene.background} background"


def test_measured_prompts_use_trained_combinations():
    assert not {c for c in adapt.CLASS_CHECK + adapt.OUTLINE_PROMPTS if c in shapes.HELD_OUT}
    assert {s for _, s, _ in adapt.CLASS_CHECK} == set(shapes.SHAPES)


def test_outline_images_are_large_outlines_with_their_captions(tmp_path):
    folder = adapt.outline_images(str(tmp_path / "outline"), count=6)  # a str as in the README
    scenes = _read(folder)
    assert len(scenes) == 6
    for name, scene in scenes.items():
        assert scene.objects and all(o.outline and o.size == "large" for o in scene.objects)
        caption = (folder / name).with_suffix(".txt").read_text().strip()
        assert all(o.colour in caption and o.shape in caption for o in scene.objects)
