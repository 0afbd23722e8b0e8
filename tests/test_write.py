"""The one writer: safetensors through the library, atomic rename, inputs never overwritten."""

import os

import pytest
import torch
from safetensors import safe_open

from sdlite.checkpoint.write import OutputError, atomic_path, save_safetensors


def test_round_trip_through_the_safetensors_library(tmp_path):
    tensors = {"a.weight": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int64).view(2, 3).t()}
    out = save_safetensors(tmp_path / "x.safetensors", tensors, {"ss_network_dim": "4"})
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"ss_network_dim": "4"}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_an_interrupted_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "y.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_inputs_are_never_overwritten(tmp_path):
    src = tmp_path / "in.safetensors"
    save_safetensors(src, {"a": torch.zeros(2)})
    before = src.read_bytes()
    with pytest.raises(OutputError, match="input"):
        save_safetensors(src, {"a": torch.ones(2)}, inputs=[src])
    os.link(src, tmp_path / "alias.safetensors")
    with pytest.raises(OutputError, match="input"):
        save_safetensors(tmp_path / "alias.safetensors", {"a": torch.ones(2)}, inputs=[src])
    assert src.read_bytes() == before


def test_bad_destinations_and_metadata_are_refused(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        save_safetensors(tmp_path / "missing" / "x.safetensors", {"a": torch.zeros(1)})
    with pytest.raises(OutputError, match="strings"):
        save_safetensors(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, {"rank": 4})
