"""The same LoRA files loaded by the tools that define them: diffusers' kohya converter and LoRA loader, PEFT's own
adapters (LoRA and DoRA, on diffusers' UNet and transformers' CLIP), and LyCORIS' modules (LoCon Tucker, LoHa, LoKr,
DoRA, full). sdlite's outputs must match theirs within the network tolerance (rel. error < 1e-4)."""

from __future__ import annotations

import copy

import lycoris  # noqa: F401  (the reference for the LyCORIS formats: a missing install fails here)
import pytest
import torch
import transformers
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import load_file

from sdlite.unet.blocks import timestep_embedding

from conftest import rel_err
from lorafiles import ALPHA, R, diffusers_unet, load_model, write_file

TOL = 1e-4
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1", "linear_2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {family: load_model(family, tmp_path_factory.mktemp(family)) for family in ("sd1", "sdxl")}


pytestmark = pytest.mark.usefixtures("take_off_loras")


def unet_inputs(pipe, seed=3):
    g = torch.Generator().manual_seed(seed)
    c = pipe.unet.config
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([900.0, 100.0])
    context = torch.randn(2, 77, c.context_dim, generator=g)
    if not c.adm_in_channels:
        return (x, t, context), {}, {}
    pooled = torch.randn(2, c.adm_in_channels - 6 * 256, generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 256).reshape(2, -1)], dim=1)
    return (x, t, context), {"y": y}, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


@torch.no_grad()
def compare_unet(pipe, ref_unet) -> float:
    args, ours_kw, ref_kw = unet_inputs(pipe)
    expected = ref_unet(args[0], args[1], encoder_hidden_states=args[2], **ref_kw).sample
    return rel_err(pipe.unet(*args, **ours_kw), expected)


def tokens(seed=4):
    return torch.randint(0, 49407, (2, 77), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def compare_text(encoder, ref) -> float:
    ids = tokens()
    return rel_err(encoder(ids, layer=-1, final_norm=True).hidden, ref(ids).last_hidden_state)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_file_matches_diffusers_loader(models, tmp_path, family):
    model = models[family]
    path = tmp_path / "kohya.safetensors"
    write_file(path, model.layers, "lora", family)
    mixin = StableDiffusionLoraLoaderMixin if family == "sd1" else StableDiffusionXLLoraLoaderMixin
    ref_unet = diffusers_unet(model.pipe.unet)
    kwargs = {"unet_config": ref_unet.config} if family == "sdxl" else {}
    state, alphas = mixin.lora_state_dict(load_file(str(path)), **kwargs)
    mixin.load_lora_into_unet(state, alphas, ref_unet)
    ref_text = copy.deepcopy(model.built.clip)
    mixin.load_lora_into_text_encoder(state, alphas, ref_text, prefix="text_encoder")

    before = compare_unet(model.pipe, ref_unet)
    model.pipe.add_lora(path)
    assert before > 1e-2  # the LoRA changes the output
    assert compare_unet(model.pipe, ref_unet) < TOL
    assert compare_text(model.pipe.text_encoders[0], ref_text) < TOL


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_adapters_match_peft(models, tmp_path, dora):
    """LoRA / DoRA adapters made by PEFT on diffusers' UNet and transformers' CLIP, saved by diffusers (alphas in the
    adapter metadata, one of them through alpha_pattern)."""
    model = models["sd1"]
    ref_unet = diffusers_unet(model.pipe.unet)
    torch.manual_seed(0)
    unet_config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=UNET_TARGETS, init_lora_weights=False,
                             use_dora=dora, alpha_pattern={"attn2.to_k": 1.0})
    ref_unet.add_adapter(unet_config)
    ref_text = copy.deepcopy(model.built.clip)
    text_config = LoraConfig(r=R, lora_alpha=2 * R, target_modules=TEXT_TARGETS, init_lora_weights=False,
                             use_dora=dora)
    inject_adapter_in_model(text_config, ref_text)
    if dora:  # DoRA starts with the magnitude equal to the weight norm; move it away from there
        with torch.no_grad():
            for name, p in [*ref_unet.named_parameters(), *ref_text.named_parameters()]:
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.2 * torch.randn_like(p))
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(ref_unet),
        text_encoder_lora_layers=get_peft_model_state_dict(ref_text),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict())
    handle = model.pipe.add_lora(tmp_path / "pytorch_lora_weights.safetensors")
    layers = len(handle.report.matched) // (3 if dora else 2)  # A, B (and the magnitude) per layer
    assert handle.report.algorithms == {"lora+dora" if dora else "lora": layers}
    assert compare_unet(model.pipe, ref_unet.eval()) < TOL
    assert compare_text(model.pipe.text_encoders[0], ref_text.eval()) < TOL


def hf_twin(openclip) -> transformers.CLIPTextModel:
    """transformers' CLIPTextModel computing the same function as an open_clip tower (separate q, k, v)."""
    c = openclip.config
    config = transformers.CLIPTextConfig(vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_width,
                                         num_hidden_layers=c.layers, num_attention_heads=c.heads, hidden_act="gelu",
                                         max_position_embeddings=c.context_length)
    twin = transformers.CLIPTextModel(config).eval()
    sd = {"embeddings.token_embedding.weight": openclip.token_embedding.weight,
          "embeddings.position_embedding.weight": openclip.positional_embedding,
          "final_layer_norm.weight": openclip.ln_final.weight, "final_layer_norm.bias": openclip.ln_final.bias}
    for n, block in enumerate(openclip.transformer.resblocks):
        p = f"encoder.layers.{n}."
        for proj, w, b in zip("qkv", block.attn.in_proj_weight.chunk(3), block.attn.in_proj_bias.chunk(3)):
            sd |= {f"{p}self_attn.{proj}_proj.weight": w, f"{p}self_attn.{proj}_proj.bias": b}
        for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            module = block.get_submodule(ours)
            sd |= {f"{p}{theirs}.weight": module.weight, f"{p}{theirs}.bias": module.bias}
    missing, unexpected = twin.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return twin


def test_peft_lora_on_hf_clip_maps_onto_open_clip_in_proj(models, tmp_path):
    """An SDXL text_encoder_2 LoRA names HF CLIP's q/k/v projections; sdlite applies them to thirds of open_clip's
    stacked in_proj_weight. A PEFT adapter on an HF twin of the bigG tower is the reference."""
    pipe = models["sdxl"].pipe
    twin = hf_twin(pipe.text_encoders[1])
    assert compare_text(pipe.text_encoders[1], twin) < TOL
    torch.manual_seed(1)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TEXT_TARGETS, init_lora_weights=False)
    inject_adapter_in_model(config, twin)
    StableDiffusionXLLoraLoaderMixin.save_lora_weights(
        tmp_path, unet_lora_layers=None, text_encoder_2_lora_layers=get_peft_model_state_dict(twin),
        text_encoder_2_lora_adapter_metadata=config.to_dict())
    handle = pipe.add_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert any("in_proj_weight[128:256]" in target for target in handle.report.matched.values())
    assert compare_text(pipe.text_encoders[1], twin) < TOL


def lycoris_module(fmt: str, name: str, module, t: dict):
    """LyCORIS' own module for one layer, built from the file's tensors by its state-dict constructors."""
    from lycoris.modules.full import FullModule
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    get = lambda role: t.get(role)  # noqa: E731
    if fmt == "full":
        return FullModule.make_module_from_state_dict(name, module, t["diff"], get("diff_b"))
    if fmt.startswith("loha"):
        return LohaModule.make_module_from_state_dict(name, module, t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"],
                                                      t["hada_w2_b"], get("hada_t1"), get("hada_t2"), t["alpha"], None)
    if fmt.startswith("lokr"):
        if "lokr_t2" in t:
            # LyCORIS' state-dict constructor reads a Tucker LoKr's rank from lokr_w2_a.shape[1], which is the
            # output factor there; the trainer's rank (lokr_w2_b.shape[0], what A1111 and ComfyUI use) is set here.
            lyco = LokrModule(name, module, 1, lora_dim=R, alpha=float(t["alpha"]), use_tucker=True, factor=2)
            for role in ("lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"):
                getattr(lyco, role).data.copy_(t[role])
            return lyco
        return LokrModule.make_module_from_state_dict(name, module, get("lokr_w1"), get("lokr_w1_a"), get("lokr_w1_b"),
                                                      get("lokr_w2"), get("lokr_w2_a"), get("lokr_w2_b"), None,
                                                      get("lokr_t2"), t["alpha"], None)
    return LoConModule.make_module_from_state_dict(name, module, t["lora_up.weight"], t["lora_down.weight"],
                                                   get("lora_mid.weight"), t["alpha"], get("dora_scale"))


@pytest.mark.parametrize("fmt", ["locon_tucker", "loha", "loha_tucker", "lokr", "lokr_lowrank", "lokr_both",
                                 "lokr_tucker", "full", "dora"])
@torch.no_grad()
def test_lycoris_formats_match_lycoris_modules(models, tmp_path, fmt):
    """A linear, a 1x1 and a 3x3 convolution of SD1, each through LyCORIS' module and through sdlite's merge."""
    model = models["sd1"]
    path = tmp_path / f"{fmt}.safetensors"
    written = write_file(path, model.layers, fmt, "sd1", seed=11)
    picks = {"attn1.to_q": None, "attentions.0.proj_in": None, "resnets.0.conv1": None}
    for name, (layer, tensors) in written.items():
        for suffix in picks:
            if picks[suffix] is None and layer.component == "unet" and layer.dotted.endswith(suffix):
                picks[suffix] = (name, layer, copy.deepcopy(layer.module), tensors)
    # DoRA's multiplier means different things in LyCORIS and in the UIs; at 1 they agree (lora_formats.py).
    m = 1.0 if fmt == "dora" else 0.7
    model.pipe.add_lora(path, weight=m)
    g = torch.Generator().manual_seed(2)
    for name, layer, original, tensors in picks.values():
        shape = (2, 5, layer.weight.shape[1]) if layer.weight.ndim == 2 else (2, layer.weight.shape[1], 6, 6)
        x = torch.randn(shape, generator=g)
        base = original(x)
        lyco = lycoris_module(fmt, name, original, tensors)
        lyco.multiplier = m
        lyco.apply_to()
        expected = original(x)
        assert rel_err(expected, base) > 1e-2, name  # the layer does change
        assert rel_err(layer.module(x), expected) < TOL, name
