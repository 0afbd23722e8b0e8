"""Writing weights: the one way sdlite writes a file.

Tensors go through the ``safetensors`` library (the format every other tool reads), to a temporary name in the
destination folder that is renamed over the destination only once the file is complete, so an interrupted run never
leaves a half-written file under the real name. A destination that is one of the run's inputs is refused before any
work starts: sdlite never overwrites what it reads. ``stream_safetensors`` writes the same format without holding
all tensors at once (the checkpoint tools merge and convert multi-gigabyte files tensor by tensor).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from ..errors import SdliteError


class OutputError(SdliteError):
    """An output path that sdlite refuses to write (it is an input of the same run, or its folder is missing)."""


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Validate a destination before any work: its folder exists and it is none of ``inputs``."""
    out = Path(path)
    if not out.parent.exists() and str(out.parent) != "":
        raise OutputError(f"{out}: the folder {out.parent} does not exist")
    if out.is_dir():
        raise OutputError(f"{out}: is a folder, expected a file name")
    for source in inputs:
        source = Path(source)
        if source.exists() and out.exists() and os.path.samefile(source, out):
            raise OutputError(f"{out}: is an input of this run; sdlite never overwrites its inputs")
    return out


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on failure removed."""
    out = check_output(path, inputs)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent or ".")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None,
                     inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Write ``tensors`` (contiguous CPU copies are made as needed) with string ``metadata``, atomically."""
    from safetensors.torch import save_file

    bad = [k for k, v in (metadata or {}).items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise OutputError(f"{path}: safetensors metadata must map strings to strings; not so for {bad[:5]}")
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path, inputs) as tmp:
        save_file(data, str(tmp), metadata=dict(metadata) if metadata else None)
    return Path(path)


# safetensors dtype names (the format's spec), for the streaming writer below.
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def safetensors_header(entries: Sequence[tuple[str, Sequence[int], torch.dtype]],
                       metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length and the JSON table of a safetensors file whose tensors follow in ``entries`` order.

    The table is padded with spaces to a multiple of 8 bytes, as the safetensors library writes it, so that every
    tensor starts aligned.
    """
    table: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, shape, dtype in entries:
        if key in table:
            raise OutputError(f"tensor {key!r} is listed twice")
        if dtype not in _DTYPE_NAMES:
            raise OutputError(f"tensor {key!r}: safetensors cannot store {dtype}")
        size = math.prod(shape) * dtype.itemsize
        table[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": [int(d) for d in shape],
                      "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(table, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def stream_safetensors(path: str | os.PathLike, entries: Sequence[tuple[str, Sequence[int], torch.dtype]],
                       tensors: Iterable[torch.Tensor], metadata: Mapping[str, str] | None = None,
                       inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Write a safetensors file one tensor at a time: the header from ``entries`` (key, shape, dtype) first, then
    each tensor ``tensors`` yields, in the same order, as soon as it is computed.

    The library's ``save_file`` needs every tensor in memory at once; this needs one. Each yielded tensor must have
    its entry's shape and dtype. Written to a temporary name and renamed when complete, like ``save_safetensors``.
    """
    bad = [k for k, v in (metadata or {}).items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise OutputError(f"{path}: safetensors metadata must map strings to strings; not so for {bad[:5]}")
    entries = list(entries)
    header = safetensors_header(entries, metadata)
    with atomic_path(path, inputs) as tmp, open(tmp, "wb") as f:
        f.write(header)
        produced = iter(tensors)
        for key, shape, dtype in entries:
            tensor = next(produced, None)
            if tensor is None:
                raise OutputError(f"{path}: the tensors ran out before {key!r}")
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise OutputError(f"{path}: tensor {key!r} came as {list(tensor.shape)} {tensor.dtype}, the header "
                                  f"says {list(shape)} {dtype}")
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(data.numpy()))
        if next(produced, None) is not None:
            raise OutputError(f"{path}: more tensors than header entries")
    return Path(path)
