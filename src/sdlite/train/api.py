"""The fronts of the training methods: keyword arguments to a ready :class:`~sdlite.train.loop.Run` (what every
method's public function, ``sdlite.train.lora(...)`` and the others, calls), and the ``sdlite train`` command.

``sdlite train METHOD MODEL DATA …``: the command-line front of the training methods.

    sdlite train lora model.safetensors data/ --rank 16 --alpha 8 --steps 500 --output style.safetensors

Every flag is a keyword of the method's Python function under the same name (``--batch-size`` → ``batch_size``);
``sdlite train lora --help`` lists them. A new method adds its own flags in a function like ``_lora_args`` and
one entry in ``METHODS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Callable

import torch

from .batches import Augment, Batches, LatentCache
from .data import ImageFolder
from .distributed import distribute, rank_and_world, setup, shutdown
from .loop import Method, Run, TrainConfig

# Options of the data pipeline (the rest of the keywords are TrainConfig fields).
DATA_OPTIONS = {"prompt": None, "resolution": None, "buckets": True, "min_bucket": 256, "max_bucket": 1024,
                "random_crop": False, "caption_extension": ".txt", "cache_dir": None, "caption_dropout": 0.0,
                "shuffle_tags": False, "keep_tokens": 0, "flip": False, "refine_latents": 0}
TRAIN_OPTIONS = {f.name for f in dataclasses.fields(TrainConfig)}


def split_options(options: dict) -> tuple[dict, dict]:
    """(data options, TrainConfig options) of a method's keywords; an unknown name is an error before any work."""
    unknown = sorted(set(options) - set(DATA_OPTIONS) - TRAIN_OPTIONS)
    if unknown:
        raise TypeError(f"unknown training option(s) {', '.join(unknown)}; known: "
                        f"{', '.join(sorted(set(DATA_OPTIONS) | TRAIN_OPTIONS))}")
    data = {k: options.get(k, v) for k, v in DATA_OPTIONS.items()}
    if data["refine_latents"] < 0:
        raise ValueError(f"refine_latents: a number of decoder-inversion steps, ≥ 0; got {data['refine_latents']}")
    return data, {k: v for k, v in options.items() if k in TRAIN_OPTIONS}


def load_model(model, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A pipeline: ``model`` itself when it is one, else ``sdlite.load(model)``."""
    if isinstance(model, (str, os.PathLike)):
        from ..pipeline import load

        return load(model, device=device, dtype=dtype)
    return model


def build_run(model, data: str | os.PathLike, method: Method, output: str | os.PathLike, *,
              device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              progress: Callable[[dict], None] | None = None, check: Callable[[ImageFolder], None] | None = None,
              **options) -> Run:
    """Check the data (and with ``check``, what the method needs of it), cache its latents with the frozen VAE, and
    set up the run (nothing trains yet)."""
    data_options, train_options = split_options(options)
    config = TrainConfig(**train_options)
    pipe = load_model(model, setup(device), dtype)
    batches = build_batches(pipe, data, data_options, config, check)
    return distribute(Run(pipe, method, batches, config, output, progress=progress, data_options=data_options))


def build_batches(pipe, data: str | os.PathLike, data_options: dict, config: TrainConfig,
                  check: Callable[[ImageFolder], None] | None = None) -> Batches:
    """The checked image folder ``data`` (``check`` sees it before any image is encoded), its latents cached by the
    frozen VAE, as the run's batches."""
    resolution = data_options["resolution"] or pipe.native_size
    folder = ImageFolder(data, resolution=resolution, prompt=data_options["prompt"],
                         caption_extension=data_options["caption_extension"], buckets=data_options["buckets"],
                         min_bucket=data_options["min_bucket"], max_bucket=data_options["max_bucket"],
                         random_crop=data_options["random_crop"], seed=config.seed)
    if check is not None:
        check(folder)
    augment = Augment(caption_dropout=data_options["caption_dropout"], shuffle_tags=data_options["shuffle_tags"],
                      keep_tokens=data_options["keep_tokens"], flip=data_options["flip"])
    with pipe.using(pipe.vae):
        cache = LatentCache(folder, pipe.vae, flip=augment.flip, folder=data_options["cache_dir"],
                            model=f"{Path(pipe.path).resolve()}|{pipe.dtype}", seed=config.seed,
                            refine=data_options["refine_latents"])
    return Batches(folder, cache, config.batch_size, config.seed, augment)


# --- the command line -----------------------------------------------------------------------------------------------

def _flag(p: argparse.ArgumentParser, name: str, kind=None, help: str | None = None, **kw) -> None:
    if kind is bool:
        p.add_argument(f"--{name}", action="store_true", default=None, help=help)
    else:
        p.add_argument(f"--{name}", type=kind, default=None, help=help, **kw)


def common_args(p: argparse.ArgumentParser) -> None:
    """The flags every method takes: model, data, output, and the TrainConfig and data settings."""
    p.add_argument("model", help="checkpoint to train on (.safetensors or .ckpt)")
    p.add_argument("data", help="folder of images with .txt captions, or of N_name subfolders (N repeats)")
    p.add_argument("-o", "--output", required=True, help="the file to write")
    defaults = TrainConfig()
    for name, kind, text in (
            ("steps", int, f"optimiser steps (default {defaults.steps})"),
            ("lr", float, f"learning rate (default {defaults.lr})"),
            ("batch-size", int, "images per micro-batch (default 1)"),
            ("grad-accum", int, "micro-batches per optimiser step (default 1)"),
            ("resolution", int, "training side in pixels (default: the model's native size)"),
            ("seed", int, "seed of noise, timesteps, shuffling and samples (default 0)"),
            ("lr-schedule", str, "constant, linear or cosine (default constant)"),
            ("warmup-steps", int, "linear warm-up steps (default 0)"),
            ("max-grad-norm", float, "gradient clipping norm (default 1.0; 0 = off)"),
            ("weight-decay", float, "AdamW weight decay (default 0.01)"),
            ("mixed-precision", str, "no, fp16 or bf16 autocast (default no)"),
            ("ema-decay", float, "keep an EMA of the trained weights and save it (e.g. 0.999)"),
            ("min-snr-gamma", float, "min-SNR-γ loss weighting (5 is usual)"),
            ("noise-offset", float, "noise offset (e.g. 0.05)"),
            ("clip-skip", int, "text encoder layer counted from the end (SD 1.x; default 1)"),
            ("sample-every", int, "write sample images every N steps"),
            ("sample-steps", int, "sampling steps of the sample images (default 20)"),
            ("save-state-every", int, "save the resumable state every N steps (with --state-dir)"),
            ("state-dir", str, "folder for the resumable training state"),
            ("resume", str, "resume from this state folder"),
            ("prompt", str, "caption for every image that has no .txt"),
            ("caption-dropout", float, "probability of training an image with an empty caption"),
            ("keep-tokens", int, "tags kept in front when shuffling"),
            ("cache-dir", str, "keep the VAE latents in this folder and reuse them in later runs"),
            ("refine-latents", int, "refine each cached latent by N steps of decoder inversion, for details the "
                                    "VAE encoder loses (default 0: off)"),
            ("device", str, "cpu, cuda, … (default cpu)")):
        _flag(p, name, kind, text)
    _flag(p, "gradient-checkpointing", bool, "recompute UNet block activations in the backward pass")
    _flag(p, "zero-terminal-snr", bool, "rescale the schedule to zero terminal SNR (Lin et al. 2023)")
    _flag(p, "shuffle-tags", bool, "shuffle the comma-separated tags of each caption")
    _flag(p, "flip", bool, "random horizontal flips")
    p.add_argument("--sample-prompt", action="append", dest="sample_prompts", default=None,
                   help="a prompt for the sample images (repeatable)")


def _lora_args(p: argparse.ArgumentParser) -> None:
    _flag(p, "rank", int, "LoRA rank of linear/1x1 layers (default 16)")
    _flag(p, "alpha", float, "LoRA alpha (default 8); the scale is alpha/rank")
    _flag(p, "conv-rank", int, "also train 3x3 convolutions (LoCon) at this rank")
    _flag(p, "conv-alpha", float, "alpha of the 3x3 convolutions (default: conv rank)")
    _flag(p, "text-encoder", bool, "train the text encoder(s) too")
    _flag(p, "unet-lr", float, "learning rate of the UNet layers (default --lr)")
    _flag(p, "text-encoder-lr", float, "learning rate of the text encoder layers (default --lr)")
    p.add_argument("--save-precision", choices=["fp32", "fp16", "bf16"], default=None, help="default fp16")


def _lora(**kwargs):
    from .lora import lora

    return lora(**kwargs)


def _ti_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", required=True, help="the new word, e.g. \"<sks>\" (name the output file after it)")
    _flag(p, "init-word", str, "word whose token rows start the vectors (default *)")
    _flag(p, "vectors", int, "vectors per token (default 1)")
    _flag(p, "template", str, "caption pattern: {} = the token, [filewords] = the image's caption")


def _ti(**kwargs):
    from .textual_inversion import textual_inversion

    return textual_inversion(**kwargs)


def _dreambooth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instance-prompt", required=True,
                   help="caption of the instance images, e.g. \"a photo of sks dog\"")
    _flag(p, "class-prompt", str, "prompt of the class images (enables prior preservation)")
    _flag(p, "class-dir", str, "folder of class images, kept and reused (default: <output>-class next to the output)")
    _flag(p, "num-class-images", int, "class images to have (default 100; only the missing are generated)")
    _flag(p, "class-steps", int, "sampling steps per generated class image (default 20)")
    _flag(p, "prior-loss-weight", float, "λ of loss = instance + λ·prior (default 1.0)")
    _flag(p, "train-text-encoder", bool, "train the text encoder(s) too")
    _flag(p, "text-encoder-lr", float, "learning rate of the text encoder(s) (default --lr)")
    p.add_argument("--save-dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default fp32")
    _flag(p, "lora", bool, "train a kohya LoRA with the DreamBooth loss instead of the whole UNet")
    _flag(p, "rank", int, "LoRA rank with --lora (default 16)")
    _flag(p, "alpha", float, "LoRA alpha with --lora (default 8)")


def _dreambooth(data, **kwargs):
    from .dreambooth import dreambooth

    return dreambooth(instance_dir=data, **kwargs)


def _controlnet_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hint-dir", required=True, help="folder of hint images named as the training images")
    p.add_argument("--save-dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default fp32")


def _controlnet(**kwargs):
    from .controlnet_train import controlnet

    return controlnet(**kwargs)


METHODS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {
    "lora": ("a kohya-format LoRA (A1111, ComfyUI, diffusers, sdlite)", _lora_args, _lora),
    "dreambooth": ("a DreamBooth checkpoint in the original single-file layout (or a LoRA with --lora)",
                   _dreambooth_args, _dreambooth),
    "controlnet": ("a ControlNet in the original control_model. layout (A1111's extension, ComfyUI, sdlite)",
                   _controlnet_args, _controlnet),
    "textual-inversion": ("a textual-inversion embedding (.safetensors: kohya/A1111/diffusers; .pt: A1111)",
                          _ti_args, _ti),
}


def add_train_parser(sub) -> None:
    """Add ``train`` with one sub-command per method to the ``sdlite`` parser's sub-commands."""
    train = sub.add_parser("train", help="train a LoRA, DreamBooth checkpoint, embedding or ControlNet on a checkpoint")
    methods = train.add_subparsers(dest="method", required=True)
    for name, (text, extra, _) in METHODS.items():
        p = methods.add_parser(name, help=text, description=f"Train {text}.")
        common_args(p)
        extra(p)


def run_train(args: argparse.Namespace) -> int:
    from .report import TrainProgress

    options = {k: v for k, v in vars(args).items() if v is not None and k not in ("command", "method")}
    if options.get("max_grad_norm") == 0:
        options["max_grad_norm"] = None
    model, data = options.pop("model"), options.pop("data")
    try:
        result = METHODS[args.method][2](model=model, data=data, progress=TrainProgress(), **options)
        rank = rank_and_world()[0]
    finally:
        shutdown()
    if rank == 0:
        print(f"{result.output}  ({result.steps} steps, final loss {result.losses[-1]:.4f}; "
              f"log {result.log_csv.name}, curve {result.loss_png.name})")
    return 0
