"""A1111 infotext: written in its layout and quoting, parsed back as its parser reads it."""

from __future__ import annotations

import hashlib

from PIL import Image, PngImagePlugin

from sdlite.infotext import create_infotext, model_hash, parse_infotext, read_infotext

A1111_TEXT = """masterpiece, (best quality:1.2), a cat
drinking beer
Negative prompt: lowres, bad anatomy
Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, Clip skip: 2, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, Lora hashes: "foo: 0123456789ab, bar: ba9876543210", Version: v1.10.1"""


def test_parse_a1111_infotext():
    p = parse_infotext(A1111_TEXT)
    assert p["Prompt"] == "masterpiece, (best quality:1.2), a cat\ndrinking beer"
    assert p["Negative prompt"] == "lowres, bad anatomy"
    assert p["Steps"] == "20" and p["Sampler"] == "DPM++ 2M" and p["Schedule type"] == "Karras"
    assert p["Size-1"] == "512" and p["Size-2"] == "768"
    assert p["Lora hashes"] == "foo: 0123456789ab, bar: ba9876543210"
    assert p["Version"] == "v1.10.1" and p["Clip skip"] == "2"
    assert p["RNG"] == "GPU"  # A1111's default for infotexts that do not name one


def test_last_line_with_few_pairs_is_prompt():
    p = parse_infotext("a photo\nstyle: anime, mood")
    assert p["Prompt"] == "a photo\nstyle: anime, mood"
    assert "Steps" not in p and p["Schedule type"] == "Automatic"


def test_write_and_read_back():
    params = {"Steps": 20, "Sampler": "Euler a", "Schedule type": "Automatic", "CFG scale": 7.0, "Seed": 42,
              "Size": "512x512", "Model": "my, model: v2", "ENSD": None, "Tiling": "Tiling"}
    text = create_infotext("a cat", "ugly", params)
    assert text.splitlines()[-1] == ('Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 42, '
                                     'Size: 512x512, Model: "my, model: v2", Tiling')
    back = parse_infotext(text)
    assert back["Model"] == "my, model: v2" and back["CFG scale"] == "7" and back["Negative prompt"] == "ugly"
    assert "ENSD" not in back


def test_prompt_records_read_back():
    """The keys A1111's conditioning writes: TI hashes quoted (it holds ":" and ","), the others bare."""
    params = {"Steps": 4, "Seed": 1, "Old prompt editing timelines": True,
              "TI hashes": "easynegative: c74b4e810b03, style: 0123456789ab", "Emphasis": "No norm"}
    text = create_infotext("a (cat)", "", params)
    assert text.endswith('Old prompt editing timelines: True, '
                         'TI hashes: "easynegative: c74b4e810b03, style: 0123456789ab", Emphasis: No norm')
    back = parse_infotext(text)
    assert back["TI hashes"] == params["TI hashes"] and back["Emphasis"] == "No norm"
    assert back["Old prompt editing timelines"] == "True"


def test_png_round_trip(tmp_path):
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", A1111_TEXT)
    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=meta)
    assert read_infotext(path) == parse_infotext(A1111_TEXT)
    assert read_infotext(Image.open(path))["Seed"] == "1234"


def test_model_hashes(tmp_path):
    data = bytes(range(256)) * 8192  # 2 MiB
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    assert model_hash(path) == hashlib.sha256(data).hexdigest()[:10]
