"""The ``sdlite`` command: img2img and inpaint subcommands against the reference pipeline, ``--from-png`` reproducing
images, ``sdlite info`` on every kind of file, and exit codes with clear messages."""

from __future__ import annotations

import subprocess
import sys

import k_diffusion.sampling as ks
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sdlite
from sdlite.cli import main
from sdlite.infotext import read_infotext

from conftest import randomize_
from lorafiles import text_layers, unet_layers, write_file
from refpipe import load_reference, max_pixel_diff, write_model
from sdfiles import VAE
from test_reference_img2img import picture, reference_img2img
from test_reference_inpaint import rectangle_mask, reference_inpaint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    path, built = write_model(folder, "sd1", seed=111)
    picture(64, 64, seed=12).save(folder / "in.png")
    rectangle_mask((64, 64), (16, 8, 48, 40)).save(folder / "mask.png")
    return path, load_reference(path, built), folder


def run(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


def test_img2img_subcommand_matches_the_reference(sd1, tmp_path, capsys):
    path, ref, folder = sd1
    out = tmp_path / "out.png"
    code, _ = run(["img2img", path, folder / "in.png", "a harbour", "-n", "rain", "--strength", "0.6", "--steps", "5",
                   "--seed", "17", "--cfg-scale", "6", "--sampler", "Euler", "--width", "64", "--height", "64", "-o",
                   out], capsys)
    assert code == 0
    expected, _ = reference_img2img(ref, Image.open(folder / "in.png"), "a harbour", "rain", [17], 5, 0.6, 6.0,
                                    ks.sample_euler)
    assert max_pixel_diff(Image.open(out), ref.to_images(expected)[0]) <= 1
    params = read_infotext(out)
    assert params["Denoising strength"] == "0.6" and params["Seed"] == "17" and params["Sampler"] == "Euler"
    again = tmp_path / "again.png"
    assert run(["img2img", path, folder / "in.png", "--from-png", out, "-o", again], capsys)[0] == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_inpaint_subcommand_matches_the_reference(sd1, tmp_path, capsys):
    path, ref, folder = sd1
    out = tmp_path / "out.png"
    code, _ = run(["inpaint", path, folder / "in.png", folder / "mask.png", "a boat", "--strength", "0.8", "--steps",
                   "4", "--seed", "5", "--cfg-scale", "7", "--mask-blur", "0", "--inpaint-fill", "latent noise",
                   "--width", "64", "--height", "64", "-o", out], capsys)
    assert code == 0
    _, pictures = reference_inpaint(ref, Image.open(folder / "in.png"), Image.open(folder / "mask.png"), "a boat",
                                    "", [5], width=64, height=64, steps=4, strength=0.8, cfg=7.0, mask_blur=0,
                                    fill_mode="latent noise")
    assert max_pixel_diff(Image.open(out), pictures[0]) <= 1
    again = tmp_path / "again.png"
    code, _ = run(["inpaint", path, folder / "in.png", folder / "mask.png", "--from-png", out, "--inpaint-fill",
                   "latent noise", "-o", again], capsys)
    assert code == 0 and np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_from_png_reproduces_hires_variation_and_ensd(sd1, tmp_path, capsys):
    path = sd1[0]
    first, again = tmp_path / "a.png", tmp_path / "b.png"
    code, _ = run(["txt2img", path, "a (tall:1.2) tower", "--width", "64", "--height", "48", "--steps", "3",
                   "--seed", "9", "--subseed", "4", "--subseed-strength", "0.25", "--eta-noise-seed-delta", "31337",
                   "--sampler", "Euler a", "--hires-scale", "1.5", "--hires-steps", "2", "--hires-strength", "0.5",
                   "-o", first], capsys)
    assert code == 0
    params = read_infotext(first)
    assert params["ENSD"] == "31337" and params["Variation seed"] == "4" and params["Hires steps"] == "2"
    assert run(["txt2img", path, "--from-png", first, "-o", again], capsys)[0] == 0
    assert Image.open(again).size == (96, 72)
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


@pytest.fixture(scope="module")
def files(sd1, tmp_path_factory):
    """One file of each kind sdlite knows."""
    path, _, folder = sd1
    pipe = sdlite.load(path)
    d = tmp_path_factory.mktemp("kinds")
    write_file(d / "lora.safetensors", unet_layers(pipe.unet) + text_layers(pipe.text_encoders[0], "te"), "lora",
               "sd1", seed=1, metadata={"ss_network_dim": "4", "ss_base_model_version": "sd_v1"})
    torch.save({"string_to_param": {"*": torch.randn(2, 128)}, "name": "style"}, d / "style.pt")
    from sdlite.adapters.controlnet import create_from_unet

    net = randomize_(create_from_unet(pipe.unet), 3)
    save_file({f"control_model.{k}": v.contiguous() for k, v in net.state_dict().items()},
              str(d / "control.safetensors"))
    save_file({k: v.contiguous() for k, v in sdlite.vae.AutoencoderKL(VAE).state_dict().items()},
              str(d / "vae.safetensors"))
    main(["txt2img", str(path), "a dune", "--width", "64", "--height", "64", "--steps", "2", "--seed", "3", "-o",
          str(d / "image.png")])
    return {"checkpoint": path, "lora": d / "lora.safetensors", "embedding": d / "style.pt",
            "controlnet": d / "control.safetensors", "vae": d / "vae.safetensors", "png": d / "image.png"}


@pytest.mark.parametrize("kind, says", [
    ("checkpoint", ["Stable Diffusion checkpoint: family sd1, prediction eps", "UNet: 64 channels", "VAE: 32 channels",
                    "text encoder: "]),
    ("lora", ["LoRA", "ss_network_dim: 4", "ss_base_model_version: sd_v1"]),
    ("embedding", ["textual-inversion embedding"]),
    ("controlnet", ["ControlNet"]),
    ("vae", ["standalone VAE"]),
    ("png", ["PNG with A1111 infotext", "prompt: 'a dune'", "Seed: 3", "Steps: 2"]),
])
def test_info_on_each_file_kind(files, capsys, kind, says):
    code, captured = run(["info", files[kind]], capsys)
    assert code == 0, captured.err
    for text in says:
        assert text in captured.out, (text, captured.out)


def test_bad_files_exit_non_zero_with_a_clear_message(sd1, files, tmp_path, capsys):
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    code, captured = run(["info", garbage], capsys)
    assert code != 0 and "sdlite: error:" in captured.err and "broken.safetensors" in captured.err
    code, captured = run(["txt2img", files["lora"], "x", "--steps", "1", "--width", "64", "--height", "64",
                          "-o", tmp_path / "x.png"], capsys)
    assert code != 0 and "LoRA" in captured.err and not (tmp_path / "x.png").exists()
    code, captured = run(["txt2img", tmp_path / "missing.safetensors", "x", "-o", tmp_path / "x.png"], capsys)
    assert code != 0 and "missing.safetensors" in captured.err
    code, captured = run(["txt2img", sd1[0], "x", "--width", "65", "-o", tmp_path / "x.png"], capsys)
    assert code != 0 and "multiples of 8" in captured.err


def test_exit_codes_of_the_installed_command(files, tmp_path):
    """The real process: 0 and the description on stdout for a good file, non-zero and one error line for a bad one."""
    good = subprocess.run([sys.executable, "-m", "sdlite.cli", "info", str(files["lora"])], capture_output=True,
                          text=True)
    assert good.returncode == 0 and "LoRA" in good.stdout
    bad = subprocess.run([sys.executable, "-m", "sdlite.cli", "info", str(tmp_path / "nothing.ckpt")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "nothing.ckpt" in bad.stderr and "Traceback" not in bad.stderr
