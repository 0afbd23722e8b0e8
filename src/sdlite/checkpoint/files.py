"""Reading tensor files: ``.safetensors`` and weights-only torch pickles (``.ckpt``, ``.pt``, ``.pth``, ``.bin``).

A ``TensorFile`` lists every tensor's shape and dtype without reading data, and reads one tensor at a time straight
into the dtype and device asked for, so loading a model costs its own size in RAM plus one tensor.

safetensors files are read with positioned reads rather than memory-mapped: pages of a mapping count towards the
process's resident memory for as long as the mapping lives, which would double the peak while the weights are
converted and moved. Pickles are opened with ``torch.load(weights_only=True, mmap=True)``: no code in them is run.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, UnsafePickleError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
_MAX_HEADER = 100 * 1024 * 1024


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
        size = path.stat().st_size
        self._file = open(path, "rb")
        try:
            raw = self._file.read(8)
            if len(raw) < 8:
                raise CheckpointError(path, f"file is {size} bytes long, too short for a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(path, f"safetensors header claims {n} bytes but the file has {size}: "
                                            "the file is truncated or not a safetensors file")
            try:
                header = json.loads(self._file.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(path, f"safetensors header is not valid JSON ({e})") from None
            if not isinstance(header, dict):
                raise CheckpointError(path, "safetensors header is not a JSON object")
            metadata = header.pop("__metadata__", None) or {}
            self._data_start = 8 + n
            self._offsets: dict[str, tuple[int, int]] = {}
            shapes, dtypes = {}, {}
            for key, entry in header.items():
                shapes[key], dtypes[key], self._offsets[key] = self._check_entry(path, key, entry, size - 8 - n)
        except BaseException:
            self._file.close()
            raise
        super().__init__(path, shapes, dtypes, metadata, {})

    @staticmethod
    def _check_entry(path: Path, key: str, entry: Any, data_size: int):
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, f"safetensors entry {key!r} is malformed: {entry!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise CheckpointError(path, f"tensor {key!r} of shape {list(shape)} ({entry['dtype']}) needs "
                                        f"{numel * dtype.itemsize} bytes, the header gives {end - begin}")
        if end > data_size:
            raise CheckpointError(path, f"tensor {key!r} ends at byte {end} of the data, but the file holds "
                                        f"{data_size} bytes of data: the file is truncated")
        return shape, dtype, (begin, end)

    def _read(self, key: str) -> torch.Tensor:
        begin, end = self._offsets[key]
        tensor = torch.empty(self.shapes[key], dtype=self.dtypes[key])
        if end > begin:
            buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            got = os.preadv(self._file.fileno(), [buffer], self._data_start + begin)
            if got != end - begin:
                raise CheckpointError(self.path, f"tensor {key!r}: read {got} of {end - begin} bytes (file changed?)")
        return tensor

    def close(self) -> None:
        self._file.close()


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


def open_tensor_file(path: str | os.PathLike) -> TensorFile:
    """Open a ``.safetensors`` file or a torch pickle; the format is recognised by its first bytes, not its name."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    with open(path, "rb") as f:
        head = f.read(9)
    # A zip archive (torch >= 1.6) or a raw pickle stream (protocol 2+ starts with 0x80) means a torch pickle.
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return PickleFile(path)
    if len(head) >= 9 and head[8:9] == b"{":
        return SafetensorsFile(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return PickleFile(path)
    return SafetensorsFile(path)
