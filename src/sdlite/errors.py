"""The errors sdlite raises on bad input.

Every message says which file and which key were involved, what was expected and what was found,
so that a user can tell a wrong file from a damaged one without reading a traceback into torch.
"""

from __future__ import annotations


class SdliteError(Exception):
    """Base class of every error sdlite raises on purpose."""


class CheckpointError(SdliteError):
    """A file could not be read as a checkpoint, or is not the kind of file that was asked for."""

    def __init__(self, path, message: str):
        self.path = None if path is None else str(path)
        self.detail = message
        super().__init__(message)

    def __str__(self) -> str:
        # The path is filled in late by the loader when the error comes from code that sees only tensors.
        return f"{self.path}: {self.detail}" if self.path else self.detail


class UnsafePickleError(CheckpointError):
    """A pickled checkpoint asks to run code; sdlite never executes it."""


class ShapeMismatchError(CheckpointError):
    """A tensor in the file has a shape the inferred architecture does not allow."""

    def __init__(self, path, key: str, expected, found):
        self.key, self.expected, self.found = key, tuple(expected), tuple(found)
        super().__init__(path, f"tensor {key!r} has shape {list(found)}, expected {list(expected)}")


class LoraError(CheckpointError):
    """A LoRA-family file does not fit the model it is applied to, or holds keys sdlite cannot apply."""
