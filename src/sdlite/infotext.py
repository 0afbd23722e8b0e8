"""AUTOMATIC1111's "infotext": the generation parameters stored in a PNG's ``parameters`` text chunk.

Layout (A1111 1.10 ``processing.create_infotext``)::

    <prompt, may span lines>
    Negative prompt: <negative prompt, may span lines>
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: …

A value containing "," ":" or a newline is written as a JSON string. Parsing follows
``infotext_utils.parse_generation_parameters``: the last line is the parameter line only if it holds at least three
``key: value`` pairs; quoted values are JSON-decoded; ``WxH`` values also give ``Key-1`` (W) and ``Key-2`` (H).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Mapping

from PIL import Image

_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")

# Keys A1111 fills in when an infotext lacks them (parse_generation_parameters), so old PNGs read the same.
_DEFAULTS = {"Clip skip": "1", "Hires resize-1": 0, "Hires resize-2": 0, "Hires sampler": "Use same sampler",
             "Hires checkpoint": "Use same checkpoint", "RNG": "GPU", "Schedule type": "Automatic"}


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def format_number(value: float) -> str:
    """Numbers as A1111 prints them: 7.0 → "7", 0.75 → "0.75"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def create_infotext(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """The infotext of one image; ``params`` in A1111's order, None values dropped, a value equal to its key written
    as the bare key."""
    pairs = []
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, float):
            value = format_number(value)
        pairs.append(key if value == key else f"{key}: {_quote(value)}")
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(pairs)}".strip()


def parse_infotext(text: str) -> dict[str, Any]:
    """Infotext → dict with "Prompt", "Negative prompt" and every parameter (values as strings, sizes split)."""
    lines = text.strip().split("\n")
    result: dict[str, Any] = {}
    last = lines[-1] if lines else ""
    if len(_PAIR.findall(last)) >= 3:
        lines = lines[:-1]
    else:
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result["Prompt"] = "\n".join(prompt)
    result["Negative prompt"] = "\n".join(negative)
    for key, value in _PAIR.findall(last):
        key = key.strip()
        value = value.strip()
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        size = _SIZE.match(value) if isinstance(value, str) else None
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size[1], size[2]
        result[key] = value
    for key, value in _DEFAULTS.items():
        result.setdefault(key, value)
    return result


def read_infotext(source: str | os.PathLike | Image.Image) -> dict[str, Any]:
    """A1111 parameters from a PNG (path or PIL image) or from infotext itself."""
    if isinstance(source, Image.Image):
        text = source.info.get("parameters")
    elif isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
        with Image.open(source) as image:
            text = image.info.get("parameters")
    else:
        text = str(source)
    if text is None:
        raise ValueError(f"{source}: the image has no 'parameters' text chunk (no A1111 infotext)")
    return parse_infotext(text)


def model_hash(path: str | os.PathLike) -> str:
    """A1111's "Model hash": the first 10 hex digits of the file's sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]

