"""sdlite.conditioning against A1111's encoding rules, on chunks built by hand and run through the reference text
encoders (transformers' CLIPTextModel, open_clip's text tower) the sdlite modules are loaded from."""

from __future__ import annotations

import pytest
import torch

from sdlite.clip import BOS, EOS, CLIPTextModel, OpenCLIPTextModel, get_tokenizer, infer_clip_config, \
    infer_openclip_config
from sdlite.conditioning import chunk_prompt, encode_schedule, encode_text

from conftest import rel_err
from sdfiles import clip_l, clip_state, open_clip_penultimate, open_clip_state, open_clip_text

TOK = get_tokenizer()
CAT, DOG, COMMA = TOK.encode("cat")[0], TOK.encode("dog")[0], TOK.encode(",")[0]
R, S = 1.1, 1 / 1.1


def load_clip(ref):
    sd = clip_state(ref)
    sd.pop("text_model.embeddings.position_ids", None)
    model = CLIPTextModel(infer_clip_config(sd))
    model.load_state_dict(sd, strict=True)
    return model.eval()


def load_openclip(ref):
    sd = open_clip_state(ref)
    model = OpenCLIPTextModel(infer_openclip_config(sd))
    model.load_state_dict(sd, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    """Reference encoders and the sdlite modules made from their weights: SD1 (CLIP-L), SD2 (OpenCLIP),
    SDXL (CLIP-L + OpenCLIP bigG), all reduced."""
    refs = {"l": clip_l(128, seed=11), "h": open_clip_text(128, seed=12), "xl_l": clip_l(64, seed=13),
            "xl_g": open_clip_text(128, seed=14)}
    ours = {"sd1": [load_clip(refs["l"])], "sd2": [load_openclip(refs["h"])],
            "sdxl": [load_clip(refs["xl_l"]), load_openclip(refs["xl_g"])]}
    ours["sdxl-refiner"] = ours["sdxl"][1:]
    return refs, ours


# --- hand-built chunks and reference encodings -----------------------------------------------------------------


def chunk(tokens: list[int], weights: list[float] | None = None):
    """[BOS, tokens, EOS padding] as ids [77] and weights [77] (1 for start, end and padding)."""
    pad = 75 - len(tokens)
    ids = [BOS, *tokens, *[EOS] * pad, EOS]
    w = [1.0, *(weights or [1.0] * len(tokens)), *[1.0] * (pad + 1)]
    return ids, w


def zero_after_end(ids: torch.Tensor) -> torch.Tensor:
    out = ids.clone()
    for row in out:
        first = (row == EOS).nonzero()[0, 0]
        row[first + 1:] = 0
    return out


def clip_ref(ref, ids: torch.Tensor, layer: int, norm: bool) -> torch.Tensor:
    h = ref(ids, output_hidden_states=True).hidden_states[layer]
    final = ref.text_model.final_layer_norm if hasattr(ref, "text_model") else ref.final_layer_norm
    return final(h) if norm else h


def original(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on one chunk tensor [B, 77, C]: weight, then restore the batch mean."""
    zw = z * w[..., None]
    return zw * (z.mean() / zw.mean())


def ids_weights(chunks):
    return torch.tensor([c[0] for c in chunks]), torch.tensor([c[1] for c in chunks])


# --- chunking -------------------------------------------------------------------------------------------------------


def as_pairs(chunks):
    return [(c.ids, c.weights) for c in chunks]


@pytest.mark.parametrize("text, expected", [
    ("", [chunk([])]),
    ("a (red:1.5) cat", [chunk(TOK.encode("a red cat"), [1.0, 1.5, 1.0])]),
    ("BREAK", [chunk([])]),
    ("a BREAK", [chunk(TOK.encode("a"))]),
    ("a BREAK b", [chunk(TOK.encode("a")), chunk(TOK.encode("b"))]),
    ("BREAK a", [chunk([]), chunk(TOK.encode("a"))]),
    ("a BREAK BREAK b", [chunk(TOK.encode("a")), chunk([]), chunk(TOK.encode("b"))]),
    ("(a BREAK b)", [chunk(TOK.encode("a BREAK b"), [R, -R, R])]),  # scaled BREAK is a word
    ("cat " * 75, [chunk([CAT] * 75)]),
    ("cat " * 76, [chunk([CAT] * 75), chunk([CAT])]),
    # the 76th token is a comma: it opens the next chunk and does not count for backtracking there
    ("cat " * 75 + ", dog", [chunk([CAT] * 75), chunk([COMMA, DOG])]),
    ("cat " * 74 + ", dog", [chunk([CAT] * 74 + [COMMA]), chunk([DOG])]),
    # comma 15 tokens back: the tokens after it move to the next chunk
    ("cat " * 60 + ", " + "(dog:1.3) " * 30,
     [chunk([CAT] * 60 + [COMMA]), chunk([DOG] * 30, [1.3] * 30)]),
    # exactly 20 back still moves; 25 back does not
    ("cat " * 55 + ", " + "dog " * 30, [chunk([CAT] * 55 + [COMMA]), chunk([DOG] * 30)]),
    ("cat " * 50 + ", " + "dog " * 30, [chunk([CAT] * 50 + [COMMA] + [DOG] * 24), chunk([DOG] * 6)]),
])
def test_chunks(text, expected):
    assert as_pairs(chunk_prompt(text)) == expected


def test_emphasis_none_keeps_brackets_and_break_as_text():
    text = "(a:1.5) BREAK [b]"
    assert as_pairs(chunk_prompt(text, emphasis="None")) == [chunk(TOK.encode(text))]
    assert as_pairs(chunk_prompt(text, emphasis="Ignore")) == as_pairs(chunk_prompt(text))


def test_long_prompt_chunk_count():
    text = ", ".join(["highly detailed oil painting of a lighthouse in a storm"] * 12)  # 131 tokens
    chunks = chunk_prompt(text)
    assert len(chunks) == 2 and all(len(c.ids) == 77 == len(c.weights) for c in chunks)
    assert [t for c in chunks for t in c.ids if t not in (BOS, EOS)] == TOK.encode(text)


# --- encoding -------------------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_weights_of_one_equal_the_plain_encoding(models, family):
    refs, ours = models
    plain = encode_text("a cat on a mat, oil painting", ours[family], family)
    weighted = encode_text("a (cat:1.0) on a (mat:1), oil painting", ours[family], family)
    assert torch.equal(plain.context, weighted.context)
    ids = TOK(["a cat on a mat, oil painting"], pad_id=EOS)
    if family == "sd1":
        expected = refs["l"](ids).last_hidden_state
    elif family == "sd2":
        expected = refs["h"].ln_final(open_clip_penultimate(refs["h"], zero_after_end(ids)))
    else:
        expected = torch.cat([clip_ref(refs["xl_l"], ids, -2, False),
                              open_clip_penultimate(refs["xl_g"], zero_after_end(ids))], dim=-1)
        assert rel_err(plain.pooled, refs["xl_g"].encode_text(zero_after_end(ids))) < 1e-4
    assert plain.context.shape == (1, 77, expected.shape[-1])
    assert rel_err(plain.context, expected) < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("emphasis", ["Original", "No norm", "Ignore", "None"])
def test_emphasis_modes_sd1(models, emphasis):
    refs, ours = models
    text = "a (red:1.5) [cat], (dog:0.5)"
    got = encode_text(text, ours["sd1"], "sd1", emphasis=emphasis).context
    if emphasis == "None":
        ids, w = ids_weights([chunk(TOK.encode(text))])
    else:
        tokens = TOK.encode("a red cat, dog")
        ids, w = ids_weights([chunk(tokens, [1.0, 1.5, S, 1.0, 0.5])])
    z = refs["l"](ids).last_hidden_state
    expected = {"Original": original(z, w), "No norm": z * w[..., None]}.get(emphasis, z)
    assert rel_err(got, expected) < 1e-5
    if emphasis == "Original":
        assert abs(got.mean() - z.mean()) < 1e-6 * z.abs().mean()


@torch.no_grad()
def test_long_prompt_sd1_clip_skip(models):
    """Three chunks (comma wrap, then BREAK), each encoded alone at layer -2 + final norm and weighted alone."""
    refs, ours = models
    text = "cat " * 60 + ", " + "(dog:1.3) " * 30 + "BREAK [cat]"
    got = encode_text(text, ours["sd1"], "sd1", clip_skip=2).context
    chunks = [chunk([CAT] * 60 + [COMMA]), chunk([DOG] * 30, [1.3] * 30), chunk([CAT], [S])]
    assert got.shape == (1, 3 * 77, 128)
    for i, (ids, w) in enumerate(chunks):
        ids, w = ids_weights([(ids, w)])
        expected = original(clip_ref(refs["l"], ids, -2, True), w)
        assert rel_err(got[:, 77 * i: 77 * (i + 1)], expected) < 1e-5


@torch.no_grad()
def test_sd2_pads_with_zero_and_ignores_clip_skip(models):
    refs, ours = models
    text = "cat " * 75 + "(dog:1.2)"
    got = encode_text(text, ours["sd2"], "sd2").context
    assert torch.equal(got, encode_text(text, ours["sd2"], "sd2", clip_skip=3).context)
    for i, (ids, w) in enumerate([chunk([CAT] * 75), chunk([DOG], [1.2])]):
        ids, w = ids_weights([(ids, w)])
        z = refs["h"].ln_final(open_clip_penultimate(refs["h"], zero_after_end(ids)))
        assert rel_err(got[:, 77 * i: 77 * (i + 1)], original(z, w)) < 1e-5


@torch.no_grad()
def test_sdxl_towers_weighted_apart_and_pooled_from_first_chunk(models):
    refs, ours = models
    text = "a (cat:1.4) BREAK [dog]"
    got = encode_text(text, ours["sdxl"], "sdxl", clip_skip=2)  # clip skip is ignored for SDXL
    assert got.context.shape == (1, 154, 64 + 128) and got.pooled.shape == (1, 128)
    chunks = [chunk(TOK.encode("a cat"), [1.0, 1.4]), chunk([DOG], [S])]
    for i, (ids, w) in enumerate(chunks):
        ids, w = ids_weights([(ids, w)])
        l_part = original(clip_ref(refs["xl_l"], ids, -2, False), w)
        g_part = original(open_clip_penultimate(refs["xl_g"], zero_after_end(ids)), w)
        assert rel_err(got.context[:, 77 * i: 77 * (i + 1)], torch.cat([l_part, g_part], -1)) < 1e-5
    first = torch.tensor([chunks[0][0]])
    assert rel_err(got.pooled, refs["xl_g"].encode_text(zero_after_end(first))) < 1e-5


@torch.no_grad()
def test_batch_pads_with_empty_chunks_and_shares_the_mean(models):
    refs, ours = models
    got = encode_text(["a (cat:1.3)", "b BREAK c"], ours["sd1"], "sd1").context
    assert got.shape == (2, 154, 128)
    first = [chunk(TOK.encode("a cat"), [1.0, 1.3]), chunk(TOK.encode("b"))]
    ids, w = ids_weights(first)
    assert rel_err(got[:, :77], original(refs["l"](ids).last_hidden_state, w)) < 1e-5  # mean over both texts
    ids, _ = ids_weights([chunk([]), chunk(TOK.encode("c"))])
    assert rel_err(got[:, 77:], refs["l"](ids).last_hidden_state) < 1e-5  # row 0 got an empty chunk
    alone = encode_text("a (cat:1.3)", ours["sd1"], "sd1").context
    assert not torch.equal(alone, got[:1, :77])  # A1111's batch-wide mean couples texts encoded together


@torch.no_grad()
def test_schedule_lookup_and_values(models):
    _, ours = models
    sched = encode_schedule("a [cat:dog:3] (b:1.2)", ours["sd1"], "sd1", steps=10)
    assert [end for end, _ in sched.entries] == [3, 10] and sched.embeddings == ()
    batch = encode_text(["a cat (b:1.2)", "a dog (b:1.2)"], ours["sd1"], "sd1").context
    first, second = sched.entries[0][1], sched.entries[1][1]
    assert torch.equal(first.context, batch[:1]) and torch.equal(second.context, batch[1:])
    assert all(sched.cond_at(s) is first for s in range(4))
    assert all(sched.cond_at(s) is second for s in range(4, 11))
    assert sched.cond_at(11) is first  # past the end A1111 falls back to the first entry


@torch.no_grad()
def test_schedule_counts_repeated_texts_as_a1111_batch(models):
    """Alternation over 3 steps encodes cat, dog, cat in one A1111 batch: the mean is taken over all three."""
    _, ours = models
    sched = encode_schedule("[cat|dog] (b:1.5)", ours["sd1"], "sd1", steps=3)
    assert [end for end, _ in sched.entries] == [1, 2, 3]
    batch = encode_text(["cat (b:1.5)", "dog (b:1.5)", "cat (b:1.5)"], ours["sd1"], "sd1").context
    for i, (_, cond) in enumerate(sched.entries):
        assert rel_err(cond.context, batch[i:i + 1]) < 1e-5  # float32 sums taken in another order
    distinct = encode_text(["cat (b:1.5)", "dog (b:1.5)"], ours["sd1"], "sd1").context
    assert rel_err(distinct[:1], batch[:1]) > 1e-4  # counting "cat" once would be visibly different
    assert sched.entries[0][1].context.data_ptr() == sched.entries[2][1].context.data_ptr()  # encoded once


@torch.no_grad()
def test_schedule_hires_pass(models):
    _, ours = models
    sched = encode_schedule("[a:b:25]", ours["sd1"], "sd1", steps=20, hires_steps=10)
    assert [end for end, _ in sched.entries] == [5, 10]


@torch.no_grad()
@pytest.mark.parametrize("family", ["sdxl", "sdxl-refiner"])
def test_empty_sdxl_negative_prompt_is_zero(models, family):
    _, ours = models
    zero = encode_schedule("", ours[family], family, 20, negative=True).cond_at(0)
    assert not zero.context.any() and not zero.pooled.any()
    for text, negative in [("", False), (" ", True), ("[:x:5]", True)]:
        cond = encode_schedule(text, ours[family], family, 20, negative=negative).cond_at(0)
        assert cond.context.any() and cond.pooled.any()
    assert encode_schedule("", ours["sd1"], "sd1", 20, negative=True).cond_at(0).context.any()


def test_input_checks(models):
    _, ours = models
    with pytest.raises(ValueError, match="family"):
        encode_text("x", ours["sd1"], "sd3")
    with pytest.raises(ValueError, match="2 text encoder"):
        encode_text("x", ours["sd1"], "sdxl")
    with pytest.raises(ValueError, match="clip_skip"):
        encode_text("x", ours["sd1"], "sd1", clip_skip=0)
    with pytest.raises(ValueError, match="emphasis"):
        encode_text("x", ours["sd1"], "sd1", emphasis="original")
    with pytest.raises(ValueError, match="at least one"):
        encode_text([], ours["sd1"], "sd1")
