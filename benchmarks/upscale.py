"""4x upscale time and peak memory: sdlite vs spandrel (the loader ComfyUI and chaiNNer use) on the same random
upscaler weights.

    python -m benchmarks.upscale                          # RealESRGAN_x4plus architecture, 512x512 → 2048x2048, CPU
    python -m benchmarks.upscale --arch srvgg --reps 3    # realesr-general-x4v3 (SRVGGNetCompact)

The weights (RRDBNet 23 blocks, 64 features, growth 32, as RealESRGAN_x4plus.pth, under ``params_ema``; or
SRVGGNetCompact 32 convs as realesr-general-x4v3.pth, under ``params``) are written once to a temporary .pth file;
each implementation then loads that file in a fresh process and upscales one random RGB image, so peak RSS
(``VmHWM``: weights, interpreter, input and output included) belongs to one implementation alone. Rows:

* spandrel: ``ModelLoader().load_from_file(path)``, the descriptor called on the whole image (spandrel does no
  tiling), the output clamped and converted to uint8;
* sdlite: ``sdlite.upscalers.load(path)`` and ``sdlite.upscalers.upscale(image, model)`` with A1111's tiling (192 px
  tiles, 8 px overlap: the 512x512 input runs as 3x3 tiles, 26% more pixels than the image) to a PIL image;
* sdlite untiled: the same with ``tile=0`` (the network on the whole image, the work spandrel does).

Besides wall time, each worker reports the CPU seconds (user + system over all its threads) its calls took: on a
machine shared with other work, or with ``--parallel`` (the implementations run at the same time, to finish
sooner), that is the fair comparison. Each result is also printed to stderr as soon as its worker ends.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

from benchmarks.measure import peak_rss, time_calls, write_json
from benchmarks.suite import machine_name

IMPLS = {"spandrel": "spandrel", "sdlite": "sdlite (tiles 192/8)", "sdlite-untiled": "sdlite (untiled)"}


def write_weights(path: str, arch: str) -> None:
    from sdlite.upscalers.archs import RRDBConfig, SRVGGConfig, SRVGGNetCompact, build

    torch.manual_seed(0)
    if arch == "rrdb":
        module, wrapper = build(RRDBConfig(layout="real-esrgan", blocks=23)), "params_ema"
    else:
        module, wrapper = SRVGGNetCompact(SRVGGConfig(convs=32)), "params"
    # small random weights keep the 23 residual blocks' activations in range
    state = {k: torch.randn(v.shape) * ((0.5 / v[0].numel()) ** 0.5 if v.ndim == 4 else 0.05)
             for k, v in module.state_dict().items()}
    torch.save({wrapper: state}, path)


def worker(impl: str, path: str, size: int, tile: int, warmup: int, reps: int) -> dict:
    torch.set_grad_enabled(False)
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    if impl == "spandrel":
        import spandrel

        model = spandrel.ModelLoader().load_from_file(path).eval()
        x = torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1)[None]

        def call():
            out = model(x)
            return torch.from_numpy((255 * out[0].clamp(0, 1).permute(1, 2, 0).numpy()).astype(np.uint8))
    else:
        from PIL import Image

        import sdlite.upscalers as up

        model = up.load(path)
        image = Image.fromarray(pixels)
        tiles = 0 if impl == "sdlite-untiled" else tile

        def call():
            return torch.from_numpy(np.array(up.upscale(image, model, tile=tiles, overlap=8)))

    before = os.times()
    result = time_calls(call, "cpu", warmup, reps)
    after = os.times()
    # CPU seconds (user + system, all threads) of the timed and warm-up calls: unlike wall time, unaffected by
    # other processes competing for the cores.
    result["cpu_s"] = (after.user + after.system - before.user - before.system) / (warmup + reps)
    result["peak_bytes"] = peak_rss()
    return {"impl": impl, **result}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["rrdb", "srvgg"], default="rrdb")
    parser.add_argument("--size", type=int, default=512, help="input side in pixels (output: 4x)")
    parser.add_argument("--tile", type=int, default=192, help="sdlite's tile size (A1111's ESRGAN_tile)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated: " + ", ".join(IMPLS))
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--parallel", action="store_true",
                        help="run the implementations at the same time (compare their CPU seconds, not wall time)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", choices=list(IMPLS), help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.weights, args.size, args.tile, args.warmup, args.reps)))
        return

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "RealESRGAN_x4plus.pth" if args.arch == "rrdb" else "realesr-general-x4v3.pth")
        write_weights(weights, args.arch)
        running = []
        for impl in args.impls.split(","):
            print(f"running {IMPLS[impl]} …", file=sys.stderr)
            cmd = [sys.executable, "-m", "benchmarks.upscale", "--worker", impl, "--weights", weights, "--size",
                   str(args.size), "--tile", str(args.tile), "--warmup", str(args.warmup), "--reps", str(args.reps)]
            running.append((impl, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)))
            if not args.parallel:
                _collect(*running.pop(), results)
        for impl, process in running:
            _collect(impl, process, results)
    name = "RRDBNet 23 blocks (RealESRGAN_x4plus)" if args.arch == "rrdb" else "SRVGGNetCompact (general-x4v3)"
    print(f"4x upscale, {name}, {args.size}x{args.size} → {4 * args.size}x{4 * args.size}, fp32, "
          f"{machine_name('cpu')}, {args.reps} timed run(s) after {args.warmup} warm-up")
    print("| implementation | wall median (min-max) | CPU seconds per call | peak RSS |")
    print("|---|---|---|---|")
    for impl, r in results.items():
        print(f"| {IMPLS[impl]} | {r['median_s']:.2f} s ({r['min_s']:.2f}-{r['max_s']:.2f}) | {r['cpu_s']:.1f} s | "
              f"{r['peak_bytes'] / 2**30:.2f} GiB |")
    if "spandrel" in results:
        ref = results["spandrel"]
        for impl in (i for i in results if i != "spandrel"):
            r = results[impl]
            print(f"{IMPLS[impl]} / spandrel: wall {r['median_s'] / ref['median_s']:.3f}x, CPU "
                  f"{r['cpu_s'] / ref['cpu_s']:.3f}x, peak RSS {r['peak_bytes'] / ref['peak_bytes']:.3f}x")
    if args.json:
        write_json(args.json, {"machine": machine_name("cpu"), "args": vars(args), "results": results})


def _collect(impl: str, process: subprocess.Popen, results: dict) -> None:
    out, _ = process.communicate()
    if process.returncode:
        raise RuntimeError(f"the {impl} worker failed (exit {process.returncode})")
    results[impl] = json.loads(out.strip().splitlines()[-1])
    print(f"{impl}: {json.dumps(results[impl])}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
