"""LoRA extraction, resizing and merging. kohya names against the names diffusers' own modules give (lorafiles);
a full-rank extraction reproduces the difference through sdlite's LoRA loader and through diffusers' kohya LoRA
loader (what ``load_lora_weights`` runs); a low rank equals a truncated SVD computed here with torch.linalg.svd."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sdlite
from sdlite.adapters.lora_keys import KeyMap, kohya_name, parse_key
from sdlite.cli import main
from sdlite.tools import ToolError, extract_lora, merge_loras, resize_lora

from conftest import rel_err
from lorafiles import diffusers_unet, layer_name, load_model, write_file
from test_lora_references import compare_text, compare_unet

TARGETS = re.compile(  # the weights kohya's LoRA/LoCon adapts, in the original key layout
    r"^model\.diffusion_model\..*\.(transformer_blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.(0\.proj|2))"
    r"|proj_in|proj_out|in_layers\.2|out_layers\.3|skip_connection|emb_layers\.1|op|conv)\.weight$"
    r"|^(cond_stage_model|conditioner)\..*\.(self_attn\.[qkvo][a-z]*_proj\.weight|mlp\.(fc[12]|c_fc|c_proj)\.weight"
    r"|attn\.in_proj_weight|attn\.out_proj\.weight)$")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per family: the original model (loaded, with its layers' names in every convention) and a tuned file that
    differs from it by full-rank changes in every layer a LoCon can hold."""
    found = {}
    for family in ("sd1", "sdxl"):
        folder = tmp_path_factory.mktemp(family)
        model = load_model(family, folder)
        g = torch.Generator().manual_seed(7)
        tuned = {k: v + 0.05 * torch.randn(v.shape, generator=g) if TARGETS.match(k) else v
                 for k, v in model.built.state.items()}
        save_file(tuned, str(folder / "tuned.safetensors"))
        model.original, model.tuned = folder / "model.safetensors", folder / "tuned.safetensors"
        model.tuned_pipe = sdlite.load(model.tuned)
        found[family] = model
    return found


pytestmark = pytest.mark.usefixtures("take_off_loras")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_names_are_the_inverse_of_the_mapping(models, family):
    model = models[family]
    keymap = KeyMap(model.pipe.unet, model.pipe.text_encoders)
    blocks = model.pipe.unet.config.num_res_blocks
    for layer in model.layers:
        third = "qkv"[layer.rows[0] // layer.weight.shape[1]] if layer.rows else None
        name = kohya_name(family, layer.component, layer.ldm, third=third, num_res_blocks=blocks)
        assert name == layer_name(layer, "kohya", family), layer.ldm  # diffusers' module names
        parsed = parse_key(name + ".lora_down.weight")
        target = keymap.resolve(parsed.component, parsed.path)
        assert target.module is layer.module and target.rows == layer.rows, name


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@torch.no_grad()
def test_full_rank_extraction_reproduces_the_difference(models, tmp_path, family):
    model = models[family]
    result = extract_lora(model.tuned, model.original, output=tmp_path / "x.safetensors", rank=10_000,
                          conv_rank=10_000)
    assert all(kept == pytest.approx(1.0) for _, kept in result.modules.values())
    pipe, tuned = model.pipe, model.tuned_pipe
    before = rel_err(pipe.unet.state_dict()["input_blocks.3.1.proj_in.weight"],
                     tuned.unet.state_dict()["input_blocks.3.1.proj_in.weight"])
    handle = pipe.add_lora(result.path)
    assert not handle.report.unmatched and not handle.report.mismatched
    for ours, want in ((pipe.unet, tuned.unet), *zip(pipe.text_encoders, tuned.text_encoders)):
        for (key, value), (_, target) in zip(ours.state_dict().items(), want.state_dict().items()):
            assert rel_err(value, target) < 1e-5, key
    assert before > 1e-3
    # diffusers' kohya loader on its own UNet (and CLIP-L) holding the original weights
    mixin = StableDiffusionLoraLoaderMixin if family == "sd1" else StableDiffusionXLLoraLoaderMixin
    handle.remove()
    ref_unet = diffusers_unet(pipe.unet)
    kwargs = {"unet_config": ref_unet.config} if family == "sdxl" else {}
    # Full rank differs between modules, so alpha (= rank) does too; diffusers' kohya converter names its per-module
    # alphas after the old attention processors, which PEFT then fails to match (it warns and uses one alpha for
    # all). The file without alpha means the same (alpha missing: scale 1, as alpha = rank) and loads right.
    lora = {k: v for k, v in load_file(str(result.path)).items() if not k.endswith(".alpha")}
    state, alphas = mixin.lora_state_dict(lora, **kwargs)
    mixin.load_lora_into_unet(state, alphas, ref_unet)
    ref_text = copy.deepcopy(model.built.clip)
    mixin.load_lora_into_text_encoder(state, alphas, ref_text, prefix="text_encoder")
    assert compare_unet(tuned, ref_unet) < 1e-4
    assert compare_text(tuned.text_encoders[0], ref_text) < 1e-4


@torch.no_grad()
def test_extracted_file_with_alphas_loads_in_diffusers_as_in_sdlite(models, tmp_path):
    """One rank for every module (so one alpha): the file as written, alphas included."""
    model = models["sd1"]
    path = extract_lora(model.tuned, model.original, output=tmp_path / "r4.safetensors", rank=4, conv_rank=4).path
    ref_unet = diffusers_unet(model.pipe.unet)
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(load_file(str(path)))
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, ref_unet)
    ref_text = copy.deepcopy(model.built.clip)
    StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(state, alphas, ref_text, prefix="text_encoder")
    before = compare_unet(model.pipe, ref_unet)
    model.pipe.add_lora(path)
    assert before > 1e-3
    assert compare_unet(model.pipe, ref_unet) < 1e-4
    assert compare_text(model.pipe.text_encoders[0], ref_text) < 1e-4


def _truncated(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, float]:
    u, s, vh = torch.linalg.svd(delta.flatten(1).double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r], math.sqrt(float(s[:r].pow(2).sum() / s.pow(2).sum()))


def _product(f, name: str) -> torch.Tensor:
    return f.get_tensor(f"{name}.lora_up.weight").flatten(1).double() @ f.get_tensor(
        f"{name}.lora_down.weight").flatten(1).double()


def test_low_rank_equals_truncated_svd_and_metadata(models, tmp_path):
    model = models["sd1"]
    result = extract_lora(model.tuned, model.original, output=tmp_path / "r.safetensors", rank=3, conv_rank=2)
    a, b = load_file(str(model.original)), load_file(str(model.tuned))
    checks = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2":
              "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.ff.net.2.weight",
              "lora_unet_up_blocks_0_resnets_1_conv2": "model.diffusion_model.output_blocks.1.0.out_layers.3.weight",
              "lora_te_text_model_encoder_layers_1_mlp_fc1":
              "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight"}
    with safe_open(str(result.path), "pt") as f:
        meta = f.metadata()
        for name, key in checks.items():
            r = 2 if "resnets" in name else 3
            want, kept = _truncated(b[key] - a[key], r)
            assert rel_err(_product(f, name), want) < 1e-4, name  # float32 SVD
            assert result.modules[name] == (r, pytest.approx(kept, rel=1e-4))
            assert float(f.get_tensor(f"{name}.alpha")) == r
        conv = "lora_unet_up_blocks_0_resnets_1_conv2"
        assert f.get_tensor(f"{conv}.lora_down.weight").shape == (2, 128, 3, 3)
        assert f.get_tensor(f"{conv}.lora_up.weight").shape == (128, 2, 1, 1)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "3"
    assert meta["ss_network_alpha"] == "3.0" and meta["ss_base_model_version"] == "sd_v1"
    assert '"conv_dim": "2"' in meta["ss_network_args"]


def test_dynamic_rank_and_clamp(models, tmp_path):
    model = models["sd1"]
    a, b = load_file(str(model.original)), load_file(str(model.tuned))
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    s = torch.linalg.svdvals((b[key] - a[key]).double())
    fro = extract_lora(model.tuned, model.original, output=tmp_path / "d.safetensors", rank=1000, dynamic="sv_fro:0.6")
    share = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
    assert fro.modules[name][0] == int((share < 0.36).sum()) + 1  # smallest rank keeping 60% of the norm
    ratio = extract_lora(model.tuned, model.original, output=tmp_path / "q.safetensors", rank=1000,
                         dynamic="sv_ratio:1.5")
    assert ratio.modules[name][0] == int((s > s[0] / 1.5).sum())
    capped = extract_lora(model.tuned, model.original, output=tmp_path / "c.safetensors", rank=2,
                          dynamic="sv_ratio:100")
    assert capped.modules[name][0] == 2
    clamped = extract_lora(model.tuned, model.original, output=tmp_path / "k.safetensors", rank=8,
                           clamp_quantile=0.9)
    with safe_open(str(clamped.path), "pt") as f:
        up, down = f.get_tensor(f"{name}.lora_up.weight"), f.get_tensor(f"{name}.lora_down.weight")
    u, sv, vh = torch.linalg.svd((b[key] - a[key]).float(), full_matrices=False)
    high = torch.quantile(torch.cat([(u[:, :8] * sv[:8]).flatten(), vh[:8].flatten()]), 0.9)
    assert torch.allclose(torch.cat([up.flatten(), down.flatten()]).abs().max(), high, rtol=1e-4)


def test_extraction_refuses_other_families(models, tmp_path):
    with pytest.raises(ToolError, match="sdxl"):
        extract_lora(models["sdxl"].tuned, models["sd1"].original, output=tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def _delta(f, name: str) -> torch.Tensor:
    return _product(f, name) * float(f.get_tensor(f"{name}.alpha")) / f.get_tensor(f"{name}.lora_down.weight").shape[0]


def test_resize_and_merge_loras(models, tmp_path):
    model = models["sd1"]
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    write_file(one, model.layers, "lora", "sd1", seed=1)
    write_file(two, model.layers, "lora", "sd1", seed=2)
    small = resize_lora(one, output=tmp_path / "small.safetensors", rank=2)
    concat = merge_loras([(one, 0.6), (two, -0.3)], output=tmp_path / "concat.safetensors")
    svd = merge_loras([(one, 0.6), (two, -0.3)], output=tmp_path / "svd.safetensors", rank=3)
    names = [n[: -len(".alpha")] for n in load_file(str(one)) if n.endswith(".alpha")]
    with safe_open(str(one), "pt") as f1, safe_open(str(two), "pt") as f2, \
            safe_open(str(small.path), "pt") as fs, safe_open(str(concat.path), "pt") as fc, \
            safe_open(str(svd.path), "pt") as fv:
        for name in names:
            d1, d2 = _delta(f1, name), _delta(f2, name)
            assert rel_err(_delta(fs, name), _truncated(d1, 2)[0]) < 1e-4, name  # kohya keeps alpha/rank
            assert float(fs.get_tensor(f"{name}.alpha")) / 2 == pytest.approx(
                float(f1.get_tensor(f"{name}.alpha")) / f1.get_tensor(f"{name}.lora_down.weight").shape[0])
            assert rel_err(_delta(fc, name), 0.6 * d1 - 0.3 * d2) < 1e-6, name
            assert fc.get_tensor(f"{name}.lora_down.weight").shape[0] == 8
            assert rel_err(_delta(fv, name), _truncated(0.6 * d1 - 0.3 * d2, 3)[0]) < 1e-4, name


def test_cli_extract_resize_merge(models, tmp_path, capsys):
    model = models["sd1"]
    lora = tmp_path / "x.safetensors"
    assert main(["extract-lora", str(model.tuned), str(model.original), "--rank", "4", "-o", str(lora)]) == 0
    assert "‖ΔW‖ kept" in capsys.readouterr().out
    assert main(["resize-lora", str(lora), "--rank", "2", "--dynamic", "sv_fro:0.9", "-o",
                 str(tmp_path / "y.safetensors")]) == 0
    assert main(["merge-lora", f"{lora}:0.5", f"{tmp_path / 'y.safetensors'}:0.5", "-o",
                 str(tmp_path / "z.safetensors")]) == 0
    with safe_open(str(tmp_path / "z.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora"
        assert f.get_tensor("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight").shape[0] > 4  # 4 + 1…2
    assert main(["merge", str(model.original), "--lora", f"{lora}:1", "-o", str(tmp_path / "m.safetensors")]) == 0
