"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word"): a few new token vectors learnt from images,
every weight of the model frozen.

The vectors enter the prompt exactly as a loaded embedding does at inference: an ``EmbeddingSet`` holding one
:class:`~sdlite.adapters.embeddings.Embedding` whose vectors are the trained parameters, found in the captions by
its name (the token) and written into the token-embedding output after the name's position. The token-embedding
tables themselves are never written, so every existing row stays bit-identical.

Files (docs/formats.md "Training: DreamBooth, textual inversion, ControlNet, DDP"): ``.safetensors`` holds kohya's
``{"emb_params": [n, W]}`` (SDXL: ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``); ``.pt`` is A1111's pickle
(``string_to_param {"*": [n, W]}``, ``string_to_token``, ``name``, ``step``, ``sd_checkpoint``,
``sd_checkpoint_name``). A1111 and sdlite name an embedding by its file name, so name the file after the token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..adapters.embeddings import SDXL_PARTS, Embedding, EmbeddingSet
from ..checkpoint.write import atomic_path, save_safetensors
from ..clip import get_tokenizer
from ..conditioning import token_table
from .api import build_run
from .batches import Batch
from .data import DataError, ImageFolder
from .loop import Method, Result, Run

A1111_TOKEN = 265  # the "*" id A1111 writes in string_to_token


class TextualInversionMethod(Method):
    """Learn ``vectors`` new vectors for ``token``, each started from the init word's token rows (cycled when the
    word has fewer tokens than vectors, as A1111 does). ``template``: caption pattern, ``{}`` the token and
    ``[filewords]`` the image's own caption (A1111's template words); without one, the captions must name the
    token."""

    name = "textual-inversion"
    trains_text = True  # gradients flow through the frozen text encoders into the vectors

    def __init__(self, token: str, init_word: str = "*", vectors: int = 1, template: str | None = None):
        if not 1 <= vectors <= 75:
            raise ValueError(f"vectors must be 1 to 75 (one prompt chunk), not {vectors}")
        if not get_tokenizer().encode(token):
            raise ValueError(f"token {token!r} has no CLIP tokens; a prompt could not name it")
        if not get_tokenizer().encode(init_word):
            raise ValueError(f"init word {init_word!r} has no CLIP tokens")
        self.token, self.init_word, self.vectors, self.template = token, init_word, vectors, template
        self.params: dict[str, nn.Parameter] = {}
        self.family = ""

    def attach(self, pipe) -> list[dict]:
        ids = torch.tensor(get_tokenizer().encode(self.init_word))
        rows = ids[torch.arange(self.vectors) % len(ids)]
        parts = SDXL_PARTS if len(pipe.text_encoders) == 2 else ("",)
        self.family = pipe.family
        for part, encoder in zip(parts, pipe.text_encoders):
            table = token_table(encoder).weight
            self.params[part] = nn.Parameter(table.detach()[rows.to(table.device)].float().clone())
        self.embeddings = EmbeddingSet([Embedding(self.token, dict(self.params))],
                                       [e.config.width for e in pipe.text_encoders])
        return [{"params": list(self.params.values())}]

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return {part or "emb_params": p for part, p in self.params.items()}

    def check(self, folder: ImageFolder) -> None:
        """Refuse data whose captions never name the token (the vectors would get no gradient)."""
        captions = self.captions_of([e.caption for e in folder.examples])
        name = get_tokenizer().encode(self.token)
        if not any(row[i:i + len(name)] == name for row in get_tokenizer().encode_batch(captions)
                   for i in range(len(row) - len(name) + 1)):
            raise DataError(f"{folder.root}: no caption names the token {self.token!r} ({captions[0]!r} …): give "
                            f"--template \"a photo of {{}}\" or put the token in the captions")

    def captions_of(self, captions: list[str]) -> list[str]:
        if self.template is None:
            return captions
        return [self.template.replace("{}", self.token).replace("[filewords]", c) for c in captions]

    def loss(self, r: Run, batch: Batch) -> torch.Tensor:
        return r.denoising_loss(dataclasses.replace(batch, captions=self.captions_of(batch.captions)))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().float().cpu().contiguous() for name, p in self.named_parameters().items()}

    def save(self, r: Run, path: Path) -> Path:
        if path.suffix.lower() != ".pt":
            return save_safetensors(path, self.tensors(), {"sdlite_token": self.token, "step": str(r.step)},
                                    inputs=[r.pipe.path])
        if len(self.params) != 1:
            raise ValueError(f"{path}: A1111's .pt holds one text encoder's vectors; save SDXL embeddings as "
                             ".safetensors (clip_l + clip_g)")
        data = {"string_to_token": {"*": A1111_TOKEN}, "string_to_param": {"*": self.tensors()["emb_params"]},
                "name": path.stem, "step": r.step, "sd_checkpoint": old_model_hash(r.pipe.path),
                "sd_checkpoint_name": r.pipe.model_name}
        with atomic_path(path, [r.pipe.path]) as tmp:
            torch.save(data, tmp)
        return path

    def detach(self) -> None:
        self.embeddings = None


def old_model_hash(path: str | os.PathLike) -> str:
    """A1111's old 8-hex model hash (what ``.pt`` embeddings record as ``sd_checkpoint``): the sha256 of the 64 KiB
    at 1 MiB into the file."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def textual_inversion(model, data: str | os.PathLike, *, output: str | os.PathLike, token: str,
                      init_word: str = "*", vectors: int = 1, template: str | None = None,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      progress: Callable[[dict], None] | None = None, **options) -> Result:
    """Train a textual-inversion embedding for ``token`` on ``model`` from the images in ``data``; ``output``
    ending in ``.pt`` is A1111's format, else kohya's ``.safetensors``. ``options`` as for :func:`sdlite.train.lora`.
    """
    method = TextualInversionMethod(token, init_word, vectors, template)
    if template is not None and "[filewords]" not in template:
        options.setdefault("prompt", "")  # the template is the whole caption: images need no .txt
    return build_run(model, data, method, output, device=device, dtype=dtype, progress=progress, check=method.check,
                     **options).execute()
