"""The one way sdlite puts weights into a module: build it on the meta device, check every key and shape against
the file, then read each tensor once, straight into the target dtype and device, and assign it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import CheckpointError, ShapeMismatchError
from .families import is_set_aside
from .files import TensorFile


@dataclass
class Plan:
    """A module built on meta and the file key of each of its parameters, checked but not yet read."""

    module: nn.Module
    sources: dict[str, str]  # module key -> file key
    name: str


def _listing(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def plan(tf: TensorFile, build: Callable[[], nn.Module], file_prefix: str, module_prefix: str = "",
         name: str = "", only: Callable[[str], bool] | None = None) -> Plan:
    """Build a module on meta and match its state dict against ``file_prefix`` keys (strict, shapes included);
    ``only`` narrows the file keys considered (a file holding more than this module)."""
    with torch.device("meta"):
        module = build()
    expected = module.state_dict()
    sources = {module_prefix + k[len(file_prefix):]: k for k in tf.keys()
               if k.startswith(file_prefix) and not is_set_aside(k) and (only is None or only(k))}
    missing = expected.keys() - sources.keys()
    unexpected = sources.keys() - expected.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(file_prefix + k[len(module_prefix):] for k in missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(sources[k] for k in unexpected)}")
        raise CheckpointError(tf.path, f"{name or file_prefix} does not match the architecture inferred from its "
                                       f"shapes ({'; '.join(parts)})")
    for key, param in expected.items():
        found = tf.shapes[sources[key]]
        if tuple(param.shape) != found:
            raise ShapeMismatchError(tf.path, sources[key], param.shape, found)
    return Plan(module, sources, name)


def materialize(tf: TensorFile, p: Plan, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """Read the planned tensors and assign them; the module comes back in eval mode without gradients."""
    tensors = {key: tf.read(src, dtype, device) for key, src in p.sources.items()}
    p.module.load_state_dict(tensors, strict=True, assign=True)
    return p.module.eval().requires_grad_(False)
