"""sdlite: Stable Diffusion from the original checkpoint files, in plain PyTorch.

    pipe = sdlite.load("v1-5-pruned-emaonly.safetensors")
    image = pipe.txt2img("a cat drinking a pint of beer", seed=1).images[0]
"""

from __future__ import annotations

from .errors import CheckpointError, SdliteError, ShapeMismatchError, UnsafePickleError
from .adapters.controlnet import ControlUnit
from .adapters.instantid import InstantIDUnit
from .adapters.ip_adapter import IPAdapterUnit
from .adapters.t2i_adapter import T2IAdapterUnit
from .composition import Region, Tiles
from .conditioning import Conditioning
from .generate import Hires, Result
from .infotext import read_infotext
from .pipeline import StableDiffusion, load

__version__ = "0.1.0"
version = __version__

__all__ = ["load", "read_infotext", "StableDiffusion", "Conditioning", "ControlUnit", "IPAdapterUnit", "InstantIDUnit",
           "T2IAdapterUnit", "Hires", "Result", "Region", "Tiles",
           "SdliteError", "CheckpointError", "ShapeMismatchError", "UnsafePickleError", "version", "__version__"]
