"""One measurement: its inputs, the timed call, the timing loop, peak memory, UNet FLOPs, and the fresh process
each measurement runs in (so that the process' peak RSS belongs to one implementation and one measurement)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch

from benchmarks.loaders import load_diffusers, load_sdlite
from benchmarks.models import DTYPES, MODELS, ModelSpec, write_checkpoint
from benchmarks.txt2img import PROMPT, STEPS, WARMUP_STEPS, load_pipeline, txt2img_call

IMPLS = ("diffusers", "sdlite")
MEASUREMENTS = ("unet", "vae", "text", "txt2img")
PATHS = ("eager", "compiled")
COMPILABLE = ("unet", "txt2img")  # the measurements a compiled UNet changes


def unet_inputs(spec: ModelSpec, device: str | torch.device, dtype: torch.dtype, batch: int = 2) -> dict:
    """Latents, timesteps, text context and (SDXL) ADM vector for one step, seeded.

    An even batch is a CFG step of batch/2 images, as both libraries' pipelines call the UNet: the latents twice
    (cond rows, then uncond rows) at one timestep, a different text context (and ADM vector) for every row."""
    g = torch.Generator().manual_seed(1)
    side = spec.size // 8
    images, parts = (batch // 2, 2) if batch % 2 == 0 else (batch, 1)
    inputs = dict(x=torch.randn(images, 4, side, side, generator=g).repeat(parts, 1, 1, 1).to(device, dtype),
                  t=torch.full((batch,), 500.0, device=device),
                  context=torch.randn(batch, 77, spec.unet["context_dim"], generator=g).to(device, dtype))
    if spec.adm:
        pooled = torch.randn(batch, spec.pooled_width, generator=g)
        time_ids = torch.tensor([spec.size, spec.size, 0, 0, spec.size, spec.size], dtype=torch.float32)
        inputs.update(pooled=pooled.to(device, dtype), time_ids=time_ids.expand(batch, 6).to(device, dtype))
    return inputs


def _sdlite_adm(pooled: torch.Tensor, size: int) -> torch.Tensor:
    """SDXL's y as sdlite's generation builds it: the pooled bigG vector, then the size/crop numbers embedded."""
    from sdlite.generate import size_embedding

    extra = [size, size, 0, 0, size, size]
    return torch.cat([pooled, size_embedding(extra, pooled.shape[0]).to(pooled)], dim=1)


def load(impl: str, measurement: str, spec: ModelSpec, path: str, device: str, dtype: torch.dtype):
    """What the measurement runs: one component, or for txt2img the whole pipeline."""
    if measurement == "txt2img":
        return load_pipeline(impl, spec, path, device, dtype)
    return (load_sdlite if impl == "sdlite" else load_diffusers)(measurement, spec, path, device, dtype)


def make_call(impl: str, measurement: str, spec: ModelSpec, model, device: str, dtype: torch.dtype,
              batch: int = 2, steps: int = STEPS) -> Callable:
    """A no-argument function doing one measured operation; inputs are prepared here, outside the timing.
    ``batch`` is the UNet step's batch (2: one CFG step), ``steps`` txt2img's sampling steps."""
    if measurement == "txt2img":
        return txt2img_call(impl, spec, model, steps)
    if measurement == "unet":
        i = unet_inputs(spec, device, dtype, batch)
        if impl == "sdlite":
            y = _sdlite_adm(i["pooled"], spec.size) if spec.adm else None
            return lambda: model(i["x"], i["t"], i["context"], y=y)
        added = dict(text_embeds=i["pooled"], time_ids=i["time_ids"]) if spec.adm else None
        return lambda: model(i["x"], i["t"], encoder_hidden_states=i["context"], added_cond_kwargs=added,
                             return_dict=False)[0]
    if measurement == "vae":
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
        pad = EOS if spec.family == "sd1" else 0
        return lambda: model[0](tokenizer([PROMPT], pad_id=pad).to(device))[0]

    def sdxl() -> torch.Tensor:  # both penultimate layers concatenated (bigG's forward also projects the pooled)
        clip_l = model[0](tokenizer([PROMPT], pad_id=EOS).to(device), output_hidden_states=True)
        big_g = model[1](tokenizer([PROMPT], pad_id=0).to(device), output_hidden_states=True)
        return torch.cat([clip_l.hidden_states[-2], big_g.hidden_states[-2]], dim=-1)

    return sdxl


def compile_options(mode: str | None) -> dict:
    """``StableDiffusion.compile``'s options for the UNet (static shapes, one graph), plus ``mode`` if given."""
    return {"dynamic": False, "fullgraph": True, **({"mode": mode} if mode else {})}


def compile_model(impl: str, measurement: str, model, mode: str | None) -> None:
    """torch.compile the UNet in place: sdlite as ``pipe.compile()`` does, diffusers' UNet with the same options
    (its UNet2DConditionModel compiles as one graph too)."""
    if measurement == "txt2img":
        if impl == "sdlite":
            model.compile(**({"mode": mode} if mode else {}))
        else:
            model.unet.compile(**compile_options(mode))
    else:
        model.compile(**compile_options(mode))


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


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def _timed(call: Callable, sync: Callable[[], None]) -> tuple[float, float, torch.Tensor]:
    """(wall seconds, CPU seconds of this process, output) of one call."""
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    out = call()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def _summary(wall: list[float], cpu: list[float], warmup: int, out: torch.Tensor) -> dict:
    """Median / min / max wall time of the timed calls, their median CPU time (this process' user + system time:
    on a core shared with other jobs it leaves out the time the process waited), the first call's wall time, and a
    checksum of the last output."""
    timed = wall[warmup:]
    return {"median_s": statistics.median(timed), "min_s": min(timed), "max_s": max(timed), "reps": len(timed),
            "cpu_median_s": statistics.median(cpu[warmup:]), "threads": torch.get_num_threads(),
            "first_call_s": wall[0], "checksum": float(out.float().abs().mean())}


def time_calls(call: Callable, device: str, warmup: int, reps: int, warm: Callable | None = None) -> dict:
    """Run ``warm`` (default: ``call``) ``warmup`` times untimed, then ``call`` ``reps`` times timed; times, the first
    call's time (with torch.compile: the compilation), peak memory and a checksum of the last output.

    Peak memory: CUDA ``max_memory_allocated`` since the warm-up ended; CPU this process' peak RSS (weights
    included), which is why every measurement has a process of its own."""
    cuda = device.startswith("cuda")
    sync = _sync(device)
    wall, cpu = [], []
    with torch.inference_mode():
        for i in range(warmup + reps):
            if i == warmup and cuda:
                torch.cuda.reset_peak_memory_stats()
            w, c, out = _timed((warm or call) if i < warmup else call, sync)
            wall.append(w)
            cpu.append(c)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    return {**_summary(wall, cpu, warmup, out), "peak_bytes": peak}


def measure(impl: str, measurement: str, model_name: str, path: str, device: str, dtype_name: str, warmup: int,
            reps: int, compiled: bool = False, compile_mode: str | None = None) -> dict:
    """Load, (compile,) warm up, time ``reps`` calls of one measurement with one implementation.

    Run in a fresh process. A compiled measurement gets at least one warm-up run, which holds the compilation;
    txt2img warms up with short generations (``WARMUP_STEPS``) at the timed size."""
    spec, dtype = MODELS[model_name], DTYPES[dtype_name]
    start = time.perf_counter()
    model = load(impl, measurement, spec, path, device, dtype)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    if compiled:
        compile_model(impl, measurement, model, compile_mode)
        warmup = max(warmup, 1)
    call = make_call(impl, measurement, spec, model, device, dtype)
    warm = make_call(impl, measurement, spec, model, device, dtype, steps=WARMUP_STEPS) \
        if measurement == "txt2img" else None
    return {"impl": impl, "measurement": measurement, "model": model_name, "dtype": dtype_name,
            "path": "compiled" if compiled else "eager", "load_s": load_s,
            **time_calls(call, device, warmup, reps, warm)}


def measure_alternating(measurement: str, model_name: str, path: str, device: str, dtype_name: str, warmup: int,
                        reps: int, compiled: bool = False, compile_mode: str | None = None) -> dict[str, dict]:
    """Both implementations in this one long-lived process, as a notebook that uses both does: each loaded once,
    then ``warmup`` untimed and ``reps`` timed rounds of one diffusers call followed by one sdlite call, so that
    each runs on the heap (and caches) the other has just left. Returns one result per implementation, as
    ``measure`` does, without peak memory (the process holds both)."""
    spec, dtype = MODELS[model_name], DTYPES[dtype_name]
    sync = _sync(device)
    calls, results = {}, {}
    for impl in IMPLS:
        start = time.perf_counter()
        model = load(impl, measurement, spec, path, device, dtype)
        sync()
        results[impl] = {"impl": impl, "measurement": measurement, "model": model_name, "dtype": dtype_name,
                         "path": "compiled" if compiled else "eager", "load_s": time.perf_counter() - start}
        if compiled:
            compile_model(impl, measurement, model, compile_mode)
        warm = make_call(impl, measurement, spec, model, device, dtype, steps=WARMUP_STEPS) \
            if measurement == "txt2img" else None
        calls[impl] = (make_call(impl, measurement, spec, model, device, dtype), warm)
    warmup = max(warmup, 1) if compiled else warmup
    wall, cpu, out = {i: [] for i in IMPLS}, {i: [] for i in IMPLS}, {}
    with torch.inference_mode():
        for r in range(warmup + reps):
            for impl in IMPLS:
                call, warm = calls[impl]
                w, c, out[impl] = _timed((warm or call) if r < warmup else call, sync)
                wall[impl].append(w)
                cpu[impl].append(c)
    for impl in IMPLS:
        results[impl].update(_summary(wall[impl], cpu[impl], warmup, out[impl]), peak_bytes=None)
    return results


def run_alternating(measurement: str, model_name: str, path: str, device: str, dtype_name: str, warmup: int,
                    reps: int, compiled: bool = False, compile_mode: str | None = None) -> dict[str, dict]:
    """``measure_alternating`` in a fresh Python process (fresh for this pair, long-lived for its rounds)."""
    cmd = [sys.executable, "-m", "benchmarks", "alternate", measurement, model_name, path, "--device", device,
           "--dtype", dtype_name, "--warmup", str(warmup), "--reps", str(reps)]
    if compiled:
        cmd += ["--compiled"] + (["--compile-mode", compile_mode] if compile_mode else [])
    return _run_json(cmd)


def _run_json(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_measurement(impl: str, measurement: str, model_name: str, path: str, device: str, dtype_name: str,
                    warmup: int, reps: int, compiled: bool = False, compile_mode: str | None = None) -> dict:
    """``measure`` in a fresh Python process; its result comes back as the last line of stdout (JSON)."""
    cmd = [sys.executable, "-m", "benchmarks", "measure", impl, measurement, model_name, path, "--device", device,
           "--dtype", dtype_name, "--warmup", str(warmup), "--reps", str(reps)]
    if compiled:
        cmd += ["--compiled"] + (["--compile-mode", compile_mode] if compile_mode else [])
    return _run_json(cmd)


def write_json(path: str, report: dict) -> None:
    """A benchmark's results as indented JSON, written to a temporary name and renamed when complete."""
    from sdlite.checkpoint.write import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=2)


@contextlib.contextmanager
def sd15_unet_file() -> Iterator[str]:
    """The path of a random SD1.5-shaped UNet (float32 .safetensors) in a temporary folder, for the block's life."""
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "sd15_unet.safetensors")
        write_checkpoint(weights, MODELS["sd15"], components=("unet",), dtype=torch.float32)
        yield weights


def sd15_unet_in_fresh_processes(module: str, flags: list[str]) -> dict[str, dict]:
    """Run ``python -m module --worker IMPL --weights W *flags`` for diffusers then sdlite, each in a fresh process,
    on one SD1.5-shaped random UNet file written to a temporary folder; each worker prints its result as the last
    line of JSON. Every result is echoed to stderr as it arrives, so a later failure keeps the earlier one."""
    results = {}
    with sd15_unet_file() as weights:
        for impl in ("diffusers", "sdlite"):
            cmd = [sys.executable, "-m", module, "--worker", impl, "--weights", weights, *flags]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[impl] = json.loads(out.strip().splitlines()[-1])
            print(f"{impl}: {json.dumps(results[impl])}", file=sys.stderr, flush=True)
    return results
