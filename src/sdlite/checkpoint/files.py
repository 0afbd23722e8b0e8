"""Reading tensor files: ``.safetensors`` and weights-only torch pickles (``.ckpt``, ``.pt``, ``.pth``, ``.bin``).

A ``TensorFile`` lists every tensor's shape and dtype without reading data, and reads one tensor at a time straight
into the dtype and device asked for (docs/formats.md §1.1).

safetensors files are read through the ``safetensors`` library, memory-mapped: measured against positioned reads
into fresh buffers (benchmarks/README.md, "Reading safetensors"), the mapping loads several times faster, because
page-cache pages are mapped instead of copied. Pages of a mapping count towards the process's resident memory for as
long as the mapping lives, which would add the file's size to the peak of a load that converts the weights or moves
them to a GPU; so the file is mapped afresh after every ``REMAP_BYTES`` read, and a mapping is released as soon as
no tensor still uses it. Weights read without conversion on the CPU stay backed by the (private, copy-on-write)
mapping, which is the same memory a copy would take. Pickles are opened with ``torch.load(weights_only=True,
mmap=True)``: no code in them is run.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError, UnsafePickleError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
# Bytes read through one mapping of a safetensors file before it is mapped afresh (see the module docstring).
REMAP_BYTES = 256 * 2**20


class TensorFile:
    """The tensors of one file, by flat key (nested dicts of pickles are joined with ".").

    ``shapes`` and ``dtypes`` are known without reading data; ``metadata`` holds safetensors' ``__metadata__``;
    ``extras`` the non-tensor entries of a pickle (``global_step``, …), which loaders set aside.
    """

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype],
                 metadata: dict[str, str], extras: dict[str, Any]):
        self.path, self.shapes, self.dtypes, self.metadata, self.extras = path, shapes, dtypes, metadata, extras

    def keys(self):
        return self.shapes.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def __len__(self) -> int:
        return len(self.shapes)

    def meta(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Shape-only stand-ins (meta tensors) of the tensors under ``prefix``, with the prefix removed."""
        return {k[len(prefix):]: torch.empty(s, dtype=self.dtypes[k], device="meta")
                for k, s in self.shapes.items() if k.startswith(prefix)}

    def read(self, key: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """One tensor, floating-point ones converted to ``dtype`` (when given), placed on ``device``."""
        tensor = self._read(key)
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor.to(device)

    def _read(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsFile(TensorFile):
    def __init__(self, path: Path):
        self._handle = _safe_open(path)
        shapes, dtypes = {}, {}
        for key in self._handle.keys():
            view = self._handle.get_slice(key)
            if view.get_dtype() not in SAFETENSORS_DTYPES:
                raise CheckpointError(path, f"tensor {key!r} has dtype {view.get_dtype()}, which sdlite does not read")
            shapes[key], dtypes[key] = tuple(view.get_shape()), SAFETENSORS_DTYPES[view.get_dtype()]
        self._mapped = 0  # bytes read through the current mapping
        super().__init__(path, shapes, dtypes, self._handle.metadata() or {}, {})

    def _read(self, key: str) -> torch.Tensor:
        size = self.dtypes[key].itemsize * int(torch.Size(self.shapes[key]).numel())
        if self._mapped + size > REMAP_BYTES and self._mapped:
            # A new mapping; the old one goes once the tensors read through it are converted or moved.
            self._handle = _safe_open(self.path)
            self._mapped = 0
        self._mapped += size
        return self._handle.get_tensor(key)

    def close(self) -> None:
        self._handle = None


def _safe_open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        reason = str(e).removeprefix("Error while deserializing header: ")
        hint = " (the file is truncated)" if "not fully covered" in reason else ""
        raise CheckpointError(path, f"not a readable safetensors file: {reason}{hint}") from None


class _LightningCheckpointCallback:
    """Stand-in for pytorch_lightning's ModelCheckpoint, which early SD .ckpt files pickle in their "callbacks".

    Only its saved attributes are kept; nothing of pytorch_lightning is imported or run.
    """

    def __setstate__(self, state):
        self.state = state


def _allowed_globals() -> list:
    import numpy as np

    allowed: list = [(_LightningCheckpointCallback, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")]
    # Training scripts sometimes store step counters as numpy scalars: plain data, rebuilt from bytes.
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    allowed += [(scalar, f"{module}.scalar") for module in ("numpy.core.multiarray", "numpy._core.multiarray")]
    allowed.append(np.dtype)
    allowed += [getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType", "Int32DType")
                if hasattr(np, "dtypes") and hasattr(np.dtypes, n)]
    return allowed


class PickleFile(TensorFile):
    def __init__(self, path: Path):
        obj = self._load(path)
        if not isinstance(obj, dict):
            raise CheckpointError(path, f"holds a {type(obj).__name__}, not a dict of tensors")
        if isinstance(obj.get("state_dict"), dict):
            # PyTorch-Lightning wrapper: the weights are under "state_dict", the rest is bookkeeping.
            extras = {k: v for k, v in obj.items() if k != "state_dict"}
            obj = obj["state_dict"]
        else:
            extras = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self._flatten(obj, "", extras)
        super().__init__(path, {k: tuple(t.shape) for k, t in self._tensors.items()},
                         {k: t.dtype for k, t in self._tensors.items()}, {}, extras)

    def _flatten(self, obj: dict, prefix: str, extras: dict) -> None:
        for key, value in obj.items():
            name = f"{prefix}{key}"
            if isinstance(value, torch.Tensor):
                self._tensors[name] = value
            elif isinstance(value, dict):
                self._flatten(value, f"{name}.", extras)
            else:
                extras[name] = value

    @staticmethod
    def _load(path: Path):
        with torch.serialization.safe_globals(_allowed_globals()):
            try:
                try:
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):
                        raise
                    # Files from torch < 1.6 use the legacy (non-zip) format, which cannot be memory-mapped.
                    return torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                reason = str(e)
                if "Unsupported global" in reason or "not an allowed global" in reason or "GLOBAL" in reason:
                    wanted = next((line.strip() for line in reason.splitlines() if "GLOBAL" in line), reason[:200])
                    raise UnsafePickleError(path, f"refused: the pickle asks to run or build code ({wanted}); sdlite "
                                                  "loads pickles with weights_only=True and never executes them. "
                                                  "Use a .safetensors file of this model.") from None
                raise CheckpointError(path, f"not a readable torch pickle ({reason.splitlines()[0]})") from None
            except Exception as e:  # a damaged pickle can fail anywhere inside the unpickler
                raise CheckpointError(path, f"not a readable torch checkpoint, or truncated "
                                            f"({type(e).__name__}: {e})") from None

    def _read(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def close(self) -> None:
        self._tensors.clear()


class RenamedFile(TensorFile):
    """A tensor file seen under other key names (``sources``: new key → the file's key); reads go to the file's own
    keys. Loaders of a second layout (diffusers' ControlNet or T2I-Adapter names) plan against the original names."""

    def __init__(self, tf: TensorFile, sources: dict[str, str]):
        super().__init__(tf.path, {k: tf.shapes[s] for k, s in sources.items()},
                         {k: tf.dtypes[s] for k, s in sources.items()}, tf.metadata, tf.extras)
        self._tf, self._sources = tf, sources

    def read(self, key: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        return self._tf.read(self._sources[key], dtype, device)


def open_tensor_file(path: str | os.PathLike) -> TensorFile:
    """Open a ``.safetensors`` file or a torch pickle; the format is recognised by its first bytes, not its name."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: the header's length (8 bytes, little-endian) and the header's JSON. Tested first: the length's
    # first byte can be anything, 0x80 or "P" included, which alone would look like a pickle.
    if len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size:
        return SafetensorsFile(path)
    # A zip archive (torch >= 1.6) or a raw pickle stream (protocol 2+ starts with 0x80) means a torch pickle.
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return PickleFile(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return PickleFile(path)
    return SafetensorsFile(path)
