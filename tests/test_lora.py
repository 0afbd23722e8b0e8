"""LoRA-family files on reduced SD1 and SDXL models: each format's merged weights against its formula (lorafiles.py),
injection = merge, exact removal, several files and weights, and the refusals (wrong family, unknown keys, shapes)."""

from __future__ import annotations

import hashlib
import zlib

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize

from sdlite.adapters.lora import lora_hash
from sdlite.errors import LoraError

from conftest import rel_err
from lorafiles import expected_weight, load_model, write_file

LYCORIS = ["lora", "locon_tucker", "loha", "loha_tucker", "lokr", "lokr_lowrank", "lokr_both", "lokr_tucker", "full",
           "dora", "dora_in"]
LAYOUTS = [(fmt, "kohya") for fmt in LYCORIS] + [("lora", "diffusers"), ("lora", "peft"), ("lora", "processor")]
# Every format on SD1 and SDXL; SD 2.x (linear proj_in, HF names on the open_clip ViT-H) with kohya and PEFT LoRAs.
CASES = [(family, *case) for family in ("sd1", "sdxl") for case in LAYOUTS] + [("sd2", "lora", "kohya"),
                                                                               ("sd2", "lora", "peft")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {family: load_model(family, tmp_path_factory.mktemp(family)) for family in ("sd1", "sd2", "sdxl")}


pytestmark = pytest.mark.usefixtures("take_off_loras")


def snapshot(pipe) -> dict[str, torch.Tensor]:
    modules = [pipe.unet, *pipe.text_encoders]
    return {f"{i}.{k}": v.clone() for i, m in enumerate(modules) for k, v in m.state_dict().items()}


def assert_restored(pipe, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(pipe)
    assert after.keys() == before.keys()  # no parametrization left behind
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"not restored bit for bit: {changed[:5]}"
    for m in [pipe.unet, *pipe.text_encoders]:
        assert not any(parametrize.is_parametrized(x) or "_lora_slots" in x.__dict__ for x in m.modules())


@torch.no_grad()
def outputs(pipe) -> list[torch.Tensor]:
    """UNet prediction and every text encoder's last hidden state on fixed inputs."""
    g = torch.Generator().manual_seed(7)
    c = pipe.unet.config
    x = torch.randn(2, c.in_channels, 8, 8, generator=g)
    context = torch.randn(2, 77, c.context_dim, generator=g)
    y = torch.randn(2, c.adm_in_channels, generator=g) if c.adm_in_channels else None
    out = [pipe.unet(x, torch.tensor([900.0, 100.0]), context, y=y)]
    tokens = torch.randint(0, 49407, (2, 77), generator=g)
    out += [te(tokens, layer=-1, final_norm=True).hidden for te in pipe.text_encoders]
    return out


@pytest.mark.parametrize("family,fmt,layout", CASES, ids=["-".join(case) for case in CASES])
def test_format_merges_its_formula_injects_the_same_and_removes_exactly(models, tmp_path, family, fmt, layout):
    model = models[family]
    pipe = model.pipe
    path = tmp_path / f"{fmt}.safetensors"
    written = write_file(path, model.layers, fmt, family, layout, seed=zlib.crc32(fmt.encode()))
    before = snapshot(pipe)
    originals = {name: (layer.weight.clone(), None if layer.bias is None else layer.bias.clone())
                 for name, (layer, _) in written.items()}
    weights = {"unet": 0.7, "te1": 0.4, "te2": 0.4}
    base = outputs(pipe)

    handle = pipe.add_lora(path, weight=0.7, te_weight=0.4)
    assert pipe.loras == [handle]
    assert not handle.report.unmatched and not handle.report.mismatched
    assert sorted(handle.report.matched) == sorted(load_file(str(path)))
    for name, (layer, tensors) in written.items():
        w, b = originals[name]
        m = weights[layer.component]
        # Compared as differences from the base weight, so that a small ΔW is checked as closely as a large one.
        assert rel_err(layer.weight - w, expected_weight(tensors, w, m) - w) < 1e-4, name
        if "diff_b" in tensors:
            assert rel_err(layer.bias - b, m * tensors["diff_b"]) < 1e-4, name
    merged = outputs(pipe)
    assert all(rel_err(x, y) > 1e-3 for x, y in zip(merged, base))
    handle.remove()
    assert pipe.loras == [] and not handle.active
    assert_restored(pipe, before)

    live = pipe.add_lora(path, weight=0.7, te_weight=0.4, mode="inject")
    for got, expected in zip(outputs(pipe), merged):
        assert rel_err(got, expected) < 1e-6
    live.remove()
    assert_restored(pipe, before)


def test_several_loras_and_weight_changes(models, tmp_path):
    model = models["sd1"]
    pipe = model.pipe
    before = snapshot(pipe)
    base = outputs(pipe)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_file(a, model.layers, "lora", "sd1", seed=1)
    write_file(b, model.layers, "loha", "sd1", seed=2)

    # Reference numbers: each file merged alone and on top of the other, at the weights used below.
    first = pipe.add_lora(a, weight=0.5)
    only_a = outputs(pipe)
    second = pipe.add_lora(b, weight=1.0, te_weight=0.25)
    both = outputs(pipe)
    assert pipe.loras == [first, second]
    first.remove()
    assert pipe.loras == [second]
    only_b = outputs(pipe)
    second.set_weight(0.0)
    assert all(rel_err(x, y) < 1e-6 for x, y in zip(outputs(pipe), base))
    second.remove()
    assert_restored(pipe, before)

    # Injected, the same files give the same numbers, and weights change without re-applying anything.
    live_a = pipe.add_lora(a, weight=0.5, mode="inject")
    live_b = pipe.add_lora(b, weight=1.0, te_weight=0.25, mode="inject")
    assert all(rel_err(x, y) < 1e-6 for x, y in zip(outputs(pipe), both))
    live_a.set_weight(0.0)
    assert all(rel_err(x, y) < 1e-6 for x, y in zip(outputs(pipe), only_b))
    live_a.set_weight(0.5)
    live_b.set_weight(0.0, te_weight=0.0)
    assert all(rel_err(x, y) < 1e-6 for x, y in zip(outputs(pipe), only_a))
    assert rel_err(outputs(pipe)[0], base[0]) > 1e-3  # the LoRA does change the output

    # A merged file and an injected one together.
    live_b.remove()
    merged_b = pipe.add_lora(b, weight=1.0, te_weight=0.25)
    assert all(rel_err(x, y) < 1e-5 for x, y in zip(outputs(pipe), both))
    live_a.remove()
    merged_b.remove()
    assert_restored(pipe, before)


def test_injected_at_strength_zero_is_not_computed(models, tmp_path):
    """A LoRA waiting at strength 0 (a region's, outside its region's calls) leaves each weight it would change the
    stored tensor itself: no ΔW is built, and the outputs are the base model's bit for bit."""
    from torch.nn.utils import parametrize

    model = models["sd1"]
    pipe = model.pipe
    base = outputs(pipe)
    path = tmp_path / "z.safetensors"
    write_file(path, model.layers, "loha", "sd1", seed=3)
    handle = pipe.add_lora(path, weight=0.0, mode="inject")
    try:
        changed = [m for m in [*pipe.unet.modules(), *pipe.text_encoders[0].modules()]
                   if parametrize.is_parametrized(m, "weight")]
        assert changed and all(m.weight is m.parametrizations.weight.original for m in changed)
        assert all(torch.equal(x, y) for x, y in zip(outputs(pipe), base))
        handle.set_weight(0.7)
        assert all(m.weight is not m.parametrizations.weight.original for m in changed)
        assert rel_err(outputs(pipe)[0], base[0]) > 1e-3
    finally:
        handle.remove()


def test_sdxl_lora_is_refused_by_sd1(models, tmp_path):
    path = tmp_path / "xl.safetensors"
    write_file(path, models["sdxl"].layers, "lora", "sdxl")
    before = snapshot(models["sd1"].pipe)
    with pytest.raises(LoraError, match=r"for SDXL \(it has a second text encoder .*the model is SD 1.x"):
        models["sd1"].pipe.add_lora(path)
    with pytest.raises(LoraError, match="for SDXL"):
        models["sd1"].pipe.add_lora(path, strict=False)
    assert_restored(models["sd1"].pipe, before)


def test_sd1_lora_is_refused_by_sdxl(models, tmp_path):
    path = tmp_path / "sd1.safetensors"
    write_file(path, models["sd1"].layers, "lora", "sd1", metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(LoraError, match=r"for SD 1.x \(its metadata says ss_base_model_version=sd_v1\).*SDXL"):
        models["sdxl"].pipe.add_lora(path)
    # Without metadata, kohya's single text encoder prefix gives it away.
    write_file(path, models["sd1"].layers, "lora", "sd1")
    with pytest.raises(LoraError, match=r"for SD 1.x or SD 2.x \(kohya writes one text encoder"):
        models["sdxl"].pipe.add_lora(path)


def test_unknown_keys_raise_or_warn(models, tmp_path):
    pipe = models["sd1"].pipe
    before = snapshot(pipe)
    path = tmp_path / "extra.safetensors"
    write_file(path, models["sd1"].layers[:3], "lora", "sd1")
    state = load_file(str(path))
    state["lora_unet_down_blocks_0_attentions_9_proj_in.lora_down.weight"] = torch.zeros(4, 64, 1, 1)
    state["lora_unet_down_blocks_0_attentions_9_proj_in.lora_up.weight"] = torch.zeros(64, 4, 1, 1)
    state["lora_unet_mid_block_attentions_0_proj_in.on_input"] = torch.zeros(1)  # LyCORIS IA3
    state["something_else"] = torch.zeros(1)
    save_file(state, str(path))
    with pytest.raises(LoraError, match=r"4 keys address no module .*IA3.*attentions_9_proj_in.lora_down.weight"):
        pipe.add_lora(path)
    assert_restored(pipe, before)
    with pytest.warns(UserWarning, match="4 keys address no module") as caught:
        handle = pipe.add_lora(path, strict=False)
    assert "something_else" in str(caught[0].message)
    assert sorted(handle.report.unmatched) == sorted(k for k in state if k not in handle.report.matched)
    assert len(handle.report.matched) == 9
    handle.remove()
    assert_restored(pipe, before)


def test_shape_mismatch_names_key_and_shapes(models, tmp_path):
    pipe = models["sd1"].pipe
    layer = next(l for l in models["sd1"].layers if l.dotted.endswith("attn2.to_k"))
    path = tmp_path / "bad.safetensors"
    name = "lora_unet_" + layer.dotted.replace(".", "_")
    out, inp = layer.weight.shape
    save_file({f"{name}.lora_down.weight": torch.zeros(4, inp + 1), f"{name}.lora_up.weight": torch.zeros(out, 4)},
              str(path))
    with pytest.raises(LoraError, match=rf"{name}.lora_down.weight \[4, {inp + 1}\].*of shape \[{out}, {inp}\]"):
        pipe.add_lora(path)


def test_inpainting_unet_takes_a_4_channel_conv_in_delta(tmp_path_factory, tmp_path):
    model = load_model("sd1", tmp_path_factory.mktemp("inpaint"), inpaint=True)
    conv_in = next(l for l in model.layers if l.ldm == "input_blocks.0.0")
    g = torch.Generator().manual_seed(0)
    down = torch.randn(4, 4, 3, 3, generator=g)  # made for a 4-channel conv_in
    up = torch.randn(conv_in.weight.shape[0], 4, 1, 1, generator=g)
    path = tmp_path / "conv_in.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up},
              str(path))
    original = conv_in.weight.clone()
    handle = model.pipe.add_lora(path, weight=0.5)
    delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    assert torch.equal(conv_in.weight[:, 4:], original[:, 4:])
    assert rel_err(conv_in.weight[:, :4], original[:, :4] + 0.5 * delta) < 1e-6
    handle.remove()
    assert torch.equal(conv_in.weight, original)


def test_lora_hash_is_a1111s_addnet_hash(tmp_path):
    path = tmp_path / "h.safetensors"
    save_file({"lora_te_x.alpha": torch.tensor(1.0)}, str(path), metadata={"ss_output_name": "h"})
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    expected = hashlib.sha256(data[8 + n:]).hexdigest()
    assert lora_hash(path) == expected[:12] and lora_hash(path, full=True) == expected
    save_file({"lora_te_x.alpha": torch.tensor(1.0)}, str(path), metadata={"sshs_model_hash": "ab" * 32})
    assert lora_hash(path) == "ab" * 6
    pickle_path = tmp_path / "h.pt"
    torch.save({"lora_te_x.alpha": torch.tensor(1.0)}, pickle_path)
    assert lora_hash(pickle_path) == hashlib.sha256(pickle_path.read_bytes()).hexdigest()[:12]
