"""A resumable training state: a folder holding everything that an uninterrupted run would still have in memory.

    trainable.safetensors  the method's trained tensors (and ``ema.<name>`` for their moving averages)
    optimizer.pt           the optimiser's state dict (read back with ``weights_only=True``: tensors and numbers only)
    rng.safetensors        the noise generator's state and torch's global CPU (and CUDA) generator states
    state.json             the step, the GradScaler's state, the loss log so far, the settings it was made with

Every file is written through ``sdlite.checkpoint.write`` (temporary name, renamed when complete) and state.json last,
so a folder with a state.json is complete.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoint.files import open_tensor_file
from ..checkpoint.write import atomic_path, save_safetensors
from ..errors import SdliteError
from .report import LogRow


class StateError(SdliteError):
    """A --resume folder that is missing, incomplete, or from a different training setup."""


def save_state(folder: Path, *, step: int, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               generator: torch.Generator, scaler_state: dict, log: list[LogRow], settings: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / "trainable.safetensors", tensors)
    with atomic_path(folder / "optimizer.pt") as tmp:
        torch.save(optimizer.state_dict(), tmp)
    rng = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    save_safetensors(folder / "rng.safetensors", rng)
    with atomic_path(folder / "state.json") as tmp:
        tmp.write_text(json.dumps({"step": step, "scaler": {k: v for k, v in scaler_state.items()
                                                            if isinstance(v, (int, float, bool))},
                                   "log": [asdict(r) for r in log], "settings": settings}, indent=1))


def load_state(folder: Path, settings: dict) -> dict:
    """The saved state as a dict (step, tensors, optimizer, rng, scaler, log); refuses a folder made for another
    method, model or rank."""
    if not (folder / "state.json").exists():
        raise StateError(f"{folder}: not a training state folder (no state.json; a state is complete once it has one)")
    meta = json.loads((folder / "state.json").read_text())
    saved = meta["settings"]
    for key in ("method", "model", "shape"):
        if saved.get(key) != settings.get(key):
            raise StateError(f"{folder}: was saved for {key} {saved.get(key)!r}, this run has {settings.get(key)!r}")
    with open_tensor_file(folder / "trainable.safetensors") as tf:
        tensors = {k: tf.read(k) for k in tf.keys()}
    with open_tensor_file(folder / "rng.safetensors") as tf:
        rng = {k: tf.read(k) for k in tf.keys()}
    optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    return {"step": meta["step"], "tensors": tensors, "optimizer": optimizer, "rng": rng, "scaler": meta["scaler"],
            "log": [LogRow(**r) for r in meta["log"]]}


def restore_rng(rng: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
