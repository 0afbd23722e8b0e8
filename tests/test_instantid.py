"""InstantID: the keypoint image against InstantX's draw_kps written with OpenCV, and the UNet + IdentityNet with
the InstantID adapter against diffusers (ControlNetModel over the face tokens, the UNet with the adapter loaded
through diffusers' IP-Adapter loader) on the same random weights."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from PIL import Image

from sdlite.adapters import keypoints
from sdlite.adapters.annotators import draw

COLOR_LIST = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]


def reference_draw_kps(size, kps):
    """InstantX's draw_kps (pipeline_stable_diffusion_xl_instantid.py) on a (width, height) canvas."""
    limbs = np.array([[0, 2], [1, 2], [3, 2], [4, 2]])
    kps = np.array(kps)
    w, h = size
    out = np.zeros([h, w, 3])
    for index in limbs:
        color = COLOR_LIST[index[0]]
        x, y = kps[index][:, 0], kps[index][:, 1]
        length = ((x[0] - x[1]) ** 2 + (y[0] - y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(x)), int(np.mean(y))), (int(length / 2), 4), int(angle), 0, 360, 1)
        out = cv2.fillConvexPoly(out.copy(), polygon, color)
    out = (out * 0.6).astype(np.uint8)
    for color, (x, y) in zip(COLOR_LIST, kps):
        out = cv2.circle(out.copy(), (int(x), int(y)), 10, color, -1)
    return Image.fromarray(out.astype(np.uint8))


def test_draw_kps_is_bit_exact_with_the_reference():
    rng = np.random.default_rng(0)
    # A face as insightface reports it on a 1024x1024 picture, then random ones, some reaching past the border
    # (OpenCV's line clipping) and some given as integers.
    cases = [((1024, 1024), [[420.3, 480.7], [600.1, 470.2], [515.5, 580.9], [440.2, 680.4], [590.8, 672.6]])]
    for i in range(60):
        w, h = int(rng.integers(40, 260)), int(rng.integers(40, 260))
        kps = rng.uniform(-25, [w + 25, h + 25], size=(5, 2))
        cases.append(((w, h), np.round(kps).astype(int) if i % 3 == 0 else kps))
    for size, kps in cases:
        got = keypoints.draw_kps(size, kps)
        assert got.size == size and got.mode == "RGB"
        assert np.array_equal(np.asarray(got), np.asarray(reference_draw_kps(size, kps)))
    # the image's size may be given as the image
    assert keypoints.draw_kps(Image.new("RGB", (64, 48)), cases[1][1]).size == (64, 48)


def test_opencv_primitives_are_bit_exact():
    rng = np.random.default_rng(1)
    for angle in range(-400, 800, 13):
        for axes in [(0, 0), (1, 4), (37, 4), (5000, 3000)]:
            center = (int(rng.integers(-50, 300)), int(rng.integers(-50, 300)))
            assert np.array_equal(draw.ellipse_poly(center, axes, angle),
                                  cv2.ellipse2Poly(center, axes, angle, 0, 360, 1))
    for _ in range(100):
        center = (int(rng.integers(-20, 80)), int(rng.integers(-20, 80)))
        polygon = draw.ellipse_poly(center, (int(rng.integers(0, 60)), int(rng.integers(0, 8))),
                                            int(rng.integers(-180, 180)))
        image = np.zeros((64, 70, 3))
        expected = cv2.fillConvexPoly(image.copy(), np.array(polygon, np.int32), (255, 0, 0))
        draw.fill_convex_poly(image, polygon, (255, 0, 0))
        assert np.array_equal(image, expected)
        image = np.zeros((64, 70, 3), np.uint8)
        radius = int(rng.integers(0, 15))
        expected = cv2.circle(image.copy(), center, radius, (1, 2, 3), -1)
        draw.fill_circle(image, center, radius, (1, 2, 3))
        assert np.array_equal(image, expected)


def test_draw_kps_refuses_other_shapes():
    with pytest.raises(ValueError, match="5 \\(x, y\\) points"):
        keypoints.draw_kps((64, 64), np.zeros((68, 2)))


# --- the UNet and the IdentityNet, against diffusers ---------------------------------------------------------------

from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402

import sdlite  # noqa: E402
from sdlite.adapters import instantid, ip_adapter  # noqa: E402
from sdlite.checkpoint.write import save_safetensors  # noqa: E402
from sdlite.unet_call import UNetCall  # noqa: E402

from conftest import rel_err  # noqa: E402
from test_controlnet import build_controlnet_pair  # noqa: E402
from test_ip_adapter import adapter_file  # noqa: E402
from test_unet import SD1, SDXL, adm_inputs, build_pair, inputs  # noqa: E402

KPS = [[30.4, 25.1], [66.2, 24.3], [48.0, 38.7], [33.5, 50.2], [62.9, 49.0]]  # on a 96x64 picture


def instantid_file(tmp_path, unet, seed=5):
    """A random InstantID adapter for ``unet``: a resampler over 512-d embeddings, k/v for every attn2."""
    nested = adapter_file(unet, "plus", seed=seed, embed_dim=512)
    flat = {f"{part}.{k}": v for part, d in nested.items() for k, v in d.items()}
    return save_safetensors(tmp_path / "ip-adapter.safetensors", flat), nested


def hint_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


@pytest.mark.parametrize("spec", ["SD1", "SDXL"])
@torch.no_grad()
def test_unet_with_identitynet_matches_diffusers(tmp_path, spec):
    """sdlite's hooks (the unit's adapter half through the attention extension point, its IdentityNet through the
    ControlNet hook) on a CFG batch against diffusers: ControlNetModel over the face tokens (projected by the
    UNet's diffusers-loaded adapter, zeros on the uncond row) and the UNet with that adapter and those residuals."""
    spec = dict(globals()[spec], context_dim=64)
    unet, ref_unet, config = build_pair(spec, seed=3)
    net, ref_net = build_controlnet_pair(spec, seed=4)
    path, nested = instantid_file(tmp_path, unet)
    face = torch.randn(512, generator=torch.Generator().manual_seed(7))
    unit = sdlite.InstantIDUnit(path, net, face.numpy(), KPS, ip_weight=0.7, control_weight=0.6)
    x, t, context, g = inputs(config, h=8, w=12)
    kw, added = {}, {}
    if config.adm_in_channels:
        kw["y"], added = adm_inputs(config, 2, g)
    rows = torch.tensor([True, False])  # row 0 carries the prompt, row 1 is the uncond row

    control = instantid.control_hook([unit], 96, 64, "cpu", torch.float32)
    call = UNetCall(unet, SimpleNamespace(progress=0.0),
                    control=lambda x, t, c, y, cond_rows, step: control(x, t, y, cond_rows, step),
                    patches=ip_adapter.patch_hook(instantid.image_prompts([unit]), unet))
    got = call(x, t, context, cond_rows=rows, **kw)

    ref_unet._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)
    for proc in ref_unet.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [0.7]
    faces = torch.stack([face, torch.zeros(512)])
    tokens = ref_unet.encoder_hid_proj.image_projection_layers[0](faces[:, None])
    hint = hint_tensor(reference_draw_kps((96, 64), KPS)).expand(2, -1, -1, -1)
    down, mid = ref_net(x, t, encoder_hidden_states=tokens, controlnet_cond=hint, conditioning_scale=0.6,
                        return_dict=False, added_cond_kwargs=added or None)
    expected = ref_unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid,
                        added_cond_kwargs={**added, "image_embeds": [faces[:, None, None]]}).sample
    assert rel_err(got, expected) < 1e-4
    # each half matters: without the IdentityNet, and without the face tokens
    no_control = UNetCall(unet, SimpleNamespace(progress=0.0), patches=call.patches)(x, t, context, cond_rows=rows,
                                                                                     **kw)
    assert rel_err(no_control, expected) > 1e-2
    assert rel_err(unet(x, t, context, control=control(x, t, kw.get("y"), rows, SimpleNamespace(progress=0.0)),
                        **kw), expected) > 1e-2
    # outside its step range the unit does nothing
    assert control(x, t, kw.get("y"), rows, SimpleNamespace(progress=1.0)) is not None
    late = sdlite.InstantIDUnit(unit.adapter, net, face, KPS, start=0.5)
    assert instantid.control_hook([late], 96, 64, "cpu", torch.float32)(x, t, kw.get("y"), rows,
                                                                        SimpleNamespace(progress=0.2)) is None


def test_unit_checks_and_keypoint_images(tmp_path):
    spec = dict(SD1, context_dim=64)
    unet, _, _ = build_pair(spec, seed=3)
    net, _ = build_controlnet_pair(spec, seed=4)
    path, _ = instantid_file(tmp_path, unet)
    adapter = ip_adapter.load(path)
    face = np.ones(512, dtype=np.float32)
    unit = sdlite.InstantIDUnit(adapter, net, face, KPS)
    assert unit.ip_weight == 0.8 and unit.control_weight == 0.8  # the reference's recommended weights
    assert np.array_equal(np.asarray(unit.keypoint_image(96, 64)), np.asarray(reference_draw_kps((96, 64), KPS)))
    # keypoints found on a picture of another size: drawn there, then resized as the reference's control image
    big = sdlite.InstantIDUnit(adapter, net, face, np.array(KPS) * 2, keypoints_size=(192, 128))
    expected = reference_draw_kps((192, 128), np.array(KPS) * 2).resize((96, 64), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(big.keypoint_image(96, 64)), np.asarray(expected))
    # a hires pass at 192x128 of a 96x64 generation: the points are the generation's, the drawing is resized
    expected = reference_draw_kps((96, 64), KPS).resize((192, 128), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(unit.keypoint_image(192, 128, canvas=(96, 64))), np.asarray(expected))
    drawn = sdlite.InstantIDUnit(adapter, net, face, reference_draw_kps((96, 64), KPS))
    assert np.array_equal(np.asarray(drawn.keypoint_image(96, 64)), np.asarray(unit.keypoint_image(96, 64)))

    with pytest.raises(ValueError, match="start/end"):
        sdlite.InstantIDUnit(adapter, net, face, KPS, start=0.6, end=0.2)
    with pytest.raises(ValueError, match="one 512-d embedding"):
        sdlite.InstantIDUnit(adapter, net, np.ones(128), KPS)
    with pytest.raises(ValueError, match="5 \\(x, y\\) points"):
        sdlite.InstantIDUnit(adapter, net, face, KPS[:4])
    plain = dict(adapter_file(unet, "base", seed=2))
    base = ip_adapter.load(save_safetensors(tmp_path / "base.safetensors",
                                            {f"{p}.{k}": v for p, d in plain.items() for k, v in d.items()}))
    with pytest.raises(ValueError, match="InstantID's adapter"):
        sdlite.InstantIDUnit(base, net, face, KPS)
    other, _ = build_controlnet_pair(dict(SD1, context_dim=96), seed=4)
    with pytest.raises(ValueError, match="different models"):
        sdlite.InstantIDUnit(adapter, other, face, KPS)
