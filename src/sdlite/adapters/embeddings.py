"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word") as A1111 loads and finds them
(stable-diffusion-webui ``modules/textual_inversion/textual_inversion.py``, ``modules/sd_hijack.py``; docs/formats.md §4).

An embedding is a few learnt token vectors; a prompt uses it by its name, which is the file name without extension.
Formats read, by their keys:

* A1111 ``.pt``: ``{"string_to_param": {"*": [n, dim]}, "string_to_token": …, "name": …, "step": …}``, one term;
* diffusers ``.bin``: ``{token: [dim] or [n, dim]}``, and any other file holding a single tensor, such as kohya's
  ``.safetensors`` ``{"emb_params": [n, dim]}``;
* SDXL ``.safetensors``: ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``, one part per text encoder.

Files are read with ``sdlite.checkpoint.open_tensor_file``: safetensors, or pickles with ``weights_only`` (nothing in
them runs). An :class:`EmbeddingSet` holds the embeddings that fit one model's text encoders; one that does not fit
(SD1 vectors on SDXL, SDXL vectors on SD1, …) is left out with a warning naming it, as A1111 skips it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from ..checkpoint import open_tensor_file
from ..clip import get_tokenizer
from ..errors import CheckpointError

__all__ = ["Embedding", "EmbeddingSet", "load_embedding", "load_embeddings", "ti_hashes"]

SUFFIXES = (".pt", ".bin", ".safetensors")
SDXL_PARTS = ("clip_l", "clip_g")  # A1111 gives SDXL's text encoder 0 "clip_l", encoder 1 "clip_g"
MAX_VECTORS = 75  # an embedding never straddles a 75-token prompt chunk


@dataclass(frozen=True, eq=False)
class Embedding:
    """One embedding: ``vectors`` maps "" (one-encoder files) or "clip_l"/"clip_g" (SDXL) to [n, width] float32.

    ``sha256`` is the hex digest of the file (empty for embeddings made in memory); its first 12 digits are the
    ``TI hashes`` entry of A1111's infotext.
    """

    name: str
    vectors: dict[str, torch.Tensor]
    sha256: str = ""
    path: str = ""

    @property
    def num_vectors(self) -> int:
        # A1111 counts SDXL embeddings by their clip_g part; EmbeddingSet insists that both parts agree.
        return self.vectors.get("clip_g", next(iter(self.vectors.values()))).shape[0]

    @property
    def shorthash(self) -> str:
        return self.sha256[:12]


def load_embedding(path: str | os.PathLike, name: str | None = None) -> Embedding:
    """Read one embedding file; ``name`` defaults to the file name without extension, as in A1111.

    Raises ``sdlite.errors.CheckpointError`` (or ``UnsafePickleError``) for a file that is not an embedding.
    """
    path = Path(path)
    with open_tensor_file(path) as tf:
        keys = list(tf.keys())
        terms = [k for k in keys if k.startswith("string_to_param.")]
        if terms:
            if len(terms) != 1:
                raise CheckpointError(path, f"holds {len(terms)} terms in string_to_param; an embedding has one")
            raw = {"": tf.read(terms[0], torch.float32)}
        elif all(part in tf for part in SDXL_PARTS):
            raw = {part: tf.read(part, torch.float32) for part in SDXL_PARTS}
        elif len(keys) == 1:
            raw = {"": tf.read(keys[0], torch.float32)}  # a diffusers {token: tensor} or kohya {"emb_params": …}
        else:
            shown = ", ".join(keys[:6]) + (" …" if len(keys) > 6 else "")
            raise CheckpointError(path, f"is not a textual-inversion embedding: expected string_to_param, "
                                        f"clip_l + clip_g or a single tensor, found {len(keys)} tensors ({shown})")
    vectors = {}
    for part, tensor in raw.items():
        tensor = tensor.detach()
        if tensor.ndim == 1:  # diffusers stores a one-vector embedding as [dim]
            tensor = tensor[None]
        if tensor.ndim != 2 or not tensor.is_floating_point():
            raise CheckpointError(path, f"embedding vectors {part or 'tensor'!r} have shape {list(tensor.shape)} "
                                        f"({tensor.dtype}); expected [n_vectors, width] floats")
        vectors[part] = tensor.contiguous()
    return Embedding(name or path.stem, vectors, hashlib.sha256(path.read_bytes()).hexdigest(), str(path))


def _fit(embedding: Embedding, widths: tuple[int, ...]) -> tuple[torch.Tensor, ...] | str:
    """The embedding's vectors for each text encoder, or why it does not fit these encoders."""
    v = embedding.vectors
    if set(v) == set(SDXL_PARTS):
        found = tuple(v[p].shape[1] for p in SDXL_PARTS)
        per_encoder = tuple(v[p] for p in SDXL_PARTS)
        if v["clip_l"].shape[0] != v["clip_g"].shape[0]:
            return f"its clip_l part has {v['clip_l'].shape[0]} vectors and its clip_g part {v['clip_g'].shape[0]}"
    else:
        found, per_encoder = (v[""].shape[1],), (v[""],)
    if found != widths:
        return (f"its vectors are {' + '.join(map(str, found))} wide, the model's text encoders take "
                f"{' + '.join(map(str, widths))}")
    if not 1 <= embedding.num_vectors <= MAX_VECTORS:
        return f"it has {embedding.num_vectors} vectors; a prompt chunk holds 1 to {MAX_VECTORS}"
    return per_encoder


class EmbeddingSet:
    """The embeddings usable with one model, found in prompts by the token ids of their names.

    ``widths`` are the model's text-encoder widths, in encoder order (SD1 (768,), SD2 (1024,), SDXL (768, 1280),
    refiner (1280,)). Embeddings that do not fit, or whose name is taken or tokenises to nothing, are left out with a
    warning. As in A1111, a name matches wherever its token ids occur in a prompt segment (so matching ignores case),
    the longest name first.
    """

    def __init__(self, embeddings: Iterable[Embedding], widths: Sequence[int]):
        self.widths = tuple(widths)
        self._by_name: dict[str, Embedding] = {}
        self._vectors: dict[str, tuple[torch.Tensor, ...]] = {}
        self._by_first_id: dict[int, list[tuple[list[int], Embedding]]] = {}
        tokenizer = get_tokenizer()
        for emb in embeddings:
            where = f" ({emb.path})" if emb.path else ""
            fitted = _fit(emb, self.widths)
            ids = tokenizer.encode(emb.name)
            if isinstance(fitted, str):
                reason = fitted
            elif emb.name in self._by_name:
                reason = f"the name is already taken by {self._by_name[emb.name].path or 'another embedding'}"
            elif not ids:
                reason = "its name has no tokens, so no prompt can use it"
            else:
                self._by_name[emb.name], self._vectors[emb.name] = emb, fitted
                self._by_first_id.setdefault(ids[0], []).append((ids, emb))
                continue
            warnings.warn(f"textual-inversion embedding {emb.name!r}{where} skipped: {reason}", stacklevel=2)
        for candidates in self._by_first_id.values():
            candidates.sort(key=lambda c: len(c[0]), reverse=True)  # stable: equal lengths keep loading order

    def __len__(self) -> int:
        return len(self._by_name)

    def __iter__(self) -> Iterator[Embedding]:
        return iter(self._by_name.values())

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> Embedding:
        return self._by_name[name]

    def __repr__(self) -> str:
        return f"EmbeddingSet({sorted(self._by_name)}, widths={self.widths})"

    def match(self, ids: Sequence[int], position: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's ids start at ``ids[position]`` and how many ids the name takes, or None."""
        for name_ids, emb in self._by_first_id.get(ids[position], ()):
            if list(ids[position : position + len(name_ids)]) == name_ids:
                return emb, len(name_ids)
        return None

    def vectors(self, embedding: Embedding, encoder_index: int) -> torch.Tensor:
        """[n, width] vectors of ``embedding`` for text encoder ``encoder_index`` (float32, on the CPU)."""
        return self._vectors[embedding.name][encoder_index]


def _files(source: Path) -> list[Path]:
    if not source.is_dir():
        return [source]
    found = [p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES and p.stat().st_size]
    return sorted(found, key=lambda p: p.relative_to(source).as_posix())


def load_embeddings(sources: str | os.PathLike | Iterable[str | os.PathLike],
                    text_encoders: Sequence[nn.Module]) -> EmbeddingSet:
    """Embeddings from files and folders (searched recursively for .pt, .bin and .safetensors, as A1111's
    embeddings folder is), matched to ``text_encoders`` (a pipeline's ``text_encoders``).

    A file named directly must load; a file found in a folder that is not an embedding is skipped with a warning.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    loaded = []
    for source in map(Path, sources):
        if not source.exists():
            raise CheckpointError(source, "no such file or folder")
        for path in _files(source):
            try:
                loaded.append(load_embedding(path))
            except CheckpointError as e:
                if not source.is_dir():
                    raise
                warnings.warn(f"textual-inversion folder {source}: {path.name} skipped: {e.detail}", stacklevel=2)
    return EmbeddingSet(loaded, [encoder.config.width for encoder in text_encoders])


def ti_hashes(embeddings: Iterable[Embedding]) -> str:
    """A1111's infotext value for ``TI hashes``: ``"name: 12hex, …"``, names without ":" and ",", each once,
    embeddings without a file left out. The infotext writer adds the quotes."""
    seen, parts = set(), []
    for emb in embeddings:
        if emb.sha256 and emb.name not in seen:
            seen.add(emb.name)
            parts.append(f"{emb.name.replace(':', '').replace(',', '')}: {emb.shorthash}")
    return ", ".join(parts)
