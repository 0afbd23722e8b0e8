"""A 2048x512 MultiDiffusion panorama: sdlite (``tiling=sdlite.Tiles``) vs diffusers' StableDiffusionPanoramaPipeline
on the same checkpoint file, and against one 512x512 image per window.

    python -m benchmarks.panorama                       # a small SD1-layout model (minutes on one CPU core)
    python -m benchmarks.panorama --model sd15 --steps 20 --device cuda --dtype fp16   # the released SD1.5 layout

Both pipelines place 64-latent windows 8 apart (diffusers' fixed placement; sdlite ``Tiles(64, 8, batch)``, which
for a 2048-wide image gives the same 25 windows), run DDIM with CFG (each window batch one UNet call with cond and
uncond rows) with as many UNet calls (diffusers' ``--steps`` DDIM steps; sdlite, A1111's DDIM, one step more, which
is as many model calls), and decode with the VAE. Timing: the two implementations alternate in one process,
``--reps`` rounds after a one-step warm-up of each, median seconds per image. "one window" is sdlite's plain 512x512
txt2img with the same settings, and the row "panorama / (windows x one window)" says what the fusion costs beyond
running the windows. Peak memory: each case once more in a fresh process, its peak RSS (VmHWM) above the RSS after
loading (CPU), or ``torch.cuda.max_memory_allocated`` (CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.measure import peak_rss
from benchmarks.models import DTYPES, MODELS, ModelSpec, write_checkpoint
from benchmarks.suite import machine_name
from benchmarks.txt2img import CFG_SCALE, NEGATIVE, PROMPT, SEED, load_pipeline, tokenizer_dir, write_tokenizer

WIDTH, HEIGHT, WINDOW, STRIDE = 2048, 512, 64, 8
_TINY_VAE = dict(vae=dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
                 diffusers_vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                                    block_out_channels=[32, 32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 4,
                                    up_block_types=["UpDecoderBlock2D"] * 4, force_upcast=False))
# A small SD1 layout (64 channels, two levels, attention at the second, a 2-layer 64-wide CLIP) for a CPU run.
SMALL = ModelSpec("small-sd1", "sd1", 512,
                  dict(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2), num_res_blocks=(1, 1),
                       transformer_depth_middle=1, transformer_depth=(0, 1), transformer_depth_output=(1, 1, 0, 0),
                       context_dim=64, use_linear_in_transformer=False, head_dim=64),
                  dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[64, 128],
                       down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                       up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=64,
                       attention_head_dim=[1, 2]),
                  (("cond_stage_model.transformer.", "clip", 64, 2, "quick_gelu", None),), **_TINY_VAE)
SPECS = {"small": SMALL, **MODELS}
CASES = ("sdlite panorama", "diffusers panorama", "sdlite one window")


def load(case: str, spec: ModelSpec, path: str, device: str, dtype: torch.dtype):
    if case.startswith("diffusers"):
        import diffusers

        base = load_pipeline("diffusers", spec, path, device, dtype)
        scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1, set_alpha_to_one=False, clip_sample=False)
        components = {k: v for k, v in base.components.items() if k != "image_encoder"}
        pipe = diffusers.StableDiffusionPanoramaPipeline(**dict(components, scheduler=scheduler),
                                                         requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return load_pipeline("sdlite", spec, path, device, dtype)


def call(case: str, pipe, steps: int, batch: int, width: int = WIDTH, height: int = HEIGHT):
    if case == "diffusers panorama":
        return lambda: pipe(PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_inference_steps=steps,
                            guidance_scale=CFG_SCALE, view_batch_size=batch,
                            generator=torch.Generator().manual_seed(SEED)).images[0]
    import sdlite

    size = dict(width=width, height=height, tiling=sdlite.Tiles(WINDOW, STRIDE, batch=batch)) \
        if case == "sdlite panorama" else dict(width=WINDOW * 8, height=WINDOW * 8)
    # A1111's DDIM (sdlite's) makes one model call fewer than its step count: steps + 1 makes as many as diffusers.
    return lambda: pipe.txt2img(PROMPT, NEGATIVE, steps=steps + 1, sampler="DDIM", cfg_scale=CFG_SCALE, seed=SEED,
                                **size).images[0]


def timed(fn, device: str) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    sync()
    return time.perf_counter() - start


def memory_worker(case: str, spec_name: str, path: str, device: str, dtype: str, steps: int, batch: int,
                  width: int, height: int) -> None:
    """One case in this fresh process: its peak memory above the loaded pipeline, printed as JSON."""
    pipe = load(case, SPECS[spec_name], path, device, DTYPES[dtype])
    loaded = torch.cuda.memory_allocated() if device.startswith("cuda") else peak_rss()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    timed(call(case, pipe, steps, batch, width, height), device)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_rss()
    print(json.dumps({"case": case, "peak_above_loaded_bytes": peak - loaded}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=list(SPECS), default="small")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="windows per UNet call (view_batch_size)")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--width", type=int, default=WIDTH)
    p.add_argument("--height", type=int, default=HEIGHT)
    p.add_argument("--tmpdir", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return memory_worker(args.worker, args.model, args.path, args.device, args.dtype, args.steps, args.batch,
                             args.width, args.height)
    spec = SPECS[args.model]
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as folder:
        path = os.path.join(folder, f"{spec.name}.safetensors")
        write_checkpoint(path, spec, dtype=torch.float32 if args.model == "small" else torch.float16)
        write_tokenizer(tokenizer_dir(path))
        pipes = {case: load(case, spec, path, args.device, DTYPES[args.dtype]) for case in CASES}
        for case in CASES:  # warm-up: one step at the timed shapes
            timed(call(case, pipes[case], 1, args.batch, args.width, args.height), args.device)
        calls = {case: call(case, pipes[case], args.steps, args.batch, args.width, args.height) for case in CASES}
        times: dict[str, list[float]] = {case: [] for case in CASES}
        for _ in range(args.reps):  # alternating, so that both see the same machine state
            for case in CASES:
                times[case].append(timed(calls[case], args.device))
                print(f"{case}: {times[case][-1]:.2f} s", file=sys.stderr)
        memory = {}
        for case in CASES:
            out = subprocess.run([sys.executable, "-m", "benchmarks.panorama", "--worker", case, "--path", path,
                                  "--model", args.model, "--device", args.device, "--dtype", args.dtype,
                                  "--steps", "1", "--batch", str(args.batch), "--width", str(args.width),
                                  "--height", str(args.height)],
                                 capture_output=True, text=True, check=True)
            memory[case] = json.loads(out.stdout.strip().splitlines()[-1])["peak_above_loaded_bytes"]
    windows = len(__import__("sdlite").Tiles(WINDOW, STRIDE).windows(args.height // 8, args.width // 8))
    median = {case: statistics.median(t) for case, t in times.items()}
    print(f"{machine_name(args.device)}; model {spec.name}, {args.dtype}, DDIM {args.steps} steps, CFG, "
          f"{args.width}x{args.height}, windows {WINDOW}/{STRIDE} latents ({windows}), {args.batch} per UNet call\n")
    print("| case | s per image (median of %d) | peak memory above the loaded model |" % args.reps)
    print("|---|---|---|")
    for case in CASES:
        print(f"| {case} | {median[case]:.2f} | {memory[case] / 2**20:.0f} MiB |")
    print(f"| sdlite / diffusers (panorama) | {median['sdlite panorama'] / median['diffusers panorama']:.3f}x | |")
    print(f"| sdlite panorama / ({windows} x one window) | "
          f"{median['sdlite panorama'] / (windows * median['sdlite one window']):.3f}x | |")


if __name__ == "__main__":
    main()
