"""Attention patches (sdlite.unet.attention): every hook against a hand-written formula, the UNet against running it
without the patch, the layer keys against the state dict, and IP-Adapter's decoupled cross-attention against
diffusers' IPAdapterAttnProcessor2_0 on the same weights."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

from sdlite.adapters.controlnet import ControlNet
from sdlite.unet import UNetConfig, UNetModel
from sdlite.unet.attention import AttentionPatch, CrossAttention, ExtraTokens, token_mask

from conftest import randomize_, rel_err
from test_controlnet import controlnet_config, controlnet_inputs
from test_unet import SD1, SDXL, adm_inputs, build_pair, inputs

TOKENS = 4  # image tokens of an IP-Adapter


def attention_keys(model: torch.nn.Module) -> set[str]:
    """The original keys of the attention layers: the state-dict prefixes of their query projections."""
    return {k.removesuffix(".to_q.weight") for k in model.state_dict() if k.endswith(".to_q.weight")}


class ImagePrompt(AttentionPatch):
    """IP-Adapter's decoupled cross-attention: image tokens with per-layer projections on the ``attn2`` layers."""

    def __init__(self, tokens, to_k, to_v, scale=1.0, mask=None):
        self.tokens, self.to_k, self.to_v, self.scale, self.mask = tokens, to_k, to_v, scale, mask

    def extra_tokens(self, site):
        if site.key not in self.to_k:
            return ()
        mask = None if self.mask is None else token_mask(self.mask, site.size)
        scale = self.scale[site.key] if isinstance(self.scale, dict) else self.scale
        return [ExtraTokens(self.to_k[site.key](self.tokens), self.to_v[site.key](self.tokens), scale, mask)]


class Every(AttentionPatch):
    """A test adapter using every hook at once, with fixed tensors; it records the sites it is asked at."""

    def __init__(self, kv=None, extra=(), output_mask=None, bias=None):
        self.kv, self.extra, self.mask, self.bias, self.sites = kv, extra, output_mask, bias, []

    def kv_inputs(self, site, k_in, v_in):
        self.sites.append(site)
        return (k_in, v_in) if self.kv is None else self.kv(site, k_in, v_in)

    def extra_tokens(self, site):
        return self.extra

    def output_mask(self, site):
        return self.mask

    def attention_bias(self, site):
        return self.bias


def by_hand(layer: CrossAttention, x, k_in, v_in, bias=None, mask=None, extras=()) -> torch.Tensor:
    """The patched attention of one layer written out per head: softmax(q kᵀ / √d + bias) v, masked, plus each
    extra set's softmax(q k_eᵀ / √d) v_e times its scale and mask, then to_out."""
    h = layer.heads
    wq, wk, wv = layer.to_q.weight, layer.to_k.weight, layer.to_v.weight
    d = wq.shape[0] // h

    def heads(t):  # [B, T, h*d] -> [B, h, T, d]
        return t.reshape(t.shape[0], t.shape[1], h, d).permute(0, 2, 1, 3)

    def attend(k, v, add=None):
        scores = torch.einsum("bhnd,bhtd->bhnt", q, heads(k)) / math.sqrt(d)
        if add is not None:
            scores = scores + add
        out = torch.einsum("bhnt,bhtd->bhnd", scores.softmax(-1), heads(v))
        return out.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], h * d)

    q = heads(x @ wq.T)
    out = attend(k_in @ wk.T, v_in @ wv.T, bias)
    if mask is not None:
        out = out * mask
    for k, v, scale, m in extras:
        out = out + scale * m * attend(k, v)
    return layer.to_out(out)


@pytest.fixture(scope="module")
def layer():
    return randomize_(CrossAttention(64, heads=4, head_dim=16, context_dim=48), 3).eval()


@torch.no_grad()
def test_every_hook_of_one_layer_matches_the_formula(layer, rng):
    b, n, t = 2, 6 * 5, 7
    x, context = torch.randn(b, n, 64, generator=rng), torch.randn(b, t, 48, generator=rng)
    wk2, wv2 = torch.randn(48, 48, generator=rng) / 7, torch.randn(48, 48, generator=rng) / 7
    extra_k, extra_v = torch.randn(2, 3, 64, generator=rng), torch.randn(1, 3, 64, generator=rng)
    extra_k2, extra_v2 = torch.randn(2, 5, 64, generator=rng), torch.randn(2, 5, 64, generator=rng)
    bias = torch.randn(b, 1, n, t, generator=rng)
    out_mask = torch.rand(1, n, 1, generator=rng)
    extra_mask = token_mask(torch.rand(1, 1, 12, 10, generator=rng), (6, 5))
    row_scale = torch.tensor([0.3, -1.2]).view(2, 1, 1)

    def hyper(site, k_in, v_in):  # separate k and v transforms, as an A1111 hypernetwork makes them
        return k_in + torch.tanh(k_in @ wk2), v_in + torch.tanh(v_in @ wv2)

    patch = Every(hyper, [ExtraTokens(extra_k, extra_v, 0.7, extra_mask), ExtraTokens(extra_k2, extra_v2, row_scale)],
                  out_mask, bias)
    got = layer(x, context, [patch], (6, 5))
    k_in, v_in = hyper(None, context, context)
    expected = by_hand(layer, x, k_in, v_in, bias, out_mask,
                       [(extra_k, extra_v.expand(2, -1, -1), 0.7, extra_mask), (extra_k2, extra_v2, row_scale, 1.0)])
    assert rel_err(got, expected) < 1e-5
    assert rel_err(got, layer(x, context)) > 1e-2
    site = patch.sites[0]
    assert (site.size, site.batch, site.self_attention, site.layer) == ((6, 5), 2, False, layer)


@torch.no_grad()
def test_self_attention_kv_inputs_match_the_formula(rng):
    attn1 = randomize_(CrossAttention(32, heads=2, head_dim=16), 4).eval()
    x = torch.randn(2, 9, 32, generator=rng)
    patch = Every(kv=lambda site, k, v: (2 * k, v - 1))
    assert rel_err(attn1(x, None, [patch], (3, 3)), by_hand(attn1, x, 2 * x, x - 1)) < 1e-5
    assert patch.sites[0].self_attention


@torch.no_grad()
def test_bad_batch_is_named(layer, rng):
    x, context = torch.randn(2, 4, 64, generator=rng), torch.randn(2, 3, 48, generator=rng)
    extra = ExtraTokens(torch.randn(3, 2, 64), torch.randn(3, 2, 64))
    with pytest.raises(ValueError, match="extra tokens for attention layer .* batch 3, the call has 2 rows"):
        layer(x, context, [Every(extra=[extra])])


@pytest.fixture(scope="module")
def sd1():
    model = randomize_(UNetModel(UNetConfig(**SD1)), 0).eval()
    x, t, context, _ = inputs(model.config, h=8, w=12)
    return model, (x, t, context)


@torch.no_grad()
def test_no_patches_and_patches_that_change_nothing_are_bit_identical(sd1):
    model, args = sd1
    plain = model(*args)
    for patches in (None, [], [AttentionPatch()], [Every(), AttentionPatch()]):
        assert torch.equal(model(*args, patches=patches), plain)


@torch.no_grad()
def test_each_attention_layer_is_visited_once_under_its_key_with_its_grid(sd1):
    model, (x, t, context) = sd1
    grids = {}  # the feature-map size each transformer sees, recorded independently of the patches
    handles = [module.register_forward_pre_hook(lambda m, a, name=name: grids.__setitem__(name, a[0].shape[-2:]))
               for name, module in model.named_modules() if type(module).__name__ == "SpatialTransformer"]
    patch = Every()
    try:
        model(x, t, context, patches=[patch])
    finally:
        for handle in handles:
            handle.remove()
    keys = [site.key for site in patch.sites]
    assert len(keys) == len(set(keys)) and set(keys) == attention_keys(model)
    assert {k.rsplit(".", 1)[1] for k in keys} == {"attn1", "attn2"}
    for site in patch.sites:
        assert site.size == grids[site.key.split(".transformer_blocks.")[0]]
        assert site.self_attention == site.key.endswith("attn1")
        assert site.layer is model.get_submodule(site.key)


@torch.no_grad()
def test_controlnet_gives_its_own_layers_their_keys():
    net = randomize_(ControlNet(controlnet_config(SD1)), 2).eval()
    x, hint, t, context, y, _ = controlnet_inputs(net.config)
    patch = Every()
    plain = net(x, hint, t, context)
    assert all(torch.equal(a, b) for a, b in zip(net(x, hint, t, context, patches=[patch]), plain))
    assert {site.key for site in patch.sites} == attention_keys(net)
    doubled = Every(kv=lambda site, k, v: (k, v) if site.self_attention else (2 * k, 2 * v))
    changed = net(x, hint, t, context, patches=[doubled])
    expected = net(x, hint, t, 2 * context)
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(changed, expected))


@torch.no_grad()
def test_context_transform_on_every_cross_attention_equals_the_transformed_context(sd1):
    model, (x, t, context) = sd1
    w = torch.randn(768, 768, generator=torch.Generator().manual_seed(5)) / 28

    def transform(c):
        return c + torch.tanh(c @ w)

    patch = Every(kv=lambda site, k, v: (k, v) if site.self_attention else (transform(k), transform(v)))
    got = model(x, t, context, patches=[patch])
    assert torch.equal(got, model(x, t, transform(context)))
    assert rel_err(got, model(x, t, context)) > 1e-3


@torch.no_grad()
def test_all_ones_masks_equal_no_masks(sd1, rng):
    model, (x, t, context) = sd1
    keys = sorted(k for k in attention_keys(model) if k.endswith("attn2"))
    to_k = {k: randomize_(torch.nn.Linear(768, model.get_submodule(k).to_k.out_features, bias=False), i)
            for i, k in enumerate(keys)}
    to_v = {k: randomize_(torch.nn.Linear(768, model.get_submodule(k).to_v.out_features, bias=False), 50 + i)
            for i, k in enumerate(keys)}
    tokens = torch.randn(2, TOKENS, 768, generator=rng)
    plain = model(x, t, context, patches=[ImagePrompt(tokens, to_k, to_v, 0.8)])
    ones = torch.ones(1, 1, 64, 96)
    masked = model(x, t, context, patches=[ImagePrompt(tokens, to_k, to_v, 0.8, ones),
                                           Every(output_mask=torch.ones(1, 1, 1))])
    assert torch.equal(masked, plain)
    assert rel_err(plain, model(x, t, context)) > 1e-3
    half = ones.clone()
    half[..., 48:] = 0
    assert rel_err(model(x, t, context, patches=[ImagePrompt(tokens, to_k, to_v, 0.8, half)]), plain) > 1e-4


@torch.no_grad()
def test_rows_carry_their_own_tokens(sd1, rng):
    model, (x, t, context) = sd1
    keys = [k for k in attention_keys(model) if k.endswith("attn2")]
    to_k = {k: randomize_(torch.nn.Linear(768, model.get_submodule(k).to_k.out_features, bias=False), 1) for k in keys}
    tokens = torch.randn(2, TOKENS, 768, generator=rng)
    scale = torch.tensor([1.0, 0.5]).view(2, 1, 1)
    both = model(x, t, context, patches=[ImagePrompt(tokens, to_k, to_k, scale)])
    for i in range(2):
        row = model(x[i:i + 1], t[i:i + 1], context[i:i + 1],
                    patches=[ImagePrompt(tokens[i:i + 1], to_k, to_k, scale[i:i + 1])])
        assert rel_err(both[i:i + 1], row) < 1e-5


def attach_ip_adapter(ours: UNetModel, ref, tokens_dim: int, scales: dict, seed: int) -> tuple[dict, dict]:
    """Give diffusers' UNet IPAdapterAttnProcessor2_0 on every cross-attention layer (random to_k_ip/to_v_ip, a
    scale per layer) and return the same projections keyed by our layer keys, the layers matched by their shared
    to_k weight (``build_pair`` loads diffusers' UNet with our tensors)."""
    key_of = {ours.get_submodule(k).to_k.weight.data_ptr(): k for k in attention_keys(ours)}
    to_k, to_v, processors = {}, {}, {}
    for i, name in enumerate(ref.attn_processors):
        attn = ref.get_submodule(name.removesuffix(".processor"))
        key = key_of[attn.to_k.weight.data_ptr()]
        if not key.endswith("attn2"):
            processors[name] = AttnProcessor2_0()
            continue
        proc = IPAdapterAttnProcessor2_0(attn.to_q.out_features, tokens_dim, num_tokens=(TOKENS,), scale=scales[key])
        randomize_(proc, seed + i)
        processors[name], to_k[key], to_v[key] = proc, proc.to_k_ip[0], proc.to_v_ip[0]
    ref.set_attn_processor(processors)
    return to_k, to_v


@pytest.mark.parametrize("name", ["SD1", "SDXL"])
@torch.no_grad()
def test_image_tokens_match_diffusers_ip_adapter(name):
    ours, ref, config = build_pair({"SD1": SD1, "SDXL": SDXL}[name])
    x, t, context, g = inputs(config, h=8, w=12)
    kwargs, y = {}, None
    if config.adm_in_channels:
        y, kwargs["added_cond_kwargs"] = adm_inputs(config, 2, g)
    keys = sorted(k for k in attention_keys(ours) if k.endswith("attn2"))
    scales = {k: 0.5 + i / len(keys) for i, k in enumerate(keys)}  # a scale per layer
    to_k, to_v = attach_ip_adapter(ours, ref, config.context_dim, scales, seed=10)
    # one row's image tokens differ from the other's (an image prompt's cond row and its uncond row)
    tokens = torch.randn(2, TOKENS, config.context_dim, generator=g)
    expected = ref(x, t, encoder_hidden_states=(context, [tokens]), **kwargs).sample
    got = ours(x, t, context, y=y, patches=[ImagePrompt(tokens, to_k, to_v, scales)])
    assert rel_err(got, expected) < 1e-4
    assert rel_err(got, ours(x, t, context, y=y)) > 1e-2
