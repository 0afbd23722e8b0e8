"""The streaming safetensors writer: files it writes read back bit for bit through the safetensors library."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdlite.checkpoint.write import OutputError, stream_safetensors


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 3, generator=g),
        "half": torch.randn(7, generator=g).half(),
        "brain": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "double": torch.randn(3, generator=g).double(),
        "ids": torch.arange(77).reshape(1, 77),
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0, 4),
        "flags": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous
    }


def test_round_trip_bit_exact_through_safe_open(tmp_path):
    data = tensors()
    entries = [(k, v.shape, v.dtype) for k, v in data.items()]
    out = stream_safetensors(tmp_path / "s.safetensors", entries, iter(data.values()), {"note": "x", "n": "{}"})
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"note": "x", "n": "{}"}
        assert set(f.keys()) == set(data)
        for key, value in data.items():
            got = f.get_tensor(key)
            assert got.dtype == value.dtype and got.shape == value.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8) if got.numel() else got,
                               value.contiguous().reshape(-1).view(torch.uint8) if value.numel() else value)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_same_tensors_as_the_library_writes(tmp_path):
    data = {k: v for k, v in tensors().items() if k != "transposed"}
    save_file(data, str(tmp_path / "lib.safetensors"))
    stream_safetensors(tmp_path / "ours.safetensors", [(k, v.shape, v.dtype) for k, v in data.items()],
                       iter(data.values()))
    with safe_open(str(tmp_path / "lib.safetensors"), "pt") as lib, \
            safe_open(str(tmp_path / "ours.safetensors"), "pt") as ours:
        for key in data:
            assert torch.equal(lib.get_tensor(key), ours.get_tensor(key))


@pytest.mark.parametrize("problem", ["shape", "dtype", "short", "long"])
def test_a_wrong_stream_leaves_no_file(tmp_path, problem):
    entries = [("a", (2, 2), torch.float32), ("b", (3,), torch.float16)]
    values = [torch.zeros(2, 2), torch.zeros(3, dtype=torch.float16)]
    if problem == "shape":
        values[1] = torch.zeros(4, dtype=torch.float16)
    elif problem == "dtype":
        values[1] = torch.zeros(3)
    elif problem == "short":
        values = values[:1]
    else:
        values.append(torch.zeros(1))
    with pytest.raises(OutputError):
        stream_safetensors(tmp_path / "x.safetensors", entries, iter(values))
    assert list(tmp_path.iterdir()) == []


def test_an_input_is_never_the_output(tmp_path):
    src = tmp_path / "in.safetensors"
    save_file({"a": torch.zeros(2)}, str(src))
    with pytest.raises(OutputError, match="input"):
        stream_safetensors(src, [("a", (2,), torch.float32)], iter([torch.ones(2)]), inputs=[src])
    with safe_open(str(src), "pt") as f:
        assert torch.equal(f.get_tensor("a"), torch.zeros(2))
