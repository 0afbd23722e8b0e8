"""Converting and pruning: pickles to safetensors bit for bit, dtypes, EMA, components, a baked VAE; the results
load in diffusers' single-file converters (UNet, VAE, CLIP) and compute what sdlite computes from them."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sdlite
from sdlite.cli import main
from sdlite.tools import ToolError, bake_vae, convert_checkpoint

from conftest import rel_err
from sdfiles import build, clip_l
from test_unet import diffusers_config

UNET = "model.diffusion_model."
VAE = "first_stage_model."


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An SD1 .ckpt as training saves it: Lightning wrapper, EMA shadows, a step counter."""
    folder = tmp_path_factory.mktemp("convert")
    state = build("sd1", seed=0).state
    g = torch.Generator().manual_seed(9)
    state |= {"model_ema." + k[len("model."):].replace(".", ""): torch.randn(v.shape, generator=g)
              for k, v in state.items() if k.startswith(UNET)}
    state |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32)}
    path = folder / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 1000, "epoch": 3}, path)
    return path, state


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_ckpt_to_safetensors_is_bit_exact(ckpt, tmp_path):
    path, state = ckpt
    result = convert_checkpoint(path, output=tmp_path / "model.safetensors")
    out = read(result.path)
    assert out.keys() == state.keys()
    for key, value in state.items():
        assert out[key].dtype == value.dtype and torch.equal(out[key], value), key
    assert any("global_step" in n for n in result.notes)
    assert result.tensors == len(state)


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype_conversion(ckpt, tmp_path, dtype, torch_dtype):
    path, state = ckpt
    out = read(convert_checkpoint(path, output=tmp_path / "half.safetensors", dtype=dtype).path)
    for key, value in state.items():
        want = value.to(torch_dtype) if value.is_floating_point() else value
        assert out[key].dtype == want.dtype and torch.equal(out[key], want), key
    # and back: fp16 → fp32 → fp16 is the identity
    back = read(convert_checkpoint(tmp_path / "half.safetensors", output=tmp_path / "f32.safetensors",
                                   dtype="fp32").path)
    assert all(torch.equal(back[k].to(out[k].dtype), out[k]) for k in out)


def test_prune_and_ema_only(ckpt, tmp_path):
    path, state = ckpt
    pruned = read(convert_checkpoint(path, output=tmp_path / "p.safetensors", ema="drop").path)
    assert pruned.keys() == {k for k in state if not k.startswith("model_ema.")}
    assert all(torch.equal(pruned[k], state[k]) for k in pruned)
    ema = read(convert_checkpoint(path, output=tmp_path / "e.safetensors", ema="only").path)
    assert ema.keys() == pruned.keys()
    key = UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(ema[key], state["model_ema.diffusion_modelinput_blocks11transformer_blocks0attn1to_qweight"])
    for k in ema:
        want = state["model_ema." + k[len("model."):].replace(".", "")] if k.startswith(UNET) else state[k]
        assert torch.equal(ema[k], want), k
    with pytest.raises(ToolError, match="no EMA"):
        convert_checkpoint(tmp_path / "p.safetensors", output=tmp_path / "x.safetensors", ema="only")
    assert not (tmp_path / "x.safetensors").exists()


def test_components_dropped_and_extracted(ckpt, tmp_path):
    path, state = ckpt
    no_vae = read(convert_checkpoint(path, output=tmp_path / "a.safetensors", vae=False, ema="drop").path)
    assert not any(k.startswith(VAE) for k in no_vae) and any(k.startswith("cond_stage_model.") for k in no_vae)
    no_te = read(convert_checkpoint(path, output=tmp_path / "b.safetensors", text_encoder=False).path)
    assert not any(k.startswith("cond_stage_model.") for k in no_te) and any(k.startswith(VAE) for k in no_te)
    unet = read(convert_checkpoint(path, output=tmp_path / "u.safetensors", extract="unet").path)
    assert unet.keys() == {k for k in state if k.startswith(UNET)}
    vae = read(convert_checkpoint(path, output=tmp_path / "v.safetensors", extract="vae").path)
    assert vae.keys() == {k[len(VAE):] for k in state if k.startswith(VAE)}
    assert all(torch.equal(vae[k], state[VAE + k]) for k in vae)


@pytest.mark.parametrize("prefixed", [False, True], ids=["bare", "first_stage_model"])
def test_bake_vae(ckpt, tmp_path, prefixed):
    path, state = ckpt
    half = convert_checkpoint(path, output=tmp_path / "half.safetensors", dtype="fp16", ema="drop").path
    new = {k[len(VAE):]: v for k, v in build("sd1", seed=50).state.items() if k.startswith(VAE)}
    vae_file = {(VAE + k if prefixed else k): v for k, v in new.items()}
    vae_file |= {"loss.discriminator.main.0.weight": torch.ones(2), "model_ema.decay": torch.tensor(0.9)}
    save_file(vae_file, str(tmp_path / "vae.safetensors"))
    out = read(bake_vae(half, tmp_path / "vae.safetensors", output=tmp_path / "baked.safetensors").path)
    for key, value in read(half).items():
        want = new[key[len(VAE):]].half() if key.startswith(VAE) else value
        assert torch.equal(out[key], want), key  # the checkpoint's dtype (fp16) is kept
    del vae_file[(VAE if prefixed else "") + "decoder.conv_out.weight"]
    save_file(vae_file, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ToolError, match="decoder.conv_out.weight"):
        bake_vae(half, tmp_path / "bad.safetensors", output=tmp_path / "no.safetensors")
    assert not (tmp_path / "no.safetensors").exists()


@torch.no_grad()
def test_converted_files_load_in_diffusers_with_equal_outputs(ckpt, tmp_path):
    path, _ = ckpt
    out = convert_checkpoint(path, output=tmp_path / "m.safetensors", dtype="fp16", ema="drop").path
    vae_only = convert_checkpoint(out, output=tmp_path / "vae.safetensors", extract="vae").path
    pipe = sdlite.load(out)
    sd = {k: v.float() for k, v in load_file(str(out)).items()}
    config = diffusers_config(pipe.unet.config)
    unet = UNet2DConditionModel(**config).eval()
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, config), strict=True)
    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 77, 128, generator=g)
    assert rel_err(pipe.unet(x, t, context), unet(x, t, encoder_hidden_states=context).sample) < 1e-4
    c = pipe.vae.config
    vconfig = dict(in_channels=3, out_channels=3, latent_channels=c.z_channels, layers_per_block=c.num_res_blocks,
                   down_block_types=["DownEncoderBlock2D"] * len(c.ch_mult),
                   up_block_types=["UpDecoderBlock2D"] * len(c.ch_mult), block_out_channels=[c.ch * m for m in c.ch_mult])
    vae = DiffusersVAE(**vconfig).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint({k: v.float() for k, v in load_file(str(vae_only)).items()},
                                                   vconfig), strict=True)
    z = torch.randn(1, 4, 4, 4, generator=g)
    assert rel_err(pipe.vae.decode(z), vae.decode(z).sample) < 1e-4
    clip = clip_l(128)
    converted = convert_ldm_clip_checkpoint(sd)
    if not any(k.startswith("text_model.") for k in clip.state_dict()):  # transformers 5 dropped that level
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    missing, unexpected = clip.load_state_dict(converted, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    ids = torch.randint(0, 49407, (1, 77), generator=g)
    assert rel_err(pipe.text_encoders[0](ids, layer=-1, final_norm=True).hidden, clip(ids).last_hidden_state) < 1e-4


def test_cli_convert_and_bake(ckpt, tmp_path, capsys):
    path, state = ckpt
    out = tmp_path / "cli.safetensors"
    assert main(["convert", str(path), "--dtype", "fp16", "--prune-ema", "--no-vae", "-o", str(out)]) == 0
    assert "model hash" in capsys.readouterr().out
    got = read(out)
    assert got.keys() == {k for k in state if not k.startswith(("model_ema.", VAE))}
    with pytest.raises(SystemExit):  # argparse: the two EMA choices exclude each other
        main(["convert", str(path), "--prune-ema", "--ema-only", "-o", str(out)])
    assert main(["bake-vae", str(path), str(path), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "not a VAE" in capsys.readouterr().err
