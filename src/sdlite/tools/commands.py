"""The ``sdlite`` subcommands of the checkpoint tools: merge, convert, bake-vae, extract-lora, resize-lora,
merge-lora. ``cli.py`` adds these parsers and runs the chosen one with its progress bar.

    sdlite merge a.safetensors b.safetensors --multiplier 0.3 -o ab.safetensors
    sdlite merge a.safetensors b.safetensors c.safetensors --mode add-difference --multiplier 1 -o abc.safetensors
    sdlite merge model.safetensors --lora style.safetensors:0.8 -o baked.safetensors
    sdlite convert model.ckpt --dtype fp16 --prune-ema -o model.safetensors
    sdlite extract-lora tuned.safetensors base.safetensors --rank 32 --conv-rank 16 -o diff.safetensors
"""

from __future__ import annotations

import argparse

COMMANDS = ("merge", "convert", "bake-vae", "extract-lora", "resize-lora", "merge-lora")


def lora_spec(text: str) -> tuple:
    """``PATH[:WEIGHT[:TE_WEIGHT]]`` → (path, weight, te_weight); the weights are the trailing numbers."""
    parts, numbers = text, []
    while len(numbers) < 2 and ":" in parts:
        head, _, tail = parts.rpartition(":")
        try:
            numbers.insert(0, float(tail))
        except ValueError:
            break
        parts = head
    weight = numbers[0] if numbers else 1.0
    return parts, weight, numbers[1] if len(numbers) > 1 else None


def _output(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="the .safetensors file to write (never an input)")


def add_parsers(sub) -> None:
    """Add the tools' subcommands to the ``sdlite`` argument parser's subparsers."""
    p = sub.add_parser("merge", help="merge checkpoints as A1111's Checkpoint Merger (and bake LoRAs in)")
    p.add_argument("models", nargs="+", metavar="MODEL", help="A [B [C]]")
    p.add_argument("--mode", choices=["weighted-sum", "add-difference", "no-interpolation"], default=None,
                   help="default: by the number of models (1: no-interpolation, 2: weighted-sum, 3: add-difference)")
    p.add_argument("--multiplier", "-m", type=float, default=0.5, help="M: A·(1−M)+B·M or A+(B−C)·M")
    p.add_argument("--blocks", default=None, help="per-block weights IN00,…,M00,…,OUT..: 25 for SD1/2, 19 for SDXL "
                                                  "(one more with BASE first)")
    p.add_argument("--te-multiplier", type=float, default=None, help="M for keys outside the UNet (BASE)")
    p.add_argument("--lora", action="append", type=lora_spec, default=[], metavar="PATH:W[:TE]",
                   help="merge a LoRA into the result at weight W (repeatable)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    p.add_argument("--no-metadata", action="store_true", help="leave out sd_merge_recipe / sd_merge_models")
    _output(p)
    p = sub.add_parser("convert", help="convert / prune a checkpoint to .safetensors")
    p.add_argument("model")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--prune-ema", action="store_true", help="drop the EMA weights (model_ema.*)")
    ema.add_argument("--ema-only", action="store_true", help="keep only the EMA weights, as the UNet")
    p.add_argument("--no-vae", action="store_true")
    p.add_argument("--no-text-encoder", action="store_true")
    p.add_argument("--bake-vae", default=None, metavar="VAE", help="replace the VAE by this standalone VAE file")
    p.add_argument("--extract", choices=["vae", "unet"], default=None, help="write only this component")
    _output(p)
    p = sub.add_parser("bake-vae", help="replace a checkpoint's VAE by a standalone VAE file")
    p.add_argument("model")
    p.add_argument("vae")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    _output(p)
    p = sub.add_parser("extract-lora", help="a kohya LoRA holding TUNED − ORIGINAL, by SVD")
    p.add_argument("tuned")
    p.add_argument("original")
    p.add_argument("--rank", type=int, default=32, help="rank of Linear / 1x1 layers")
    p.add_argument("--conv-rank", type=int, default=None, help="also 3x3 convolutions (LoCon), at this rank")
    p.add_argument("--clamp-quantile", type=float, default=None, help="kohya's outlier clamp, e.g. 0.99 (off)")
    p.add_argument("--dynamic", default=None, metavar="METHOD:V", help="sv_ratio:V, sv_cumulative:V or sv_fro:V")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    _output(p)
    p = sub.add_parser("resize-lora", help="lower a LoRA's rank by SVD")
    p.add_argument("lora")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--dynamic", default=None, metavar="METHOD:V", help="sv_ratio:V, sv_cumulative:V or sv_fro:V")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    _output(p)
    p = sub.add_parser("merge-lora", help="merge several LoRAs into one (ranks concatenated, or SVD with --rank)")
    p.add_argument("loras", nargs="+", type=lora_spec, metavar="PATH:W")
    p.add_argument("--rank", type=int, default=None, help="factor the sum again at this rank (default: concatenate)")
    p.add_argument("--dynamic", default=None, metavar="METHOD:V")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    _output(p)


def run(args: argparse.Namespace, progress) -> object:
    """Run the tool ``args.command`` names; returns what it wrote (printable)."""
    from . import bake_vae, convert_checkpoint, extract_lora, merge_checkpoints, merge_loras, resize_lora

    if args.command == "merge":
        if len(args.models) > 3:
            raise ValueError(f"merge takes at most 3 models (A B C), got {len(args.models)}")
        mode = args.mode or ("no-interpolation", "weighted-sum", "add-difference")[len(args.models) - 1]
        return merge_checkpoints(*args.models, output=args.output, mode=mode, multiplier=args.multiplier,
                                 blocks=args.blocks, base_multiplier=args.te_multiplier, loras=args.lora,
                                 dtype=args.dtype, metadata=not args.no_metadata, progress=progress)
    if args.command == "convert":
        ema = "drop" if args.prune_ema else "only" if args.ema_only else None
        return convert_checkpoint(args.model, output=args.output, dtype=args.dtype, ema=ema, vae=not args.no_vae,
                                  text_encoder=not args.no_text_encoder, bake_vae=args.bake_vae, extract=args.extract,
                                  progress=progress)
    if args.command == "bake-vae":
        return bake_vae(args.model, args.vae, output=args.output, dtype=args.dtype, progress=progress)
    if args.command == "extract-lora":
        return extract_lora(args.tuned, args.original, output=args.output, rank=args.rank, conv_rank=args.conv_rank,
                            clamp_quantile=args.clamp_quantile, dynamic=args.dynamic, dtype=args.dtype,
                            progress=progress)
    if args.command == "resize-lora":
        return resize_lora(args.lora, output=args.output, rank=args.rank, dynamic=args.dynamic, dtype=args.dtype,
                           progress=progress)
    return merge_loras([(p, w) for p, w, _ in args.loras], output=args.output, rank=args.rank, dynamic=args.dynamic,
                       dtype=args.dtype, progress=progress)
