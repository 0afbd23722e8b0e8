"""IP-Adapter files: variant detection, image projections against diffusers' converters and modules, bad files."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel

from sdlite.adapters import image_proj, ip_adapter
from sdlite.checkpoint.write import save_safetensors
from sdlite.errors import CheckpointError
from sdlite.unet import UNetConfig, UNetModel

from sdfiles import UNETS


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def randomised(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.1 if p.ndim == 1 else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "norm" in name and "weight" in name else 0.0))
    return module


# (variant, our projection, input features, the file's image_proj keys we must write, checked literally)
CASES = {
    "base": (lambda: image_proj.LinearProjection(96, 64, 4), torch.randn(2, 96),
             {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}),
    "plus": (lambda: image_proj.Resampler(80, 128, 128, 16, 4, 512, 64), torch.randn(2, 17, 80),
             {"latents", "proj_in.weight", "layers.0.0.norm1.weight", "layers.0.0.to_kv.weight",
              "layers.3.0.to_out.weight", "layers.2.1.0.bias", "layers.1.1.1.weight", "layers.0.1.3.weight",
              "proj_out.weight", "norm_out.bias"}),
    "full-face": (lambda: image_proj.TokenMLP(80, 64), torch.randn(2, 17, 80),
                  {"proj.0.weight", "proj.2.weight", "proj.3.weight", "proj.3.bias"}),
    "faceid": (lambda: image_proj.FaceIDProjection(512, 1024, 64, 4), torch.randn(2, 512),
               {"proj.0.weight", "proj.2.bias", "norm.weight"}),
    "instantid": (lambda: image_proj.Resampler(512, 128, 128, 16, 4, 512, 96), torch.randn(2, 512),
                  {"latents", "proj_in.weight", "layers.0.0.to_q.weight"}),
}


def write_adapter(tmp_path, variant, context_dim, hidden=(32, 32, 64, 64, 64, 32, 32, 32, 64), seed=0):
    build, features, must_have = CASES[variant]
    proj = randomised(build(), seed)
    sd = {"image_proj." + k: v for k, v in proj.state_dict().items()}
    assert must_have <= {k[len("image_proj."):] for k in sd}
    g = torch.Generator().manual_seed(seed + 1)
    for i, h in enumerate(hidden):
        n = 2 * i + 1
        sd[f"ip_adapter.{n}.to_k_ip.weight"] = torch.randn(h, context_dim, generator=g) * 0.1
        sd[f"ip_adapter.{n}.to_v_ip.weight"] = torch.randn(h, context_dim, generator=g) * 0.1
    return save_safetensors(tmp_path / f"{variant}.safetensors", sd), sd, features


@pytest.mark.parametrize("variant", list(CASES))
def test_image_tokens_match_diffusers(tmp_path, variant):
    context_dim = {"base": 64, "plus": 64, "full-face": 64, "faceid": 64, "instantid": 96}[variant]
    path, sd, features = write_adapter(tmp_path, variant, context_dim)
    adapter = ip_adapter.load(path)
    assert adapter.variant == variant and adapter.context_dim == context_dim
    proj_sd = {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")}
    reference = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(
        SimpleNamespace(), proj_sd, low_cpu_mem_usage=False).eval()
    with torch.no_grad():
        ours = adapter.image_tokens(features)
        ref = reference(features[:, None] if variant == "instantid" else features)
    assert ours.shape == ref.shape
    assert rel(ours, ref) < 1e-5


def test_layer_projections_follow_diffusers_processor_order(tmp_path):
    unet = UNetModel(UNetConfig(**UNETS["sd1"]))
    order = ip_adapter.processor_order(unet)
    # diffusers' attn_processors order: down blocks, up blocks, mid block; attn1 before attn2
    assert order[0].startswith("input_blocks") and order[-1].startswith("middle_block")
    assert [k.rsplit(".", 1)[1] for k in order[:2]] == ["attn1", "attn2"]
    hidden = [unet.get_submodule(k).to_k.out_features for k in order if k.endswith("attn2")]
    context = unet.get_submodule(order[1]).to_k.in_features
    path, sd, _ = write_adapter(tmp_path, "base", context, hidden=hidden)
    layers = ip_adapter.load(path).layer_projections(order)
    assert list(layers) == [k for k in order if k.endswith("attn2")]
    assert torch.equal(layers[order[1]].to_k_ip.weight, sd["ip_adapter.1.to_k_ip.weight"])
    path, _, _ = write_adapter(tmp_path, "base", context, hidden=hidden[:-1])
    with pytest.raises(CheckpointError, match="another model family"):
        ip_adapter.load(path).layer_projections(order)


def test_bad_files_are_refused_by_name(tmp_path):
    path = save_safetensors(tmp_path / "lora.safetensors", {"lora_unet_x.lora_down.weight": torch.zeros(4, 8)})
    with pytest.raises(CheckpointError, match="not an IP-Adapter file"):
        ip_adapter.load(path)
    path = save_safetensors(tmp_path / "odd.safetensors", {"image_proj.something": torch.zeros(3),
                                                            "ip_adapter.1.to_k_ip.weight": torch.zeros(4, 8)})
    with pytest.raises(CheckpointError, match="none of the known IP-Adapter layouts"):
        ip_adapter.load(path)
    _, sd, _ = write_adapter(tmp_path, "base", 64)
    sd["image_proj.norm.weight"] = torch.zeros(65)
    with pytest.raises(CheckpointError, match="not a whole number of tokens"):
        ip_adapter.load(save_safetensors(tmp_path / "bad_shape.safetensors", sd))


# --- at generation time: the UNet with an adapter attached, against diffusers' IP-Adapter loader -------------------

from diffusers.models.embeddings import ImageProjection  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402
from PIL import Image  # noqa: E402

from sdlite.clip import load_vision, preprocess  # noqa: E402
from test_unet import SD1, SDXL, adm_inputs, build_pair, inputs  # noqa: E402


def adapter_file(ours, variant, seed, embed_dim=48):
    """A random IP-Adapter file for ``ours``: the variant's image_proj and k/v projections for every attn2."""
    order = ip_adapter.processor_order(ours)
    context = ours.config.context_dim
    build = {"base": lambda: image_proj.LinearProjection(embed_dim, context, 4),
             "plus": lambda: image_proj.Resampler(embed_dim, 64, 64, 16, 4, 256, context)}[variant]
    proj = randomised(build(), seed)
    nested = {"image_proj": dict(proj.state_dict()), "ip_adapter": {}}
    g = torch.Generator().manual_seed(seed + 1)
    for n, key in enumerate(order):
        if key.endswith("attn2"):
            hidden = ours.get_submodule(key).to_k.out_features
            for name in ("to_k_ip", "to_v_ip"):
                nested["ip_adapter"][f"{n}.{name}.weight"] = torch.randn(hidden, context, generator=g) * 0.2
    return nested


@pytest.mark.parametrize("spec,variant", [("SD1", "base"), ("SD1", "plus"), ("SDXL", "base"), ("SDXL", "plus")])
@torch.no_grad()
def test_unet_with_adapter_matches_diffusers(tmp_path, spec, variant):
    ours, ref, config = build_pair(dict(globals()[spec], context_dim=64))
    nested = adapter_file(ours, variant, seed=3)
    flat = {f"{part}.{k}": v for part, d in nested.items() for k, v in d.items()}
    adapter = ip_adapter.load(save_safetensors(tmp_path / "ip.safetensors", flat))
    ref._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)
    for proc in ref.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [0.7]
    x, t, context, g = inputs(config)
    features = torch.randn(2, 48, generator=g) if variant == "base" else torch.randn(2, 9, 48, generator=g)
    extra = {"image_embeds": [features[:, None]]}
    kw = {}
    if config.adm_in_channels:
        y, added = adm_inputs(config, 2, g)
        extra |= added
        kw["y"] = y
    expected = ref(x, t, encoder_hidden_states=context, added_cond_kwargs=extra).sample
    patch = ip_adapter.IPAdapterPatch(adapter.layer_projections(ip_adapter.processor_order(ours)),
                                      adapter.image_tokens(features), 0.7)
    got = ours(x, t, context, patches=[patch], **kw)
    plain = ours(x, t, context, **kw)
    assert rel(got, expected) < 1e-4
    assert rel(plain, expected) > 1e-2  # the adapter does change the prediction


def clip_files(tmp_path, hidden=64, projection=48):
    torch.manual_seed(5)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=224,
        patch_size=32, projection_dim=projection, hidden_act="gelu")).eval()
    path = save_safetensors(tmp_path / "image_encoder.safetensors",
                            {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")})
    return model, load_vision(path, heads=4, activation="gelu")


@pytest.mark.parametrize("variant", ["base", "plus"])
@torch.no_grad()
def test_unit_tokens_follow_the_reference_pipeline(tmp_path, variant):
    """Positive and negative tokens as diffusers' pipelines make them (encode_image / prepare_ip_adapter_image_embeds):
    base projects image_embeds and zeros; plus projects hidden_states[-2] of the image and of an all-zero input."""
    clip, encoder = clip_files(tmp_path)
    dim = 48 if variant == "base" else 64
    unet = UNetModel(UNetConfig(**UNETS["sd1"]))
    nested = adapter_file(unet, variant, seed=4, embed_dim=dim)
    flat = {f"{part}.{k}": v for part, d in nested.items() for k, v in d.items()}
    adapter = ip_adapter.load(save_safetensors(tmp_path / "ip.safetensors", flat))
    image = Image.new("RGB", (300, 260), (200, 40, 90))
    unit = ip_adapter.IPAdapterUnit(adapter, [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)],
                                    encoder=encoder, weight=0.5)
    pos, neg = unit.tokens()
    proj = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(
        SimpleNamespace(), nested["image_proj"], low_cpu_mem_usage=False).eval()
    pixels = preprocess([image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    out = clip(pixel_values=pixels, output_hidden_states=True)
    if variant == "base":
        feats, zero = out.image_embeds, torch.zeros_like(out.image_embeds)
    else:
        feats = out.hidden_states[-2]
        zero = clip(pixel_values=torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
    assert rel(pos, proj(feats).reshape(-1, pos.shape[-1])) < 1e-5
    assert rel(neg, proj(zero).reshape(-1, pos.shape[-1])) < 1e-5
    with pytest.raises(ValueError, match="encoder="):
        ip_adapter.IPAdapterUnit(adapter, image)
    with pytest.raises(ValueError, match="face_embedding"):
        path, _, _ = write_adapter(tmp_path, "faceid", 128)
        ip_adapter.IPAdapterUnit(ip_adapter.load(path), image, encoder=encoder)
