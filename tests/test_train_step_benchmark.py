"""benchmarks/train_step.py on the tiny SD1 spec, in this process: both implementations set up LoRAs on the same
layers (the kohya names sdlite gives its layers equal those made from diffusers' own module names) from the same
starting values, and compute the same losses over three training steps, as the timings assume."""

from __future__ import annotations

import pytest
import torch

from benchmarks.models import write_checkpoint
from benchmarks.train_step import alternating, diffusers_trainer, sdlite_trainer, worker

from test_benchmarks import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_both_sides_train_the_same_layers_the_same_way(tmp_path, checkpointing):
    spec = TINY["tiny-sd1"]
    path = str(tmp_path / "unet.safetensors")
    write_checkpoint(path, spec, components=("unet",), dtype=torch.float32)
    ours, our_layers = sdlite_trainer(spec, path, "cpu", torch.float32, 1, checkpointing)
    theirs, their_layers = diffusers_trainer(spec, path, "cpu", torch.float32, 1, checkpointing)
    assert sorted(our_layers) == sorted(their_layers) and len(our_layers) == 7 * 12  # 7 transformers, 12 layers each
    a = [ours() for _ in range(3)]
    b = [theirs() for _ in range(3)]
    assert a[0] == pytest.approx(b[0], rel=1e-5)
    assert a[2] != a[0]  # the steps change the model
    assert a == pytest.approx(b, rel=1e-4)


def test_worker_reports_time_and_memory(tmp_path, monkeypatch):
    spec = TINY["tiny-sd1"]
    path = str(tmp_path / "unet.safetensors")
    write_checkpoint(path, spec, components=("unet",), dtype=torch.float32)
    result = worker("sdlite", spec, path, "cpu", "fp32", 1, warmup=1, reps=1)
    assert result["median_s"] > 0 and result["peak_bytes"] > 0 and len(result["losses"]) == 2


def test_alternating_rounds_time_both(tmp_path):
    spec = TINY["tiny-sd1"]
    path = str(tmp_path / "unet.safetensors")
    write_checkpoint(path, spec, components=("unet",), dtype=torch.float32)
    result = alternating(spec, path, "cpu", "fp32", 1, warmup=1, reps=2)
    assert {k: len(v) for k, v in result["times"].items()} == {"diffusers": 3, "sdlite": 3}
    expected = [s / d for s, d in zip(result["times"]["sdlite"][1:], result["times"]["diffusers"][1:])]
    assert result["round_ratios"] == pytest.approx(expected)
