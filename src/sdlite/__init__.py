"""sdlite: Stable Diffusion from the original checkpoint files, in plain PyTorch.

    pipe = sdlite.load("v1-5-pruned-emaonly.safetensors")
    cond = pipe.encode_prompt(["a cat drinking a pint of beer"])
"""

from __future__ import annotations

from .errors import CheckpointError, SdliteError, ShapeMismatchError, UnsafePickleError
from .pipeline import Conditioning, StableDiffusion, load

__version__ = "0.1.0"
version = __version__

__all__ = ["load", "StableDiffusion", "Conditioning", "SdliteError", "CheckpointError", "ShapeMismatchError",
           "UnsafePickleError", "version", "__version__"]
