"""The CUDA-only checks of the GPU suite (benchmarks/README.md, "CUDA"), in one process, each recorded as it ends.

    python -m benchmarks.cuda_checks --out cuda_checks.json               # every check
    python -m benchmarks.cuda_checks --only nv_noise,samplers --out c.json

Checks (nothing is downloaded: the built-in model and random full-size weights):
- ``nv_noise``: the "NV" noise source (Philox4x32-10 and cuRAND's Box-Muller, computed on the CPU) against
  ``torch.randn`` on the GPU after ``torch.manual_seed``, and the "GPU" source, bit for bit, two calls per seed.
- ``compile``: the SD1.5 UNet (random weights, fp16, batch 2 at 512x512) eager vs ``torch.compile`` as
  ``pipe.compile()`` does it; relative L2 error of the output, and each one's error against the float32 UNet.
- ``samplers``: every sampler of the A1111 list on the built-in model (fp16, 20 steps, CFG 5), eager and then with the
  UNet compiled in ``mode="reduce-overhead"`` (CUDA graphs): final latents compared, both images read by the detector.
- ``offload``: SD1.5 (random weights, fp16) txt2img resident vs ``offload=True``: latents and pixels bit-identical,
  peak GPU memory of each against the components' sizes.
- ``vae_upcast``: the SDXL VAE (random weights) in fp16 with one decoder convolution made to overflow, as SDXL's
  released VAE does in fp16: the decode warns, redoes itself in fp32, and matches a fp32 decode.

A check that raises is recorded with its error and the others still run. Every number goes to ``--out`` (JSON,
rewritten after each check) and a one-line summary per check to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch

from benchmarks.measure import _sync, unet_inputs, write_json
from benchmarks.models import MODELS, write_checkpoint

CHECKS = ("nv_noise", "compile", "samplers", "offload", "vae_upcast")
PROMPT = "a red circle on a blue background"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_nv_noise(device: str, tmp: str) -> dict:
    from sdlite.rng import PhiloxGenerator, make_generator

    shapes = [(3, 4), (1, 4, 64, 64), (2, 4, 128, 128), (1, 4, 96, 144), (1, 4, 7, 9), (4, 4, 64, 64)]
    rows, all_equal = [], True
    for seed in (0, 1, 42, 3_000_000_000):
        for shape in shapes:
            nv = PhiloxGenerator(seed)
            gpu = make_generator(seed, "GPU", device)
            torch.manual_seed(seed)
            for call in (1, 2):
                ref = torch.randn(shape, device=device).cpu()
                ours, theirs = nv.randn(shape), gpu.randn(shape).cpu()
                row = {"seed": seed, "shape": list(shape), "call": call,
                       "nv_equal": bool(torch.equal(ours, ref)), "nv_max_abs": float((ours - ref).abs().max()),
                       "gpu_source_equal": bool(torch.equal(theirs, ref))}
                all_equal &= row["nv_equal"] and row["gpu_source_equal"]
                rows.append(row)
    return {"ok": all_equal, "cases": len(rows), "nv_equal": sum(r["nv_equal"] for r in rows),
            "gpu_source_equal": sum(r["gpu_source_equal"] for r in rows), "rows": rows}


def _sd15_file(tmp: str, components=("unet", "vae", "text")) -> str:
    path = f"{tmp}/sd15-{'-'.join(components)}.safetensors"
    write_checkpoint(path, MODELS["sd15"], components=components)
    return path


def check_compile(device: str, tmp: str) -> dict:
    from benchmarks.loaders import load_sdlite
    from benchmarks.measure import compile_options

    spec, dtype = MODELS["sd15"], torch.float16
    path = _sd15_file(tmp, ("unet",))
    i = unet_inputs(spec, device, dtype)
    with torch.inference_mode():  # the float32 UNet: how far each fp16 path is from exact arithmetic
        exact = load_sdlite("unet", spec, path, device, torch.float32)(
            i["x"].float(), i["t"], i["context"].float()).clone()
    unet = load_sdlite("unet", spec, path, device, dtype)
    with torch.inference_mode():
        eager = unet(i["x"], i["t"], i["context"]).clone()
        unet.compile(**compile_options(None))
        start = time.perf_counter()
        compiled = unet(i["x"], i["t"], i["context"]).clone()
        _sync(device)()
        first = time.perf_counter() - start
        again = unet(i["x"], i["t"], i["context"]).clone()
    err = rel_err(compiled, eager)
    return {"ok": err < 1e-3 and torch.equal(compiled, again), "rel_err": err,
            "eager_vs_fp32": rel_err(eager, exact), "compiled_vs_fp32": rel_err(compiled, exact),
            "max_abs": float((compiled.float() - eager.float()).abs().max()), "first_call_s": first,
            "deterministic": bool(torch.equal(compiled, again))}


def _generate(pipe, sampler: str, seed: int = 3):
    sync = _sync(str(pipe.device))
    sync()
    start = time.perf_counter()
    result = pipe.txt2img(PROMPT, steps=20, cfg_scale=5, sampler=sampler, seed=seed)
    sync()
    return result, time.perf_counter() - start


def _pixel_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def check_samplers(device: str, tmp: str) -> dict:
    import sdlite
    from sdlite.data.shapes import describe
    from sdlite.schedulers import SAMPLER_NAMES

    dtype = torch.float16 if device.startswith("cuda") else torch.float32  # (fp16 convolutions crawl on a CPU)
    pipe = sdlite.load("shapes", device=device, dtype=dtype)
    eager = {}
    for name in SAMPLER_NAMES:
        try:
            eager[name] = _generate(pipe, name)
        except Exception as e:  # noqa: BLE001 - recorded per sampler
            eager[name] = e
    pipe.compile(mode="reduce-overhead")
    rows, ok = [], True
    for name in SAMPLER_NAMES:
        row = {"sampler": name}
        try:
            if isinstance(eager[name], Exception):
                raise eager[name]
            # The first graphed generation holds the compilation and the graph capture.
            (plain, plain_s), (graphed, graphed_s) = eager[name], _generate(pipe, name)
            a, b = describe(plain.images[0]), describe(graphed.images[0])
            row.update(rel_err=rel_err(graphed.latents, plain.latents),
                       max_abs=float((graphed.latents.float() - plain.latents.float()).abs().max()),
                       pixels_max_diff=_pixel_diff(plain.images[0], graphed.images[0]),
                       eager_s=plain_s, graphed_s=graphed_s, eager_read=str(a.scene), graphed_read=str(b.scene),
                       same_reading=a.scene == b.scene)
            ok &= row["same_reading"] and row["rel_err"] < 2e-2
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[-2000:]
            ok = False
        rows.append(row)
        print(f"  {row}", file=sys.stderr, flush=True)
    return {"ok": ok, "rows": rows}


def check_offload(device: str, tmp: str) -> dict:
    import sdlite

    path = _sd15_file(tmp)
    args = dict(width=512, height=512, steps=4, sampler="Euler", seed=5)
    out = {}
    for mode in ("resident", "offload"):
        pipe = sdlite.load(path, device=device, dtype=torch.float16, offload=mode == "offload")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = pipe.txt2img("a photo of a cat", **args)
        torch.cuda.synchronize()
        sizes = {name: sum(p.numel() * p.element_size() for p in m.parameters())
                 for name, m in (("unet", pipe.unet), ("vae", pipe.vae),
                                 ("text", torch.nn.ModuleList(pipe.text_encoders)))}
        out[mode] = dict(result=result, peak=torch.cuda.max_memory_allocated(), sizes=sizes,
                         after=torch.cuda.memory_allocated())
        del pipe
        torch.cuda.empty_cache()
    a, b = out["resident"]["result"], out["offload"]["result"]
    same_latents = bool(torch.equal(a.latents.cpu(), b.latents.cpu()))
    same_pixels = _pixel_diff(a.images[0], b.images[0]) == 0
    return {"ok": same_latents and same_pixels, "same_latents": same_latents, "same_pixels": same_pixels,
            "peak_resident_bytes": out["resident"]["peak"], "peak_offload_bytes": out["offload"]["peak"],
            "allocated_after_offload_bytes": out["offload"]["after"], "component_bytes": out["resident"]["sizes"]}


def check_vae_upcast(device: str, tmp: str) -> dict:
    from sdlite.vae import AutoencoderKL, VAEConfig, VAEUpcastWarning

    torch.manual_seed(0)
    reference = AutoencoderKL(VAEConfig(scale_factor=0.13025)).eval()
    with torch.no_grad():
        for p in reference.parameters():
            if p.ndim > 1:
                p.normal_(0, p[0].numel() ** -0.5)
        conv = reference.get_submodule("decoder.up.1.upsample.conv")
        conv.weight.mul_(2e4)
        conv.bias.mul_(2e4)
    half = AutoencoderKL(VAEConfig(scale_factor=0.13025)).eval()
    half.load_state_dict(reference.state_dict())
    half = half.half().to(device)
    full = AutoencoderKL(VAEConfig(scale_factor=0.13025)).eval()
    full.load_state_dict(half.state_dict())  # the same fp16-rounded weights, in fp32
    full = full.float().to(device)
    side = 128 if device.startswith("cuda") else 16  # SDXL's 1024x1024 on the GPU; a quick dry run elsewhere
    z = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        raw = half.decoder(half.post_quant_conv(z.half()))
        overflowed = not bool(torch.isfinite(raw).all())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            decoded = half.decode(z.half())
        expected = full.decode(z)
    warned = any(issubclass(w.category, VAEUpcastWarning) for w in caught)
    err = rel_err(decoded, expected)
    finite = bool(torch.isfinite(decoded).all())
    return {"ok": overflowed and warned and finite and err < 1e-2, "fp16_overflowed": overflowed, "warned": warned,
            "finite": finite, "rel_err_vs_fp32": err, "decoder_dtype_after": str(next(half.decoder.parameters()).dtype),
            "output_dtype": str(decoded.dtype)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated, of {','.join(CHECKS)}")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", help="write the results here as JSON (rewritten after each check)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(CHECKS)
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
              "torch": torch.__version__, "checks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            start = time.perf_counter()
            try:
                result = globals()[f"check_{name}"](args.device, tmp)
            except Exception as e:  # noqa: BLE001 - recorded, the other checks still run
                result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            result["seconds"] = time.perf_counter() - start
            report["checks"][name] = result
            brief = {k: v for k, v in result.items() if k not in ("rows", "traceback")}
            print(f"[{name}] {json.dumps(brief, default=str)}", file=sys.stderr, flush=True)
            if args.out:
                write_json(args.out, report)
    return 0 if all(r["ok"] for r in report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
