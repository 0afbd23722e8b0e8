"""ControlNet training end to end on tiny SD1 and SDXL checkpoints: only the ControlNet trains (the UNet bit-identical),
hints are paired by file name, the loss goes down on a fixed batch, and the saved control_model. file loads in sdlite
(controlnet.load) and, through diffusers' own original-checkpoint converter, in diffusers' ControlNetModel with the
same residuals."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint
from PIL import Image
from safetensors.torch import load_file, save_file

import sdlite.cli
import sdlite.train
from sdlite.adapters.controlnet import load
from sdlite.train.api import build_run
from sdlite.train.controlnet_train import ControlNetMethod, hint_paths
from sdlite.train.data import DataError

from conftest import rel_err
from lorafiles import load_model
from test_train_lora import write_images
from test_unet import diffusers_config, inputs

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ["sd1", "sdxl"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {f: load_model(f, tmp_path_factory.mktemp(f)) for f in FAMILIES}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn")
    images = write_images(root / "img", n=2)
    hints = root / "hints"
    hints.mkdir()
    for p in images.iterdir():  # the hint: a checkerboard of the image, so it differs per image
        g = torch.Generator().manual_seed(len(p.stem))
        t = (torch.rand(64, 64, 3, generator=g) > 0.5).to(torch.uint8) * 255
        Image.fromarray(t.numpy()).save(hints / f"{p.stem}.png")
    return images, hints


@pytest.fixture(scope="module")
def trained(models, data, tmp_path_factory):
    out = {}
    for family, model in models.items():
        before = {k: v.clone() for k, v in model.pipe.unet.state_dict().items()}
        path = tmp_path_factory.mktemp(family) / "cn.safetensors"
        result = sdlite.train.controlnet(model.pipe, data[0], output=path, hint_dir=data[1], prompt="a photo",
                                         resolution=64, steps=3, lr=1e-3)
        out[family] = (result, before)
    return out


def diffusers_controlnet(state: dict, unet_config) -> ControlNetModel:
    unet = diffusers_config(unet_config)
    shared = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
              "attention_head_dim", "use_linear_projection", "transformer_layers_per_block", "addition_embed_type",
              "addition_time_embed_dim", "projection_class_embeddings_input_dim")
    dcfg = {k: unet[k] for k in shared if k in unet}
    converted = convert_controlnet_checkpoint(state, dcfg)
    if unet_config.adm_in_channels is not None:
        # diffusers' ControlNet converter skips label_emb (SDXL); its own mapping table names the target keys.
        for target, source in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
            converted[target] = state[f"control_model.{source}"]
    ref = ControlNetModel(**dcfg)
    ref.load_state_dict(converted, strict=True)
    return ref.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_controlnet_matches_diffusers(models, trained, family):
    (result, before), pipe = trained[family], models[family].pipe
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())  # base frozen
    state = load_file(str(result.output))
    assert all(k.startswith("control_model.") for k in state) and "control_model.zero_convs.0.0.weight" in state
    assert state["control_model.middle_block_out.0.weight"].abs().sum() > 0  # the zero convs trained
    ours = load(result.output)
    ref = diffusers_controlnet(state, pipe.unet.config)
    x, t, context, g = inputs(pipe.unet.config, h=8, w=8)
    hint = torch.rand(2, 3, 64, 64, generator=g)
    kwargs, y = {}, None
    if pipe.unet.config.adm_in_channels:
        from sdlite.generate import size_embedding

        pooled = torch.randn(2, 128, generator=g)
        y = torch.cat([pooled, size_embedding([0.0] * 6, 2)], dim=1)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.zeros(2, 6)}
    with torch.no_grad():
        a = ours(x, hint, t, context, y)
        down, mid = ref(x, t, context, controlnet_cond=hint, return_dict=False, **kwargs)
    for mine, theirs in zip(a, [*down, mid]):
        assert rel_err(mine, theirs) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_goes_down_on_a_fixed_batch(models, data, tmp_path, family):
    class Fixed(ControlNetMethod):
        def loss(self, r, batch):
            g = torch.Generator().manual_seed(0)
            r.generator = g  # the same noise and timesteps at every step
            return super().loss(r, batch)

    method = Fixed([], "fp32")
    run = build_run(models[family].pipe, data[0], method, tmp_path / "f.safetensors", prompt="p", resolution=64,
                    steps=8, lr=3e-3, batch_size=2, caption_dropout=0.0)
    method.hints = hint_paths(run.batches.data, data[1])
    losses = run.execute().losses
    assert losses[-1] < 0.9 * losses[0], losses


def test_missing_hint_is_named(models, data, tmp_path):
    images = write_images(tmp_path / "img", n=1)
    (images / "0.png").rename(images / "lonely.png")
    with pytest.raises(DataError, match="lonely.png: no hint image"):
        sdlite.train.controlnet(models["sd1"].pipe, images, output=tmp_path / "x.safetensors", hint_dir=data[1],
                                prompt="p", resolution=64, steps=1)


def test_cli(models, data, tmp_path):
    model = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in models["sd1"].built.state.items()}, str(model))
    out = tmp_path / "cn16.safetensors"
    assert sdlite.cli.main(["train", "controlnet", str(model), str(data[0]), "--hint-dir", str(data[1]), "--prompt",
                            "p", "--steps", "1", "--resolution", "64", "--save-dtype", "fp16", "--output",
                            str(out)]) == 0
    assert all(v.dtype == torch.float16 for v in load_file(str(out)).values())
