"""benchmarks/ip_adapter_step.py on a tiny SD1 spec: the four timed calls run, and sdlite and diffusers compute the
same UNet step with and without the adapter (so the timings compare the same work), the adapter changing it."""

from __future__ import annotations

import pytest
import torch

from benchmarks.ip_adapter_step import CONFIGS, build_calls, run

from conftest import rel_err
from test_benchmarks import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_the_benchmarked_calls_agree(variant):
    times, out = run(build_calls(TINY["tiny-sd1"], 64, variant), rounds=1, warmup=0)
    assert all(len(times[name]["wall"]) == len(times[name]["cpu"]) == 1 for name in CONFIGS)
    assert rel_err(out["sdlite"], out["diffusers"]) < 1e-4
    assert rel_err(out["sdlite + IP-Adapter"], out["diffusers + IP-Adapter"]) < 1e-4
    assert rel_err(out["sdlite + IP-Adapter"], out["sdlite"]) > 1e-3
    # the plain diffusers call after an adapter call runs without it again
    times, again = run(build_calls(TINY["tiny-sd1"], 64, variant), rounds=2, warmup=0)
    assert torch.equal(again["diffusers"], out["diffusers"])
