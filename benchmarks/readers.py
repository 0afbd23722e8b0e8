"""Which safetensors reader sdlite should use: peak RSS and load time of reading a whole checkpoint.

``python -m benchmarks.readers --models sd15,sdxl --tmpdir /tmp`` writes each model's random fp16 checkpoint
(``benchmarks.models.write_checkpoint``), then for every reader and target dtype starts a fresh Python process that
reads every tensor of the file into that dtype and keeps it, as a model load does, and reports the wall time and
the process's peak resident memory (VmHWM of /proc/self/status, which counts file pages a mapping has touched).

Readers: ``positioned`` is the hand-written parser sdlite used before (``os.preadv`` straight into each tensor's own
buffer, kept here only as the measured alternative); ``safe_open`` is ``safetensors.safe_open(framework="pt")`` with
``get_tensor`` (the file memory-mapped), ``safe_open_pread`` the same with ``backend="pread"`` (safetensors >= 0.8);
``sdlite`` is whatever ``sdlite.checkpoint.files.open_tensor_file`` does now (``SDLITE_SRC`` picks the checkout).
Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import statistics
import tempfile

SRC = os.environ.get("SDLITE_SRC", "src")  # the sdlite tree the children import (another checkout's, to compare)

_CHILD = r"""
import json, os, struct, sys, time
import torch
import sdlite  # every reader pays the same imports
path, reader, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
DT = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16}


def positioned():
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        out = {}
        for key, e in header.items():
            t = torch.empty(e["shape"], dtype=DT[e["dtype"]])
            begin, end = e["data_offsets"]
            if end > begin:
                os.preadv(f.fileno(), [memoryview(t.reshape(-1).view(torch.uint8).numpy())], 8 + n + begin)
            out[key] = t.to(dtype)
        return out


def safe_open(backend="mmap"):
    from safetensors import safe_open as open_
    with open_(path, framework="pt", backend=backend) as f:
        return {key: f.get_tensor(key).to(dtype) for key in f.keys()}


def current():
    from sdlite.checkpoint.files import open_tensor_file
    with open_tensor_file(path) as f:
        return {key: f.read(key, dtype) for key in f.keys()}


start = time.perf_counter()
readers = {"positioned": positioned, "safe_open": safe_open, "safe_open_pread": lambda: safe_open("pread"),
           "sdlite": current}
tensors = readers[reader]()
loaded = time.perf_counter()
# A model uses every weight: read one byte per page, so that tensors still backed by a file mapping are paged in.
for t in tensors.values():
    if t.numel():
        t.reshape(-1).view(torch.uint8)[::4096].sum()
touched = time.perf_counter()
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"load": loaded - start, "touch": touched - loaded,
                  "peak_rss_gib": int(status["VmHWM"].split()[0]) / 2**20}))
"""


READERS = ("positioned", "safe_open", "safe_open_pread", "sdlite")


def measure(path: str, reader: str, dtype: str) -> dict:
    """One fresh process reading the whole file with ``reader`` into ``dtype``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _CHILD, path, reader, dtype], check=True, capture_output=True,
                         text=True, env=env)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd15", help="comma-separated: sd15, sd21, sdxl")
    parser.add_argument("--dtypes", default="float16,float32", help="target dtypes of the read")
    parser.add_argument("--reps", type=int, default=3, help="fresh processes per reader and dtype (median kept)")
    parser.add_argument("--readers", default=",".join(READERS), help="comma-separated: " + ", ".join(READERS))
    parser.add_argument("--tmpdir", default=tempfile.gettempdir())
    args = parser.parse_args()
    from benchmarks.models import MODELS, write_checkpoint

    print("| model | file GiB | reader | into | load s | first use s | peak RSS GiB |\n|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        path = os.path.join(args.tmpdir, f"sdlite-readers-{name}.safetensors")
        try:
            write_checkpoint(path, MODELS[name], dtype=__import__("torch").float16)
            size = os.path.getsize(path) / 2**30
            with open(path, "rb") as f:  # every run then reads from the page cache, as the first does
                while f.read(1 << 26):
                    pass
            for dtype in args.dtypes.split(","):
                runs: dict[str, list[dict]] = {r: [] for r in args.readers.split(",")}
                for _ in range(args.reps):  # readers interleaved, so that a busy machine slows each alike
                    for reader in runs:
                        runs[reader].append(measure(path, reader, dtype))
                for reader, rs in runs.items():
                    load, touch = (statistics.median(r[k] for r in rs) for k in ("load", "touch"))
                    peak = max(r["peak_rss_gib"] for r in rs)
                    print(f"| {name} | {size:.2f} | {reader} | {dtype} | {load:.2f} | {touch:.2f} | {peak:.2f} |",
                          flush=True)
        finally:
            if os.path.exists(path):
                os.unlink(path)


if __name__ == "__main__":
    main()
