"""Loading original single-file checkpoints: families, file formats, set-aside keys, and clear refusals."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import save_file

import sdlite
from sdlite.checkpoint import TensorFile, open_tensor_file
from sdlite.checkpoint.load import plan_components
from sdlite.errors import CheckpointError, ShapeMismatchError, UnsafePickleError

from sdfiles import FULL_UNETS, UNETS, build, full_key_set
from sdlite.unet import UNetConfig, UNetModel

FAMILIES = ["sd1", "sd2", "sdxl", "sdxl-refiner"]


@pytest.fixture(scope="module")
def built():
    return {f: build(f) for f in FAMILIES} | {"sd1-inpaint": build("sd1", inpaint=True),
                                               "sdxl-inpaint": build("sdxl", inpaint=True)}


def write(state: dict, path, fmt: str = "safetensors", wrap: dict | None = None):
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, **(wrap or {})}, str(path))
    return path


def assert_loaded_exactly(pipe, state: dict, dtype=torch.float32):
    """Every module tensor equals the file's tensor at the original key."""
    prefixes = {"sd1": ["cond_stage_model.transformer."], "sd2": ["cond_stage_model.model."],
                "sdxl": ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."],
                "sdxl-refiner": ["conditioner.embedders.0.model."]}[pipe.family]
    modules = [("model.diffusion_model.", pipe.unet), ("first_stage_model.", pipe.vae)]
    modules += list(zip(prefixes, pipe.text_encoders))
    count = 0
    for prefix, module in modules:
        for key, value in module.state_dict().items():
            assert value.dtype == dtype, key
            assert torch.equal(value, state[prefix + key].to(dtype)), prefix + key
            count += 1
    assert count == len(state)


@pytest.mark.parametrize("name", list(FAMILIES) + ["sd1-inpaint", "sdxl-inpaint"])
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_families_load_strictly(built, tmp_path, name, fmt):
    b = built[name]
    path = write(b.state, tmp_path / f"model.{fmt}", fmt)
    pipe = sdlite.load(path)
    assert pipe.family == b.family
    assert pipe.is_inpaint == name.endswith("inpaint")
    assert pipe.vae.scale_factor == (0.13025 if b.family.startswith("sdxl") else 0.18215)
    assert_loaded_exactly(pipe, b.state)
    assert not pipe.unknown


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_and_targets(built, tmp_path, dtype):
    state = {k: v.to(dtype) for k, v in built["sd1"].state.items()}
    path = write(state, tmp_path / "half.safetensors")
    assert_loaded_exactly(sdlite.load(path, dtype=torch.float32), state, torch.float32)
    assert_loaded_exactly(sdlite.load(path, dtype=dtype), state, dtype)
    full = write(built["sd1"].state, tmp_path / "full.safetensors")
    assert sdlite.load(full, dtype=dtype).unet.out[2].weight.dtype == dtype


def test_training_leftovers_are_set_aside(built, tmp_path):
    state = dict(built["sd1"].state)
    leftovers = {"betas": torch.rand(1000), "alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999),
                 "model_ema.num_updates": torch.tensor(5), "model_ema.diffusion_modelout2weight": torch.rand(4, 64, 3, 3),
                 "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
                 "lvlb_weights": torch.rand(1000), "denoiser.sigmas": torch.rand(1000)}
    path = write(state | leftovers, tmp_path / "m.ckpt", "ckpt", wrap={"global_step": 470000, "epoch": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = sdlite.load(path)
    assert sorted(pipe.set_aside) == sorted(leftovers)
    assert_loaded_exactly(pipe, state)


def test_unknown_keys_are_reported_not_dropped_silently(built, tmp_path):
    path = write(built["sd1"].state | {"embedding_manager.foo": torch.zeros(3)}, tmp_path / "m.safetensors")
    with pytest.warns(UserWarning, match="embedding_manager.foo"):
        pipe = sdlite.load(path)
    assert pipe.unknown == ["embedding_manager.foo"]


def test_legacy_clip_keys_without_text_model(built, tmp_path):
    prefix = "cond_stage_model.transformer.text_model."
    state = {k.replace(prefix, "cond_stage_model.transformer."): v for k, v in built["sd1"].state.items()}
    pipe = sdlite.load(write(state, tmp_path / "old.safetensors"))
    assert torch.equal(pipe.text_encoders[0].state_dict()["text_model.final_layer_norm.weight"],
                       state["cond_stage_model.transformer.final_layer_norm.weight"])


def test_sd2_prediction_heuristic_and_override(built, tmp_path):
    state = dict(built["sd2"].state)
    key = "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.norm1.bias"
    state[key] = torch.randn(state[key].shape) * 0.2  # the released 768-v model's bias spread
    path = write(state, tmp_path / "v.safetensors")
    assert sdlite.load(path).prediction == "v"
    assert sdlite.load(path, prediction="eps").prediction == "eps"
    state[key] = torch.randn(state[key].shape) * 0.02
    assert sdlite.load(write(state, tmp_path / "eps.safetensors")).prediction == "eps"
    assert sdlite.load(write(built["sd1"].state, tmp_path / "sd1.safetensors")).prediction == "eps"
    with pytest.raises(ValueError, match="prediction"):
        sdlite.load(path, prediction="x0")


def test_sdxl_v_pred_marker(built, tmp_path):
    path = write(built["sdxl"].state | {"v_pred": torch.tensor([])}, tmp_path / "v.safetensors")
    pipe = sdlite.load(path)
    assert pipe.prediction == "v" and "v_pred" in pipe.set_aside


# --- refusals -------------------------------------------------------------------------------------------------


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        sdlite.load(junk)
    with pytest.raises(CheckpointError, match="no such file"):
        sdlite.load(tmp_path / "missing.safetensors")
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.ckpt"):
        sdlite.load(text)


def test_truncated_files(built, tmp_path):
    for fmt in ("safetensors", "ckpt"):
        path = write(built["sd1"].state, tmp_path / f"m.{fmt}", fmt)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=f"m.{fmt}") as info:
            sdlite.load(path)
        if fmt == "safetensors":
            assert "truncated" in str(info.value)


def test_safetensors_reads_across_remappings_and_never_write_the_file(tmp_path, monkeypatch):
    from sdlite.checkpoint import files

    state = {f"t{i}": torch.randn(64, 64) for i in range(8)}
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    before = path.read_bytes()
    monkeypatch.setattr(files, "REMAP_BYTES", 3 * 64 * 64 * 4)  # a new mapping every third tensor
    with open_tensor_file(path) as tf:
        got = {k: tf.read(k) for k in state}  # same dtype on the CPU: tensors backed by the file's mappings
        half = {k: tf.read(k, torch.float16) for k in state}
    for key, value in state.items():
        assert torch.equal(got[key], value) and torch.equal(half[key], value.half())
        got[key] += 1  # the mapping is private: changing the weights never changes the file
    assert path.read_bytes() == before


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("header_length", [0x180, 0x280, 0x350])
def test_safetensors_header_length_that_starts_like_a_pickle(tmp_path, header_length):
    """A safetensors file begins with its header's length: a first byte of 0x80 (a pickle's protocol mark) must not
    make it a pickle. Written by the safetensors library, its header padded to the length wanted."""
    from safetensors import safe_open

    path = tmp_path / "m.safetensors"
    tensors = {"w": torch.arange(4, dtype=torch.float32)}
    pad = 0
    while True:  # metadata of a growing length until the library's (8-byte aligned) header has the length asked
        save_file(tensors, str(path), metadata={"modelspec.resolution": "64x64", "pad": "x" * pad})
        length = int.from_bytes(path.read_bytes()[:8], "little")
        if length >= header_length:
            break
        pad += 1
    assert length == header_length and path.read_bytes()[0] == header_length & 0xFF
    with open_tensor_file(path) as tf:
        assert type(tf).__name__ == "SafetensorsFile" and tf.metadata["modelspec.resolution"] == "64x64"
        assert torch.equal(tf.read("w"), tensors["w"])
    with safe_open(str(path), "pt") as f:  # the library reads the same file
        assert f.metadata()["modelspec.resolution"] == "64x64"


def test_pickle_with_code_is_refused_and_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Exploit()}, path)
    with pytest.raises(UnsafePickleError, match="os.system|posix.system|refused"):
        sdlite.load(path)
    assert not (tmp_path / "PWNED").exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Exploit(), protocol=2))
    with pytest.raises(UnsafePickleError):
        sdlite.load(raw)
    assert not (tmp_path / "PWNED").exists()


def test_lightning_callback_in_old_ckpt_is_read_as_data(built, tmp_path):
    script = textwrap.dedent(f"""
        import sys, types, torch
        from safetensors.torch import load_file
        mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
        class ModelCheckpoint:
            pass
        ModelCheckpoint.__module__ = mod.__name__
        mod.ModelCheckpoint = ModelCheckpoint
        for name in ["pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__]:
            sys.modules[name] = mod if name == mod.__name__ else types.ModuleType(name)
        cb = ModelCheckpoint(); cb.monitor = None; cb.best_model_score = torch.tensor(0.5)
        state = load_file(sys.argv[1])
        torch.save({{"state_dict": state, "global_step": 1, "callbacks": {{ModelCheckpoint: cb}}}}, sys.argv[2])
    """)
    src = write(built["sd1"].state, tmp_path / "src.safetensors")
    subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / "old.ckpt")], check=True)
    pipe = sdlite.load(tmp_path / "old.ckpt")
    assert pipe.family == "sd1"


@pytest.mark.parametrize("state, message", [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}, "LoRA"),
    ({"control_model.zero_convs.0.0.weight": torch.zeros(320, 320, 1, 1),
      "control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}, "ControlNet"),
    ({"encoder.conv_in.weight": torch.zeros(128, 3, 3, 3), "decoder.conv_out.weight": torch.zeros(3, 128, 3, 3)},
     "standalone VAE"),
    ({"emb_params": torch.zeros(2, 768)}, "textual-inversion"),
    ({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(320, 320, 3, 3)}, "diffusers layout"),
    ({"something.else": torch.zeros(3)}, "not a Stable Diffusion checkpoint"),
])
def test_other_kinds_of_file_are_named(tmp_path, state, message):
    with pytest.raises(CheckpointError, match=message):
        sdlite.load(write(state, tmp_path / "thing.safetensors"))


def test_missing_component(built, tmp_path):
    state = {k: v for k, v in built["sd1"].state.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(CheckpointError, match=r"first_stage_model\.\* \(VAE\)"):
        sdlite.load(write(state, tmp_path / "m.safetensors"))


def test_missing_key_and_wrong_shape_name_the_key(built, tmp_path):
    state = dict(built["sd1"].state)
    del state["first_stage_model.decoder.up.0.block.0.conv1.bias"]
    with pytest.raises(CheckpointError, match=r"m1.safetensors.*missing keys: first_stage_model.decoder.up.0.block.0.conv1.bias"):
        sdlite.load(write(state, tmp_path / "m1.safetensors"))
    state = dict(built["sd1"].state)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    state[key] = torch.zeros(64, 32)
    with pytest.raises(ShapeMismatchError, match=r"to_q.weight.*\[64, 32\].*\[64, 64\]"):
        sdlite.load(write(state, tmp_path / "m2.safetensors"))


def test_context_width_must_match_text_encoder(built, tmp_path):
    state = dict(built["sd1"].state)
    for k in [k for k in state if "attn2.to_k" in k or "attn2.to_v" in k]:
        state[k] = torch.zeros(state[k].shape[0], 96)
    with pytest.raises(CheckpointError, match="96-wide context"):
        sdlite.load(write(state, tmp_path / "m.safetensors"))


def test_tensor_file_reads_shapes_without_data(built, tmp_path):
    path = write(built["sd1"].state, tmp_path / "m.safetensors")
    with open_tensor_file(path) as tf:
        assert set(tf.keys()) == set(built["sd1"].state)
        key = "model.diffusion_model.out.2.weight"
        assert tf.shapes[key] == tuple(built["sd1"].state[key].shape)
        assert torch.equal(tf.read(key), built["sd1"].state[key])
        assert tf.read(key, torch.float16).dtype == torch.float16


def test_peak_memory_while_loading_stays_near_model_size(tmp_path):
    """Peak RSS growth while loading a ~200 MB fp16 file into fp32 stays under 1.3x the loaded model's size."""
    script = textwrap.dedent("""
        import resource, sys, torch, sdlite
        from sdlite.clip import get_tokenizer
        get_tokenizer()
        import gc; gc.collect()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        pipe = sdlite.load(sys.argv[1])
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        size = sum(p.numel() * p.element_size() for m in [pipe.unet, pipe.vae, *pipe.text_encoders]
                   for p in m.parameters())
        print((peak - base) * 1024 / size)
    """)
    spec = dict(UNETS["sd1"], model_channels=192, channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2),
                transformer_depth=(1,) * 6, transformer_depth_output=(1,) * 9)
    with torch.device("meta"):
        shapes = UNetModel(UNetConfig(**spec)).state_dict()
    g = torch.Generator().manual_seed(0)
    state = {k: v.half() for k, v in build("sd1").state.items() if not k.startswith("model.diffusion_model.")}
    state |= {f"model.diffusion_model.{k}": torch.randn(v.shape, generator=g).half() for k, v in shapes.items()}
    path = write(state, tmp_path / "big.safetensors")
    out = subprocess.run([sys.executable, "-c", script, str(path)], check=True, capture_output=True, text=True)
    ratio = float(out.stdout.strip().splitlines()[-1])
    assert ratio < 1.3, ratio


class ShapeOnlyFile(TensorFile):
    """A checkpoint's key set without data: enough to identify it and plan every component."""

    def __init__(self, shapes: dict):
        super().__init__("released.safetensors", shapes, {k: torch.float16 for k in shapes}, {}, {})

    def _read(self, key):
        return torch.zeros(self.shapes[key], dtype=torch.float16)


@pytest.mark.parametrize("release, family, widths", [
    ("sd15", "sd1", [768]), ("sd15-inpaint", "sd1", [768]), ("sd21", "sd2", [1024]),
    ("sdxl", "sdxl", [768, 1280]), ("sdxl-inpaint", "sdxl", [768, 1280]), ("sdxl_refiner", "sdxl-refiner", [1280]),
])
def test_released_key_sets_are_identified_and_planned(release, family, widths):
    shapes = full_key_set(release)
    plan = plan_components(ShapeOnlyFile(shapes))
    assert plan.found.family == family
    unet, vae, *text = [p.module.config for p in plan.plans]
    name = release.partition("-")[0]
    assert unet == UNetConfig(**dict(FULL_UNETS[name], in_channels=9 if release.endswith("inpaint") else 4))
    assert (vae.ch, vae.ch_mult, vae.num_res_blocks, vae.z_channels) == (128, (1, 2, 4, 4), 2, 4)
    assert [t.width for t in text] == widths
    assert [t.layers for t in text] == [{768: 12, 1024: 24, 1280: 32}[w] for w in widths]
    assert [t.heads for t in text] == [w // 64 for w in widths]
    assert sum(len(p.sources) for p in plan.plans) + len(plan.set_aside) == len(shapes)
