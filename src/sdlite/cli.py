"""The ``sdlite`` command: txt2img, img2img, inpaint, and ``info`` on any file.

    sdlite txt2img "a red circle on a blue background" -o circle.png       # the built-in model "shapes"
    sdlite txt2img model.safetensors "a cat drinking a pint of beer" --steps 20 --seed 1 -o cat.png
    sdlite txt2img model.safetensors --from-png cat.png -o again.png      # the settings stored in a PNG
    sdlite info model.safetensors                                          # what a checkpoint/LoRA/embedding/PNG is
    sdlite train lora model.safetensors data/ --rank 16 --alpha 8 --output style.safetensors   # see sdlite.train
    sdlite merge a.safetensors b.safetensors -m 0.3 -o ab.safetensors      # and convert, extract-lora, … (tools)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from PIL import Image

from .checkpoint.write import check_output
from .composition.record import options_from_infotext as composition_options, parse_region, parse_tile
from .images import write_png
from .progress import ProgressLine
from .tools import commands as tools


class ProgressBar(ProgressLine):
    """The sampler callback's line: step, it/s and ETA, redrawn at each sampler step (and the tools' progress)."""

    def __call__(self, info: dict) -> None:
        self.draw(info["i"] + 1, info["total"], info["elapsed"])


# Infotext keys → Job options, for --from-png.
_FROM_INFOTEXT = {"Steps": ("steps", int), "Sampler": ("sampler", str), "Schedule type": ("scheduler", str),
                  "CFG scale": ("cfg_scale", float), "Seed": ("seed", int), "Size-1": ("width", int),
                  "Size-2": ("height", int), "Clip skip": ("clip_skip", int), "ENSD": ("eta_noise_seed_delta", int),
                  "RNG": ("rng", str), "Variation seed": ("subseed", int),
                  "Variation seed strength": ("subseed_strength", float), "Denoising strength": ("strength", float),
                  "Mask blur": ("mask_blur", int), "Emphasis": ("emphasis", str),
                  "Old prompt editing timelines": ("use_old_scheduling", lambda v: v == "True")}


def _a1111_version(text: str) -> tuple[int, int, int] | None:
    found = re.match(r"v(\d+)\.(\d+)\.(\d+)", text or "")
    return tuple(map(int, found.groups())) if found else None


def options_from_png(path: str) -> tuple[str, dict]:
    """Prompt and options found in a PNG's A1111 infotext."""
    from .infotext import read_infotext

    params = read_infotext(path)
    options = {"negative_prompt": params.get("Negative prompt", "")}
    for key, (name, cast) in _FROM_INFOTEXT.items():
        if key in params:
            options[name] = cast(params[key])
    if "Seed resize from-1" in params:
        options["seed_resize_from"] = (int(params["Seed resize from-1"]), int(params["Seed resize from-2"]))
    if "Hires upscaler" in params:
        hires = {"upscaler": params["Hires upscaler"], "denoising_strength": options.pop("strength", 0.7)}
        if "Hires upscale" in params:
            hires["scale"] = float(params["Hires upscale"])
        if params.get("Hires resize-1"):
            hires["width"], hires["height"] = int(params["Hires resize-1"]), int(params["Hires resize-2"])
        if "Hires steps" in params:
            hires["steps"] = int(params["Hires steps"])
        options["hires"] = hires
    version = _a1111_version(params.get("Version", ""))
    if version is not None and version < (1, 6, 0) and "[" in params.get("Prompt", ""):
        options["use_old_scheduling"] = True  # A1111 changed prompt-editing timelines in 1.6.0 (its backcompat rule)
    if options.get("rng") not in (None, "CPU", "GPU", "NV"):
        del options["rng"]
    options.update(composition_options(params))  # Tile size/stride/weights, Regions, Region bootstrap
    return params.get("Prompt", ""), options


CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _generation_args(p: argparse.ArgumentParser, image: bool, mask: bool) -> None:
    inputs = " IMAGE" * image + " MASK" * mask
    count = ("a single argument is", "two arguments are", "three arguments are")[image + mask]
    p.add_argument("words", nargs="*", metavar=f"[MODEL]{inputs} PROMPT",
                   help="MODEL: a checkpoint file or \"shapes\", the built-in model (the default when MODEL is left "
                        f"out). With --from-png the PROMPT may be left out, so there {count} MODEL{inputs} (use "
                        "--model shapes to give the built-in model a new prompt)")
    p.add_argument("--model", default=None, help="the checkpoint, instead of the first positional argument")
    p.add_argument("-n", "--negative-prompt", default=None)
    p.add_argument("--from-png", help="take prompt and settings from this PNG's infotext (explicit flags win)")
    p.add_argument("-o", "--output", default="out.png", help="output PNG; a batch gets -1, -2 … suffixes")
    for name, kind in (("width", int), ("height", int), ("steps", int), ("cfg-scale", float), ("seed", int),
                       ("batch-size", int), ("clip-skip", int), ("subseed", int), ("subseed-strength", float),
                       ("eta-noise-seed-delta", int)):
        p.add_argument(f"--{name}", type=kind, default=None)
    p.add_argument("--sampler", default=None, help='A1111 name, e.g. "Euler a", "DPM++ 2M Karras"')
    p.add_argument("--scheduler", default=None, help='"Automatic", "Karras", "Exponential", …')
    p.add_argument("--rng", choices=["CPU", "GPU", "NV"], default=None)
    p.add_argument("--emphasis", choices=["Original", "No norm", "Ignore", "None"], default=None)
    p.add_argument("--use-old-scheduling", action="store_true", help="A1111's old prompt-editing timelines")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--prediction", choices=["eps", "v"], default=None)
    p.add_argument("--hires-scale", type=float, default=None, help="enable hires fix with this upscale factor")
    p.add_argument("--hires-steps", type=int, default=None)
    p.add_argument("--hires-upscaler", default=None,
                   help='a latent mode, "Lanczos", or an upscaler file ("R-ESRGAN 4x+", "4x-UltraSharp")')
    p.add_argument("--upscaler-dir", action="append", default=[], help="where upscaler files are looked up")
    p.add_argument("--lora-dir", action="append", default=[],
                   help="where <lora:name:weight> prompt tags (and regions' LoRAs) are looked up; repeat")
    p.add_argument("--embeddings", action="append", default=[],
                   help="textual-inversion embedding files or folders, used in prompts by file name; repeat")
    p.add_argument("--hires-strength", type=float, default=None)
    p.add_argument("--tile", default=None, help="MultiDiffusion windows SIZE:STRIDE in latents, e.g. 64:48 "
                   "(add :gaussian for Mixture of Diffusers weights, :circular for a 360° panorama)")
    p.add_argument("--region", action="append", default=[], help='"x,y,w,h:prompt" (pixels or fractions); repeat')
    p.add_argument("--region-bootstrap", type=float, default=None, help="share of steps with bootstrapping")
    if image:
        p.add_argument("--strength", type=float, default=None, help="denoising strength")
    if mask:
        p.add_argument("--mask-blur", type=int, default=None)
        p.add_argument("--invert-mask", action="store_true")
        p.add_argument("--inpaint-fill", choices=["original", "fill", "latent noise", "latent nothing"], default=None)
        p.add_argument("--only-masked", action="store_true")


def assign_positionals(args: argparse.Namespace, inputs: tuple[str, ...]) -> None:
    """Set ``args.model``, the ``inputs`` (image, mask) and ``args.prompt`` from the positional words.

    The words are ``[MODEL] INPUTS... [PROMPT]``: with n inputs, n + 2 words are model, inputs, prompt; n + 1 words
    are inputs and prompt on the built-in model, except with ``--from-png`` (whose infotext gives the prompt), where
    they are model and inputs; n words are the inputs alone. ``--model`` names the model and leaves the words to the
    inputs and prompt. A lone word that is a checkpoint file is refused as a prompt (it was meant as the model)."""
    words, n = list(args.words), len(inputs)
    model_first = args.model is None and (len(words) == n + 2 or (len(words) == n + 1 and args.from_png))
    if len(words) not in (n, n + 1, n + 2) or (args.model is not None and len(words) == n + 2):
        shape = " ".join(["[MODEL]" if args.model is None else "", *(i.upper() for i in inputs), "PROMPT"]).strip()
        raise ValueError(f"{args.command} takes {shape}; got {len(words)} argument(s): {words}")
    args.model = words.pop(0) if model_first else (args.model or "shapes")
    for name in inputs:
        setattr(args, name, words.pop(0))
    args.prompt = words.pop(0) if words else None
    first = args.prompt if not inputs else getattr(args, inputs[0])
    if not model_first and args.model == "shapes" and first and first.lower().endswith(CHECKPOINT_SUFFIXES) \
            and os.path.isfile(first):
        raise ValueError(f"{first!r} is a checkpoint file, not {'a prompt' if not inputs else 'an image'}: give "
                         f"the prompt after it ({args.command} MODEL{' IMAGE' * bool(inputs)} PROMPT) or --model")
    if args.prompt is None and not args.from_png:
        raise ValueError(f"{args.command} needs a PROMPT (or --from-png)")


def _options(args: argparse.Namespace) -> tuple[str, dict]:
    prompt, options = options_from_png(args.from_png) if args.from_png else ("", {})
    if args.prompt is not None:
        prompt = args.prompt
    if args.negative_prompt is not None:
        options["negative_prompt"] = args.negative_prompt
    for name in ("width", "height", "steps", "cfg_scale", "seed", "batch_size", "clip_skip", "subseed",
                 "subseed_strength", "eta_noise_seed_delta", "sampler", "scheduler", "rng", "strength", "mask_blur",
                 "inpaint_fill", "emphasis"):
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    for flag in ("invert_mask", "only_masked", "use_old_scheduling"):
        if getattr(args, flag, False):
            options[flag] = True
    if args.tile is not None:
        options["tiling"] = parse_tile(args.tile)
    if args.region:
        options["regions"] = [parse_region(text) for text in args.region]
    if args.region_bootstrap is not None:
        options["region_bootstrap"] = args.region_bootstrap
    if args.hires_scale is not None or "hires" in options:
        hires = dict(options.get("hires", {}))
        for key, value in (("scale", args.hires_scale), ("steps", args.hires_steps),
                           ("upscaler", args.hires_upscaler), ("denoising_strength", args.hires_strength)):
            if value is not None:
                hires[key] = value
        options["hires"] = hires
    return prompt, options


def run_generation(args: argparse.Namespace) -> int:
    import torch

    import sdlite

    assign_positionals(args, {"txt2img": (), "img2img": ("image",), "inpaint": ("image", "mask")}[args.command])
    prompt, options = _options(args)
    # The output is checked before any work: its folder exists and it is none of the inputs.
    inputs = [p for p in (getattr(args, "image", None), getattr(args, "mask", None), args.from_png) if p]
    check_output(args.output, inputs)
    missing = [p for p in (*args.lora_dir, *args.embeddings) if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"--lora-dir/--embeddings: {', '.join(map(str, missing))} not found")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe = sdlite.load(args.model, device=args.device, dtype=dtype, prediction=args.prediction)
    pipe.upscaler_dirs = list(args.upscaler_dir)
    pipe.lora_dirs = list(args.lora_dir)
    if args.embeddings:
        pipe.load_embeddings(*args.embeddings)
    options["callback"] = ProgressBar()
    negative = options.pop("negative_prompt", "")
    start = time.perf_counter()
    if args.command == "txt2img":
        options.pop("strength", None)
        result = pipe.txt2img(prompt, negative, **options)
    elif args.command == "img2img":
        result = pipe.img2img(Image.open(args.image), prompt, negative, **options)
    else:
        result = pipe.inpaint(Image.open(args.image), Image.open(args.mask), prompt, negative, **options)
    for i, (image, info) in enumerate(zip(result.images, result.infotexts)):
        path = args.output if len(result.images) == 1 else args.output.replace(".png", f"-{i + 1}.png")
        write_png(path, image, info, inputs)
        print(f"{path}  seed {result.seeds[i]}")
    print(f"done in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


def run_info(args: argparse.Namespace) -> int:
    from .info import describe_file

    print(describe_file(args.file))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdlite", description="Stable Diffusion from original checkpoint files")
    sub = parser.add_subparsers(dest="command", required=True)
    _generation_args(sub.add_parser("txt2img", help="text to image"), image=False, mask=False)
    _generation_args(sub.add_parser("img2img", help="image to image"), image=True, mask=False)
    _generation_args(sub.add_parser("inpaint", help="regenerate the masked part of an image"), image=True, mask=True)
    info = sub.add_parser("info", help="what a checkpoint, LoRA, embedding or PNG is")
    info.add_argument("file")
    from .train.api import add_train_parser, run_train

    add_train_parser(sub)
    tools.add_parsers(sub)
    args = parser.parse_args(argv)
    from .errors import SdliteError

    try:
        if args.command == "train":
            return run_train(args)
        if args.command in tools.COMMANDS:
            print(tools.run(args, ProgressBar()))
            return 0
        return run_info(args) if args.command == "info" else run_generation(args)
    except (SdliteError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"sdlite: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
