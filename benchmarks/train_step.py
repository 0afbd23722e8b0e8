"""One LoRA training step: sdlite vs diffusers + peft on the same random full-size SD1.5 UNet weights.

    python -m benchmarks.train_step                    # CPU, fp32, batch 1 at 512x512, rank 16
    python -m benchmarks.train_step --reps 5 --json train_step.json
    python -m benchmarks.train_step --checkpointing     # both sides with gradient checkpointing (less memory)
    python -m benchmarks.train_step --alternate --reps 6  # time only: both in one process, steps alternating
    python -m benchmarks.train_step --device cuda --dtype bf16 --profile prof/   # and a torch.profiler table each

A step is what LoRA training repeats: noise the latents to a timestep of the scaled-linear schedule, run the UNet
with a text context, take the MSE to the noise, backpropagate into the LoRA weights and make an AdamW step. Both
sides train rank-16 LoRAs (alpha 8) on the same layers, kohya's UNet targets: proj_in, proj_out and every
attention and feed-forward linear of the transformer blocks (sdlite: ``sdlite.train`` LoRA parametrizations;
diffusers: ``unet.add_adapter(peft.LoraConfig(...))``). The LoRA down matrices start from the same values on both
sides (seeded per layer name), the up matrices at zero, so both sides compute the same steps; text encoding is left
out (the context is given). Each implementation runs in a fresh process that loads the UNet from one .safetensors
file, so peak RSS belongs to one implementation alone; the first step is a warm-up, the median of the rest is
reported, and the ratio sdlite/diffusers last.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import time
import zlib

import torch

from benchmarks.loaders import load_diffusers, load_sdlite
from benchmarks.measure import peak_rss, sd15_unet_file, sd15_unet_in_fresh_processes, write_json
from benchmarks.models import DTYPES, MODELS, ModelSpec
from benchmarks.suite import machine_name

RANK, ALPHA = 16, 8.0
PEFT_TARGETS = ["proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def step_inputs(spec: ModelSpec, batch: int, device, dtype) -> dict:
    g = torch.Generator().manual_seed(1)
    side = spec.size // 8
    return dict(latents=torch.randn(batch, 4, side, side, generator=g).to(device, dtype),
                noise=torch.randn(batch, 4, side, side, generator=g).to(device, dtype),
                context=torch.randn(batch, 77, spec.unet["context_dim"], generator=g).to(device, dtype),
                t=torch.randint(0, 1000, (batch,), generator=g).to(device))


def initial_down(name: str, shape) -> torch.Tensor:
    """The starting down matrix of a layer, seeded by its kohya name (the same on both sides)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    fan_in = torch.Size(shape[1:]).numel()
    return (torch.rand(shape, generator=g) * 2 - 1) / fan_in**0.5


def sdlite_trainer(spec: ModelSpec, path: str, device, dtype, batch: int, checkpointing: bool = False):
    """sdlite's UNet with its training LoRA layers; returns (step function, LoRA layers by kohya name)."""
    from types import SimpleNamespace

    import sdlite.train
    from sdlite.train.lora_layers import attach
    from sdlite.train.optim import channels_last_kernels, checkpointed_blocks
    from sdlite.train.lora_targets import lora_targets

    unet = load_sdlite("unet", spec, path, device, dtype).requires_grad_(False)
    layers = {}
    with torch.no_grad():
        for t in lora_targets(SimpleNamespace(unet=unet, text_encoders=[], family=spec.family)):
            lora = attach(t.target, RANK, ALPHA)
            lora.down.copy_(initial_down(t.name, lora.down.shape))
            layers[t.name] = lora
    params = [p for lora in layers.values() for p in (lora.down, lora.up)]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    i = step_inputs(spec, batch, device, dtype)
    unet.train()
    # The kernels' memory order for the trainer's life, as sdlite.train's loop holds it for a run.
    layout = contextlib.ExitStack()
    layout.enter_context(channels_last_kernels(unet))

    def step() -> float:
        with checkpointed_blocks(unet) if checkpointing else contextlib.nullcontext():
            loss = sdlite.train.denoising_loss(unet, i["latents"], i["context"], i["noise"], i["t"]).mean()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step.layout = layout  # the context lives as long as the step function
    return step, layers


def diffusers_trainer(spec: ModelSpec, path: str, device, dtype, batch: int, checkpointing: bool = False):
    """diffusers' UNet with a PEFT LoRA adapter on the same layers; returns (step function, LoRA modules by name)."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    unet = load_diffusers("unet", spec, path, device, dtype)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PEFT_TARGETS, init_lora_weights=True))
    if checkpointing:
        unet.enable_gradient_checkpointing()
    layers = {}
    with torch.no_grad():
        for name, module in unet.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                kohya = "lora_unet_" + name.replace(".", "_")
                down = module.lora_A["default"].weight
                down.copy_(initial_down(kohya, down.shape))
                layers[kohya] = module
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    i = step_inputs(spec, batch, device, dtype)
    unet.train()

    def step() -> float:
        noisy = scheduler.add_noise(i["latents"], i["noise"], i["t"])
        pred = unet(noisy, i["t"], encoder_hidden_states=i["context"], return_dict=False)[0]
        loss = F.mse_loss(pred.float(), i["noise"].float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, layers


def worker(impl: str, spec: ModelSpec, path: str, device: str, dtype_name: str, batch: int, warmup: int,
           reps: int, checkpointing: bool = False, profile: str | None = None) -> dict:
    make = sdlite_trainer if impl == "sdlite" else diffusers_trainer
    step, layers = make(spec, path, device, DTYPES[dtype_name], batch, checkpointing)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times, losses = [], []
    for _ in range(warmup + reps):
        sync()
        start = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - start)
    timed = times[warmup:]
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_rss()
    if profile:
        write_profile(step, device, f"{profile}/{impl}.txt")
    return {"impl": impl, "median_s": statistics.median(timed), "min_s": min(timed), "max_s": max(timed),
            "reps": reps, "first_step_s": times[0], "peak_bytes": peak, "losses": losses, "lora_layers": len(layers)}


def write_profile(step, device: str, path: str, steps: int = 3) -> None:
    """``steps`` more steps under ``torch.profiler`` (CPU, and CUDA kernels on a GPU); the operators by their own
    time on the device (or the CPU), as a table in ``path``."""
    from torch.profiler import ProfilerActivity, profile

    from sdlite.checkpoint.write import atomic_path

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=40)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(f"{steps} steps\n{table}\n")


def alternating(spec: ModelSpec, path: str, device: str, dtype_name: str, batch: int, warmup: int, reps: int,
                checkpointing: bool = False) -> dict:
    """Both trainers in this process, their steps alternating (diffusers, sdlite, diffusers, …), so that both see
    the same machine state; the time ratio of each round, and their median. Peak memory is not separable here."""
    made = {impl: make(spec, path, device, DTYPES[dtype_name], batch, checkpointing)[0]
            for impl, make in (("diffusers", diffusers_trainer), ("sdlite", sdlite_trainer))}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {impl: [] for impl in made}
    for _ in range(warmup + reps):
        for impl, step in made.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[impl].append(time.perf_counter() - start)
    rounds = [s / d for s, d in zip(times["sdlite"][warmup:], times["diffusers"][warmup:])]
    return {"times": times, "round_ratios": rounds, "median_ratio": statistics.median(rounds)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent side = size/8)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing of the UNet blocks on both sides (less memory, more time)")
    parser.add_argument("--alternate", action="store_true",
                        help="time both in one process, steps alternating (time only; the default fresh processes "
                             "measure each one's peak memory)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--profile", metavar="DIR",
                        help="then profile 3 more steps of each and write DIR/sdlite.txt, DIR/diffusers.txt")
    parser.add_argument("--worker", choices=["sdlite", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    spec = dataclasses.replace(MODELS["sd15"], size=args.size)
    if args.worker:
        print(json.dumps(worker(args.worker, spec, args.weights, args.device, args.dtype, args.batch, args.warmup,
                                args.reps, args.checkpointing, args.profile)))
        return
    if args.alternate:
        with sd15_unet_file() as weights:
            r = alternating(spec, weights, args.device, args.dtype, args.batch, args.warmup, args.reps,
                            args.checkpointing)
        print(f"SD1.5 LoRA training step (rank {RANK}), batch {args.batch}, {args.size}x{args.size}, {args.dtype}, "
              f"one process, alternating, {machine_name(args.device)}")
        for impl, t in r["times"].items():
            print(f"  {impl:9s} " + ", ".join(f"{x:.2f}" for x in t[args.warmup:]) + " s")
        print("  sdlite/diffusers per round: " + ", ".join(f"{x:.3f}" for x in r["round_ratios"]) +
              f"; median {r['median_ratio']:.3f}x")
        if args.json:
            write_json(args.json, {"args": vars(args), **r})
        return
    flags = ["--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch), "--size", str(args.size),
             "--warmup", str(args.warmup), "--reps", str(args.reps)]
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        flags += ["--profile", os.path.abspath(args.profile)]
    results = sd15_unet_in_fresh_processes("benchmarks.train_step",
                                           flags + (["--checkpointing"] if args.checkpointing else []))
    machine = machine_name(args.device)
    print(f"SD1.5 LoRA training step (rank {RANK}), batch {args.batch}, {args.size}x{args.size}, {args.dtype}, "
          f"{'gradient checkpointing, ' if args.checkpointing else ''}{machine}")
    for impl, r in results.items():
        print(f"  {impl:9s} median {r['median_s']:8.2f} s  (min {r['min_s']:.2f}, max {r['max_s']:.2f}, "
              f"{r['reps']} steps after {args.warmup} warm-up)  peak {'GPU memory' if args.device != 'cpu' else 'RSS'}"
              f" {r['peak_bytes'] / 2**30:.2f} GiB  LoRA layers {r['lora_layers']}  losses "
              f"{', '.join(f'{x:.5f}' for x in r['losses'])}")
    ratio_t = results["sdlite"]["median_s"] / results["diffusers"]["median_s"]
    ratio_m = results["sdlite"]["peak_bytes"] / results["diffusers"]["peak_bytes"]
    print(f"  sdlite/diffusers: time {ratio_t:.3f}x, peak memory {ratio_m:.3f}x")
    if args.json:
        write_json(args.json, {"machine": machine, "args": vars(args), "results": results, "ratio_time": ratio_t,
                               "ratio_memory": ratio_m})


if __name__ == "__main__":
    main()
