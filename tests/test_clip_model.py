"""sdlite.clip text encoders against transformers' CLIPTextModel (clip layout) and open_clip's text tower."""

from __future__ import annotations

import open_clip
import open_clip.model as open_clip_model
import pytest
import torch
import transformers

from sdlite.clip import (
    EOS,
    CLIPTextModel,
    OpenCLIPTextModel,
    TextEncoderConfig,
    get_tokenizer,
    infer_clip_config,
    infer_openclip_config,
)
from sdlite.errors import CheckpointError, ShapeMismatchError


PROMPTS = [
    "",
    "a photo of an astronaut riding a horse on mars",
    "masterpiece, best quality, (detailed face:1.2), 1girl, solo, long hair, blue eyes, city lights, night",
    ", ".join(["highly detailed oil painting of a lighthouse in a storm"] * 12),  # truncated at 75 tokens
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Both references initialise LayerNorms to (1, 0) and most biases to 0; perturb them so that a wrong norm or a
    dropped bias shows in the numbers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("text_projection"):
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[0] ** -0.5)
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))


def _load(cls, config: TextEncoderConfig, sd: dict[str, torch.Tensor]):
    """Build on meta and assign the weights, as the checkpoint loader does."""
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def _hf_clip(hidden: int, layers: int, heads: int, mlp: int, seed: int):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        attn_implementation="eager",
    )
    ref = transformers.CLIPTextModel(config).eval()
    _randomize(ref, seed)
    sd = ref.state_dict()
    # transformers 5 no longer nests the text model under "text_model." in state_dict(); the files do.
    sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}
    sd.pop("text_model.embeddings.position_ids", None)  # set aside by the loader when a file has it
    return ref, sd


def _open_clip(text_cfg: dict, embed_dim: int, seed: int):
    """An open_clip CLIP with the given text tower (GELU, as ViT-H/bigG) and a tiny vision tower, which SD files
    drop anyway; returns it and its non-``visual.`` state dict, exactly what SD2/SDXL files hold."""
    torch.manual_seed(seed)
    ref = open_clip_model.CLIP(
        embed_dim=embed_dim,
        vision_cfg=open_clip_model.CLIPVisionCfg(layers=1, width=64, head_width=64, patch_size=16, image_size=32),
        text_cfg=open_clip_model.CLIPTextCfg(**text_cfg),
        quick_gelu=False,
    ).eval()
    _randomize(ref, seed)
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("visual.")}
    return ref, sd


def _check_clip(ref, ours: CLIPTextModel, ids: torch.Tensor) -> None:
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        # transformers 5 flattened CLIPTextModel (no .text_model child); 4.x still has it.
        norm = ref.text_model.final_layer_norm if hasattr(ref, "text_model") else ref.final_layer_norm
        sd1 = ours(ids)
        assert rel(sd1.hidden, out.last_hidden_state) < 1e-4 and sd1.pooled is None
        skip2 = ours(ids, layer=-2)  # A1111 "clip skip 2"
        assert rel(skip2.hidden, norm(out.hidden_states[-2])) < 1e-4
        sdxl = ours(ids, layer=-2, final_norm=False)
        assert rel(sdxl.hidden, out.hidden_states[-2]) < 1e-4
        first = ours(ids, layer=0, final_norm=False)
        assert rel(first.hidden, out.hidden_states[1]) < 1e-4
        pooled = ours(ids, layer=-2, final_norm=False, pooled=True)
        assert torch.equal(pooled.hidden, sdxl.hidden)
        assert rel(pooled.pooled, out.pooler_output) < 1e-4


def _check_openclip(ref, ours: OpenCLIPTextModel, ids: torch.Tensor) -> None:
    with torch.no_grad():
        # open_clip's own modules, step by step, for the layers SD2/SDXL read.
        x = ref.token_embedding(ids) + ref.positional_embedding
        for block in ref.transformer.resblocks[:-1]:
            x = block(x, attn_mask=ref.attn_mask)
        penultimate = x
        last = ref.transformer.resblocks[-1](x, attn_mask=ref.attn_mask)

        sd2 = ours(ids, layer=-2, final_norm=True)
        assert rel(sd2.hidden, ref.ln_final(penultimate)) < 1e-4 and sd2.pooled is None
        sdxl = ours(ids, layer=-2, final_norm=False, pooled=True)
        assert rel(sdxl.hidden, penultimate) < 1e-4
        assert rel(sdxl.pooled, ref.encode_text(ids)) < 1e-4
        assert rel(ours(ids).hidden, ref.ln_final(last)) < 1e-4


@pytest.fixture(scope="module")
def clip_pair():
    ref, sd = _hf_clip(hidden=128, layers=3, heads=2, mlp=256, seed=0)
    config = infer_clip_config(sd)
    assert config == TextEncoderConfig(
        layout="clip", width=128, layers=3, heads=2, mlp_width=256, activation="quick_gelu"
    )
    return ref, sd, _load(CLIPTextModel, config, sd)


@pytest.fixture(scope="module")
def openclip_pair():
    text_cfg = dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=3)
    # A projection width different from the model width catches a transposed text_projection.
    ref, sd = _open_clip(text_cfg, embed_dim=96, seed=1)
    config = infer_openclip_config(sd)
    assert config == TextEncoderConfig(
        layout="openclip", width=128, layers=3, heads=2, mlp_width=512, projection_dim=96, activation="gelu"
    )
    return ref, sd, _load(OpenCLIPTextModel, config, sd)


def test_clip_matches_transformers(clip_pair):
    ref, _, ours = clip_pair
    _check_clip(ref, ours, get_tokenizer()(PROMPTS, pad_id=EOS))


def test_clip_shorter_sequence(clip_pair):
    ref, _, ours = clip_pair
    ids = get_tokenizer()(PROMPTS, pad_id=EOS)[:, :40]
    ids[:, -1] = EOS  # every row still has its end token
    _check_clip(ref, ours, ids)


def test_openclip_matches_open_clip(openclip_pair):
    ref, _, ours = openclip_pair
    _check_openclip(ref, ours, get_tokenizer()(PROMPTS, pad_id=0))


@pytest.mark.parametrize("pair", ["clip_pair", "openclip_pair"])
def test_state_dict_is_the_file_layout(pair, request):
    _, sd, ours = request.getfixturevalue(pair)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    assert list(ours.buffers()) == []


@pytest.mark.parametrize("cls, config", [
    (CLIPTextModel, TextEncoderConfig(layout="clip", width=768, layers=12, heads=12, mlp_width=3072,
                                      activation="quick_gelu")),
    (OpenCLIPTextModel, TextEncoderConfig(layout="openclip", width=1280, layers=32, heads=20, mlp_width=5120,
                                          projection_dim=1280, activation="gelu")),
])
def test_builds_on_meta_without_buffers(cls, config):
    with torch.device("meta"):
        model = cls(config)
    assert all(p.is_meta for p in model.parameters())
    assert list(model.buffers()) == []


@pytest.mark.parametrize("pair", ["clip_pair", "openclip_pair"])
def test_layers_after_the_selected_one_are_skipped(pair, request):
    _, _, ours = request.getfixturevalue(pair)
    blocks = ours._blocks()
    calls = []
    handle = blocks[-1].register_forward_hook(lambda *_: calls.append(1))
    try:
        ids = get_tokenizer()(PROMPTS[:1], pad_id=EOS)
        ours(ids, layer=-2)
        assert calls == []
        ours(ids, layer=-2, pooled=True)
        assert calls == [1]
    finally:
        handle.remove()
    with pytest.raises(ValueError):
        ours(ids, layer=len(blocks))
    with pytest.raises(ValueError):
        ours(ids, layer=-len(blocks) - 1)


@pytest.mark.parametrize("pair", ["clip_pair", "openclip_pair"])
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 4e-2)])
def test_half_precision_close_to_float32(pair, dtype, tol, request):
    _, sd, ours = request.getfixturevalue(pair)
    half = _load(type(ours), ours.config, {k: v.to(dtype) for k, v in sd.items()})
    ids = get_tokenizer()(PROMPTS, pad_id=EOS)
    with torch.no_grad():
        want = ours(ids, layer=-2, final_norm=False, pooled=True)
        got = half(ids, layer=-2, final_norm=False, pooled=True)
    for a, b in zip(got, want):
        assert a.dtype == dtype and torch.isfinite(a).all()
        assert rel(a, b) < tol


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        TextEncoderConfig(layout="clip", width=100, layers=1, heads=3, mlp_width=4, activation="quick_gelu")
    with pytest.raises(ValueError, match="projection_dim"):
        TextEncoderConfig(layout="openclip", width=64, layers=1, heads=1, mlp_width=4, activation="gelu")
    with pytest.raises(ValueError, match="layout"):
        TextEncoderConfig(layout="t5", width=64, layers=1, heads=1, mlp_width=4, activation="gelu")
    clip = TextEncoderConfig(layout="clip", width=64, layers=1, heads=1, mlp_width=4, activation="quick_gelu")
    with pytest.raises(ValueError, match="layout"):
        OpenCLIPTextModel(clip)


@pytest.mark.parametrize("edit, key, error", [
    ("drop", "text_model.final_layer_norm.weight", CheckpointError),
    ("drop", "text_model.embeddings.token_embedding.weight", CheckpointError),
    ("transpose", "text_model.encoder.layers.0.mlp.fc2.weight", ShapeMismatchError),
    ("narrow", "text_model.embeddings.position_embedding.weight", ShapeMismatchError),
    ("drop_layer", "text_model.encoder.layers.1.mlp.fc1.weight", CheckpointError),
])
def test_clip_config_errors_name_the_key(clip_pair, edit, key, error):
    _, sd, _ = clip_pair
    with pytest.raises(error) as info:
        infer_clip_config(_edit(sd, edit, key))
    assert key in str(info.value) and info.value.path is None


@pytest.mark.parametrize("edit, key, error", [
    ("drop", "text_projection", CheckpointError),
    ("drop", "positional_embedding", CheckpointError),
    ("narrow", "transformer.resblocks.0.attn.in_proj_weight", ShapeMismatchError),
    ("narrow", "ln_final.weight", ShapeMismatchError),
    ("drop_layer", "transformer.resblocks.1.mlp.c_fc.weight", CheckpointError),
])
def test_openclip_config_errors_name_the_key(openclip_pair, edit, key, error):
    _, sd, _ = openclip_pair
    with pytest.raises(error) as info:
        infer_openclip_config(_edit(sd, edit, key))
    assert key in str(info.value) and info.value.path is None


def test_shape_error_says_expected_and_found(clip_pair):
    _, sd, _ = clip_pair
    key = "text_model.encoder.layers.0.mlp.fc2.weight"
    with pytest.raises(ShapeMismatchError) as info:
        infer_clip_config(_edit(sd, "transpose", key))
    assert "[256, 128]" in str(info.value) and "[128, 256]" in str(info.value)


def test_width_must_give_64_channel_heads():
    _, sd = _hf_clip(hidden=96, layers=1, heads=2, mlp=64, seed=2)
    with pytest.raises(CheckpointError, match="multiple of 64"):
        infer_clip_config(sd)


def _edit(sd: dict[str, torch.Tensor], edit: str, key: str) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    if edit == "drop":
        del sd[key]
    elif edit == "transpose":
        sd[key] = sd[key].t()
    elif edit == "narrow":
        sd[key] = sd[key][..., :-1]
    elif edit == "drop_layer":
        layer = key.rsplit(".", 3)[0] + "."  # e.g. "transformer.resblocks.1."
        sd = {k: v for k, v in sd.items() if not k.startswith(layer)}
    return sd


# --- full-size shapes ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_vit_l():
    ref, sd = _hf_clip(hidden=768, layers=12, heads=12, mlp=3072, seed=3)
    config = infer_clip_config(sd)
    assert (config.width, config.layers, config.heads, config.mlp_width) == (768, 12, 12, 3072)
    _check_clip(ref, _load(CLIPTextModel, config, sd), get_tokenizer()(PROMPTS, pad_id=EOS))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, shape", [("ViT-H-14", (1024, 24, 16, 4096, 1024)), ("ViT-bigG-14", (1280, 32, 20, 5120, 1280))]
)
def test_full_size_openclip(name, shape):
    model_cfg = open_clip.get_model_config(name)
    # The text tower comes from open_clip's own config for the model; its vision tower (1.8B parameters for bigG)
    # is replaced by a tiny one, since SD files do not contain it.
    ref, sd = _open_clip(model_cfg["text_cfg"], embed_dim=model_cfg["embed_dim"], seed=4)
    config = infer_openclip_config(sd)
    assert (config.width, config.layers, config.heads, config.mlp_width, config.projection_dim) == shape
    _check_openclip(ref, _load(OpenCLIPTextModel, config, sd), get_tokenizer()(PROMPTS, pad_id=0))
