"""UNet step time and peak memory: sdlite vs diffusers on the same random full-size SD1.5 UNet weights.

    python -m benchmarks.unet_step                      # CPU, fp32, batch 2 (one CFG step) at 512x512
    python -m benchmarks.unet_step --device cuda --dtype fp16 --reps 50

The weights are written once to a temporary .safetensors file in the original layout (model.diffusion_model.*);
each implementation then runs in a fresh process that loads that file (diffusers through its own ldm converter),
so peak RSS on CPU belongs to one implementation alone. Warm-up runs are excluded; the median and the spread of
the timed runs are printed, and the ratio sdlite/diffusers last.

The building blocks (weights, loaders, the timed call, the timing loop) are those of the full suite
(``python -m benchmarks run``: benchmarks/models.py, loaders.py, measure.py); this script is its SD1.5 UNet step
with a free batch and size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from benchmarks.loaders import load_diffusers, load_sdlite
from benchmarks.measure import make_call, sd15_unet_in_fresh_processes, time_calls, write_json
from benchmarks.models import DTYPES, MODELS
from benchmarks.suite import machine_name


def worker(impl: str, path: str, device: str, dtype_name: str, batch: int, size: int, warmup: int, reps: int) -> dict:
    spec = dataclasses.replace(MODELS["sd15"], size=size)
    dtype = DTYPES[dtype_name]
    model = (load_sdlite if impl == "sdlite" else load_diffusers)("unet", spec, path, device, dtype)
    call = make_call(impl, "unet", spec, model, device, dtype, batch=batch)
    return {"impl": impl, **time_calls(call, device, warmup, reps)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: fp32 on CPU, fp16 on CUDA")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent side = size/8)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", choices=["sdlite", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("fp16" if cuda else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.reps = args.reps if args.reps is not None else (30 if cuda else 3)

    if args.worker:
        print(json.dumps(worker(args.worker, args.weights, args.device, args.dtype, args.batch, args.size,
                                args.warmup, args.reps)))
        return

    results = sd15_unet_in_fresh_processes("benchmarks.unet_step", [
        "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch), "--size", str(args.size),
        "--warmup", str(args.warmup), "--reps", str(args.reps)])
    machine = machine_name(args.device)
    print(f"SD1.5 UNet step, batch {args.batch}, {args.size}x{args.size}, {args.dtype}, {machine}")
    for impl, r in results.items():
        print(f"  {impl:9s} median {r['median_s'] * 1000:9.1f} ms  (min {r['min_s'] * 1000:.1f}, max "
              f"{r['max_s'] * 1000:.1f}, {r['reps']} runs)  peak {'GPU memory' if cuda else 'RSS'} "
              f"{r['peak_bytes'] / 2**30:.2f} GiB")
    ratio_t = results["sdlite"]["median_s"] / results["diffusers"]["median_s"]
    ratio_m = results["sdlite"]["peak_bytes"] / results["diffusers"]["peak_bytes"]
    print(f"  sdlite/diffusers: time {ratio_t:.3f}x, peak memory {ratio_m:.3f}x")
    if args.json:
        write_json(args.json, {"machine": machine, "args": vars(args), "results": results,
                               "ratio_time": ratio_t, "ratio_memory": ratio_m})


if __name__ == "__main__":
    main()
