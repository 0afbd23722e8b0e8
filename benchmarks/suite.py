"""Benchmark suite: sdlite vs diffusers on the same random full-size checkpoints (SD1.5, SD2.1, SDXL).

    python -m benchmarks run --suite cpu                      # SD1.5, fp32, eager, on the CPU
    python -m benchmarks run --suite gpu --out results.json   # SD1.5, SD2.1, SDXL, fp16 + bf16, eager + compiled

For each model one random checkpoint is written in the original single-file layout (``benchmarks/models.py``); every
measurement then runs in a fresh subprocess that loads only what it measures from that file, sdlite through its own
loader, diffusers through its own ldm converters (``benchmarks/loaders.py``, ``benchmarks/txt2img.py``). So peak
memory (CPU: the process' peak RSS; CUDA: ``torch.cuda.max_memory_allocated``) belongs to one implementation and one
measurement. Warm-up excluded, median / min / max of the timed runs (``benchmarks/measure.py``):

* ``unet``: one UNet step, batch 2 (one CFG step), 512x512 (SD1.5/SD2.1) or 1024x1024 (SDXL, with the ADM vector),
  with its FLOPs (``FlopCounterMode`` on sdlite's module, on meta) and each implementation's achieved GFLOP/s;
* ``vae``: decoding one latent to a full-size image;
* ``text``: encoding one prompt (sdlite's ``encode_text``; transformers' CLIP models as diffusers' pipelines use them);
* ``txt2img``: one 20-step Euler image with CFG, end to end, and its time over 20 UNet steps of the same run.

``unet`` and ``txt2img`` are measured eager and, with ``--paths eager,compiled``, with the UNet torch.compile'd.
With ``--processes fresh,one`` each measurement is also run with both implementations loaded in one long-lived
process, alternating call by call (``measure_alternating``), as a notebook that uses both runs them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable

import torch

from benchmarks.measure import (COMPILABLE, IMPLS, MEASUREMENTS, PATHS, count_unet_flops, measure,
                                measure_alternating, run_alternating, run_measurement, write_json)
from benchmarks.models import DTYPES, MODELS, write_checkpoint
from benchmarks.txt2img import STEPS, WARMUP_STEPS, tokenizer_dir, write_tokenizer

# txt2img_reps None: as many as --reps. CPU: one 20-step 512x512 image takes minutes.
SUITES = {"cpu": dict(device="cpu", models=["sd15"], warmup=1, reps=3, txt2img_reps=1, paths=["eager"]),
          "gpu": dict(device="cuda", models=["sd15", "sd21", "sdxl"], warmup=5, reps=30, txt2img_reps=None,
                      paths=["eager", "compiled"])}


def machine_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"CPU, {os.cpu_count()} cores, torch {torch.__version__}"


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# How the implementations are run: each measurement in a fresh process of its own, or both in one process,
# alternating call by call (no peak memory of its own there).
PROCESSES = ("fresh", "one")


def _compare(row: dict) -> None:
    """The ratios sdlite/diffusers of a row whose two measurements both succeeded (wall time, CPU time, memory)."""
    d, s = row["diffusers"], row["sdlite"]
    if d and s:
        row["ratio_time"] = s["median_s"] / d["median_s"]
        row["ratio_cpu"] = s["cpu_median_s"] / d["cpu_median_s"]
        if d["peak_bytes"] and s["peak_bytes"]:
            row["ratio_memory"] = s["peak_bytes"] / d["peak_bytes"]


def _txt2img_vs_unet(rows: list[dict]) -> None:
    """The issue's end-to-end target: txt2img within 10% of 20 UNet steps. For each txt2img row with a UNet row of
    the same model, dtype and path, each implementation's txt2img median over 20x its UNet step median."""
    unet = {(r["model"], r["dtype"], r["path"], r["processes"]): r for r in rows if r["measurement"] == "unet"}
    for row in rows:
        step = unet.get((row["model"], row["dtype"], row["path"], row["processes"]))
        if row["measurement"] != "txt2img" or step is None:
            continue
        row["txt2img_over_unet_steps"] = {
            impl: row[impl]["median_s"] / (STEPS * step[impl]["median_s"])
            for impl in IMPLS if row[impl] and step[impl]}


def run_suite(models: list[str], device: str, dtypes: list[str], measurements: list[str], paths: list[str],
              warmup: int, reps: int, txt2img_reps: int, compile_mode: str | None = None, tmpdir: str | None = None,
              log: Callable[[str], None] = print, runner: Callable[..., dict] = run_measurement,
              processes: tuple[str, ...] = ("fresh",), pair_runner: Callable[..., dict] = run_alternating) -> dict:
    """Every model x dtype x measurement x path x processes x implementation; returns the JSON-ready results.

    ``runner`` runs one measurement of one implementation (default: in a fresh process), ``pair_runner`` both
    implementations alternating in one process (``processes`` "one"); a failed one is logged and left out of its
    row (``None``, with the error under ``errors``), so that one out-of-memory does not cost the rest of a long
    run."""
    rows = []
    for name in models:
        spec = MODELS[name]
        with tempfile.TemporaryDirectory(dir=tmpdir) as tmp:
            path = os.path.join(tmp, f"{name}.safetensors")
            log(f"[{name}] writing random fp16 checkpoint")
            write_checkpoint(path, spec)
            if "txt2img" in measurements:
                write_tokenizer(tokenizer_dir(path))
            flops = count_unet_flops(spec) if "unet" in measurements else None
            for dtype_name in dtypes:
                for measurement in measurements:
                    for path_kind, proc in ((p, q) for p in (paths if measurement in COMPILABLE else ["eager"])
                                            for q in processes):
                        row = {"model": name, "measurement": measurement, "dtype": dtype_name, "path": path_kind,
                               "processes": proc}
                        n = txt2img_reps if measurement == "txt2img" else reps
                        args = (measurement, name, path, device, dtype_name, warmup, n)
                        options = dict(compiled=path_kind == "compiled", compile_mode=compile_mode)
                        what = f"[{name}] {measurement}, {dtype_name}, {path_kind}"
                        if proc == "fresh":
                            for impl in IMPLS:
                                log(f"{what}: {impl}")
                                _attempt(row, [impl], lambda: {impl: runner(impl, *args, **options)}, what, log)
                        else:
                            log(f"{what}: both in one process, alternating")
                            _attempt(row, list(IMPLS), lambda: pair_runner(*args, **options), what, log)
                        if measurement == "unet":
                            row["flops"] = flops
                            for impl in IMPLS:
                                if row[impl]:
                                    row[impl]["gflops_per_s"] = flops / row[impl]["median_s"] / 1e9
                        _compare(row)
                        rows.append(row)
                        log(f"{what}: row {json.dumps(row)}")  # a run cut short keeps its finished rows in the log
    _txt2img_vs_unet(rows)
    return {"machine": machine_name(device), "threads": torch.get_num_threads(), "device": device,
            "dtypes": dtypes, "paths": paths, "processes": list(processes),
            "compile_mode": compile_mode, "warmup": warmup, "reps": reps, "txt2img_reps": txt2img_reps,
            "txt2img_steps": STEPS, "txt2img_warmup_steps": WARMUP_STEPS, "torch": torch.__version__,
            "diffusers": _version("diffusers"), "transformers": _version("transformers"), "results": rows}


def _attempt(row: dict, impls: list[str], run: Callable[[], dict], what: str, log: Callable[[str], None]) -> None:
    """``row[impl]`` for each of ``impls`` from ``run()``, or None and the error in ``row["errors"]``."""
    try:
        row.update(run())
    except Exception as e:  # noqa: BLE001 - reported in the row and the log, the run goes on
        log(f"{what}: {'/'.join(impls)} FAILED: {e}")
        for impl in impls:
            row[impl] = None
            row.setdefault("errors", {})[impl] = str(e)[-4000:]


def _what(row: dict) -> str:
    size = MODELS[row["model"]].size
    return {"unet": f"UNet step, batch 2, {size}x{size}", "vae": f"VAE decode, 1 image, {size}x{size}",
            "text": "text encode, 1 prompt",
            "txt2img": f"txt2img, {STEPS} Euler steps, CFG, {size}x{size}"}[row["measurement"]]


def markdown_table(report: dict) -> str:
    """One row per model x measurement x path x dtype: each implementation's median (min-max), peak memory, GFLOP/s,
    txt2img over 20 UNet steps, then the ratios sdlite/diffusers."""
    mem = "peak GPU mem" if report["device"].startswith("cuda") else "peak RSS"

    def cell(r: dict | None) -> str:
        return "failed" if r is None else f"{r['median_s']:.3f} s ({r['min_s']:.3f}-{r['max_s']:.3f})"

    def gib(r: dict | None) -> str:
        if r is None:
            return "failed"
        return "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f} GiB"

    def path(row: dict) -> str:  # compiled: the first call, which compiles, in seconds (diffusers / sdlite)
        if row["path"] == "eager":
            return "eager"
        first = " / ".join("-" if row[i] is None else f"{row[i]['first_call_s']:.1f}" for i in IMPLS)
        return f"compiled (first call {first} s)"

    lines = [f"{report['machine']}, {report['threads']} thread(s); {report['reps']} timed runs after "
             f"{report['warmup']} warm-up "
             f"(txt2img: {report['txt2img_reps']} after {report['warmup']} warm-up generation(s) of "
             f"{report['txt2img_warmup_steps']} steps)",
             "",
             f"| model | measurement | path | processes | dtype | diffusers median (min-max) | "
             f"sdlite median (min-max) | diffusers {mem} | sdlite {mem} | UNet TFLOP | diffusers GFLOP/s | "
             f"sdlite GFLOP/s | sdlite txt2img / {STEPS} UNet steps | **sdlite/diffusers time** | "
             f"sdlite/diffusers CPU time | **sdlite/diffusers memory** |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["results"]:
        d, s = row["diffusers"], row["sdlite"]
        flops = row.get("flops")
        tflop = f"{flops / 1e12:.2f}" if flops else ""
        dg = f"{d['gflops_per_s']:.0f}" if flops and d else ""
        sg = f"{s['gflops_per_s']:.0f}" if flops and s else ""
        over = row.get("txt2img_over_unet_steps", {}).get("sdlite")
        over = f"{over:.3f}" if over is not None else ""
        rt = f"**{row['ratio_time']:.3f}x**" if "ratio_time" in row else "n/a"
        rc = f"{row['ratio_cpu']:.3f}x" if "ratio_cpu" in row else "n/a"
        rm = f"**{row['ratio_memory']:.3f}x**" if "ratio_memory" in row else "n/a"
        proc = "fresh, one each" if row["processes"] == "fresh" else "one, alternating"
        lines.append(f"| {row['model']} | {_what(row)} | {path(row)} | {proc} | {row['dtype']} | {cell(d)} | "
                     f"{cell(s)} | {gib(d)} | {gib(s)} | {tflop} | {dg} | {sg} | {over} | {rt} | {rc} | {rm} |")
    return "\n".join(lines)


def _names(text: str | None, known, what: str, parser: argparse.ArgumentParser) -> list[str] | None:
    """A comma-separated option as a list, each name checked against ``known``; None when not given."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"{what}: unknown {unknown or text!r}; choose from {','.join(known)}")
    return names


def _default_dtypes(device: str) -> list[str]:
    if not device.startswith("cuda"):
        return ["fp32"]
    return ["fp16", "bf16"] if torch.cuda.is_bf16_supported() else ["fp16"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the suite, print a markdown table")
    run.add_argument("--suite", choices=list(SUITES), default="cpu",
                     help="cpu: SD1.5 on cpu, eager; gpu: SD1.5, SD2.1, SDXL on cuda, eager and compiled")
    run.add_argument("--models", help=f"comma-separated, of {','.join(MODELS)} (default: the suite's)")
    run.add_argument("--measure", help=f"comma-separated, of {','.join(MEASUREMENTS)} (default: all)")
    run.add_argument("--dtype", help=f"comma-separated, of {','.join(DTYPES)} (default: fp32 on CPU; fp16,bf16 on "
                                     "CUDA, bf16 where the GPU supports it)")
    run.add_argument("--paths", help=f"comma-separated, of {','.join(PATHS)}: the UNet eager and/or torch.compile'd, "
                                     "for unet and txt2img (default: eager for the cpu suite, both for the gpu suite)")
    run.add_argument("--processes", help=f"comma-separated, of {','.join(PROCESSES)}: each measurement in a fresh "
                                         "process per implementation, and/or both implementations in one process, "
                                         "alternating call by call (default: fresh)")
    run.add_argument("--compile-mode", choices=["reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                     help="torch.compile mode for the compiled path (default: torch's default mode)")
    run.add_argument("--device", help="default: cpu for the cpu suite, cuda for the gpu suite")
    run.add_argument("--warmup", type=int, help="warm-up runs, not timed (default: 1 on CPU, 5 on CUDA); for txt2img "
                                                f"generations of {WARMUP_STEPS} steps")
    run.add_argument("--reps", type=int, help="timed runs (default: 3 on CPU, 30 on CUDA)")
    run.add_argument("--txt2img-reps", type=int,
                     help="timed txt2img runs (default: 1 for the cpu suite, --reps for the gpu suite)")
    run.add_argument("--out", help="also write the results here as JSON")
    run.add_argument("--tmpdir", help="where the random checkpoint is written (default: the system temp dir)")
    one = sub.add_parser("measure", help="(internal) one measurement in this process, printed as JSON")
    one.add_argument("impl", choices=IMPLS)
    one.add_argument("measurement", choices=MEASUREMENTS)
    one.add_argument("model", choices=list(MODELS))
    one.add_argument("path")
    pair = sub.add_parser("alternate", help="(internal) both implementations in this process, printed as JSON")
    pair.add_argument("measurement", choices=MEASUREMENTS)
    pair.add_argument("model", choices=list(MODELS))
    pair.add_argument("path")
    for p in (one, pair):
        p.add_argument("--device", default="cpu")
        p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
        p.add_argument("--warmup", type=int, default=1)
        p.add_argument("--reps", type=int, default=3)
        p.add_argument("--compiled", action="store_true")
        p.add_argument("--compile-mode")
    args = parser.parse_args(argv)

    if args.command in ("measure", "alternate"):
        first = (args.impl,) if args.command == "measure" else ()
        fn = measure if args.command == "measure" else measure_alternating
        print(json.dumps(fn(*first, args.measurement, args.model, args.path, args.device, args.dtype, args.warmup,
                            args.reps, args.compiled, args.compile_mode)))
        return

    suite = SUITES[args.suite]
    device = args.device or suite["device"]
    models = _names(args.models, list(MODELS), "--models", parser) or suite["models"]
    measurements = _names(args.measure, MEASUREMENTS, "--measure", parser) or list(MEASUREMENTS)
    dtypes = _names(args.dtype, list(DTYPES), "--dtype", parser) or _default_dtypes(device)
    paths = _names(args.paths, PATHS, "--paths", parser) or suite["paths"]
    processes = _names(args.processes, PROCESSES, "--processes", parser) or ["fresh"]
    warmup = args.warmup if args.warmup is not None else suite["warmup"]
    reps = args.reps if args.reps is not None else suite["reps"]
    txt2img_reps = args.txt2img_reps or suite["txt2img_reps"] or reps
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    report = run_suite(models, device, dtypes, measurements, paths, warmup, reps, txt2img_reps, args.compile_mode,
                       args.tmpdir, log, processes=tuple(processes))
    if args.out:
        write_json(args.out, report)
    print(markdown_table(report))
