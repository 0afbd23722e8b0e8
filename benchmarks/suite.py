"""Benchmark suite: sdlite vs diffusers on the same random full-size checkpoints (SD1.5, SD2.1, SDXL).

    python -m benchmarks run --suite cpu                      # SD1.5, fp32, on the CPU
    python -m benchmarks run --suite gpu --out results.json   # SD1.5, SD2.1, SDXL, fp16, on CUDA

For each model one random checkpoint is written in the original single-file layout (UNet under
``model.diffusion_model.``, VAE under ``first_stage_model.``, the text encoders under their SD1/SD2/SDXL prefixes);
every measurement then runs in a fresh subprocess that loads only the component it measures from that file, sdlite
through ``sdlite.checkpoint`` (plan + materialize), diffusers through its own ldm converters. So peak memory (CPU:
the process' peak RSS; CUDA: ``torch.cuda.max_memory_allocated``) belongs to one implementation and one component.

Measured, warm-up excluded, median / min / max of the timed runs:

* ``unet``: one UNet step, batch 2 (one CFG step), 512x512 (SD1.5/SD2.1) or 1024x1024 (SDXL, with the ADM vector);
  its FLOPs are counted once with ``torch.utils.flop_counter.FlopCounterMode`` on sdlite's module (on the meta
  device, no weights needed), and both implementations' achieved GFLOP/s are reported;
* ``vae``: decoding one latent to a full-size image;
* ``text``: encoding one prompt (with one emphasis group). sdlite: ``sdlite.conditioning.encode_text`` on the
  file's text encoders, the same call ``StableDiffusion.encode_prompt`` makes (tokenizing, emphasis, the family's
  layer rule). diffusers: transformers' CLIP text models as diffusers' pipelines hold them, loaded via
  ``convert_ldm_clip_checkpoint`` / ``convert_open_clip_checkpoint``; sdlite's tokenizer plus the forward passes
  the pipelines make (no prompt weighting, which diffusers lacks).
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
from collections.abc import Callable
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMPLS = ("diffusers", "sdlite")
COMPONENTS = ("unet", "vae", "text")
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed, (sharp focus:1.2)"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# --- the models: sdlite's original-layout configs and the matching diffusers configs --------------------------------

_SD15_UNET = dict(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4),
                  num_res_blocks=(2, 2, 2, 2), transformer_depth=(1, 1, 1, 1, 1, 1, 0, 0),
                  transformer_depth_output=(0, 0, 0) + (1,) * 9, transformer_depth_middle=1, context_dim=768,
                  use_linear_in_transformer=False, num_heads=8)
_SD_DIFFUSERS_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
# Text towers: (file prefix, layout, width, layers, activation, projection_dim); heads = width / 64 as released.
_CLIP_L = ("clip", 768, 12, "quick_gelu", None)
_OPENCLIP_H = ("openclip", 1024, 24, "gelu", 1024)
_OPENCLIP_BIGG = ("openclip", 1280, 32, "gelu", 1280)


@dataclass(frozen=True)
class ModelSpec:
    """One released architecture: how to write it and how each implementation builds it."""

    name: str
    family: str  # sdlite family name (SCALE_FACTORS key)
    size: int  # image side in pixels for the UNet step and the VAE decode
    unet: dict  # sdlite UNetConfig fields
    diffusers_unet: dict  # diffusers UNet2DConditionModel config
    text: tuple[tuple, ...]  # (file prefix, *tower) per text encoder, in file order
    scale_factor: float = 0.18215
    adm: int | None = None  # SDXL's vector conditioning width (y / added_cond_kwargs)


MODELS = {
    "sd15": ModelSpec(
        "sd15", "sd1", 512, _SD15_UNET,
        dict(_SD_DIFFUSERS_UNET, sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        (("cond_stage_model.transformer.", *_CLIP_L),)),
    "sd21": ModelSpec(
        "sd21", "sd2", 512,
        dict(_SD15_UNET, context_dim=1024, use_linear_in_transformer=True, num_heads=None, head_dim=64),
        dict(_SD_DIFFUSERS_UNET, sample_size=64, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
             use_linear_projection=True),
        (("cond_stage_model.model.", *_OPENCLIP_H),)),
    "sdxl": ModelSpec(
        "sdxl", "sdxl", 1024,
        dict(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2),
             transformer_depth=(0, 0, 2, 2, 10, 10), transformer_depth_output=(10, 10, 10, 2, 2, 2, 0, 0, 0),
             transformer_depth_middle=10, context_dim=2048, use_linear_in_transformer=True, head_dim=64,
             adm_in_channels=2816),
        dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
             down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
             use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
             projection_class_embeddings_input_dim=2816),
        (("conditioner.embedders.0.transformer.", *_CLIP_L), ("conditioner.embedders.1.model.", *_OPENCLIP_BIGG)),
        scale_factor=0.13025, adm=2816),
}
DIFFUSERS_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                     block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                     up_block_types=["UpDecoderBlock2D"] * 4)


# --- random checkpoints ----------------------------------------------------------------------------------------------


def _text_module(layout: str, width: int, layers: int, activation: str, projection_dim: int | None):
    from sdlite.clip import CLIPTextModel, OpenCLIPTextModel, TextEncoderConfig

    config = TextEncoderConfig(layout=layout, width=width, layers=layers, heads=width // 64, mlp_width=4 * width,
                               activation=activation, projection_dim=projection_dim)
    return (CLIPTextModel if layout == "clip" else OpenCLIPTextModel)(config)


def checkpoint_shapes(spec: ModelSpec, components: tuple[str, ...] = COMPONENTS) -> dict[str, torch.Size]:
    """File key -> shape of the full checkpoint in the original layout, from sdlite's modules built on meta."""
    from sdlite.unet import UNetConfig, UNetModel
    from sdlite.vae import AutoencoderKL, VAEConfig

    modules: list[tuple[str, torch.nn.Module]] = []
    with torch.device("meta"):
        if "unet" in components:
            modules.append((UNET_PREFIX, UNetModel(UNetConfig(**spec.unet))))
        if "vae" in components:
            modules.append((VAE_PREFIX, AutoencoderKL(VAEConfig(scale_factor=spec.scale_factor))))
        if "text" in components:
            modules += [(prefix, _text_module(*tower)) for prefix, *tower in spec.text]
    return {prefix + k: v.shape for prefix, m in modules for k, v in m.state_dict().items()}


def write_checkpoint(path: str, spec: ModelSpec, components: tuple[str, ...] = COMPONENTS,
                     dtype: torch.dtype = torch.float16, seed: int = 0) -> None:
    """Random weights for ``components`` of ``spec``, saved as one .safetensors in the original layout.

    Matrices and kernels are N(0, 1/fan_in) so activations stay in range through the deep stacks; norm weights are
    1 + small noise, biases and other vectors small noise. Each tensor is drawn in fp32 and stored as ``dtype``.
    """
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in checkpoint_shapes(spec, components).items():
        ndim = len(shape)
        scale = (torch.Size(shape[1:]).numel() ** -0.5) if ndim > 1 else 0.1
        base = 1.0 if key.endswith("weight") and ndim == 1 else 0.0
        if key.endswith("logit_scale"):
            base, scale = 4.6, 0.0
        state[key] = (base + scale * torch.randn(shape, generator=g)).to(dtype)
    save_file(state, path)


# --- loading one component ---------------------------------------------------------------------------------------


def _diffusers_state(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def _assign(model: torch.nn.Module, state: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_sdlite(component: str, spec: ModelSpec, path: str, device: str, dtype: torch.dtype):
    """sdlite's component(s), read from ``path`` by sdlite's own loader straight into ``dtype`` on ``device``."""
    from sdlite.checkpoint import open_tensor_file, plan_components
    from sdlite.checkpoint.materialize import materialize, plan
    from sdlite.unet import UNetModel, infer_unet_config
    from sdlite.vae import AutoencoderKL, infer_vae_config

    with open_tensor_file(path) as tf:
        if component == "unet":
            config = infer_unet_config(tf.meta(UNET_PREFIX))
            return materialize(tf, plan(tf, lambda: UNetModel(config), UNET_PREFIX), dtype, device)
        if component == "vae":
            config = infer_vae_config(tf.meta(VAE_PREFIX), scale_factor=spec.scale_factor)
            return materialize(tf, plan(tf, lambda: AutoencoderKL(config), VAE_PREFIX), dtype, device)
        # The pipeline's own plan of the whole file; only the text encoders are read.
        return [materialize(tf, p, dtype, device) for p in plan_components(tf).plans[2:]]


def load_diffusers(component: str, spec: ModelSpec, path: str, device: str, dtype: torch.dtype):
    """The diffusers / transformers model for the component, loaded through diffusers' ldm converters."""
    from diffusers.loaders import single_file_utils as sfu

    if component == "unet":
        from diffusers import UNet2DConditionModel

        state = sfu.convert_ldm_unet_checkpoint(_diffusers_state(path), spec.diffusers_unet)
        with torch.device("meta"):
            model = UNet2DConditionModel(**spec.diffusers_unet)
        return _assign(model, state, device, dtype)
    if component == "vae":
        from diffusers import AutoencoderKL

        config = dict(DIFFUSERS_VAE, sample_size=spec.size, scaling_factor=spec.scale_factor)
        state = sfu.convert_ldm_vae_checkpoint(_diffusers_state(path), config)
        with torch.device("meta"):
            model = AutoencoderKL(**config)
        return _assign(model, state, device, dtype)
    return _diffusers_text_encoders(spec, path, device, dtype)


def _diffusers_text_encoders(spec: ModelSpec, path: str, device: str, dtype: torch.dtype) -> list:
    """transformers' text models as diffusers' pipelines hold them, converted by diffusers' ldm converters.

    SD1.5: CLIPTextModel (ViT-L). SD2.1: CLIPTextModel with 23 of ViT-H's 24 layers (diffusers' pipelines take the
    last hidden state, the file's penultimate layer). SDXL: CLIPTextModel (ViT-L) and CLIPTextModelWithProjection
    (bigG), both read at hidden_states[-2].
    """
    import transformers
    from diffusers.loaders import single_file_utils as sfu

    checkpoint = _diffusers_state(path)
    models = []
    for prefix, layout, width, layers, activation, projection_dim in spec.text:
        if spec.name == "sd21":
            layers -= 1
        config = transformers.CLIPTextConfig(
            hidden_size=width, intermediate_size=4 * width, num_attention_heads=width // 64, num_hidden_layers=layers,
            max_position_embeddings=77, hidden_act=activation, projection_dim=projection_dim or 768)
        with_projection = spec.adm is not None and layout == "openclip"  # SDXL's bigG
        cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
        with torch.device("meta"):
            model = cls(config)
        if layout == "clip":
            state = sfu.convert_ldm_clip_checkpoint(checkpoint, remove_prefix=prefix)
        else:
            state = sfu.convert_open_clip_checkpoint(model, checkpoint, prefix=prefix)
        expected = model.state_dict().keys()
        if not any(k.startswith("text_model.") for k in expected):  # transformers 5 drops the nesting in state_dict
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        # Drop what the model does not hold: position_ids (a non-persistent buffer now), SD2.1's last layer.
        model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True, assign=True)
        for module in model.modules():  # non-persistent buffers built on meta get real values here
            if isinstance(getattr(module, "position_ids", None), torch.Tensor):
                module.register_buffer("position_ids", torch.arange(77).unsqueeze(0), persistent=False)
        models.append(model.to(device=device, dtype=dtype).eval().requires_grad_(False))
    return models


# --- the call that is timed ------------------------------------------------------------------------------------


def unet_inputs(spec: ModelSpec, device: str | torch.device, dtype: torch.dtype, batch: int = 2) -> dict:
    """Latents, timesteps, text context and (SDXL) ADM vector for one step, seeded."""
    g = torch.Generator().manual_seed(1)
    side = spec.size // 8
    inputs = dict(x=torch.randn(batch, 4, side, side, generator=g).to(device, dtype),
                  t=torch.full((batch,), 500.0, device=device),
                  context=torch.randn(batch, 77, spec.unet["context_dim"], generator=g).to(device, dtype))
    if spec.adm:
        pooled = torch.randn(batch, 1280, generator=g)
        time_ids = torch.tensor([spec.size, spec.size, 0, 0, spec.size, spec.size], dtype=torch.float32)
        inputs.update(pooled=pooled.to(device, dtype), time_ids=time_ids.expand(batch, 6).to(device, dtype))
    return inputs


def _sdlite_adm(pooled: torch.Tensor, size: int) -> torch.Tensor:
    """SDXL's y as sdlite's generation builds it: the pooled bigG vector, then the size/crop numbers embedded."""
    from sdlite.generate import size_embedding

    extra = [size, size, 0, 0, size, size]
    return torch.cat([pooled, size_embedding(extra, pooled.shape[0]).to(pooled)], dim=1)


def make_call(impl: str, component: str, spec: ModelSpec, model, device: str, dtype: torch.dtype,
              batch: int = 2) -> Callable:
    """A no-argument function doing one measured operation; inputs are prepared here, outside the timing.
    ``batch`` is the UNet step's batch (2: one CFG step)."""
    if component == "unet":
        i = unet_inputs(spec, device, dtype, batch)
        if impl == "sdlite":
            y = _sdlite_adm(i["pooled"], spec.size) if spec.adm else None
            return lambda: model(i["x"], i["t"], i["context"], y=y)
        added = dict(text_embeds=i["pooled"], time_ids=i["time_ids"]) if spec.adm else None
        return lambda: model(i["x"], i["t"], encoder_hidden_states=i["context"], added_cond_kwargs=added,
                             return_dict=False)[0]
    if component == "vae":
        g = torch.Generator().manual_seed(2)
        z = torch.randn(1, 4, spec.size // 8, spec.size // 8, generator=g).to(device, dtype)
        if impl == "sdlite":
            return lambda: model.decode(z)
        return lambda: model.decode(z, return_dict=False)[0]
    if impl == "sdlite":
        from sdlite.conditioning import encode_text

        return lambda: encode_text([PROMPT], model, spec.family).context
    from sdlite.clip import EOS, get_tokenizer

    tokenizer = get_tokenizer()
    if not spec.adm:  # SD1.5 / SD2.1: one model's last hidden state
        pad = EOS if spec.name == "sd15" else 0
        return lambda: model[0](tokenizer([PROMPT], pad_id=pad).to(device))[0]

    def sdxl() -> torch.Tensor:  # both penultimate layers concatenated (bigG's forward also projects the pooled)
        clip_l = model[0](tokenizer([PROMPT], pad_id=EOS).to(device), output_hidden_states=True)
        big_g = model[1](tokenizer([PROMPT], pad_id=0).to(device), output_hidden_states=True)
        return torch.cat([clip_l.hidden_states[-2], big_g.hidden_states[-2]], dim=-1)

    return sdxl


def count_unet_flops(spec: ModelSpec, batch: int = 2) -> int:
    """FLOPs of one sdlite UNet step (a multiply-add counts 2), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from sdlite.unet import UNetConfig, UNetModel

    with torch.device("meta"):
        model = UNetModel(UNetConfig(**spec.unet)).eval()
    i = unet_inputs(spec, "meta", torch.float32, batch)
    y = torch.empty(batch, spec.adm, device="meta") if spec.adm else None
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(i["x"], i["t"], i["context"], y=y)
    return counter.get_total_flops()


# --- one measurement (in its own process) ------------------------------------------------------------------------


def peak_rss() -> int:
    """This process' peak resident set size in bytes.

    Linux: VmHWM of /proc/self/status, which starts afresh at exec. ``ru_maxrss`` does not: a child inherits its
    parent's peak through fork+exec, so it would report at least the suite process' RSS."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def time_calls(call: Callable, device: str, warmup: int, reps: int) -> dict:
    """Run ``call`` ``warmup`` times untimed, then ``reps`` times timed; times, peak memory and a checksum.

    Peak memory: CUDA ``max_memory_allocated`` since the warm-up ended; CPU this process' peak RSS (weights
    included), which is why every measurement has a process of its own."""
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + reps):
            if i == warmup and cuda:
                torch.cuda.reset_peak_memory_stats()
            sync()
            start = time.perf_counter()
            out = call()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "reps": reps,
            "peak_bytes": peak, "checksum": float(out.float().abs().mean())}


def measure(impl: str, component: str, model_name: str, path: str, device: str, dtype_name: str, warmup: int,
            reps: int) -> dict:
    """Load one component with one implementation, warm up, time ``reps`` calls; run in a fresh process."""
    spec, dtype = MODELS[model_name], DTYPES[dtype_name]
    start = time.perf_counter()
    model = (load_sdlite if impl == "sdlite" else load_diffusers)(component, spec, path, device, dtype)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    call = make_call(impl, component, spec, model, device, dtype)
    return {"impl": impl, "component": component, "model": model_name, "load_s": load_s,
            **time_calls(call, device, warmup, reps)}


def run_measurement(impl: str, component: str, model_name: str, path: str, device: str, dtype_name: str,
                    warmup: int, reps: int) -> dict:
    """``measure`` in a fresh Python process; its result comes back as the last line of stdout (JSON)."""
    cmd = [sys.executable, "-m", "benchmarks", "measure", impl, component, model_name, path, "--device", device,
           "--dtype", dtype_name, "--warmup", str(warmup), "--reps", str(reps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the suite -------------------------------------------------------------------------------------------------


SUITES = {"cpu": dict(device="cpu", models=["sd15"], warmup=1, reps=3),
          "gpu": dict(device="cuda", models=["sd15", "sd21", "sdxl"], warmup=5, reps=30)}


def machine_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"CPU, {os.cpu_count()} cores, torch {torch.__version__}"


def run_suite(models: list[str], device: str, dtype_name: str, warmup: int, reps: int, tmpdir: str | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Every model x component x implementation; returns the JSON-ready results."""
    rows = []
    for name in models:
        spec = MODELS[name]
        with tempfile.TemporaryDirectory(dir=tmpdir) as tmp:
            path = os.path.join(tmp, f"{name}.safetensors")
            log(f"[{name}] writing random fp16 checkpoint")
            write_checkpoint(path, spec)
            flops = count_unet_flops(spec)
            for component in COMPONENTS:
                row = {"model": name, "component": component}
                for impl in IMPLS:
                    log(f"[{name}] {component}: {impl}")
                    row[impl] = run_measurement(impl, component, name, path, device, dtype_name, warmup, reps)
                if component == "unet":
                    row["flops"] = flops
                    for impl in IMPLS:
                        row[impl]["gflops_per_s"] = flops / row[impl]["median_s"] / 1e9
                if row["diffusers"]:
                    row["ratio_time"] = row["sdlite"]["median_s"] / row["diffusers"]["median_s"]
                    row["ratio_memory"] = row["sdlite"]["peak_bytes"] / row["diffusers"]["peak_bytes"]
                rows.append(row)
    return {"machine": machine_name(device), "device": device, "dtype": dtype_name, "warmup": warmup, "reps": reps,
            "torch": torch.__version__, "diffusers": _version("diffusers"), "results": rows}


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


_WHAT = {"unet": "UNet step, batch 2", "vae": "VAE decode, 1 image", "text": "text encode, 1 prompt"}


def markdown_table(report: dict) -> str:
    """One row per model x component: each implementation's median (min-max), peak memory, GFLOP/s, then ratios."""
    mem = "peak GPU mem" if report["device"].startswith("cuda") else "peak RSS"

    def cell(r: dict | None) -> str:
        if r is None:
            return "n/a"
        return f"{r['median_s']:.3f} s ({r['min_s']:.3f}-{r['max_s']:.3f})"

    def gib(r: dict | None) -> str:
        return "n/a" if r is None else f"{r['peak_bytes'] / 2**30:.2f} GiB"

    lines = [f"{report['machine']}, {report['dtype']}, {report['reps']} timed runs after {report['warmup']} warm-up",
             "",
             f"| model | measurement | diffusers median (min-max) | sdlite median (min-max) | diffusers {mem} | "
             f"sdlite {mem} | UNet TFLOP | diffusers GFLOP/s | sdlite GFLOP/s | **sdlite/diffusers time** | "
             f"**sdlite/diffusers memory** |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["results"]:
        spec = MODELS[row["model"]]
        what = _WHAT[row["component"]] + ("" if row["component"] == "text" else f", {spec.size}x{spec.size}")
        d, s = row["diffusers"], row["sdlite"]
        flops = row.get("flops")
        tflop = f"{flops / 1e12:.2f}" if flops else ""
        dg = f"{d['gflops_per_s']:.0f}" if flops and d else ""
        sg = f"{s['gflops_per_s']:.0f}" if flops else ""
        rt = f"**{row['ratio_time']:.3f}x**" if "ratio_time" in row else "n/a"
        rm = f"**{row['ratio_memory']:.3f}x**" if "ratio_memory" in row else "n/a"
        lines.append(f"| {row['model']} | {what} | {cell(d)} | {cell(s)} | {gib(d)} | {gib(s)} | {tflop} | {dg} | "
                     f"{sg} | {rt} | {rm} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the suite, print a markdown table")
    run.add_argument("--suite", choices=list(SUITES), default="cpu")
    run.add_argument("--models", help=f"comma-separated, of {','.join(MODELS)} (default: the suite's)")
    run.add_argument("--dtype", choices=list(DTYPES), help="default: fp32 on CPU, fp16 on CUDA")
    run.add_argument("--device", help="default: cpu for the cpu suite, cuda for the gpu suite")
    run.add_argument("--warmup", type=int, help="warm-up runs, not timed (default: 1 on CPU, 5 on CUDA)")
    run.add_argument("--reps", type=int, help="timed runs (default: 3 on CPU, 30 on CUDA)")
    run.add_argument("--out", help="also write the results here as JSON")
    run.add_argument("--tmpdir", help="where the random checkpoint is written (default: the system temp dir)")
    one = sub.add_parser("measure", help="(internal) one measurement in this process, printed as JSON")
    one.add_argument("impl", choices=IMPLS)
    one.add_argument("component", choices=COMPONENTS)
    one.add_argument("model", choices=list(MODELS))
    one.add_argument("path")
    one.add_argument("--device", default="cpu")
    one.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    one.add_argument("--warmup", type=int, default=1)
    one.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)

    if args.command == "measure":
        print(json.dumps(measure(args.impl, args.component, args.model, args.path, args.device, args.dtype,
                                 args.warmup, args.reps)))
        return

    suite = SUITES[args.suite]
    device = args.device or suite["device"]
    dtype_name = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    models = args.models.split(",") if args.models else suite["models"]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    warmup = args.warmup if args.warmup is not None else suite["warmup"]
    reps = args.reps if args.reps is not None else suite["reps"]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    report = run_suite(models, device, dtype_name, warmup, reps, args.tmpdir, log)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    print(markdown_table(report))
