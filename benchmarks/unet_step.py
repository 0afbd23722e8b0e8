"""UNet step time and peak memory: sdlite vs diffusers on the same random full-size SD1.5 UNet weights.

    python -m benchmarks.unet_step                      # CPU, fp32, batch 2 (one CFG step) at 512x512
    python -m benchmarks.unet_step --device cuda --dtype fp16 --reps 50

The weights are written once to a temporary .safetensors file in the original layout (model.diffusion_model.*);
each implementation then runs in a fresh process that loads that file (diffusers through its own ldm converter),
so peak RSS on CPU belongs to one implementation alone. Warm-up runs are excluded; the median and the spread of
the timed runs are printed, and the ratio sdlite/diffusers last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SD15 = dict(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=(2, 2, 2, 2),
            transformer_depth=(1, 1, 1, 1, 1, 1, 0, 0), transformer_depth_output=(0, 0, 0) + (1,) * 9,
            transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False, num_heads=8)
DIFFUSERS_SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=768, attention_head_dim=8,
)


def write_weights(path: str, seed: int = 0) -> None:
    """Random SD1.5 UNet weights in the original layout (N(0, 1/fan_in), so activations stay in range)."""
    from safetensors.torch import save_file

    from sdlite.unet import UNetConfig, UNetModel

    with torch.device("meta"):
        shapes = UNetModel(UNetConfig(**SD15)).state_dict()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, p in shapes.items():
        fan_in = p[0].numel() if p.ndim > 1 else 1
        scale = fan_in ** -0.5 if p.ndim > 1 else 0.1
        base = 1.0 if key.endswith("weight") and p.ndim == 1 else 0.0
        state[f"model.diffusion_model.{key}"] = base + scale * torch.randn(p.shape, generator=g)
    save_file(state, path)


def load_sdlite(path: str, device: str, dtype: torch.dtype):
    from sdlite.checkpoint import open_tensor_file
    from sdlite.checkpoint.materialize import materialize, plan
    from sdlite.unet import UNetModel, infer_unet_config

    with open_tensor_file(path) as tf:
        config = infer_unet_config(tf.meta("model.diffusion_model."))
        return materialize(tf, plan(tf, lambda: UNetModel(config), "model.diffusion_model."), dtype, device)


def load_diffusers(path: str, device: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from safetensors.torch import load_file

    state = convert_ldm_unet_checkpoint(load_file(path), DIFFUSERS_SD15)
    with torch.device("meta"):
        model = UNet2DConditionModel(**DIFFUSERS_SD15)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def worker(impl: str, path: str, device: str, dtype_name: str, batch: int, size: int, warmup: int, reps: int) -> dict:
    dtype = DTYPES[dtype_name]
    model = (load_sdlite if impl == "sdlite" else load_diffusers)(path, device, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, size // 8, size // 8, generator=g).to(device, dtype)
    t = torch.full((batch,), 500.0, device=device)
    context = torch.randn(batch, 77, 768, generator=g).to(device, dtype)
    if impl == "sdlite":
        step = lambda: model(x, t, context)  # noqa: E731
    else:
        step = lambda: model(x, t, encoder_hidden_states=context, return_dict=False)[0]  # noqa: E731
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + reps):
            if i == warmup and device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            sync()
            start = time.perf_counter()
            out = step()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    result = {"impl": impl, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
              "reps": reps, "checksum": float(out.float().abs().mean())}
    if device.startswith("cuda"):
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        result["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


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

    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "sd15_unet.safetensors")
        write_weights(weights)
        results = {}
        for impl in ("diffusers", "sdlite"):
            cmd = [sys.executable, "-m", "benchmarks.unet_step", "--worker", impl, "--weights", weights,
                   "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch), "--size",
                   str(args.size), "--warmup", str(args.warmup), "--reps", str(args.reps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[impl] = json.loads(out.strip().splitlines()[-1])
    machine = torch.cuda.get_device_name() if cuda else f"CPU, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"SD1.5 UNet step, batch {args.batch}, {args.size}x{args.size}, {args.dtype}, {machine}")
    for impl, r in results.items():
        print(f"  {impl:9s} median {r['median_s'] * 1000:9.1f} ms  (min {r['min_s'] * 1000:.1f}, max "
              f"{r['max_s'] * 1000:.1f}, {r['reps']} runs)  peak {'GPU memory' if cuda else 'RSS'} "
              f"{r['peak_bytes'] / 2**30:.2f} GiB")
    ratio_t = results["sdlite"]["median_s"] / results["diffusers"]["median_s"]
    ratio_m = results["sdlite"]["peak_bytes"] / results["diffusers"]["peak_bytes"]
    print(f"  sdlite/diffusers: time {ratio_t:.3f}x, peak memory {ratio_m:.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "results": results,
                       "ratio_time": ratio_t, "ratio_memory": ratio_m}, f, indent=2)


if __name__ == "__main__":
    main()
