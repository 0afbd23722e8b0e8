"""Composition: MultiDiffusion windows for panoramas and large images (``tiles``), regional prompts with a LoRA per
region (``regions``), and what they write to the infotext (``record``). The generation core wraps its denoisers in
them (``sdlite.generate``)."""

from __future__ import annotations

from .regions import Region
from .tiles import Tiles

__all__ = ["Region", "Tiles", "check_composition"]


def check_composition(job) -> None:
    """The composition options of a job, checked before any work."""
    if job.tiling is not None:
        if not isinstance(job.tiling, Tiles):
            raise TypeError(f"tiling must be sdlite.Tiles(size=…, stride=…), got {type(job.tiling).__name__}")
        job.tiling.check()
        if job.t2i_adapters:
            raise ValueError("T2I-Adapter features are not cut into MultiDiffusion windows; use a ControlNet unit")
    for region in job.regions:
        if not isinstance(region, Region):
            raise TypeError(f"regions must be sdlite.Region objects, got {type(region).__name__}")
        region.check(job.width, job.height)
    if not 0.0 <= job.region_bootstrap <= 1.0:
        raise ValueError(f"region_bootstrap is a share of the sampler steps in [0, 1], got {job.region_bootstrap}")
