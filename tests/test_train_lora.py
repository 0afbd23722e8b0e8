"""LoRA training end to end on tiny SD1 and SDXL checkpoints: the saved kohya file loads in diffusers (its kohya
converter and LoRA loader, as load_lora_weights runs them) with the same outputs as in sdlite's ``pipe.add_lora``;
its key names are kohya's (checked against names taken from diffusers' own UNet, not from sdlite's mapping); its
metadata is kohya's; the loss goes down on a fixed batch."""

from __future__ import annotations

import copy
import hashlib
import json
import struct

import pytest
import torch
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sdlite
import sdlite.cli
import sdlite.train
from sdlite.adapters.lora_keys import guess_family
from sdlite.train.api import build_run
from sdlite.train.lora import LoraMethod

from conftest import rel_err
from lorafiles import diffusers_unet, layer_name, load_model
from test_lora_references import compare_text, compare_unet, hf_twin

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4


def write_images(folder, n=2, size=(64, 64)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        data = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(data).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {family: load_model(family, tmp_path_factory.mktemp(family)) for family in ("sd1", "sdxl")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(models, data, tmp_path_factory):
    """Each family's LoRA (UNet with LoCon and the text encoders), trained for a few steps at a high rate."""
    out = {}
    for family, model in models.items():
        path = tmp_path_factory.mktemp(f"{family}-out") / "style.safetensors"
        result = sdlite.train.lora(model.pipe, data, output=path, rank=4, alpha=2, conv_rank=2, text_encoder=True,
                                   prompt="a photo of sks", resolution=64, steps=3, lr=3e-2, save_precision="fp32")
        out[family] = result
    return out


def expected_names(model, conv: bool) -> set[str]:
    """kohya's names for the layers a LoRA trains, from the diffusers / HF names of the layers (lorafiles builds
    them from diffusers' own UNet) and kohya's rules: every layer of the transformer blocks, the text encoders'
    attention and MLP layers, and with LoCon the res blocks' and samplers' layers."""
    names = set()
    for layer in model.layers:
        d = layer.dotted
        if layer.component != "unet" or ".attentions." in d or (
                conv and (".resnets." in d or "samplers." in d)):
            names.add(layer_name(layer, "kohya", model.family))
    return names


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_saved_names_are_kohyas(models, trained, family):
    keys = load_file(str(trained[family].output)).keys()
    layers = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert layers == expected_names(models[family], conv=True)
    assert all(f"{name}.{t}" in keys for name in layers for t in ("lora_down.weight", "lora_up.weight", "alpha"))
    prefix = "lora_unet_down_blocks_" if family == "sd1" else "lora_unet_input_blocks_"
    assert any(k.startswith(prefix) for k in keys)
    if family == "sd1":
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    else:
        assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys  # 2 levels
        assert {k[:9] for k in keys if k.startswith("lora_te")} == {"lora_te1_", "lora_te2_"}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_trained_file_matches_diffusers_loader(models, trained, family):
    model, path = models[family], trained[family].output
    mixin = StableDiffusionLoraLoaderMixin if family == "sd1" else StableDiffusionXLLoraLoaderMixin
    ref_unet = diffusers_unet(model.pipe.unet)
    kwargs = {"unet_config": ref_unet.config} if family == "sdxl" else {}
    state, alphas = mixin.lora_state_dict(load_file(str(path)), **kwargs)
    mixin.load_lora_into_unet(state, alphas, ref_unet)
    ref_text = copy.deepcopy(model.built.clip)
    mixin.load_lora_into_text_encoder(state, alphas, ref_text, prefix="text_encoder")
    if family == "sdxl":
        twin = hf_twin(model.pipe.text_encoders[1])
        mixin.load_lora_into_text_encoder(state, alphas, twin, prefix="text_encoder_2")

    before = compare_unet(model.pipe, ref_unet)
    handle = model.pipe.add_lora(path)
    try:
        assert before > 1e-3  # the trained LoRA changes the output
        assert not (handle.report.unmatched or handle.report.mismatched or handle.report.skipped)
        assert compare_unet(model.pipe, ref_unet) < TOL
        assert compare_text(model.pipe.text_encoders[0], ref_text) < TOL
        if family == "sdxl":
            assert compare_text(model.pipe.text_encoders[1], twin) < TOL
    finally:
        handle.remove()


def test_metadata_is_kohyas(models, trained):
    path = trained["sdxl"].output
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.resolution"] == "64x64" and meta["ss_steps"] == "3"
    assert json.loads(meta["ss_tag_frequency"]) == {"data0": {"a photo of sks": 2}}
    assert guess_family(meta.keys(), {}, meta).families == {"sdxl"}  # how sdlite and A1111 label it
    # sshs_model_hash is A1111's "addnet" hash of the file as written: sha256 of the bytes after the header
    with open(path, "rb") as f:
        f.seek(8 + struct.unpack("<Q", f.read(8))[0])
        assert meta["sshs_model_hash"] == hashlib.sha256(f.read()).hexdigest()
    sd1 = safe_open(str(trained["sd1"].output), "pt").metadata()
    assert sd1["ss_base_model_version"] == "sd_v1" and sd1["modelspec.implementation"] == "diffusers"


def test_loss_curve_and_log_are_written(trained):
    result = trained["sd1"]
    assert result.log_csv.read_text().count("\n") == 1 + result.steps
    with Image.open(result.loss_png) as png:
        assert png.size == (800, 450)


class FixedBatchLora(LoraMethod):
    """LoRA whose loss is always taken at the same noise and timesteps: the loss must fall as it trains."""

    def loss(self, r, batch):
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(batch.latents.shape, generator=g)
        context, y = r.condition(batch)
        t = torch.full((batch.latents.shape[0],), 400)
        return sdlite.train.denoising_loss(r.pipe, batch.latents, context, noise, t, y)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_loss_goes_down_on_a_fixed_batch(models, tmp_path, family):
    folder = write_images(tmp_path / "one", n=1)
    run = build_run(models[family].pipe, folder, FixedBatchLora(4, 4), tmp_path / "fixed.safetensors",
                    prompt="x", resolution=64, steps=12, lr=1e-2)
    losses = run.execute().losses
    assert losses[-1] < 0.85 * losses[0] and min(losses[-3:]) < min(losses[:3]), losses


def test_resume_continues_as_if_uninterrupted(models, data, tmp_path):
    pipe = models["sd1"].pipe
    common = dict(rank=2, alpha=2, resolution=64, prompt="p", steps=4, lr=1e-2, lr_schedule="cosine",
                  save_precision="fp32", ema_decay=0.5)
    straight = sdlite.train.lora(pipe, data, output=tmp_path / "a.safetensors", **common)

    def stop_after_two(info):
        if info["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sdlite.train.lora(pipe, data, output=tmp_path / "b.safetensors", state_dir=str(tmp_path / "state"),
                          save_state_every=2, progress=stop_after_two, **common)
    assert json.loads((tmp_path / "state" / "state.json").read_text())["step"] == 2
    resumed = sdlite.train.lora(pipe, data, output=tmp_path / "b.safetensors", resume=str(tmp_path / "state"),
                                **common)
    a, b = load_file(str(straight.output)), load_file(str(resumed.output))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.losses == straight.losses


def test_gradient_checkpointing_and_bf16_autocast(models, data, tmp_path):
    pipe = models["sd1"].pipe
    common = dict(rank=2, alpha=2, resolution=64, prompt="p", steps=2, lr=1e-2, save_precision="fp32")
    plain_run = sdlite.train.lora(pipe, data, output=tmp_path / "a.safetensors", **common)
    plain = load_file(str(plain_run.output))
    ckpt = load_file(str(sdlite.train.lora(pipe, data, output=tmp_path / "b.safetensors",
                                           gradient_checkpointing=True, **common).output))
    assert all(rel_err(ckpt[k], plain[k]) < 1e-5 for k in plain if "lora_up" in k)
    assert not any("forward" in vars(block) for block in pipe.unet.input_blocks)  # the shadowing is undone
    bf16 = sdlite.train.lora(pipe, data, output=tmp_path / "c.safetensors", mixed_precision="bf16", **common)
    assert all(v.dtype == torch.float32 for v in load_file(str(bf16.output)).values())  # float32 master weights
    # the first step's loss (before any update) computed under bf16 autocast: near float32's, not equal to it
    first, reference = bf16.losses[0], plain_run.losses[0]
    assert first != reference and abs(first - reference) < 0.05 * reference


def test_training_leaves_the_model_as_it_was(models, data, tmp_path):
    pipe = models["sd1"].pipe
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.unet.out.requires_grad_(True)  # whatever the caller had set is given back
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    sdlite.train.lora(pipe, data, output=tmp_path / "a.safetensors", rank=2, resolution=64, prompt="p", steps=1)
    after = pipe.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags and not pipe.unet.training
    pipe.unet.requires_grad_(False)


def test_cli_trains_and_reports_bad_data(models, data, tmp_path, capsys):
    save_file({k: v.contiguous() for k, v in models["sd1"].built.state.items()}, str(tmp_path / "m.safetensors"))
    out = tmp_path / "cli.safetensors"
    cache = tmp_path / "cache"
    code = sdlite.cli.main(["train", "lora", str(tmp_path / "m.safetensors"), str(data), "--rank", "2", "--alpha",
                            "1", "--steps", "2", "--resolution", "64", "--prompt", "p", "--output", str(out),
                            "--cache-dir", str(cache), "--refine-latents", "2"])
    assert code == 0 and out.exists()
    assert safe_open(str(out), "pt").metadata()["ss_network_dim"] == "2"
    assert "2/2 loss" in capsys.readouterr().err
    refined = len(list(cache.iterdir()))
    sdlite.train.lora(tmp_path / "m.safetensors", data, output=tmp_path / "plain.safetensors", rank=2, resolution=64,
                      prompt="p", steps=1, cache_dir=cache)
    assert refined > 0 and len(list(cache.iterdir())) == 2 * refined  # the refined latents were cached apart
    bad = write_images(tmp_path / "bad", n=1)
    code = sdlite.cli.main(["train", "lora", str(tmp_path / "m.safetensors"), str(bad), "--steps", "1",
                            "--resolution", "64", "--output", str(tmp_path / "x.safetensors")])
    assert code == 2 and "0.png: no caption" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_trained_layer_gets_a_gradient(models, data, tmp_path, family):
    """The parametrizations act however a layer is used: called as a module, or read directly (the UNet's
    ``pointwise`` reads proj_in/proj_out weights), and through the text encoders' stacked q;k;v."""
    pipe = models[family].pipe
    method = LoraMethod(2, 2, conv_rank=2, text_encoder=True)
    run = build_run(pipe, data, method, tmp_path / "g.safetensors", prompt="a photo", resolution=64)
    for module in (pipe.unet, pipe.vae, *pipe.text_encoders):
        module.requires_grad_(False)
    method.attach(pipe)
    try:
        run.denoising_loss(run.batches[0]).mean().backward()
        ups = {n: p.grad for n, p in method.named_parameters().items() if n.endswith("lora_up.weight")}
        # SDXL's context is the penultimate layers: CLIP-L's last layer feeds nothing, bigG's only the pooled vector
        unused = "lora_te1_text_model_encoder_layers_2_" if family == "sdxl" else "-"
        missing = [n for n, g in ups.items() if not n.startswith(unused) and (g is None or not g.any())]
        assert not missing and any("proj_in" in n for n in ups)
    finally:
        method.detach()
    assert not any(parametrize_is_on(m) for m in pipe.unet.modules())


def parametrize_is_on(module) -> bool:
    return bool(getattr(module, "parametrizations", None))
