"""LoRA-family files (kohya LoRA, LyCORIS LoCon/LoHa/LoKr/full/DoRA, diffusers and PEFT) applied to a loaded model.

    handle = pipe.add_lora("style.safetensors", weight=0.8)                  # merged into the weights
    live = pipe.add_lora("loha.safetensors", weight=0.5, mode="inject")      # computed on the fly
    live.set_weight(0.7, te_weight=0.3); handle.remove(); live.remove()     # originals restored bit for bit

"merge" adds ΔW into the weights (no cost per step). "inject" registers a ``torch.nn.utils.parametrize``
parametrization on each changed weight, so the weight is computed from the untouched original on every access and
user weights can change between images. Both compute W + Σ m·ΔW with the same code in float32, so they give the same
numbers. While anything is merged into a parameter, a copy of its original value is kept (on the CPU); removing the
last LoRA copies it back, so the model returns to its exact original bits. While a LoRA is injected, ``state_dict()``
lists the changed weights as ``….parametrizations.weight.original`` (PyTorch's parametrization layout).

Key names are mapped by ``lora_keys``, the per-format ΔW formulas live in ``lora_formats`` (docs/formats.md §3).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import struct
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..checkpoint import open_tensor_file
from ..checkpoint.files import SafetensorsFile
from ..errors import LoraError
from .lora_formats import LayerUpdate
from .lora_keys import BUNDLED_EMBEDDING, FAMILY_NAMES, KeyMap, Target, guess_family, parse_key, stored_parameter

MODES = ("merge", "inject")
_LISTED = 12  # keys quoted in an error message before "and N more"
# Tensor names of LyCORIS algorithms sdlite does not apply, to say what a file is instead of only "unknown key".
_UNSUPPORTED = {"on_input": "IA3", "oft_blocks": "OFT", "oft_diag": "OFT", "oft_R": "BOFT", "a1.weight": "GLoRA",
                "b1.weight": "GLoRA", "w_norm": "norm", "b_norm": "norm", "lora_bias": "PEFT lora_bias"}


@dataclass
class LoraFile:
    """The layers of one LoRA-family file, grouped by the module they address (component, flat path)."""

    path: Path
    layers: dict[tuple[str, str], LayerUpdate]
    unknown: list[str]  # keys in no known LoRA layout
    bundled: list[str]  # textual-inversion embeddings some trainers bundle (``bundle_emb.*``)
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA-family file (.safetensors or weights-only pickle) and group its tensors by layer."""
    tf = open_tensor_file(path)
    try:
        layers: dict[tuple[str, str], LayerUpdate] = {}
        unknown, bundled = [], []
        for key in tf.keys():
            parsed = parse_key(key)
            if parsed is None:
                (bundled if key.startswith(BUNDLED_EMBEDDING) else unknown).append(key)
                continue
            layer = layers.setdefault((parsed.component, parsed.path), LayerUpdate(parsed.dotted))
            if parsed.role in layer.keys:
                raise LoraError(tf.path, f"keys {layer.keys[parsed.role]!r} and {key!r} both hold the "
                                         f"{parsed.role} tensor of layer {parsed.dotted!r}")
            layer.keys[parsed.role] = key
            tensor = tf.read(key)
            if parsed.role == "alpha":
                layer.alpha = float(tensor.reshape(-1)[0])
            else:
                layer.tensors[parsed.role] = tensor
        _peft_alphas(layers, tf.metadata)
        return LoraFile(tf.path, layers, unknown, bundled, dict(tf.shapes), dict(tf.metadata))
    finally:
        tf.close()


def _peft_alphas(layers: dict[tuple[str, str], LayerUpdate], metadata: dict[str, str]) -> None:
    """Alphas of diffusers-saved PEFT files, which keep the LoraConfig in ``lora_adapter_metadata`` (JSON)."""
    if "lora_adapter_metadata" not in metadata:
        return
    config = json.loads(metadata["lora_adapter_metadata"])
    names = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}
    for (component, _), layer in layers.items():
        prefix = names[component] + "."
        if layer.alpha is not None or prefix + "lora_alpha" not in config:
            continue
        # PEFT's per-module overrides: the pattern must match the end of the module path at a "." boundary.
        patterns = config.get(prefix + "alpha_pattern") or {}
        match = next((p for p in patterns if re.match(rf"(.*\.)?({p})$", layer.name)), None)
        layer.alpha = float(patterns[match] if match else config[prefix + "lora_alpha"])
        layer.rank_root = bool(config.get(prefix + "use_rslora", False))


@dataclass
class LoraReport:
    """What applying a file did: each key's module, and every key that was not applied and why."""

    matched: dict[str, str] = field(default_factory=dict)  # file key → module it changes, e.g. "unet:out.2"
    unmatched: list[str] = field(default_factory=list)  # keys that address no module of the model
    mismatched: dict[str, str] = field(default_factory=dict)  # key → why its tensors do not fit the module
    skipped: list[str] = field(default_factory=list)  # keys deliberately not applied (bundled embeddings)
    algorithms: Counter = field(default_factory=Counter)  # layers per algorithm: lora, loha, lokr, full, +dora

    def __str__(self) -> str:
        kinds = ", ".join(f"{n} {algo}" for algo, n in sorted(self.algorithms.items()))
        text = f"{len(self.matched)} keys applied ({kinds})"
        for label, items in (("unmatched", self.unmatched), ("not fitting", self.mismatched),
                             ("skipped", self.skipped)):
            if items:
                text += f"; {len(items)} {label}"
        return text


def _listing(items: Sequence[str], separator: str = ", ") -> str:
    shown = separator.join(items[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def _match(lora: LoraFile, keymap: KeyMap) -> tuple[list[tuple[LayerUpdate, Target]], LoraReport]:
    report = LoraReport(unmatched=list(lora.unknown), skipped=list(lora.bundled))
    plan: list[tuple[LayerUpdate, Target]] = []
    claimed: dict[tuple, str] = {}
    for (component, path), layer in lora.layers.items():
        keys = list(layer.keys.values())
        target = keymap.resolve(component, path)
        if target is None:
            report.unmatched += keys
            continue
        problem = layer.problem() or _shape_problem(layer, target)
        if problem:
            report.mismatched.update({k: problem for k in keys})
            continue
        slot = (id(target.module), target.weight, target.rows)
        if slot in claimed:
            raise LoraError(lora.path, f"layers {claimed[slot]!r} and {layer.name!r} both address {target}")
        claimed[slot] = layer.name
        plan.append((layer, target))
        report.matched.update({k: str(target) for k in keys})
        report.algorithms[layer.algorithm + ("+dora" if layer.dora else "")] += 1
    return plan, report


def _shape_problem(layer: LayerUpdate, target: Target) -> str | None:
    shape = target.shape
    if not layer.fits(shape, target.pads_inpaint_input):
        tensors = ", ".join(f"{layer.keys[r]} {list(t.shape)}" for r, t in layer.tensors.items())
        return f"{tensors} give a ΔW of {list(layer.matrix_shape())} that does not fit {target} of shape {list(shape)}"
    if "diff_b" in layer.tensors and tuple(layer.tensors["diff_b"].shape) != target.bias_shape:
        bias = "no bias" if target.bias_shape is None else f"a bias of shape {list(target.bias_shape)}"
        return f"{layer.keys['diff_b']} {list(layer.tensors['diff_b'].shape)} does not fit {target}, which has {bias}"
    return None


def _refuse(lora: LoraFile, report: LoraReport, plan: list, family: str, strict: bool) -> None:
    """Raise (or warn, when not strict) about keys that were not applied; a LoRA of another family is refused."""
    problems = report.unmatched + list(report.mismatched)
    if problems:
        guess = guess_family(lora.shapes, lora.shapes, lora.metadata)
        if guess is not None and family not in guess.families:
            raise LoraError(lora.path, f"this LoRA is for {guess.describe()} ({guess.reason}) and the model is "
                                       f"{FAMILY_NAMES[family]}: {len(problems)} of its {len(lora.shapes)} keys do not "
                                       f"fit, e.g. {_listing(problems[:3])}")
    messages = []
    if report.mismatched:
        reasons = list(dict.fromkeys(report.mismatched.values()))
        messages.append(f"{len(report.mismatched)} keys do not fit their module: {_listing(reasons, '; ')}")
    if report.unmatched:
        algos = sorted({a for k in report.unmatched for s, a in _UNSUPPORTED.items() if k.endswith(s)})
        hint = f" (LyCORIS/PEFT {', '.join(algos)} layers, which sdlite does not apply)" if algos else ""
        messages.append(f"{len(report.unmatched)} keys address no module of this {FAMILY_NAMES[family]} model"
                        f"{hint}: {_listing(report.unmatched)}")
    if messages and (strict or not plan):
        rest = " (strict=False applies the rest)" if plan else ""
        raise LoraError(lora.path, "; ".join(messages) + rest)
    if not plan:
        raise LoraError(lora.path, f"the file holds no LoRA layer (keys: {_listing(sorted(lora.shapes))})")
    for message in messages:
        warnings.warn(f"{lora.path}: {message}; applying the other {len(report.matched)} keys", stacklevel=3)
    if report.skipped:
        warnings.warn(f"{lora.path}: {len(report.skipped)} embeddings bundled in the file are not applied "
                      f"({_listing(report.skipped)}); load them as textual-inversion embeddings", stacklevel=3)


class _Injected(nn.Module):
    """Parametrization giving a weight with the injected LoRA changes of its slot applied."""

    def __init__(self, slot: "_Slot"):
        super().__init__()
        self.slot = slot

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.slot.compute(weight, self.slot.injected)


class _Slot:
    """One parameter that LoRAs change: the changes merged into it and injected on top, in the order applied.

    Lives in ``module._lora_slots`` only while some LoRA changes the parameter.
    """

    def __init__(self, module: nn.Module, name: str):
        self.module, self.name = module, name
        self.merged: list[_Change] = []
        self.injected: list[_Change] = []
        self.original: torch.Tensor | None = None  # the parameter's own bits, kept while anything is merged

    @staticmethod
    def of(module: nn.Module, name: str) -> "_Slot":
        slots = module.__dict__.setdefault("_lora_slots", {})
        return slots.setdefault(name, _Slot(module, name))

    def compute(self, value: torch.Tensor, changes: list["_Change"]) -> torch.Tensor:
        # at strength 0 every kind of change is W + 0·(…) = W (DoRA included), so it is not computed: a region's
        # LoRAs wait injected at 0 outside that region's UNet calls
        changes = [c for c in changes if c.multiplier != 0]
        if not changes:
            return value
        work = value.to(torch.promote_types(value.dtype, torch.float32), copy=True)
        for change in changes:
            rows = change.target.rows
            if rows is None:
                work = change.apply(work)
            else:
                work[rows[0]:rows[1]] = change.apply(work[rows[0]:rows[1]])
        return work.to(value.dtype)

    @torch.no_grad()
    def add(self, change: "_Change", mode: str) -> None:
        if mode == "merge":
            if self.original is None:
                self.original = stored_parameter(self.module, self.name).detach().to("cpu", copy=True)
            self.merged.append(change)
            self.remerge()
        else:
            self.injected.append(change)
            if len(self.injected) == 1:
                parametrize.register_parametrization(self.module, self.name, _Injected(self), unsafe=True)

    @torch.no_grad()
    def remerge(self) -> None:
        """Recompute the stored parameter from its original and the merged changes (exactly the original if none)."""
        parameter = stored_parameter(self.module, self.name)
        original = self.original.to(parameter.device)
        parameter.copy_(self.compute(original, self.merged) if self.merged else original)

    def discard(self, change: "_Change") -> None:
        if change in self.merged:
            self.merged.remove(change)
            self.remerge()
            if not self.merged:
                self.original = None
        if change in self.injected:
            self.injected.remove(change)
            if not self.injected:
                parametrize.remove_parametrizations(self.module, self.name, leave_parametrized=False)
        if not self.merged and not self.injected:
            slots = self.module.__dict__["_lora_slots"]
            del slots[self.name]
            if not slots:
                del self.module.__dict__["_lora_slots"]


@dataclass(eq=False)
class _Change:
    """One layer of one applied file, acting on the weight (or, for ``diff_b``, the bias) of its target."""

    handle: "LoraHandle"
    layer: LayerUpdate
    target: Target
    bias: bool = False

    def __post_init__(self):
        self.slot = _Slot.of(self.target.module, self.target.bias if self.bias else self.target.weight)

    @property
    def multiplier(self) -> float:
        return self.handle.weight if self.target.component == "unet" else self.handle.te_weight

    def apply(self, value: torch.Tensor) -> torch.Tensor:
        m = self.multiplier
        if self.bias:
            return value + m * self.layer.tensors["diff_b"].to(value)
        return self.layer.update(value, m, self.target.pads_inpaint_input)


class LoraHandle:
    """A LoRA-family file applied to a model. ``remove()`` takes it off; ``set_weight`` changes its strength.

    ``weight`` multiplies the UNet layers' ΔW, ``te_weight`` the text encoders' (None: the same as ``weight``).
    ``report`` says which file keys changed which module and which were not applied.
    """

    def __init__(self, path: Path, mode: str, weight: float, te_weight: float | None, report: LoraReport,
                 applied: list | None):
        self.path, self.mode, self.report = path, mode, report
        self.name = path.stem
        self._weight, self._te_weight = float(weight), te_weight
        self._changes: list[_Change] = []
        self._applied = applied

    @property
    def weight(self) -> float:
        return self._weight

    @property
    def te_weight(self) -> float:
        return self._weight if self._te_weight is None else float(self._te_weight)

    @property
    def active(self) -> bool:
        return bool(self._changes)

    @functools.cached_property
    def hash(self) -> str:
        """A1111's 12-hex LoRA hash for ``Lora hashes`` in infotext (see ``lora_hash``), computed once."""
        return lora_hash(self.path)

    def _attach(self, plan: list[tuple[LayerUpdate, Target]]) -> None:
        try:
            for layer, target in plan:
                device = stored_parameter(target.module, target.weight).device
                layer.tensors = {role: t.to(device) for role, t in layer.tensors.items()}
                for bias in (False, True) if "diff_b" in layer.tensors else (False,):
                    change = _Change(self, layer, target, bias)
                    self._changes.append(change)  # first, so that a failing add is cleaned up by remove()
                    change.slot.add(change, self.mode)
        except BaseException:
            self.remove()
            raise
        if self._applied is not None:
            self._applied.append(self)

    def set_weight(self, weight: float, te_weight: float | None = None) -> None:
        """New strengths; injected LoRAs use them from the next forward, merged ones are re-merged now."""
        self._weight, self._te_weight = float(weight), te_weight
        if self.mode == "merge":
            for slot in {id(c.slot): c.slot for c in self._changes}.values():
                slot.remerge()

    def remove(self) -> None:
        """Take this file's changes off; parameters no LoRA changes any more get their original bits back."""
        for change in reversed(self._changes):
            change.slot.discard(change)
        self._changes.clear()
        if self._applied is not None and self in self._applied:
            self._applied.remove(self)

    def __repr__(self) -> str:
        state = "" if self.active else ", removed"
        return f"LoraHandle({self.name!r}, weight={self.weight}, te_weight={self.te_weight}, mode={self.mode!r}{state})"


def apply_lora(unet: nn.Module, text_encoders: Sequence[nn.Module], path: str | os.PathLike, *, family: str,
               weight: float = 1.0, te_weight: float | None = None, mode: str = "merge", strict: bool = True,
               applied: list | None = None) -> LoraHandle:
    """Apply a LoRA-family file to a UNet and its text encoders (``StableDiffusion.add_lora`` calls this).

    ``family`` ("sd1", "sd2", "sdxl", "sdxl-refiner") names the model in messages: a file made for another family
    is refused with a ``LoraError`` saying so. Keys that address no module raise a ``LoraError`` listing them, or,
    with ``strict=False``, a warning, and the rest is applied. ``applied``, when given, is a list the handle adds
    itself to and leaves on ``remove()``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    lora, plan, report = match_lora(unet, text_encoders, path, family=family, strict=strict)
    handle = LoraHandle(lora.path, mode, weight, te_weight, report, applied)
    handle._attach(plan)
    return handle


def match_lora(unet: nn.Module, text_encoders: Sequence[nn.Module], path: str | os.PathLike, *, family: str,
               strict: bool = True) -> tuple[LoraFile, list[tuple[LayerUpdate, Target]], LoraReport]:
    """A LoRA file's layers paired with the weights they change (modules may be on meta), refused as apply_lora does."""
    lora = read_lora(path)
    plan, report = _match(lora, KeyMap(unet, text_encoders))
    _refuse(lora, report, plan, family, strict)
    return lora, plan, report


def lora_hash(path: str | os.PathLike, full: bool = False) -> str:
    """A1111's LoRA hash (docs/formats.md §6.4): the ``sshs_model_hash`` metadata, else for safetensors the "addnet" hash
    (sha256 of the bytes after the JSON header), else the sha256 of the file. 12 hex digits unless ``full``."""
    tf = open_tensor_file(path)
    try:
        digest = tf.metadata.get("sshs_model_hash")
        is_safetensors = isinstance(tf, SafetensorsFile)
    finally:
        tf.close()
    if not digest:
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            if is_safetensors:  # 8-byte little-endian header length, then the header
                f.seek(8 + struct.unpack("<Q", f.read(8))[0])
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        digest = sha.hexdigest()
    return digest if full else digest[:12]
