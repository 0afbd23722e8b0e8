"""Peak memory of a streaming checkpoint merge (``sdlite.tools.merge_checkpoints``) against the size of its files.

    python -m benchmarks.merge_memory --model sdxl --dtype fp16 --tmpdir /tmp     # two ~5 GiB inputs
    python -m benchmarks.merge_memory --model sd15                                # two ~2 GiB inputs

Two random checkpoints of the full-size architecture are written (tensor by tensor, with sdlite's streaming writer),
then a weighted-sum merge of them runs in a fresh Python process that reports its peak resident set size (VmHWM);
so does a process that only imports sdlite and torch, the floor any merge pays. The files are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.measure import peak_rss
from benchmarks.models import DTYPES, MODELS, checkpoint_shapes

GiB = 1024 ** 3


def write_random(path: str, model: str, dtype: torch.dtype, seed: int) -> None:
    from sdlite.checkpoint.write import stream_safetensors

    shapes = checkpoint_shapes(MODELS[model])
    g = torch.Generator().manual_seed(seed)
    entries = [(k, tuple(s), dtype) for k, s in shapes.items()]
    stream_safetensors(path, entries, (torch.randn(s, generator=g).to(dtype) for _, s, _ in entries))


def worker(argv: list[str]) -> None:
    """In a fresh process: merge A and B into OUT (or, with no files, only import), print peak RSS as JSON."""
    import sdlite.tools

    start = time.perf_counter()
    if argv:
        a, b, out = argv
        sdlite.tools.merge_checkpoints(a, b, output=out, multiplier=0.3)
    print(json.dumps({"peak_rss": peak_rss(), "seconds": time.perf_counter() - start}))


def _run(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.merge_memory", "--worker", *args], check=True,
                          capture_output=True, text=True, cwd=os.getcwd())
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="sdxl")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--tmpdir", default=None)
    parser.add_argument("--worker", nargs="*", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker(args.worker)
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as folder:
        a, b, out = (os.path.join(folder, f"{n}.safetensors") for n in ("a", "b", "merged"))
        for seed, path in enumerate((a, b)):
            print(f"writing {path} …", file=sys.stderr)
            write_random(path, args.model, DTYPES[args.dtype], seed)
        floor = _run([])
        merged = _run([a, b, out])
        size = os.path.getsize(a)
    print(f"| model | dtype | each input | output | peak RSS of the merge | RSS of the import alone | time |\n"
          f"|---|---|---|---|---|---|---|\n"
          f"| {args.model} | {args.dtype} | {size / GiB:.2f} GiB | {size / GiB:.2f} GiB | "
          f"{merged['peak_rss'] / GiB:.2f} GiB | {floor['peak_rss'] / GiB:.2f} GiB | {merged['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
