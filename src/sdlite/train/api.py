"""From a model, a data folder and keyword options to a ready :class:`~sdlite.train.loop.Run`: what every method's
public function (``sdlite.train.lora(...)``, …) and the ``sdlite train`` command share."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import torch

from .batches import Augment, Batches, LatentCache
from .data import ImageFolder
from .loop import Method, Run, TrainConfig

# Options of the data pipeline (the rest of the keywords are TrainConfig fields).
DATA_OPTIONS = {"prompt": None, "resolution": None, "buckets": True, "min_bucket": 256, "max_bucket": 1024,
                "random_crop": False, "caption_extension": ".txt", "cache_dir": None, "caption_dropout": 0.0,
                "shuffle_tags": False, "keep_tokens": 0, "flip": False}
TRAIN_OPTIONS = {f.name for f in dataclasses.fields(TrainConfig)}


def split_options(options: dict) -> tuple[dict, dict]:
    """(data options, TrainConfig options) of a method's keywords; an unknown name is an error before any work."""
    unknown = sorted(set(options) - set(DATA_OPTIONS) - TRAIN_OPTIONS)
    if unknown:
        raise TypeError(f"unknown training option(s) {', '.join(unknown)}; known: "
                        f"{', '.join(sorted(set(DATA_OPTIONS) | TRAIN_OPTIONS))}")
    data = {k: options.get(k, v) for k, v in DATA_OPTIONS.items()}
    return data, {k: v for k, v in options.items() if k in TRAIN_OPTIONS}


def load_model(model, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A pipeline: ``model`` itself when it is one, else ``sdlite.load(model)``."""
    if isinstance(model, (str, os.PathLike)):
        from ..pipeline import load

        return load(model, device=device, dtype=dtype)
    return model


def build_run(model, data: str | os.PathLike, method: Method, output: str | os.PathLike, *,
              device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              progress: Callable[[dict], None] | None = None, **options) -> Run:
    """Check the data, cache its latents with the frozen VAE, and set up the run (nothing trains yet)."""
    data_options, train_options = split_options(options)
    config = TrainConfig(**train_options)
    pipe = load_model(model, device, dtype)
    resolution = data_options["resolution"] or pipe.native_size
    folder = ImageFolder(data, resolution=resolution, prompt=data_options["prompt"],
                         caption_extension=data_options["caption_extension"], buckets=data_options["buckets"],
                         min_bucket=data_options["min_bucket"], max_bucket=data_options["max_bucket"],
                         random_crop=data_options["random_crop"], seed=config.seed)
    augment = Augment(caption_dropout=data_options["caption_dropout"], shuffle_tags=data_options["shuffle_tags"],
                      keep_tokens=data_options["keep_tokens"], flip=data_options["flip"])
    with pipe.using(pipe.vae):
        cache = LatentCache(folder, pipe.vae, flip=augment.flip, folder=data_options["cache_dir"],
                            model=f"{Path(pipe.path).resolve()}|{pipe.dtype}", seed=config.seed)
    batches = Batches(folder, cache, config.batch_size, config.seed, augment)
    return Run(pipe, method, batches, config, output, progress=progress, data_options=data_options)
