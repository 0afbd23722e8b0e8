"""The UNet's CPU fast paths that change how, not what, it computes.

The shared CFG prefix (``UNetModel.shared_rows``): a batch of repeated latents at one timestep, the rows differing
only in their text context, is computed once per distinct row up to the first cross-attention. Proven against
diffusers' UNet2DConditionModel (which computes every row) on such batches, against sdlite's own plain path (forced
by a no-op attention patch) to float32 / float64 rounding, and by which batch the first ResBlock is given, so that a
prefix that silently stops being shared fails here. The feed-forward's row chunks against the unchunked layers.
"""

from __future__ import annotations

import pytest
import torch

from sdlite.unet import blocks
from sdlite.unet.attention import AttentionPatch

from conftest import rel_err
from test_unet import SD1, SD2, SDXL, adm_inputs, build_pair

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_inputs(config, images: int, parts: int, seed: int = 3):
    """``parts`` copies of ``images`` latents (as GuidedDenoiser stacks cond and uncond), one timestep per image,
    a different random context for every row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(images, config.in_channels, 16, 24, generator=g).repeat(parts, 1, 1, 1)
    t = torch.tensor([999.0, 261.5, 40.0][:images]).repeat(parts)
    context = torch.randn(images * parts, 77, config.context_dim, generator=g)
    return x, t, context, g


def first_resblock_batches(model) -> list[int]:
    """The batch sizes input block 1's ResBlock (the first layer after the input convolution) is called with."""
    seen: list[int] = []
    model.input_blocks[1][0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    return seen


@pytest.mark.parametrize("name, images, parts", [("SD1", 1, 2), ("SD1", 2, 2), ("SD2", 1, 3)])
@torch.no_grad()
def test_shared_prefix_matches_diffusers_and_the_plain_path(name, images, parts):
    ours, ref, config = build_pair(globals()[name])
    x, t, context, _ = cfg_inputs(config, images, parts)
    seen = first_resblock_batches(ours)
    got = ours(x, t, context)
    assert seen == [images]  # computed once per distinct row
    assert rel_err(got, ref(x, t, encoder_hidden_states=context).sample) < 1e-4
    plain = ours(x, t, context, patches=[AttentionPatch()])  # a no-op patch: every row computed
    assert seen == [images, images * parts]
    assert rel_err(got, plain) < 1e-6
    # the rows do differ (by their contexts), so they were not just copied through
    assert rel_err(got[:images], got[images:2 * images]) > 1e-3


@torch.no_grad()
def test_shared_prefix_is_exact_in_float64():
    ours, _, config = build_pair(SD1)
    ours.double()
    x, t, context, _ = cfg_inputs(config, 1, 2)
    x, context = x.double(), context.double()
    got = ours(x, t, context)
    assert rel_err(got, ours(x, t, context, patches=[AttentionPatch()])) < 1e-13


@torch.no_grad()
def test_rows_that_differ_are_not_shared():
    ours, ref, config = build_pair(SD1)
    x, t, context, _ = cfg_inputs(config, 1, 2)
    seen = first_resblock_batches(ours)
    x_moved = x.clone()
    x_moved[1, 0, 5, 7] += 1e-3  # one latent value
    t_moved = torch.tensor([999.0, 998.0])  # one timestep
    for xi, ti in ((x_moved, t), (x, t_moved)):
        got = ours(xi, ti, context)
        assert rel_err(got, ref(xi, ti, encoder_hidden_states=context).sample) < 1e-4
    assert seen == [2, 2]


@torch.no_grad()
def test_sdxl_shares_only_with_equal_adm_vectors():
    """SDXL's vector conditioning enters the time embedding, so cond and uncond rows (different pooled text) differ
    from the first ResBlock on; equal ADM vectors share the prefix (SDXL has no attention at its first level)."""
    ours, ref, config = build_pair(SDXL)
    x, t, context, g = cfg_inputs(config, 1, 2)
    seen = first_resblock_batches(ours)
    y, added = adm_inputs(config, 2, g)
    same_y, same_added = y[:1].repeat(2, 1), {k: v[:1].repeat(2, 1) for k, v in added.items()}
    for yi, ai in ((y, added), (same_y, same_added)):
        got = ours(x, t, context, y=yi)
        assert rel_err(got, ref(x, t, encoder_hidden_states=context, added_cond_kwargs=ai).sample) < 1e-4
    assert seen == [2, 1]


@torch.no_grad()
def test_feed_forward_chunks_equal_the_whole(monkeypatch):
    ff = blocks.FeedForward(16).eval()
    x = torch.randn(2, 37, 16, generator=torch.Generator().manual_seed(5))
    whole = ff.net(x)
    monkeypatch.setattr(blocks, "FF_MIN_ROWS", 10)
    monkeypatch.setattr(blocks, "FF_CHUNK_BYTES", 1)  # the minimum decides: 8 chunks of 10 rows, the last of 4
    assert torch.allclose(ff(x), whole, rtol=1e-6, atol=1e-7)
    monkeypatch.setattr(blocks, "FF_CHUNK_BYTES", 20 * ff.hidden * 4)  # the byte size decides: 20 rows a chunk
    assert torch.allclose(ff(x), whole, rtol=1e-6, atol=1e-7)
