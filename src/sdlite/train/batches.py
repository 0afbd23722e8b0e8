"""Batches of training examples: latents encoded once by the frozen VAE (kept in memory or on disk), grouped so that
each batch holds one bucket's size, with per-step caption variation and mirroring.

The order is a function of the seed and the step alone (the epoch's shuffle is seeded by seed and epoch, a step's
caption and flip draws by seed and step), so a resumed run sees exactly the batches an uninterrupted one would.

What the UNet is conditioned on during training: the captions' text context and, for SDXL, the ADM vector.

Captions are encoded with each family's layer rule, as at inference (SD1: last layer through the final norm; SD2:
penultimate through ln_final; SDXL: CLIP-L and bigG penultimate layers concatenated, bigG's pooled projection), in
chunks of 75 tokens, but as plain text: brackets are not read as emphasis, as kohya sd-scripts trains by default.
Gradients flow into the text encoders when the method trains them (text-encoder LoRA). SDXL's ADM vector
is built per image from its original size, its crop and its bucket (Podell et al. 2023, "micro-conditioning"),
with the same size embedding the generation code uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..checkpoint.files import open_tensor_file
from ..checkpoint.write import save_safetensors
from ..conditioning import Conditioning, encode_text_with_grad
from ..generate import size_embedding
from ..vae import refine_latents
from .data import ImageFolder, vary_caption


@dataclass
class Batch:
    """One step's examples: scaled latents [B, 4, h, w] of one bucket, captions, and SDXL's size conditioning."""

    latents: torch.Tensor
    captions: list[str]
    original_sizes: list[tuple[int, int]]  # (height, width) of each image as it was
    crops: list[tuple[int, int]]  # (top, left) of the cut in the scaled image
    target_size: tuple[int, int]  # (height, width) of the bucket
    indices: list[int]
    shard: tuple[list[int], int] | None = None  # a rank's part of a distributed batch: (its rows, rows of the whole)


class LatentCache:
    """Latents (× the VAE's scale factor, float32, CPU) of every example, and of its mirror image when ``flip``.

    ``folder``: keep them on disk there as safetensors (reused by later runs: the file name is a digest of the image
    path, its modification time and size, its bucket placement, and ``model``, which names the VAE); else in memory.
    The posterior is sampled once per image with a generator seeded by ``seed``, as kohya's cache does.
    ``refine``: that many steps of decoder inversion after the encoder (``sdlite.vae.refine_latents``), for images
    the encoder cannot carry but the decoder can draw (the built-in model's stars); 0, the default, keeps the
    encoder's latents.
    """

    def __init__(self, data: ImageFolder, vae, *, flip: bool = False, folder: str | Path | None = None,
                 model: str = "", seed: int = 0, refine: int = 0):
        self.data, self.flip, self.refine = data, flip, refine
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.latents: list[dict[str, torch.Tensor]] = []
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for index in range(len(data)):
                self.latents.append(self._load_or_encode(index, vae, model, generator))

    def _file(self, index: int, model: str) -> Path | None:
        if self.folder is None:
            return None
        e = self.data.examples[index]
        stat = e.path.stat()
        key = f"{e.path.resolve()}|{stat.st_mtime_ns}|{stat.st_size}|{e.placement}|{model}|{self.flip}"
        if self.refine:
            key += f"|refine {self.refine}"
        return self.folder / f"{e.path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.safetensors"

    def _load_or_encode(self, index: int, vae, model: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
        path = self._file(index, model)
        if path is not None and path.exists():
            with open_tensor_file(path) as tf:
                return {k: tf.read(k) for k in tf.keys()}
        views = {"latents": self.data.pixels(index)}
        if self.flip:
            views["flipped"] = views["latents"].flip(-1)
        param = next(vae.parameters())
        out = {}
        for name, pixels in views.items():
            x = pixels[None].to(param.device, param.dtype)
            z = vae.encode(x).sample(generator)
            if self.refine:
                z = refine_latents(vae, x, z, self.refine)
            out[name] = (z * vae.scale_factor)[0].float().cpu()
        if path is not None:
            save_safetensors(path, out)
        return out

    def get(self, index: int, flipped: bool = False) -> torch.Tensor:
        return self.latents[index]["flipped" if flipped else "latents"]


def epoch_order(data: ImageFolder, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: each example ``repeats`` times, shuffled within its bucket, cut into batches of at
    most ``batch_size``, and the batches shuffled (kohya's bucket batching)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, e in enumerate(data.examples):
        by_bucket.setdefault(e.placement.bucket, []).extend([index] * e.repeats)
    batches = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        rng.shuffle(indices)
        batches += [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class Augment:
    """Per-step variation: caption dropout, tag shuffling after ``keep_tokens`` tags, horizontal flip."""

    caption_dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 0
    flip: bool = False


class Batches:
    """The run's batches, step by step (a step here is one forward/backward: one micro-batch)."""

    def __init__(self, data: ImageFolder, cache: LatentCache, batch_size: int, seed: int, augment: Augment):
        if augment.flip and not cache.flip:
            raise ValueError("flip augmentation needs the mirrored latents: build the LatentCache with flip=True")
        self.data, self.cache, self.batch_size, self.seed, self.augment = data, cache, batch_size, seed, augment
        self._epochs: dict[int, list[list[int]]] = {}

    def _order(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            self._epochs = {epoch: epoch_order(self.data, self.batch_size, self.seed, epoch)}
        return self._epochs[epoch]

    def __getitem__(self, step: int) -> Batch:
        per_epoch = len(self._order(0))
        indices = self._order(step // per_epoch)[step % per_epoch]
        rng = random.Random(self.seed * 1_000_003 + 7919 * step + 1)
        a = self.augment
        flips = [a.flip and rng.random() < 0.5 for _ in indices]
        captions = [vary_caption(self.data.examples[i].caption, rng, shuffle_tags=a.shuffle_tags,
                                 keep_tokens=a.keep_tokens, dropout=a.caption_dropout) for i in indices]
        examples = [self.data.examples[i] for i in indices]
        bucket = examples[0].placement.bucket
        return Batch(latents=torch.stack([self.cache.get(i, f) for i, f in zip(indices, flips)]),
                     captions=captions,
                     original_sizes=[(e.size[1], e.size[0]) for e in examples],
                     crops=[(e.placement.crop[1], e.placement.crop[0]) for e in examples],
                     target_size=(bucket[1], bucket[0]), indices=list(indices))


def encode_captions(pipe, captions: Sequence[str], *, clip_skip: int = 1, grad: bool = False,
                    embeddings=None) -> Conditioning:
    """Text context [B, 77·k, D] (and pooled [B, P] for SDXL) of training captions; ``grad``: keep the graph, for
    methods that train the text encoders or ``embeddings`` (an EmbeddingSet, found in captions by name)."""
    with contextlib.nullcontext() if grad else torch.no_grad(), pipe.using(*pipe.text_encoders):
        return encode_text_with_grad(list(captions), pipe.text_encoders, pipe.family, clip_skip=clip_skip,
                                     embeddings=embeddings, emphasis="None")


def adm_vector(pipe, pooled: torch.Tensor | None, original_sizes: Sequence[tuple[int, int]],
               crops: Sequence[tuple[int, int]], target_size: tuple[int, int],
               aesthetic_score: float = 6.0) -> torch.Tensor | None:
    """SDXL's ADM vector per image: pooled ⊕ emb(original h, w) ⊕ emb(crop top, left) ⊕ emb(target h, w) (the
    refiner: ⊕ emb(aesthetic score) instead of the target size); None for families without one."""
    if pooled is None or not pipe.family.startswith("sdxl"):
        return None
    rows = []
    for (oh, ow), (top, left) in zip(original_sizes, crops):
        tail = [target_size[0], target_size[1]] if pipe.family == "sdxl" else [aesthetic_score]
        rows.append(size_embedding([oh, ow, top, left, *tail], 1))
    return torch.cat([pooled, torch.cat(rows).to(pooled)], dim=1)
