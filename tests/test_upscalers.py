"""Upscalers against spandrel (the loader ComfyUI and chaiNNer use) on the same random weights in each file layout,
tiling against the untiled network, and the refusal of files that are not upscalers."""

import numpy as np
import pytest
import torch
from PIL import Image

import sdlite.upscalers as up
from sdlite.errors import CheckpointError
from sdlite.upscalers.archs import RRDBConfig, SRVGGConfig, SRVGGNetCompact, build

import spandrel  # noqa: E402  (the reference: a missing one fails, never skips)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _random_state(module: torch.nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * (0.5 / max(1, v[0].numel()) ** 0.5 if v.ndim == 4 else 0.2)
            for k, v in module.state_dict().items()}


def _write(tmp_path, name, state, wrapper=None):
    path = tmp_path / name
    torch.save({wrapper: state} if wrapper else state, path)
    return path


RRDB_CASES = [
    # layout, x2 stages, unshuffle, blocks, file wrapper
    ("esrgan", 2, 1, 2, None),            # 4x-UltraSharp / original ESRGAN
    ("esrgan", 1, 1, 1, None),            # 2x
    ("esrgan", 3, 1, 1, None),            # 8x
    ("real-esrgan", 2, 1, 2, "params_ema"),   # RealESRGAN_x4plus
    ("real-esrgan", 2, 1, 6, "params_ema"),   # RealESRGAN_x4plus_anime_6B
    ("real-esrgan", 2, 2, 1, "params_ema"),   # RealESRGAN_x2plus: pixel unshuffle, 12 input channels
    ("bsrgan", 2, 1, 2, None),            # ESRGAN_4x.pth as A1111 downloads it
]


@pytest.mark.parametrize("layout,ups,unshuffle,blocks,wrapper", RRDB_CASES)
def test_rrdbnet_matches_spandrel(tmp_path, layout, ups, unshuffle, blocks, wrapper):
    config = RRDBConfig(layout=layout, features=8, growth=32, blocks=blocks, upsamples=ups, unshuffle=unshuffle)
    state = _random_state(build(config), seed=ups * 10 + blocks)
    path = _write(tmp_path, "model.pth", state, wrapper)
    model = up.load(path)
    assert model.config == config and model.scale == 2 ** ups // unshuffle
    assert set(model.state_dict()) == set(state)  # module keys are the file's keys

    ref = spandrel.ModelLoader().load_from_state_dict(torch.load(path)).model.eval()
    x = torch.rand(1, 3, 11, 13)  # odd sizes: the unshuffle models pad and crop
    with torch.no_grad():
        ours, theirs = model(x), ref(x)
    assert ours.shape == theirs.shape == (1, 3, 11 * model.scale, 13 * model.scale)
    assert rel(ours, theirs) < 1e-5


@pytest.mark.parametrize("scale,convs", [(4, 2), (2, 1)])
def test_srvgg_matches_spandrel(tmp_path, scale, convs):
    config = SRVGGConfig(features=8, convs=convs, scale=scale)
    state = _random_state(SRVGGNetCompact(config), seed=scale)
    path = _write(tmp_path, "realesr-general-x4v3.pth", state, "params")
    model = up.load(path)
    assert model.config == config and model.scale == scale
    ref = spandrel.ModelLoader().load_from_state_dict(state).model.eval()
    x = torch.rand(2, 3, 9, 10)
    with torch.no_grad():
        assert rel(model(x), ref(x)) < 1e-5


def test_growth_channels_are_inferred(tmp_path):
    config = RRDBConfig(layout="real-esrgan", features=8, growth=4, blocks=1, upsamples=2)
    path = _write(tmp_path, "m.pth", _random_state(build(config), 0), "params_ema")
    assert up.load(path).config == config


def test_params_ema_preferred_over_params(tmp_path):
    config = RRDBConfig(layout="real-esrgan", features=8, growth=8, blocks=1, upsamples=2)
    ema, raw = _random_state(build(config), 1), _random_state(build(config), 2)
    path = tmp_path / "m.pth"
    torch.save({"params": raw, "params_ema": ema}, path)
    model = up.load(path)
    assert torch.equal(model.conv_first.weight, ema["conv_first.weight"])


def test_refuses_other_files_by_name(tmp_path):
    sd_like = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}
    with pytest.raises(CheckpointError, match=r"not an upscaler.*model\.\* \(1\)"):
        up.load(_write(tmp_path, "sd.pth", sd_like))

    config = RRDBConfig(layout="esrgan", features=8, growth=8, blocks=1, upsamples=2)
    state = _random_state(build(config), 3)
    del state["model.6.weight"], state["model.6.bias"]  # one upsampling conv missing
    with pytest.raises(CheckpointError, match=r"RRDBNet.*model\.N conv indices after the trunk are \[3, 8, 10\]"):
        up.load(_write(tmp_path, "broken.pth", state))

    state = _random_state(build(config), 3)
    state["model.1.sub.0.RDB1.conv2.0.weight"] = torch.zeros(8, 15, 3, 3)
    with pytest.raises(CheckpointError, match=r"model\.1\.sub\.0\.RDB1\.conv2\.0\.weight.*\[8, 15, 3, 3\].*\[8, 16, 3, 3\]"):
        up.load(_write(tmp_path, "shape.pth", state))

    vgg = _random_state(SRVGGNetCompact(SRVGGConfig(features=8, convs=1, scale=4)), 4)
    vgg["body.4.weight"] = torch.zeros(47, 8, 3, 3)
    with pytest.raises(CheckpointError, match=r"SRVGGNetCompact.*body\.4\.weight \[47, 8, 3, 3\]"):
        up.load(_write(tmp_path, "vgg.pth", vgg, "params"))


def test_tile_grid_follows_a1111():
    # split_grid: ceil((w - overlap) / (tile - overlap)) tiles, spread evenly, the last flush with the edge
    assert up.tile_starts(512, 192, 8) == [0, 160, 320]
    assert up.tile_starts(100, 192, 8) == [0]
    assert up.tile_starts(400, 192, 8) == [0, 104, 208]
    assert up.tile_starts(193, 192, 8) == [0, 1]


def test_tiled_output_matches_untiled():
    torch.manual_seed(0)
    model = SRVGGNetCompact(SRVGGConfig(features=8, convs=1, scale=2)).eval()
    x = torch.rand(1, 3, 70, 90)
    whole = up.upscale_tensor(x, model, tile=0)
    tiled = up.upscale_tensor(x, model, tile=32, overlap=8)
    assert tiled.shape == whole.shape == (1, 3, 140, 180)
    # Tiles see zero padding where the whole image had neighbours: only a few pixels at each seam differ, and the
    # blend keeps them small.
    assert rel(tiled, whole) < 2e-2
    diff = (tiled - whole).abs()[0].amax(0)
    assert (diff > 1e-5).float().mean() < 0.2
    # one tile is the untiled network exactly
    assert torch.equal(up.upscale_tensor(x, model, tile=96), whole)


def test_upscale_pil_a1111_rules():
    torch.manual_seed(1)
    model = SRVGGNetCompact(SRVGGConfig(features=4, convs=1, scale=2)).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8))
    once = up.upscale(image, model)
    assert once.size == (40, 48)
    # ×255 then truncated, as A1111 does
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        ref = (255 * model(x)[0].clamp(0, 1).permute(1, 2, 0).numpy()).astype(np.uint8)
    assert np.array_equal(np.asarray(once), ref)
    # scale 3 with a x2 model: two passes (to 80x96) then Lanczos down to int(20*3)//8*8 x int(24*3)//8*8
    assert up.upscale(image, model, scale=3).size == (56, 72)
    # bgr=True swaps red and blue around the network (A1111's convention)
    bgr = up.upscale(image, model, bgr=True)
    with torch.no_grad():
        ref = model(x.flip(1))[0].flip(0)
    assert np.array_equal(np.asarray(bgr), (255 * ref.clamp(0, 1).permute(1, 2, 0).numpy()).astype(np.uint8))
    # tensors and lists give lists
    assert [p.size for p in up.upscale(x.repeat(2, 1, 1, 1), model)] == [(40, 48), (40, 48)]


def test_find_by_a1111_name_or_stem(tmp_path):
    for stem in ("RealESRGAN_x4plus", "4x-UltraSharp", "ESRGAN_4x"):
        (tmp_path / f"{stem}.pth").write_bytes(b"")
    assert up.find("R-ESRGAN 4x+", [tmp_path]).name == "RealESRGAN_x4plus.pth"
    assert up.loader.display_name(tmp_path / "RealESRGAN_x4plus.pth") == "R-ESRGAN 4x+"
    assert up.loader.display_name(tmp_path / "4x-UltraSharp.pth") == "4x-UltraSharp"
    assert up.find("ESRGAN_4x", [tmp_path]).name == "ESRGAN_4x.pth"
    assert up.find("4x-UltraSharp", ["/nonexistent", tmp_path]).name == "4x-UltraSharp.pth"
    with pytest.raises(FileNotFoundError, match="RealESRGAN_x4plus_anime_6B.pth"):
        up.find("R-ESRGAN 4x+ Anime6B", [tmp_path])


def _a1111_upscale_without_tiling(model, img):
    """A1111's upscaler_utils.upscale_without_tiling: BGR in, ×255 truncated, back to RGB."""
    x = torch.from_numpy(np.ascontiguousarray(np.array(img)[:, :, ::-1].transpose(2, 0, 1)) / 255).float()[None]
    with torch.no_grad():
        out = model(x)[0].clamp(0, 1).numpy()
    return Image.fromarray((255.0 * np.moveaxis(out, 0, 2)).astype(np.uint8)[:, :, ::-1].copy(), "RGB")


def test_fit_is_a1111_hires_resize_with_spandrel(tmp_path):
    config = RRDBConfig(layout="real-esrgan", features=8, growth=32, blocks=1, upsamples=2)  # spandrel: growth 32
    path = _write(tmp_path, "RealESRGAN_x4plus.pth", _random_state(build(config), 6), "params_ema")
    ref = spandrel.ModelLoader().load_from_file(path).model.eval()
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (24, 20, 3), dtype=np.uint8))
    for width, height in ((40, 48), (48, 56)):
        # by hand, A1111's images.resize_image(1, image, width, height, upscaler_name) with the model in spandrel
        ratio, src_ratio = width / height, image.width / image.height
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
        scale = max(src_w / image.width, src_h / image.height)
        dest = (int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8))  # Upscaler.upscale
        big = _a1111_upscale_without_tiling(ref, image)  # x4 reaches dest in one pass
        big = big.resize(dest, Image.Resampling.LANCZOS) if big.size != dest else big
        big = big.resize((src_w, src_h), Image.Resampling.LANCZOS) if big.size != (src_w, src_h) else big
        expected = Image.new("RGB", (width, height))
        expected.paste(big, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        assert np.array_equal(np.asarray(up.fit(image, up.resolve(path, []), width, height)), np.asarray(expected))


def test_resolve_loads_once(tmp_path):
    config = SRVGGConfig(features=4, convs=1, scale=2)
    _write(tmp_path, "2x-tiny.pth", _random_state(SRVGGNetCompact(config), 7), "params")
    model = up.resolve("2x-tiny", [tmp_path])
    assert model.scale == 2 and up.resolve("2x-tiny", [tmp_path]) is model and up.resolve(model, []) is model
