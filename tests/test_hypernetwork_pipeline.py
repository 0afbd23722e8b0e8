"""``<hypernet:name:m>`` prompt tags through txt2img against the reference pipeline with a diffusers attention
processor that applies A1111's formula (hypernetwork.py: k and v inputs of every attention layer, self-attention
included, chosen by width) written here from the documented rule."""

from __future__ import annotations

import k_diffusion.sampling as ks
import pytest
import torch
import torch.nn.functional as F

import sdlite

from conftest import rel_err
from refpipe import CFG, Noise, batch, load_reference, max_pixel_diff, sample, write_model

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp_state(g, width):
    return {"linear.0.weight": torch.randn(2 * width, width, generator=g) * width ** -0.5,
            "linear.0.bias": torch.randn(2 * width, generator=g) * 0.1,
            "linear.2.weight": torch.randn(width, 2 * width, generator=g) * (2 * width) ** -0.5,
            "linear.2.bias": torch.randn(width, generator=g) * 0.1}


def formula(state, x, m):
    """x + (W2·relu(W1·x + b1) + b2)·m: layer structure [1, 2, 1], ReLU, no output activation."""
    h = F.linear(F.relu(F.linear(x, state["linear.0.weight"], state["linear.0.bias"])),
                 state["linear.2.weight"], state["linear.2.bias"])
    return x + h * m


class HyperProcessor:
    def __init__(self, pairs, m):
        self.pairs, self.m = pairs, m

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        k_in = v_in = ctx
        if ctx.shape[-1] in self.pairs:
            sk, sv = self.pairs[ctx.shape[-1]]
            k_in, v_in = formula(sk, ctx, self.m), formula(sv, ctx, self.m)
        b = hidden_states.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(k_in), attn.to_v(v_in)
        q, k, v = (t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))


@torch.no_grad()
def test_hypernet_tag_matches_the_formula_in_every_attention_layer(tmp_path):
    path, built = write_model(tmp_path, "sd1", seed=61)
    pipe, ref = sdlite.load(path), load_reference(path, built)
    g = torch.Generator().manual_seed(3)
    widths = sorted({m.to_k.in_features for name, m in pipe.unet.named_modules() if name.endswith(("attn1", "attn2"))})
    pairs = {w: (mlp_state(g, w), mlp_state(g, w)) for w in widths}
    folder = tmp_path / "hypernetworks"
    folder.mkdir()
    torch.save({**{w: p for w, p in pairs.items()}, "layer_structure": [1, 2, 1], "activation_func": "relu",
                "is_layer_norm": False, "use_dropout": False, "activate_output": False, "name": "painterly"},
               folder / "painterly.pt")
    pipe.hypernetwork_dirs = [folder]
    got = pipe.txt2img("a harbour <hypernet:painterly:0.6>", "fog", width=64, height=64, steps=3, cfg_scale=5.0,
                       sampler="Euler", seed=4)
    assert "Hypernet: painterly" in got.infotexts[0] and "Hypernet strength: 0.6" in got.infotexts[0]

    ref.unet.set_attn_processor(HyperProcessor(pairs, 0.6))
    c, u = ref.encode(["a harbour "]), ref.encode(["fog"])
    noise = Noise((4, 8, 8), [4])
    sigmas = ref.sigmas(3)
    model = CFG(ref.wrapped, lambda _: [(batch(c, 1), 1.0)], lambda _: batch(u, 1), 5.0)
    expected = sample(ks.sample_euler, model, noise.first() * sigmas[0], sigmas)
    assert rel_err(got.latents, expected) < 1e-4
    assert max_pixel_diff(got.images[0], ref.to_images(expected)[0]) <= 1
    plain = pipe.txt2img("a harbour ", "fog", width=64, height=64, steps=3, cfg_scale=5.0, sampler="Euler", seed=4)
    assert rel_err(plain.latents, expected) > 1e-3

    with pytest.raises(ValueError, match="no missing.pt in pipe.hypernetwork_dirs"):
        pipe.txt2img("x <hypernet:missing>", width=64, height=64, steps=1)
