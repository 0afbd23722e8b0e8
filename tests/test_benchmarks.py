"""The benchmark suite's code (benchmarks/) on tiny model specs: the random checkpoint, both implementations'
loaders, every measurement and the report, run in this process with no warm-up and one timed run.

Full-size runs are the suite's business (``python -m benchmarks run``); here the point is that each code path the
suite takes works, for an SD1-style file and an SDXL-style one (two text towers, the ADM vector), and that sdlite and
diffusers compute the same UNet step and VAE decode from the same file, as the timings assume.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.measure import (IMPLS, MEASUREMENTS, count_unet_flops, load, make_call, measure, measure_alternating,
                                unet_inputs)
from benchmarks.models import MODELS, ModelSpec, write_checkpoint
from benchmarks.suite import markdown_table, run_suite
from benchmarks.txt2img import PROMPT, _diffusers_tokenizer, tokenizer_dir, write_tokenizer

from conftest import rel_err  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

_TINY_VAE = dict(vae=dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
                 diffusers_vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                                    block_out_channels=[32, 32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 4,
                                    up_block_types=["UpDecoderBlock2D"] * 4, force_upcast=False))
_UNET = dict(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2), num_res_blocks=(1, 1),
             transformer_depth_middle=1)
_DIFFUSERS_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[64, 128])

TINY = {
    # SD1 layout: CLIP-L-style tower, convolutional transformer projections. 64-wide heads, as sdlite infers them
    # for a context other than SD1's 768.
    "tiny-sd1": ModelSpec(
        "tiny-sd1", "sd1", 64,
        dict(_UNET, transformer_depth=(1, 1), transformer_depth_output=(1, 1, 1, 1), context_dim=64,
             use_linear_in_transformer=False, head_dim=64),
        dict(_DIFFUSERS_UNET, down_block_types=["CrossAttnDownBlock2D"] * 2,
             up_block_types=["CrossAttnUpBlock2D"] * 2, cross_attention_dim=64, attention_head_dim=[1, 2]),
        (("cond_stage_model.transformer.", "clip", 64, 2, "quick_gelu", None),), **_TINY_VAE),
    # SDXL layout: two towers (the second with a projection for the pooled vector), the ADM vector, linear
    # projections, 64-wide heads, no attention at the first level.
    "tiny-sdxl": ModelSpec(
        "tiny-sdxl", "sdxl", 64,
        dict(_UNET, transformer_depth=(0, 1), transformer_depth_output=(1, 1, 0, 0), context_dim=64 + 128,
             use_linear_in_transformer=True, head_dim=64, adm_in_channels=128 + 6 * 256),
        dict(_DIFFUSERS_UNET, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
             up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[1, 2],
             cross_attention_dim=64 + 128, use_linear_projection=True, addition_embed_type="text_time",
             addition_time_embed_dim=256, projection_class_embeddings_input_dim=128 + 6 * 256),
        (("conditioner.embedders.0.transformer.", "clip", 64, 2, "quick_gelu", None),
         ("conditioner.embedders.1.model.", "openclip", 128, 2, "gelu", 128)),
        scale_factor=0.13025, adm=128 + 6 * 256, **_TINY_VAE),
}


@pytest.fixture(params=list(TINY))
def spec(request, monkeypatch):
    """A tiny spec, registered under its name as the suite's measurements look models up by name."""
    monkeypatch.setitem(MODELS, request.param, TINY[request.param])
    return TINY[request.param]


@torch.inference_mode()
def test_unet_and_vae_agree_across_implementations(spec, tmp_path):
    path = str(tmp_path / "tiny.safetensors")
    write_checkpoint(path, spec, dtype=torch.float32)
    for measurement in ("unet", "vae"):
        out = {impl: make_call(impl, measurement, spec, load(impl, measurement, spec, path, "cpu", torch.float32),
                               "cpu", torch.float32)() for impl in IMPLS}
        assert out["sdlite"].shape == out["diffusers"].shape
        assert rel_err(out["sdlite"], out["diffusers"]) < 1e-4, measurement


@torch.inference_mode()
def test_txt2img_gives_one_image_at_the_model_size(spec, tmp_path):
    path = str(tmp_path / "tiny.safetensors")
    write_checkpoint(path, spec, dtype=torch.float32)
    write_tokenizer(tokenizer_dir(path))
    for impl in IMPLS:
        pipe = load(impl, "txt2img", spec, path, "cpu", torch.float32)
        image = make_call(impl, "txt2img", spec, pipe, "cpu", torch.float32, steps=2)()
        assert image.shape == (spec.size, spec.size, 3) and image.dtype == torch.uint8, impl


def test_every_measurement_and_the_report(spec, tmp_path):
    report = run_suite([spec.name], "cpu", ["fp32"], list(MEASUREMENTS), ["eager"], warmup=0, reps=1, txt2img_reps=1,
                       tmpdir=str(tmp_path), log=lambda msg: None, runner=measure, processes=("fresh", "one"),
                       pair_runner=measure_alternating)
    rows = {(row["measurement"], row["processes"]): row for row in report["results"]}
    assert list(rows) == [(m, p) for m in MEASUREMENTS for p in ("fresh", "one")]
    for (name, processes), row in rows.items():
        assert "errors" not in row, row.get("errors")
        assert (row["model"], row["dtype"], row["path"]) == (spec.name, "fp32", "eager")
        for impl in IMPLS:
            r = row[impl]
            assert (r["impl"], r["measurement"], r["reps"]) == (impl, name, 1)
            assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"] and r["first_call_s"] > 0 and r["load_s"] > 0
            assert r["cpu_median_s"] > 0 and r["threads"] == torch.get_num_threads()
            assert r["checksum"] == r["checksum"]  # not NaN
            # one process holds both implementations: no peak memory of either's own
            assert r["peak_bytes"] > 0 if processes == "fresh" else r["peak_bytes"] is None
        assert row["ratio_time"] > 0 and row["ratio_cpu"] > 0
        assert (row["ratio_memory"] > 0) if processes == "fresh" else "ratio_memory" not in row
    for processes in ("fresh", "one"):
        unet = rows["unet", processes]
        assert unet["flops"] == count_unet_flops(spec) > 0
        assert unet["sdlite"]["gflops_per_s"] > 0
        # The same step's output from both (the comparison test above checks it closely).
        assert unet["sdlite"]["checksum"] == pytest.approx(unet["diffusers"]["checksum"], rel=1e-4)
        assert set(rows["txt2img", processes]["txt2img_over_unet_steps"]) == set(IMPLS)
    table = markdown_table(report)
    assert table.count(f"| {spec.name} |") == 2 * len(MEASUREMENTS)
    assert table.count("| one, alternating |") == len(MEASUREMENTS)
    assert "txt2img, 20 Euler steps, CFG, 64x64" in table


def test_unet_inputs_are_a_cfg_batch(spec):
    """An even batch is a CFG step as the pipelines make it: each image's latents in both halves, one timestep,
    a different context per row."""
    i = unet_inputs(spec, "cpu", torch.float32, batch=4)
    assert torch.equal(i["x"][:2], i["x"][2:]) and not torch.equal(i["x"][0], i["x"][1])
    assert not torch.equal(i["context"][:2], i["context"][2:])
    assert torch.equal(i["t"], torch.full((4,), 500.0))
    assert not torch.equal(*unet_inputs(spec, "cpu", torch.float32, batch=3)["x"][:2])


def test_diffusers_tokenizers_give_sdlite_ids(tmp_path):
    """The diffusers pipelines' tokenizers, from files written from sdlite's BPE merges, frame a prompt as sdlite
    does: padded with <|endoftext|> for CLIP-L, with "!" (id 0) for the OpenCLIP towers."""
    from sdlite.clip import EOS, get_tokenizer

    folder = tokenizer_dir(str(tmp_path / "model.safetensors"))
    write_tokenizer(folder)
    for layout, pad in (("clip", EOS), ("openclip", 0)):
        tokenizer = _diffusers_tokenizer(folder, layout)
        ids = tokenizer([PROMPT], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True)["input_ids"]
        assert ids == get_tokenizer()([PROMPT], pad_id=pad).tolist(), layout


def test_results_json_is_written_whole(tmp_path):
    from benchmarks.measure import write_json

    path = tmp_path / "r.json"
    write_json(str(path), {"ratio_time": 0.97, "args": {"reps": 5}})
    assert json.loads(path.read_text()) == {"ratio_time": 0.97, "args": {"reps": 5}}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # the temporary name is gone
