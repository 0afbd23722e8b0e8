"""Checkpoint merging: A1111's formulas key by key, block weights on their blocks, inpainting models, LoRAs baked
in (against sdlite's own LoRA loader, which test_lora_references checks against diffusers, PEFT and LyCORIS), the
merge recipe metadata, and refusals that leave no file."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sdlite
from sdlite.cli import main
from sdlite.tools import ToolError, block_names, merge_checkpoints
from sdlite.tools.blocks import block_count

from lorafiles import load_model, write_file
from sdfiles import build, full_key_set


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge")
    paths = {}
    for name, seed in (("a", 0), ("b", 10), ("c", 20)):
        state = build("sd1", seed=seed).state
        state[f"model.only_{name}"] = torch.full((2,), float(seed))  # merged by name ("model"), in one file only
        state["betas"] = torch.full((3,), float(seed))  # no "model" in the name: A's is kept
        if name == "c":
            del state["model.diffusion_model.out.2.bias"]  # B − C for this key counts as nothing
        paths[name] = folder / f"{name}.safetensors"
        save_file(state, str(paths[name]))
    paths["inpaint"] = folder / "inpaint.safetensors"
    save_file(build("sd1", inpaint=True, seed=30).state, str(paths["inpaint"]))
    paths["xl"] = folder / "xl.safetensors"
    save_file(build("sdxl", seed=40).state, str(paths["xl"]))
    return paths


def expected_block(key: str, count: int) -> str:
    """The merge-block-weighted assignment, spelled out for the test."""
    rest = key.removeprefix("model.diffusion_model.")
    if rest == key:
        return "BASE"
    if rest.startswith(("time_embed.", "label_emb.")):
        return "IN00"
    if rest.startswith("out."):
        return f"OUT{count - 1:02d}"
    part, index = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.", rest).groups()
    return "M00" if part == "middle_block" else {"input_blocks": "IN", "output_blocks": "OUT"}[part] + f"{int(index):02d}"


def test_weighted_sum_and_add_difference_are_exact_per_key(files, tmp_path):
    a, b, c = (load_file(str(files[n])) for n in "abc")
    ws = merge_checkpoints(files["a"], files["b"], output=tmp_path / "ws.safetensors", multiplier=0.3)
    ad = merge_checkpoints(files["a"], files["b"], files["c"], mode="add-difference",
                           output=tmp_path / "ad.safetensors", multiplier=0.7)
    ni = merge_checkpoints(files["a"], mode="no-interpolation", output=tmp_path / "ni.safetensors")
    out_ws, out_ad, out_ni = (load_file(str(r.path)) for r in (ws, ad, ni))
    assert set(out_ws) == set(out_ad) == set(a)  # keys only in B are dropped, only in A kept
    for key, va in a.items():
        assert torch.equal(out_ni[key], va)
        if key in ("betas", "model.only_a") or key.endswith("position_ids"):
            assert torch.equal(out_ws[key], va) and torch.equal(out_ad[key], va)
            continue
        assert torch.equal(out_ws[key], (1 - 0.3) * va + 0.3 * b[key]), key
        want = va if key not in c else va + 0.7 * (b[key] - c[key])
        assert torch.equal(out_ad[key], want), key
    assert any("only in A" in n for n in ws.notes) and any("only in B" in n for n in ws.notes)
    assert any("missing in C" in n for n in ad.notes)
    assert ws.model_hash == hashlib.sha256(ws.path.read_bytes()).hexdigest()[:10]


def test_merge_recipe_metadata(files, tmp_path):
    out = merge_checkpoints(files["a"], files["b"], output=tmp_path / "m.safetensors", multiplier=0.25,
                            dtype="fp16").path
    again = merge_checkpoints(out, files["c"], output=tmp_path / "m2.safetensors", multiplier=0.5).path
    sha = {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in (("a", files["a"]), ("b", files["b"]),
                                                                       ("c", files["c"]), ("m", out))}
    with safe_open(str(again), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16  # A's dtype (fp16)
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["interp_method"] == "Weighted sum" and recipe["multiplier"] == 0.5
    assert (recipe["primary_model_hash"], recipe["secondary_model_hash"]) == (sha["m"], sha["c"])
    assert recipe["tertiary_model_hash"] is None
    models = json.loads(meta["sd_merge_models"])
    # The first merge's inputs come along with its own recipe, as A1111 chains them.
    assert set(models) == {sha["m"], sha["c"], sha["a"], sha["b"]}
    assert models[sha["m"]]["sd_merge_recipe"]["save_as_half"] is True
    assert models[sha["a"]]["name"] == "a.safetensors"


def test_block_weights_land_on_their_blocks(files, tmp_path):
    a, b = load_file(str(files["a"])), load_file(str(files["b"]))
    count = block_count(a)
    names = block_names(count)
    weights = [(i + 1) / 50 for i in range(len(names))]
    out = load_file(str(merge_checkpoints(files["a"], files["b"], output=tmp_path / "mbw.safetensors",
                                          blocks=weights, base_multiplier=0.9).path))
    seen = set()
    for key, va in a.items():
        if key == "betas" or key.endswith("position_ids") or key not in b:
            continue
        block = expected_block(key, count)
        w = 0.9 if block == "BASE" else weights[names.index(block)]
        seen.add(block)
        assert torch.equal(out[key], (1 - w) * va + w * b[key]), (key, block)
    assert seen == set(names) | {"BASE"}


def test_block_names_of_the_released_models():
    assert block_names(block_count(full_key_set("sd15"))) == (
        [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)])
    assert len(block_names(block_count(full_key_set("sd21")))) == 25
    assert block_names(block_count(full_key_set("sdxl"))) == (
        [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)])


def test_inpainting_a_merges_its_first_four_channels(files, tmp_path):
    a, b = load_file(str(files["inpaint"])), load_file(str(files["b"]))
    result = merge_checkpoints(files["inpaint"], files["b"], output=tmp_path / "ip.safetensors", multiplier=0.4)
    out = load_file(str(result.path))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert out[key].shape == a[key].shape == (64, 9, 3, 3)
    assert torch.equal(out[key][:, :4], 0.6 * a[key][:, :4] + 0.4 * b[key])
    assert torch.equal(out[key][:, 4:], a[key][:, 4:])
    assert any("inpainting" in n for n in result.notes)
    assert sdlite.load(result.path).is_inpaint
    with pytest.raises(ToolError, match="must be A"):
        merge_checkpoints(files["b"], files["inpaint"], output=tmp_path / "no.safetensors")
    assert not (tmp_path / "no.safetensors").exists()


def test_other_families_are_refused_before_writing(files, tmp_path):
    with pytest.raises(ToolError, match="different families"):
        merge_checkpoints(files["a"], files["xl"], output=tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["lora", "loha"])
def test_loras_baked_in_equal_sdlites_merge(tmp_path, fmt):
    model = load_model("sd1", tmp_path)
    lora = tmp_path / "style.safetensors"
    write_file(lora, model.layers, fmt, "sd1", seed=3)
    result = merge_checkpoints(tmp_path / "model.safetensors", mode="no-interpolation",
                               output=tmp_path / "baked.safetensors", loras=[(lora, 0.7, 0.4)])
    assert "applied" in result.notes[-1]
    baked = sdlite.load(result.path)
    model.pipe.add_lora(lora, weight=0.7, te_weight=0.4)
    for ours, theirs in ((baked.unet, model.pipe.unet), (baked.text_encoders[0], model.pipe.text_encoders[0])):
        for (k, v), (k2, v2) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert k == k2 and torch.equal(v, v2), k


def test_cli_merge_and_refusals(files, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert main(["merge", str(files["a"]), str(files["b"]), "-m", "0.25", "-o", str(out)]) == 0
    text = capsys.readouterr()
    assert "model hash" in text.out and "/" in text.err  # the report, and the progress bar
    a, b, got = load_file(str(files["a"])), load_file(str(files["b"])), load_file(str(out))
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert torch.equal(got[key], 0.75 * a[key] + 0.25 * b[key])
    before = files["a"].read_bytes()
    assert main(["merge", str(files["a"]), str(files["b"]), "-o", str(files["a"])]) == 2
    assert "never overwrites" in capsys.readouterr().err and files["a"].read_bytes() == before
    assert main(["merge", str(files["a"]), str(files["b"]), "--blocks", "1,2,3", "-o", str(tmp_path / "y")]) == 2
    assert "block weights" in capsys.readouterr().err


def test_pickled_inputs_merge_like_safetensors_and_stay_untouched(files, tmp_path):
    b = load_file(str(files["b"]))
    torch.save({"state_dict": b}, tmp_path / "b.ckpt")
    before = (tmp_path / "b.ckpt").read_bytes()
    from_ckpt = merge_checkpoints(files["a"], tmp_path / "b.ckpt", output=tmp_path / "p.safetensors", multiplier=0.3)
    from_st = merge_checkpoints(files["a"], files["b"], output=tmp_path / "s.safetensors", multiplier=0.3)
    got, want = load_file(str(from_ckpt.path)), load_file(str(from_st.path))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (tmp_path / "b.ckpt").read_bytes() == before
