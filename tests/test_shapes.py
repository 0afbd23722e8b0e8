"""sdlite.data.shapes: the procedural data set, its captions, the held-out combinations, the folder writer."""

from __future__ import annotations

import itertools
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from sdlite.data import shapes

# The caption grammar of the issue, written out independently of the module's caption code.
_C = "(red|orange|yellow|green|blue|purple|white|black)"
_S = "(circle|square|triangle|star|heart)"
_PLAIN = re.compile(rf"^an? {_C} {_S} on an? {_C} background$")
_DETAILED = re.compile(rf"^a (small|large) {_C} {_S} (on the left|on the right|at the top|at the bottom|in the center), "
                       rf"{_C} background$")
_PAIR = re.compile(rf"^an? {_C} {_S} to the left of an? {_C} {_S} on an? {_C} background$")
_WHERE = {"on the left": "left", "on the right": "right", "at the top": "top", "at the bottom": "bottom",
          "in the center": "center"}


def _parse(caption: str):
    """(background, [(colour, shape, size or None, position or None)]) read from a caption."""
    if m := _DETAILED.match(caption):
        return m[5], [(m[2], m[3], m[1], _WHERE[m[4]])]
    if m := _PAIR.match(caption):
        return m[5], [(m[1], m[2], None, "left"), (m[3], m[4], None, "right")]
    if m := _PLAIN.match(caption):
        return m[3], [(m[1], m[2], None, None)]
    raise AssertionError(f"caption {caption!r} has none of the three forms")


@pytest.fixture(scope="module")
def train():
    return [shapes.dataset(2000, seed=3)[i] for i in range(2000)]


def test_palette_is_fixed_and_distinct():
    assert list(shapes.PALETTE) == ["red", "orange", "yellow", "green", "blue", "purple", "white", "black"]
    assert shapes.PALETTE["white"] == (255, 255, 255) and shapes.PALETTE["black"] == (0, 0, 0)
    rgb = np.array(list(shapes.PALETTE.values()), dtype=float)
    gaps = [np.linalg.norm(a - b) for a, b in itertools.combinations(rgb, 2)]
    assert min(gaps) > 80  # generated images stay readable by nearest colour


def test_held_out_is_fixed_15_percent_of_the_combinations():
    combos = {(c, s, b) for c in shapes.COLOURS for s in shapes.SHAPES for b in shapes.COLOURS if c != b}
    assert len(combos) == 168
    assert shapes.HELD_OUT <= combos and len(shapes.HELD_OUT) == round(0.15 * 168) == 25
    # Every colour, shape and background is held out somewhere and still trained with the others.
    for i, values in enumerate((shapes.COLOURS, shapes.SHAPES, shapes.COLOURS)):
        counts = Counter(h[i] for h in shapes.HELD_OUT)
        assert set(counts) == set(values) and max(counts.values()) <= 9


def test_captions_describe_the_scene(train):
    forms = Counter()
    for image, caption, scene in train:
        bg, objects = _parse(caption)
        forms[len(objects), objects[0][2] is None] += 1
        assert bg == scene.background and len(objects) == len(scene.objects)
        for (colour, shape, size, position), obj in zip(objects, scene.objects):
            assert (colour, shape) == (obj.colour, obj.shape)
            assert size in (None, obj.size) and position in (None, obj.position)
            assert obj.colour != scene.background
            assert obj.shape in shapes.SHAPES  # no star or heart unless asked for
        assert image.size == (64, 64) and image.mode == "RGB"
    assert set(forms) == {(1, True), (1, False), (2, True)} and min(forms.values()) > 400


def test_train_split_never_shows_a_held_out_combination(train):
    seen = {(o.colour, o.shape, s.background) for _, _, s in train for o in s.objects}
    assert not seen & shapes.HELD_OUT
    assert len(seen) == 168 - 25  # and shows all the others


def test_held_out_split_shows_them():
    data = shapes.dataset(300, seed=1, split="held_out")
    for _, caption, scene in data:
        assert any((o.colour, o.shape, scene.background) in shapes.HELD_OUT for o in scene.objects), caption


def test_images_are_flat_colours_with_antialiased_edges(train):
    for image, _, scene in train[:50]:
        pixels = np.asarray(image).reshape(-1, 3)
        colours = {tuple(shapes.PALETTE[scene.background])} | {tuple(shapes.PALETTE[o.colour]) for o in scene.objects}
        exact = np.array([tuple(p) in colours for p in pixels])
        assert exact.mean() > 0.85  # interiors are the palette's values; only edge pixels blend
        assert tuple(pixels[0]) == shapes.PALETTE[scene.background]  # corners are background


def test_deterministic_from_the_seed_and_in_any_order():
    a, b = shapes.dataset(20, seed=7), shapes.dataset(20, seed=7)
    for i in reversed(range(20)):
        assert a[i].caption == b[i].caption and a[i].image.tobytes() == b[i].image.tobytes()
    other = shapes.dataset(20, seed=8)
    assert [a[i].caption for i in range(20)] != [other[i].caption for i in range(20)]
    first = shapes.sample(np.random.default_rng(5))
    again = shapes.sample(5)
    assert first.caption == again.caption and first.image.tobytes() == again.image.tobytes()
    with pytest.raises(IndexError):
        a[20]


def test_adaptation_shapes_on_request():
    data = shapes.dataset(50, seed=0, shapes=("star", "heart"))
    assert {o.shape for _, _, s in data for o in s.objects} == {"star", "heart"}
    with pytest.raises(ValueError, match="unknown shape"):
        shapes.dataset(5, shapes=("hexagon",))
    with pytest.raises(ValueError, match="split"):
        shapes.dataset(5, split="test")
    with pytest.raises(ValueError, match="held-out"):
        shapes.dataset(5, split="held_out", shapes=("star",))


def test_torch_data_loader_reads_it():
    import torch

    loader = torch.utils.data.DataLoader(shapes.dataset(8, seed=0), batch_size=4, collate_fn=list)
    batches = list(loader)
    assert len(batches) == 2 and all(isinstance(item.image, Image.Image) for item in batches[0])


def test_write_cli_makes_a_caption_folder(tmp_path, capsys):
    out = tmp_path / "data"
    assert shapes.main(["write", str(out), "--count", "6", "--seed", "2"]) == 0
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(6)]
    data = shapes.dataset(6, seed=2)
    for i, png in enumerate(pngs):
        assert png.with_suffix(".txt").read_text().strip() == data[i].caption
        assert Image.open(png).tobytes() == data[i].image.tobytes()
    assert not list(out.glob(".*"))  # no temporary files left behind
    assert shapes.main(["describe", str(pngs[0])]) == 0
    assert "background" in capsys.readouterr().out
    assert shapes.main(["write", str(out), "--shapes", "hexagon"]) == 2
