"""Every sampler of the A1111 list draws pictures on the built-in model at its default steps.

The thresholds are low on purpose: this is not a quality ranking of the samplers but a check that none of them is
broken. A sampler with a wrong step, σ schedule or noise term leaves noise or a smear, which the detector cannot
read as a flat background with a shape on it. The model is the one ``SDLITE_SHAPES_MODEL`` names, else the built-in.
"""

from __future__ import annotations

import os

import pytest
import torch

import sdlite
from sdlite.data import quality
from sdlite.data.scene import Obj, Scene
from sdlite.data.shapes import caption
from sdlite.schedulers import SAMPLER_NAMES

pytestmark = pytest.mark.usefixtures("one_thread")

# Prompts of the training distribution (not held out): the point here is the sampler, not generalisation.
PROMPTS = [quality.Prompt(caption(Scene(bg, (Obj(colour, shape, "large", "center"),)), "plain"), bg, ((colour, shape),))
           for colour, shape, bg in (("red", "circle", "blue"), ("yellow", "square", "black"))]


@pytest.fixture(scope="module")
def model():
    path = os.environ.get("SDLITE_SHAPES_MODEL")
    return sdlite.load(path) if path else sdlite.load()


@pytest.fixture(scope="module")
def by_sampler(model):
    with torch.no_grad():  # default steps: the pipeline's (A1111's) 20
        return {name: quality.evaluate(model, PROMPTS, seeds=1, sampler=name) for name in SAMPLER_NAMES}


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_sampler_draws_a_readable_picture(by_sampler, name):
    result = by_sampler[name]
    verdicts = [f"{r.prompt.text!r} -> {r.verdict()} (background share {r.read.background_share:.2f})"
                for r in result.records]
    # a flat background covers most of a picture of one shape; noise spreads over all eight palette colours (about
    # 1/8 each). Per sampler the mean, not each image: LMS (4th-order multistep) at 20 steps leaves one of the two
    # pictures half-formed on this tiny model (share 0.44), which is the model's weakness, not noise.
    shares = [r.read.background_share for r in result.records]
    assert sum(shares) / len(shares) >= 0.5, verdicts
    assert result.background >= 0.5, verdicts


def test_samplers_together_draw_mostly_right(by_sampler):
    records = [r for result in by_sampler.values() for r in result.records]
    background = sum(r.background_ok for r in records) / len(records)
    objects = sum(r.objects_ok for r in records) / len(records)
    assert background >= 0.9 and objects >= 0.6, (background, objects)
