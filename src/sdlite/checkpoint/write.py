"""Writing weights: the one way sdlite writes a file.

Tensors go through the ``safetensors`` library (the format every other tool reads), to a temporary name in the
destination folder that is renamed over the destination only once the file is complete, so an interrupted run never
leaves a half-written file under the real name. A destination that is one of the run's inputs is refused before any
work starts: sdlite never overwrites what it reads.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

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
