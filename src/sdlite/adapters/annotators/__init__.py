"""ControlNet annotators that need network weights, loaded from the files lllyasviel/Annotators publishes, with
the architecture read from the keys and a file of another kind refused by name.

Preprocessor names are sd-webui-controlnet's: "softedge_hed" ("hed"), "softedge_hedsafe", "lineart_realistic"
("lineart"), "lineart_coarse", "openpose" (body). Each runs as controlnet_aux's detector with the same name does
and returns the uint8 [H, W, 3] map the ControlNet was trained on::

    net = sdlite.adapters.annotators.load("body_pose_model.pth")
    pose_map = sdlite.adapters.annotators.annotate("openpose", image, net, detect_resolution=512)

Depth (MiDaS / DPT), normal (BAE), segmentation (UniFormer / OneFormer) and MLSD are not included: give those
ControlNets a ready map (``preprocessor=None``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from ...checkpoint import open_tensor_file
from ...checkpoint.materialize import materialize, plan
from ...errors import CheckpointError
from . import openpose
from .edges import ControlNetHED, LineartGenerator, detect_hed, detect_lineart, residual_blocks
from .openpose import BodyPoseNet

# preprocessor name -> (network kind, detector options, file names searched in order)
PREPROCESSORS = {
    "softedge_hed": ("hed", {}, ("ControlNetHED.pth", "ControlNetHED_Apache2.pth")),
    "hed": ("hed", {}, ("ControlNetHED.pth", "ControlNetHED_Apache2.pth")),
    "softedge_hedsafe": ("hed", {"safe": True}, ("ControlNetHED.pth", "ControlNetHED_Apache2.pth")),
    "lineart_realistic": ("lineart", {}, ("sk_model.pth",)),
    "lineart": ("lineart", {}, ("sk_model.pth",)),
    "lineart_coarse": ("lineart", {}, ("sk_model2.pth",)),
    "openpose": ("openpose", {}, ("body_pose_model.pth",)),
}
_DETECT = {"hed": detect_hed, "lineart": detect_lineart, "openpose": openpose.detect}

# Files of other annotators, recognised by one key so that the error can say what was given.
_OTHERS = {
    "moduleVggOne.0.weight": "Xie & Tu's original BGR HED (network-bsds500.pth, ControlNet 1.0's annotator); "
                             "the softedge preprocessors use ControlNetHED.pth",
    "conv6_2_CPM.weight": "the OpenPose hand model (hand_pose_model.pth); openpose here uses body_pose_model.pth",
    "backbone.features.0.0.weight": "an MLSD line detector, which sdlite does not include",
    "pretrained.model.patch_embed.proj.weight": "a MiDaS/DPT depth model, which sdlite does not include",
}


def kind_of(keys) -> str:
    """"hed", "lineart" or "openpose" from a file's keys; CheckpointError-ready ValueError otherwise."""
    keys = set(keys)
    if {"norm", "block1.convs.0.weight", "block5.projection.weight"} <= keys:
        return "hed"
    if {"model0.1.weight", "model4.1.weight"} <= keys:
        return "lineart"
    if {"conv1_1.weight", "Mconv7_stage6_L1.weight", "Mconv7_stage6_L2.weight"} <= keys:
        return "openpose"
    known = next((what for key, what in _OTHERS.items() if key in keys), None)
    if known:
        raise ValueError(f"this is {known}")
    sample = ", ".join(sorted(keys)[:5])
    raise ValueError(f"not a HED (ControlNetHED.pth), lineart (sk_model.pth, sk_model2.pth) or OpenPose body "
                     f"(body_pose_model.pth) annotator: {len(keys)} tensors such as {sample}")


def _build(kind: str, keys) -> nn.Module:
    if kind == "hed":
        return ControlNetHED()
    if kind == "lineart":
        return LineartGenerator(residual_blocks(keys))
    return BodyPoseNet()


def load(path: str | os.PathLike, kind: str | None = None, device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32) -> nn.Module:
    """An annotator network from its file; ``kind`` ("hed", "lineart", "openpose") refuses a file of another kind.
    The module has ``.kind``."""
    tf = open_tensor_file(path)
    try:
        try:
            found = kind_of(tf.keys())
            p = plan(tf, lambda: _build(found, tf.keys()), "", name=f"{found} annotator")
        except ValueError as e:
            raise CheckpointError(path, str(e)) from None
        if kind is not None and found != kind:
            raise CheckpointError(path, f"is a {found} annotator, not the {kind} one asked for")
        module = materialize(tf, p, dtype, device)
    finally:
        tf.close()
    module.kind = found
    return module


@functools.lru_cache(maxsize=4)
def _cached(path: str, kind: str, mtime: float) -> nn.Module:
    return load(path, kind)


def find(preprocessor: str, dirs: Iterable[str | os.PathLike]) -> Path:
    """The weight file of ``preprocessor`` in ``dirs`` (searched in order)."""
    if preprocessor not in PREPROCESSORS:
        raise ValueError(f"no annotator network for preprocessor {preprocessor!r}; known: {sorted(PREPROCESSORS)}")
    names = PREPROCESSORS[preprocessor][2]
    dirs = [Path(d) for d in dirs]
    for d in dirs:
        for name in names:
            if (d / name).is_file():
                return d / name
    searched = ", ".join(str(d) for d in dirs) or "no directories (set pipe.annotator_dirs)"
    raise FileNotFoundError(f"preprocessor {preprocessor!r} needs {' or '.join(names)}; not found in {searched}")


def network_for(preprocessor: str, dirs: Iterable[str | os.PathLike]) -> nn.Module:
    """The network of ``preprocessor`` found in ``dirs``, loaded once per file and kept (the last few)."""
    path = find(preprocessor, dirs)
    return _cached(str(path), PREPROCESSORS[preprocessor][0], path.stat().st_mtime)


def annotate(preprocessor: str, image: np.ndarray, net: nn.Module, detect_resolution: int = 512,
             image_resolution: int | None = None) -> np.ndarray:
    """Run ``preprocessor`` with ``net`` on a uint8 image [H, W(, C)]: the map, uint8 [H', W', 3], at
    ``image_resolution`` (default: ``detect_resolution``) by the annotators' 64-multiple size rule."""
    kind, options, _ = PREPROCESSORS[preprocessor]
    if getattr(net, "kind", kind) != kind:
        raise ValueError(f"preprocessor {preprocessor!r} needs a {kind} network, got a {net.kind} one")
    return _DETECT[kind](net, np.asarray(image), detect_resolution,
                         detect_resolution if image_resolution is None else image_resolution, **options)


__all__ = ["PREPROCESSORS", "annotate", "find", "kind_of", "load", "network_for"]
