"""sdlite's own data: the procedural "shapes" data set (``sdlite.data.shapes``), its detector, and the built-in
model trained on it, shipped in this folder as ``shapes.safetensors``."""

from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import CheckpointError

BUILTIN_MODELS = ("shapes",)
MODELS_DIR = Path(__file__).parent  # where the packaged model files are (package data, see pyproject.toml)


def builtin_model(name: str = "shapes") -> Path:
    """The packaged file of a built-in model, or a CheckpointError saying how to make it when it is not there."""
    if name not in BUILTIN_MODELS:
        raise CheckpointError(name, f"no built-in model of that name; built-in: {', '.join(BUILTIN_MODELS)}")
    path = MODELS_DIR / f"{name}.safetensors"
    if not path.is_file():
        raise CheckpointError(path, f"the built-in model {name!r} is not trained yet (this install has no {path.name}); "
                                    f"train it with `python -m sdlite.data.shapes train --out {path}`")
    return path


def __getattr__(name: str):
    # ``sdlite.data.shapes`` after a plain ``import sdlite``, imported on first use rather than with the package, so
    # that ``python -m sdlite.data.shapes`` runs the module once (runpy warns about a module imported before it runs)
    if name == "shapes":
        return importlib.import_module(f"{__name__}.shapes")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
