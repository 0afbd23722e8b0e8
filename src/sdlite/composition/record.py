"""What a composed generation writes to its infotext and reads back (``--from-png``), and the CLI's spellings.

Infotext keys (sdlite's own; A1111 has no built-in equivalent): ``Tile size``, ``Tile stride`` (latent pixels),
``Tile weights`` (only when "gaussian"), ``Tile circular`` (only when on); ``Regions``: a JSON list with one object per
region (``prompt``, ``box`` as given, ``weight`` unless 1, ``negative`` when set, ``loras`` as [file name, weight]
pairs; a mask image is recorded as ``"mask": "image"`` and cannot be rebuilt); ``Region bootstrap`` when above 0.
"""

from __future__ import annotations

import json
import os

from .regions import Region
from .tiles import Tiles


def infotext_params(job) -> dict:
    params: dict = {}
    if job.tiling is not None:
        params.update(job.tiling.infotext())
    if job.regions:
        params["Regions"] = json.dumps([_region_record(r) for r in job.regions], ensure_ascii=False)
        params["Region bootstrap"] = float(job.region_bootstrap) if job.region_bootstrap else None
    return params


def _region_record(region: Region) -> dict:
    record: dict = {"prompt": region.prompt}
    if region.box is not None:
        record["box"] = [int(v) if v.is_integer() and max(region.box) > 1 else v for v in region.box]
    else:
        record["mask"] = "image"
    if region.weight != 1:
        record["weight"] = region.weight
    if region.negative is not None:
        record["negative"] = region.negative
    if region.loras:
        record["loras"] = [[os.path.basename(str(name)), float(w)] for name, w in region.loras]
    return record


def options_from_infotext(params: dict) -> dict:
    """Job options for the composition keys of a parsed infotext (``sdlite.infotext.parse_infotext``)."""
    options: dict = {}
    tiles = Tiles.from_infotext(params)
    if tiles is not None:
        options["tiling"] = tiles
    if "Regions" in params:
        regions = []
        for record in json.loads(params["Regions"]):
            if "box" not in record:
                raise ValueError(f"the infotext's region {record.get('prompt')!r} used a mask image, which the "
                                 "infotext does not hold: give it again as Region(prompt, mask)")
            regions.append(Region(record["prompt"], box=tuple(record["box"]), weight=record.get("weight", 1.0),
                                  negative=record.get("negative"),
                                  loras=[tuple(pair) for pair in record.get("loras", [])] or None))
        options["regions"] = regions
    if "Region bootstrap" in params:
        options["region_bootstrap"] = float(params["Region bootstrap"])
    return options


def parse_tile(text: str) -> Tiles:
    """``SIZE:STRIDE`` with optional ``:gaussian`` and ``:circular`` (the CLI's ``--tile 64:48``)."""
    size, _, rest = text.partition(":")
    stride, *flags = rest.split(":") if rest else [size]
    unknown = set(flags) - {"gaussian", "uniform", "circular"}
    if unknown or not size.isdigit() or not stride.isdigit():
        raise ValueError(f"--tile takes SIZE:STRIDE[:gaussian][:circular] in latent pixels, got {text!r}")
    return Tiles(size=int(size), stride=int(stride), weights="gaussian" if "gaussian" in flags else "uniform",
                 circular="circular" in flags)


def parse_region(text: str) -> Region:
    """``x,y,w,h:prompt`` (pixels, or fractions of the image when every number is at most 1)."""
    box, sep, prompt = text.partition(":")
    try:
        numbers = tuple(float(v) for v in box.split(","))
    except ValueError:
        numbers = ()
    if not sep or len(numbers) != 4:
        raise ValueError(f"--region takes \"x,y,w,h:prompt\", got {text!r}")
    return Region(prompt.strip(), box=numbers)
