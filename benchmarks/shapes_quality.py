"""Quality of the built-in "shapes" model on prompts it never saw: the issue's three measures, and the time they took.

    python -m benchmarks.shapes_quality                         # the built-in model, 50 prompts x 4 seeds
    python -m benchmarks.shapes_quality model.safetensors --seeds 8 --out shapes.json
    python -m benchmarks.shapes_quality --sampler "DPM++ 2M" --steps 20   # another sampler, same prompts

``sdlite.data.quality.evaluate`` generates each held-out prompt (``held_out_prompts``: 25 one-object, 25
two-object) for seeds 0..N-1 through ``pipe.txt2img`` (20 Euler a steps, CFG 5 by default, the model's 64x64) and
reads every image with the detector ``sdlite.data.shapes.describe``. Reported: background colour accuracy (all
images), colour + shape accuracy of one-object prompts, and both objects right with their left/right relation for
two-object prompts, each against the issue's target, plus seconds per image. The tests
(tests/test_shapes_quality.py) check the same measures on fewer prompts and seeds.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.measure import write_json
from benchmarks.suite import machine_name


def run(model: str, seeds: int, sampler: str, steps: int, cfg_scale: float, device: str) -> dict:
    import sdlite
    from sdlite.data.quality import TARGETS, evaluate

    pipe = sdlite.load(model, device=device)

    def progress(done: int, total: int) -> None:
        print(f"\r{done}/{total} prompts", end="" if done < total else "\n", file=sys.stderr, flush=True)

    with torch.no_grad():
        result = evaluate(pipe, seeds=seeds, sampler=sampler, steps=steps, cfg_scale=cfg_scale, progress=progress)
    images = len(result.records)
    return {"machine": machine_name(device), "model": str(pipe.path), "settings": result.settings,
            "measures": result.measures(), "counts": result.counts(), "targets": TARGETS,
            "seconds": result.seconds, "seconds_per_image": result.seconds / images,
            "failures": [{"prompt": r.prompt.text, "seed": r.seed, "read": r.verdict()} for r in result.failures()],
            "table": result.table()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shapes_quality", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="shapes", help="checkpoint (default: the built-in model)")
    parser.add_argument("--seeds", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg-scale", type=float, default=5.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="also write the results (failures included) here as JSON")
    args = parser.parse_args(argv)
    report = run(args.model, args.seeds, args.sampler, args.steps, args.cfg_scale, args.device)
    if args.out:
        write_json(args.out, report)
    print(f"{report['machine']}; {report['model']}\n\n{report['table']}\n\n"
          f"{report['seconds_per_image'] * 1000:.0f} ms per image (generation and detection)")


if __name__ == "__main__":
    main()
