"""AUTOMATIC1111 hypernetworks (the ``.pt`` files of its Train tab; docs/formats.md §15.4).

A hypernetwork holds, per context width (320, 640, 768, 1024, 1280 …), a pair of small MLPs: one transforms the
input of every attention layer's ``to_k``, the other the input of its ``to_v``. Self-attention layers are included:
their "context" is the layer's own input, so the width chooses the pair. Each MLP is a residual
``x + mlp(x) · multiplier`` whose layers follow ``layer_structure`` (widths as multiples of the context width, e.g.
[1, 2, 1]): Linear, then the activation (not after the last Linear unless ``activate_output``), then LayerNorm if
``is_layer_norm``, then Dropout where ``dropout_structure`` (or the older ``use_dropout`` flags) put one. Dropout
and activations hold no parameters but take indices in the file's ``linear.{i}`` numbering, so the module is built
from the indices the file's keys actually use. Several hypernetworks chain: each transforms the previous one's k
and v inputs.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint.files import PickleFile, open_tensor_file
from ..errors import CheckpointError
from ..unet.attention import AttentionPatch, AttentionSite

_NAMED = {"linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish,
          "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
# A1111 also accepts every activation class of torch.nn by its lower-cased name ("gelu", "mish", "silu", …).
ACTIVATIONS = {name.lower(): cls for name, cls in inspect.getmembers(nn.modules.activation, inspect.isclass)
               if cls.__module__ == "torch.nn.modules.activation"} | _NAMED


class HypernetworkModule(nn.Module):
    """One residual MLP under the file's ``linear.{i}`` names; ``layers`` maps each index holding parameters to a
    Linear (2-D weight) or a LayerNorm (1-D weight)."""

    def __init__(self, layers: dict[int, tuple[int, ...]], activation: str | None, activate_output: bool):
        super().__init__()
        size = max(layers) + 1
        modules: list[nn.Module] = [nn.Identity() for _ in range(size)]
        for index, shape in layers.items():
            modules[index] = nn.Linear(shape[1], shape[0]) if len(shape) == 2 else nn.LayerNorm(shape[0])
        self.linear = nn.Sequential(*modules)
        linears = [i for i, shape in sorted(layers.items()) if len(shape) == 2]
        act = ACTIVATIONS[activation]() if activation not in (None, "linear") else None
        self.activate_after = {i for i in linears if act is not None and (i != linears[-1] or activate_output)}
        self.activation = act
        self.multiplier = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for index, layer in enumerate(self.linear):
            h = layer(h)
            if index in self.activate_after:
                h = self.activation(h)
        return x + h * self.multiplier


@dataclass
class Hypernetwork:
    """The (k, v) module pairs of one file by context width, and the strength they are applied at."""

    name: str
    layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]]
    multiplier: float = 1.0

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for pair in self.layers.values():
            for module in pair:
                module.multiplier = multiplier

    def to(self, device=None, dtype=None) -> "Hypernetwork":
        for pair in self.layers.values():
            for module in pair:
                module.to(device=device, dtype=dtype)
        return self


def apply_hypernetworks(hypernetworks, context_k: torch.Tensor, context_v: torch.Tensor):
    """The k and v inputs of one attention layer after each hypernetwork in turn (A1111's chaining)."""
    for hn in hypernetworks:
        pair = hn.layers.get(context_k.shape[-1])
        if pair is not None:
            context_k, context_v = pair[0](context_k), pair[1](context_v)
    return context_k, context_v


class HypernetworkPatch(AttentionPatch):
    """Hypernetworks on the attention extension point: the k and v inputs of every attention layer (self-attention
    included) through each hypernetwork in turn."""

    def __init__(self, hypernetworks):
        self.hypernetworks = list(hypernetworks)

    def kv_inputs(self, site: AttentionSite, k_in: torch.Tensor, v_in: torch.Tensor):
        return apply_hypernetworks(self.hypernetworks, k_in, v_in)


def _module_shapes(state: dict, path, where: str) -> dict[int, tuple[int, ...]]:
    """Parameter indices and shapes of one MLP's state dict; old ``linear1``/``linear2`` names become 0/1."""
    if not isinstance(state, dict):
        raise CheckpointError(path, f"{where} is a {type(state).__name__}, expected a state dict")
    renamed = {k.replace("linear1.", "linear.0.").replace("linear2.", "linear.1."): v for k, v in state.items()}
    layers: dict[int, tuple[int, ...]] = {}
    for key, value in renamed.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "linear" or not parts[1].isdigit() or parts[2] not in ("weight", "bias") \
                or not isinstance(value, torch.Tensor):
            raise CheckpointError(path, f"{where}: unexpected entry {key!r} in a hypernetwork module")
        if parts[2] == "weight":
            layers[int(parts[1])] = tuple(value.shape)
    return layers


def _check_chain(shapes: dict[int, tuple[int, ...]], width: int, path, where: str) -> None:
    """Each Linear takes the previous layer's width, each LayerNorm normalises it, and the MLP returns to ``width``."""
    current = width
    for index, shape in sorted(shapes.items()):
        if len(shape) == 2:
            if shape[1] != current:
                raise CheckpointError(path, f"{where}: linear.{index}.weight has shape {list(shape)}, expected "
                                            f"[*, {current}]")
            current = shape[0]
        elif shape != (current,):
            raise CheckpointError(path, f"{where}: linear.{index}.weight has shape {list(shape)}, expected [{current}]")
    if current != width:
        raise CheckpointError(path, f"{where}: the last layer returns width {current}, expected {width}")


def load(path: str | os.PathLike, multiplier: float = 1.0, device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32) -> Hypernetwork:
    """Read an A1111 hypernetwork ``.pt`` (weights only: no code in the pickle runs)."""
    with open_tensor_file(path) as tf:
        if not isinstance(tf, PickleFile):
            raise CheckpointError(tf.path, "hypernetworks are A1111 .pt pickles; this is a safetensors file")
        info = tf.extras
        sizes = {int(k): v for k, v in info.items() if k.isdigit()}
        if not sizes:
            raise CheckpointError(tf.path, "not a hypernetwork: no per-width (768: (k, v), …) entries")
        activation = info.get("activation_func")
        if activation not in ACTIVATIONS and activation is not None:
            raise CheckpointError(tf.path, f"hypernetwork activation {activation!r} is not one A1111 knows")
        if activation == "prelu":
            raise CheckpointError(tf.path, "hypernetworks with the PReLU activation (which has weights) are not "
                                           "supported")
        activate_output = bool(info.get("activate_output", True))  # A1111's default for files without the flag
        layers = {}
        for width, pair in sorted(sizes.items()):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise CheckpointError(tf.path, f"entry {width} must be a (k, v) pair of state dicts")
            modules = []
            for which, state in zip("kv", pair):
                where = f"entry {width} ({which})"
                shapes = _module_shapes(state, tf.path, where)
                _check_chain(shapes, width, tf.path, where)
                module = HypernetworkModule(shapes, activation, activate_output)
                state = {k.replace("linear1.", "linear.0.").replace("linear2.", "linear.1."): v
                         for k, v in state.items()}
                missing = module.state_dict().keys() - state.keys()
                if missing:
                    raise CheckpointError(tf.path, f"{where}: missing {sorted(missing)}")
                module.load_state_dict(state)
                modules.append(module.to(device=device, dtype=dtype).eval().requires_grad_(False))
            layers[width] = tuple(modules)
        name = info.get("name") or os.path.splitext(os.path.basename(str(path)))[0]
        hn = Hypernetwork(str(name), layers)
        hn.set_multiplier(multiplier)
        return hn
