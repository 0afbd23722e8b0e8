"""What an IP-Adapter unit costs per UNet step: sdlite and diffusers, each with and without the adapter, on the same
random SD1.5 UNet weights, in one process, the four calls alternating round by round.

    python -m benchmarks.ip_adapter_step                         # SD1.5 UNet, batch 2 (one CFG step), 256x256, CPU
    python -m benchmarks.ip_adapter_step --variant plus --size 512 --rounds 5

One random SD1.5 UNet is built in memory; diffusers' UNet2DConditionModel gets the same tensors through diffusers'
ldm converter (shared, not copied). The adapter is an ip-adapter_sd15 file's shapes (``base``: ViT-H's 1024-d image
embedding to 4 tokens) or ip-adapter-plus_sd15's (``plus``: a 16-query resampler over ViT-H's 257 x 1280 penultimate
states), random, loaded into diffusers through its IP-Adapter loader and into sdlite by ``ip_adapter.load``. The
calls are what a sampling step does in each library: sdlite's image tokens are made once per generation, so the
step gets an ``IPAdapterPatch`` over precomputed tokens (cond row: the image's, uncond row: the zero embedding's);
diffusers' pipelines pass ``image_embeds`` to every UNet call, which projects them again inside the step. diffusers
runs without the adapter with its default attention processors and no image projection, as before loading.

Timings in one process, alternating (sdlite plain, sdlite + adapter, diffusers plain, diffusers + adapter, then
again), so that every configuration sees the same machine state; medians over the rounds after the warm-up rounds,
of wall time and of this process's CPU time (on a core shared with other work, the CPU seconds are what compares).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from benchmarks.models import MODELS, ModelSpec
from benchmarks.suite import machine_name

CONFIGS = ("sdlite", "sdlite + IP-Adapter", "diffusers", "diffusers + IP-Adapter")
VIT_H = dict(embeds=1024, width=1280, tokens=257)  # the ViT-H/14 image encoder the SD1.5 adapters read


def _adapter_file(unet, variant: str, folder: str, generator: torch.Generator) -> tuple[str, dict]:
    """A random adapter of ``variant`` for ``unet`` (sdlite's), as a file and as the nested dict diffusers loads."""
    from sdlite.adapters import image_proj, ip_adapter
    from sdlite.checkpoint.write import save_safetensors

    context = unet.config.context_dim
    if variant == "base":
        proj = image_proj.LinearProjection(VIT_H["embeds"], context, 4)
    else:
        proj = image_proj.Resampler(VIT_H["width"], context, context, 16, 4, 4 * context, context)
    for p in proj.parameters():
        p.data = torch.randn(p.shape, generator=generator) * (p.shape[-1] ** -0.5 if p.ndim > 1 else 0.02)
    nested = {"image_proj": dict(proj.state_dict()), "ip_adapter": {}}
    for n, key in enumerate(ip_adapter.processor_order(unet)):
        if key.endswith("attn2"):
            hidden = unet.get_submodule(key).to_k.out_features
            for name in ("to_k_ip", "to_v_ip"):
                nested["ip_adapter"][f"{n}.{name}.weight"] = torch.randn(hidden, context, generator=generator) * 0.05
    path = os.path.join(folder, f"ip-adapter-{variant}.safetensors")
    save_safetensors(path, {f"{part}.{k}": v for part, d in nested.items() for k, v in d.items()})
    return path, nested


def build_calls(spec: ModelSpec, size: int, variant: str, weight: float = 0.8, batch: int = 2) -> dict:
    """The four configurations of ``CONFIGS`` on shared random weights: (prepare, call) each, ``prepare`` (None or
    diffusers' switch of attention processors, untimed) before ``call`` (the timed UNet step)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from diffusers.models.attention_processor import AttnProcessor2_0

    from sdlite.adapters import ip_adapter
    from sdlite.unet import UNetConfig, UNetModel

    g = torch.Generator().manual_seed(0)
    unet = UNetModel(UNetConfig(**spec.unet)).eval().requires_grad_(False)
    for p in unet.parameters():  # N(0, 1/fan_in) everywhere, zero-initialised outputs included
        p.data = torch.randn(p.shape, generator=g) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.02)
    original = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    with torch.device("meta"):
        ref = UNet2DConditionModel(**spec.diffusers_unet)
    ref.load_state_dict(convert_ldm_unet_checkpoint(original, spec.diffusers_unet), strict=True, assign=True)
    ref.eval().requires_grad_(False)

    with tempfile.TemporaryDirectory() as folder:
        path, nested = _adapter_file(unet, variant, folder, g)
        adapter = ip_adapter.load(path)
    plain_processors = {name: AttnProcessor2_0() for name in ref.attn_processors}
    ref._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)
    ip_processors, projection = dict(ref.attn_processors), ref.encoder_hid_proj
    for proc in ip_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [weight]

    side = size // 8
    x = torch.randn(batch, 4, side, side, generator=g)
    t = torch.full((batch,), 500.0)
    context = torch.randn(batch, 77, spec.unet["context_dim"], generator=g)
    shape = (1, VIT_H["embeds"]) if variant == "base" else (1, VIT_H["tokens"], VIT_H["width"])
    image = torch.randn(shape, generator=g)
    # The first half of the batch carries the image, the second the uncond embedding (zeros), as a CFG step does.
    features = torch.cat([image.expand(batch // 2, *shape[1:]), torch.zeros(batch - batch // 2, *shape[1:])])
    tokens = adapter.image_tokens(features)
    patch = ip_adapter.IPAdapterPatch(adapter.layer_projections(ip_adapter.processor_order(unet)), tokens, weight)

    def switch(with_adapter: bool):
        # The projection first: a resampler's own attention layers count among the processors diffusers sets.
        ref.encoder_hid_proj = projection if with_adapter else None
        ref.config.encoder_hid_dim_type = "ip_image_proj" if with_adapter else None
        ref.set_attn_processor(dict(ip_processors if with_adapter else plain_processors))

    extra = {"image_embeds": [features[:, None]]}

    def diffusers_step(with_adapter: bool):
        kwargs = {"added_cond_kwargs": extra} if with_adapter else {}
        return lambda: switch(with_adapter), lambda: ref(x, t, encoder_hidden_states=context, **kwargs).sample

    return {"sdlite": (None, lambda: unet(x, t, context)),
            "sdlite + IP-Adapter": (None, lambda: unet(x, t, context, patches=[patch])),
            "diffusers": diffusers_step(False), "diffusers + IP-Adapter": diffusers_step(True)}


def run(calls: dict, rounds: int, warmup: int) -> tuple[dict[str, dict[str, list[float]]], dict[str, torch.Tensor]]:
    """Every call once per round, in ``CONFIGS`` order; per configuration the wall and CPU seconds (this process,
    all its threads) of the rounds after ``warmup``, and each configuration's last output."""
    times = {name: {"wall": [], "cpu": []} for name in CONFIGS}
    outputs = {}
    with torch.inference_mode():
        for r in range(warmup + rounds):
            for name in CONFIGS:
                prepare, call = calls[name]
                if prepare is not None:
                    prepare()
                wall, cpu = time.perf_counter(), time.process_time()
                outputs[name] = call()
                if r >= warmup:
                    times[name]["wall"].append(time.perf_counter() - wall)
                    times[name]["cpu"].append(time.process_time() - cpu)
    return times, outputs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["base", "plus"], default="base")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent side = size/8)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    calls = build_calls(MODELS["sd15"], args.size, args.variant)
    times, outputs = run(calls, args.rounds, args.warmup)

    def rel(a, b):
        return float((outputs[a] - outputs[b]).norm() / outputs[b].norm())

    print(f"SD1.5 UNet step, batch 2, {args.size}x{args.size}, fp32, IP-Adapter {args.variant}, "
          f"{torch.get_num_threads()} thread(s), {machine_name('cpu')}; {args.rounds} rounds after {args.warmup}")
    print("| configuration | wall median s (min-max) | CPU median s (min-max) |\n|---|---|---|")
    median = {}
    for name in CONFIGS:
        wall, cpu = times[name]["wall"], times[name]["cpu"]
        median[name] = {"wall": statistics.median(wall), "cpu": statistics.median(cpu)}
        print(f"| {name} | {median[name]['wall']:.3f} ({min(wall):.3f}-{max(wall):.3f}) | "
              f"{median[name]['cpu']:.3f} ({min(cpu):.3f}-{max(cpu):.3f}) |")
    for clock in ("cpu", "wall"):
        m = {name: median[name][clock] for name in CONFIGS}
        print(f"{clock}: IP-Adapter cost per step: sdlite {m['sdlite + IP-Adapter'] / m['sdlite'] - 1:+.1%}, "
              f"diffusers {m['diffusers + IP-Adapter'] / m['diffusers'] - 1:+.1%}; with the adapter "
              f"sdlite/diffusers {m['sdlite + IP-Adapter'] / m['diffusers + IP-Adapter']:.3f}x")
    print(f"outputs sdlite vs diffusers, rel. L2: plain {rel('sdlite', 'diffusers'):.1e}, with the adapter "
          f"{rel('sdlite + IP-Adapter', 'diffusers + IP-Adapter'):.1e}")


if __name__ == "__main__":
    main()
