"""Reading tensor shapes for architecture inference: the one helper the UNet, VAE, CLIP and ControlNet config
functions share (docs/formats.md §2).

Those functions see one component's tensors with its prefix removed, usually shape-only stand-ins
(``TensorFile.meta``). A missing key or a tensor of the wrong rank is a ``CheckpointError`` naming the key as it
is written in the file (the component prefix put back); the loader adds the file's path.
"""

from __future__ import annotations

import re
from typing import Mapping

from ..errors import CheckpointError, ShapeMismatchError


class ShapeReader:
    """Shapes of the tensors in ``sd`` (anything with ``.shape``); ``what`` names the component in messages
    ("UNet", "VAE", …) and ``prefix`` is the component's prefix in the file."""

    def __init__(self, sd: Mapping, what: str, prefix: str = ""):
        self.sd, self.what, self.prefix = sd, what, prefix

    def __contains__(self, key: str) -> bool:
        return key in self.sd

    def __iter__(self):
        return iter(self.sd)

    def file_key(self, key: str) -> str:
        return self.prefix + key

    def missing(self, key: str, why: str = "") -> CheckpointError:
        """The error for a required key that is absent."""
        return CheckpointError(None, f"{self.what} key {self.file_key(key)!r} is missing{why}")

    def __call__(self, key: str, *, ndim: int | None = None,
                 expected: tuple[int | None, ...] | None = None) -> tuple[int, ...]:
        """The shape of ``key``, checked against ``expected`` (None: any size there) or a dimension count."""
        if key not in self.sd:
            raise self.missing(key)
        found = tuple(self.sd[key].shape)
        if expected is not None:
            if len(found) != len(expected) or any(e is not None and e != f for e, f in zip(expected, found)):
                # Free sizes are shown as -1 ("any size").
                raise ShapeMismatchError(None, self.file_key(key), [-1 if e is None else e for e in expected], found)
        elif ndim is not None and len(found) != ndim:
            raise CheckpointError(None, f"{self.what} tensor {self.file_key(key)!r} has shape {list(found)}, "
                                        f"expected a {ndim}-d tensor")
        return found

    def indices(self, prefix: str) -> list[int]:
        """The numbers N of the keys ``prefix + "N." + …``, ascending (with gaps, if the file has them)."""
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        return sorted({int(m[1]) for key in self.sd if (m := pattern.match(key))})

    def count(self, prefix: str, marker: str = "") -> int:
        """How many blocks ``prefix + "N."`` there are. They must run 0 … n-1 without a gap, and with a ``marker``
        each must hold ``prefix + "N." + marker`` (a gap is then reported as that key missing)."""
        found = self.indices(prefix)
        if not found:
            raise self.missing(f"{prefix}0.{marker}" if marker else f"{prefix}0", " (no blocks found)")
        for i in range(found[-1] + 1):
            if marker and f"{prefix}{i}.{marker}" not in self.sd:
                raise self.missing(f"{prefix}{i}.{marker}", f" (keys of blocks up to {found[-1]} are present)")
            if not marker and found[i:i + 1] != [i]:
                raise CheckpointError(None, f"{self.what} keys {self.file_key(prefix)}N.* have indices {found}, "
                                            f"expected 0 … {len(found) - 1}")
        return found[-1] + 1
