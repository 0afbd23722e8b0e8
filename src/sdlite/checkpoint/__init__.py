"""Checkpoint files: reading them (``files``), telling what they hold (``families``), the facts of each SD family
(``family_table``), the shape reader the config inference shares (``shapes``), loading a full checkpoint's
components strictly (``load``) and writing (``write``).

This package's own namespace holds only what imports nothing of the model packages, so that the UNet, VAE and CLIP
code may read the shape reader and the family table without an import cycle; ``load`` imports them.
"""

from __future__ import annotations

from .families import describe, identify
from .files import TensorFile, open_tensor_file

__all__ = ["TensorFile", "describe", "identify", "open_tensor_file"]
