"""What the checkpoint tools share: their error, progress reporting, the result they hand back, dtypes by name."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from ..errors import CheckpointError
from ..infotext import model_hash

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Progress = Callable[[dict], None]
T = TypeVar("T")


class ToolError(CheckpointError):
    """Inputs a checkpoint tool refuses before writing anything: mismatched families or shapes, missing keys."""


def dtype_of(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp16"`` / ``torch.float16`` / None → a torch dtype (or None: keep each tensor's own)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {name!r}")
    return DTYPES[name]


def with_progress(items: Iterable[T], total: int, progress: Progress | None) -> Iterator[T]:
    """Yield ``items``, calling ``progress`` after each with the dict the CLI's progress bar reads."""
    start = time.perf_counter()
    for i, item in enumerate(items):
        yield item
        if progress is not None:
            progress({"i": i, "total": total, "elapsed": time.perf_counter() - start})


@dataclass
class Written:
    """A file a tool wrote, with A1111's model hash of it and what the tool has to say about its inputs."""

    path: Path
    tensors: int
    notes: list[str] = field(default_factory=list)
    sha256: str = ""

    @property
    def model_hash(self) -> str:
        """A1111's "Model hash" (first 10 hex digits of the sha256), as the infotext of an image made with it."""
        return self.sha256[:10]

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.tensors} tensors, model hash {self.model_hash}"]
        return "\n".join(lines + [f"  {note}" for note in self.notes])


def written(path: str | Path, tensors: int, notes: list[str]) -> Written:
    return Written(Path(path), tensors, notes, model_hash(path, full=True))


def listing(keys: Iterable[str], limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
