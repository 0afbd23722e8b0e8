"""The family table (sdlite.checkpoint.family_table) and the shared shape reader (sdlite.checkpoint.shapes).

The table's facts are checked against independent sources: the released architectures written out by hand in
sdfiles.FULL_UNETS (from the original yaml configs), diffusers' SDXL pipelines for the ADM vector, diffusers'
single-file defaults for the native sizes.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)
from safetensors.torch import save_file

import sdlite
from sdlite.checkpoint.family_table import FAMILIES, by_context_dim, get_family, heads_for_context
from sdlite.checkpoint.shapes import ShapeReader
from sdlite.errors import CheckpointError, ShapeMismatchError

from sdfiles import FULL_UNETS, build

RELEASES = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl", "sdxl-refiner": "sdxl_refiner"}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_table_matches_the_released_unets(name):
    family, unet = FAMILIES[name], FULL_UNETS[RELEASES[name]]
    assert family.context_dim == unet["context_dim"]
    assert by_context_dim(unet["context_dim"]) is family
    expected_heads = {k: unet[k] for k in ("num_heads", "head_dim") if unet.get(k) is not None}
    assert heads_for_context(unet["context_dim"]) == expected_heads == family.heads
    pooled = next((t.width for t in family.text_encoders if t.pooled), None)
    assert family.adm_width(pooled) == unet.get("adm_in_channels")


def test_native_sizes_match_diffusers_defaults():
    assert FAMILIES["sd1"].size_for("eps") == DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP["v1"]
    assert FAMILIES["sd2"].size_for("v") == DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP["v2"]
    assert FAMILIES["sdxl"].size_for("eps") == DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP["xl_base"]
    assert FAMILIES["sdxl-refiner"].size_for("eps") == DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP["xl_refiner"]
    assert FAMILIES["sd2"].size_for("eps") == 512


def _stub(adm_width: int, aesthetics: bool):
    unet = SimpleNamespace(config=SimpleNamespace(addition_time_embed_dim=256),
                           add_embedding=SimpleNamespace(linear_1=SimpleNamespace(in_features=adm_width)))
    return SimpleNamespace(unet=unet, config=SimpleNamespace(requires_aesthetics_score=aesthetics))


def test_adm_values_and_width_match_diffusers_add_time_ids():
    # Distinct numbers everywhere, so that any swap of height/width or top/left shows.
    size, crop, target, score = (832, 1216), (24, 40), (896, 1152), 6.5  # (w, h), (left, top), (w, h)
    base = FAMILIES["sdxl"]
    ours = base.adm_values(original_size=size, crop=crop, target_size=target, aesthetic_score=score)
    # diffusers takes (h, w) sizes and (top, left) crops, and checks the ADM width against the UNet's.
    theirs = StableDiffusionXLPipeline._get_add_time_ids(
        _stub(base.adm_width(1280), False), size[::-1], crop[::-1], target[::-1], torch.float64, 1280)
    assert ours == theirs[0].tolist()

    refiner = FAMILIES["sdxl-refiner"]
    ours = refiner.adm_values(original_size=size, crop=crop, target_size=target, aesthetic_score=score)
    theirs, _ = StableDiffusionXLImg2ImgPipeline._get_add_time_ids(
        _stub(refiner.adm_width(1280), True), size[::-1], crop[::-1], target[::-1], score, 2.5, size[::-1],
        crop[::-1], target[::-1], torch.float64, 1280)
    assert ours == theirs[0].tolist()


def test_layer_rules():
    sd1, sdxl = FAMILIES["sd1"].text_encoders[0], FAMILIES["sdxl"].text_encoders
    assert sd1.read(1) == (-1, True, False) and sd1.read(2) == (-2, True, False)
    assert FAMILIES["sd2"].text_encoders[0].read(2) == (-2, True, False)  # clip skip is SD 1.x's only
    assert [t.read(3) for t in sdxl] == [(-2, False, False), (-2, False, True)]
    with pytest.raises(ValueError, match="sd1"):
        get_family("sd3")


def test_shape_reader_names_file_keys():
    sd = {"a.0.w": torch.empty(2, 3, device="meta"), "a.2.w": torch.empty(2, device="meta")}
    shape = ShapeReader(sd, "UNet", "model.diffusion_model.")
    assert shape("a.0.w", ndim=2) == (2, 3) and shape("a.0.w", expected=(2, None)) == (2, 3)
    with pytest.raises(CheckpointError, match=r"UNet key 'model\.diffusion_model\.b' is missing"):
        shape("b")
    with pytest.raises(CheckpointError, match=r"'model\.diffusion_model\.a\.0\.w' has shape \[2, 3\], expected a 4-d"):
        shape("a.0.w", ndim=4)
    with pytest.raises(ShapeMismatchError) as info:
        shape("a.0.w", expected=(3, None))
    assert info.value.key == "model.diffusion_model.a.0.w" and info.value.expected == (3, -1)
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\.a\.1\.w' is missing"):
        shape.count("a.", "w")
    with pytest.raises(CheckpointError, match=r"indices \[0, 2\]"):
        shape.count("a.")


def test_loading_names_the_missing_key_and_the_file(tmp_path):
    state = dict(build("sd1").state)
    del state["model.diffusion_model.out.2.weight"]
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"broken\.safetensors: UNet key 'model\.diffusion_model\.out\.2\."):
        sdlite.load(path)
