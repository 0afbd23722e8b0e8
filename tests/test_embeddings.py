"""Textual-inversion embeddings: the four file formats, folders, fitting the text encoders, and their vectors in the
conditioning, checked against the reference encoders fed the same vectors (written into spare rows of their token
table, at the slots A1111 gives the embedding)."""

from __future__ import annotations

import copy
import hashlib
import warnings

import pytest
import torch
from safetensors.torch import save_file

from sdlite.adapters.embeddings import Embedding, EmbeddingSet, load_embedding, load_embeddings, ti_hashes
from sdlite.clip import EOS, get_tokenizer
from sdlite.conditioning import chunk_prompt, encode_schedule, encode_text
from sdlite.errors import CheckpointError

from conftest import rel_err
from sdfiles import clip_l, open_clip_penultimate, open_clip_text
from test_conditioning import CAT, COMMA, DOG, chunk, clip_ref, ids_weights, load_clip, load_openclip, original, \
    zero_after_end

TOK = get_tokenizer()
SPARE = 1000  # token rows the reference models get the embedding vectors in


def vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file per format: A1111 .pt (2 vectors), diffusers .bin (1 vector as [dim]), kohya .safetensors (3),
    SDXL .safetensors (2 per tower), all for the reduced encoders (128 wide; SDXL 64 + 128)."""
    d = tmp_path_factory.mktemp("embeddings")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors(2, 128, 1)}, "name": "other name",
                "step": 3000, "sd_checkpoint": "a9263745", "sd_checkpoint_name": "v1-5"}, d / "mystyle.pt")
    torch.save({"<cat-toy>": vectors(1, 128, 2)[0]}, d / "cattoy.bin")
    save_file({"emb_params": vectors(3, 128, 3)}, str(d / "kohyaemb.safetensors"))
    save_file({"clip_l": vectors(2, 64, 4), "clip_g": vectors(2, 128, 5)}, str(d / "xlstyle.safetensors"))
    return d


@pytest.fixture(scope="module")
def models():
    refs = {"l": clip_l(128, seed=21), "h": open_clip_text(128, seed=22), "xl_l": clip_l(64, seed=23),
            "xl_g": open_clip_text(128, seed=24)}
    ours = {"sd1": [load_clip(refs["l"])], "sd2": [load_openclip(refs["h"])],
            "sdxl": [load_clip(refs["xl_l"]), load_openclip(refs["xl_g"])]}
    return refs, ours


def with_rows(ref, rows: torch.Tensor):
    """A copy of a reference encoder whose token rows SPARE… hold ``rows``."""
    ref = copy.deepcopy(ref)
    table = ref.get_input_embeddings() if hasattr(ref, "get_input_embeddings") else ref.token_embedding
    with torch.no_grad():
        table.weight[SPARE: SPARE + len(rows)] = rows
    return ref


def spare(ids: list[int], slot: int, n: int) -> torch.Tensor:
    """Chunk ids with the embedding's slots (id 0, after the start token) pointing at the spare rows."""
    ids = list(ids)
    ids[slot + 1: slot + 1 + n] = range(SPARE, SPARE + n)
    return torch.tensor([ids])


# --- files --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem, suffix, parts, n", [
    ("mystyle", ".pt", {"": 128}, 2),
    ("cattoy", ".bin", {"": 128}, 1),
    ("kohyaemb", ".safetensors", {"": 128}, 3),
    ("xlstyle", ".safetensors", {"clip_l": 64, "clip_g": 128}, 2),
])
def test_formats_load(files, stem, suffix, parts, n):
    path = files / f"{stem}{suffix}"
    emb = load_embedding(path)
    assert emb.name == stem  # the file stem, not the name stored in an A1111 .pt
    assert {k: v.shape for k, v in emb.vectors.items()} == {k: (n, w) for k, w in parts.items()}
    assert all(v.dtype == torch.float32 for v in emb.vectors.values()) and emb.num_vectors == n
    assert emb.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and emb.shorthash == emb.sha256[:12]


def test_a1111_vectors_are_the_stored_ones(files):
    assert torch.equal(load_embedding(files / "mystyle.pt").vectors[""], vectors(2, 128, 1))
    assert torch.equal(load_embedding(files / "cattoy.bin").vectors[""], vectors(1, 128, 2))


def test_not_an_embedding(tmp_path):
    torch.save({"string_to_param": {"a": torch.zeros(1, 8), "b": torch.zeros(1, 8)}}, tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match="2 terms"):
        load_embedding(tmp_path / "two.pt")
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(CheckpointError, match="not a textual-inversion embedding"):
        load_embedding(tmp_path / "lora.safetensors")


def test_folder_loading_and_fitting(files, tmp_path, models):
    _, ours = models
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    for f in files.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "sub" / "mystyle.safetensors").write_bytes((files / "kohyaemb.safetensors").read_bytes())  # same name
    (folder / "sub" / "notes.txt").write_text("not an embedding")
    (folder / "empty.pt").write_bytes(b"")  # A1111 skips empty files
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.zeros(1, 128))})},
               folder / "oldtorch.pt")  # an old-style pickle that asks to build a module: refused, not run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sd1 = load_embeddings(folder, ours["sd1"])
    messages = " | ".join(str(w.message) for w in caught)
    assert sorted(e.name for e in sd1) == ["cattoy", "kohyaemb", "mystyle"]
    assert "'xlstyle'" in messages and "64 + 128 wide" in messages  # SDXL vectors do not fit SD1
    assert "oldtorch.pt" in messages and "already taken" in messages
    assert sd1["mystyle"].path.endswith("mystyle.pt")  # the first found keeps the name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        xl = load_embeddings([files / "xlstyle.safetensors", files / "mystyle.pt"], ours["sdxl"])
    assert [e.name for e in xl] == ["xlstyle"] and "'mystyle'" in str(caught[0].message)
    with pytest.raises(CheckpointError, match="no such file"):
        load_embeddings(tmp_path / "missing", ours["sd1"])


def test_fitting_rules():
    widths = (768, 1280)
    uneven = Embedding("uneven", {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)})
    big = Embedding("big", {"clip_l": torch.zeros(76, 768), "clip_g": torch.zeros(76, 1280)})
    ok = Embedding("fine", {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)})
    with pytest.warns(UserWarning) as caught:
        s = EmbeddingSet([uneven, big, ok], widths)
    assert [e.name for e in s] == ["fine"] and len(caught) == 2
    assert "clip_g part 3" in str(caught[0].message) and "76 vectors" in str(caught[1].message)


# --- in prompts -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_set(files, models):
    _, ours = models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # xlstyle does not fit SD1
        return load_embeddings(files, ours["sd1"])


def test_chunks_carry_embedding_slots(sd1_set):
    emb = sd1_set["mystyle"]
    chunks = chunk_prompt("a photo of MyStyle, red", embeddings=sd1_set)  # names match case-insensitively
    prefix = TOK.encode("a photo of")
    assert [(c.ids, c.weights) for c in chunks] == [chunk(prefix + [0, 0] + TOK.encode(", red"))]
    assert chunks[0].fixes == [(3, emb)]
    weighted = chunk_prompt("a photo of (mystyle:1.2)", embeddings=sd1_set)[0]
    assert weighted.weights[4:6] == [1.2, 1.2] and weighted.fixes == [(3, emb)]
    # an embedding that does not fit in what is left of a chunk starts the next one
    chunks = chunk_prompt("cat " * 74 + "kohyaemb", embeddings=sd1_set)
    assert [c.ids for c in chunks] == [chunk([CAT] * 74)[0], chunk([0, 0, 0])[0]]
    assert chunks[0].fixes == [] and chunks[1].fixes == [(0, sd1_set["kohyaemb"])]


def test_longest_name_wins():
    short = Embedding("bad", {"": torch.zeros(1, 128)})
    long = Embedding("bad hands", {"": torch.zeros(3, 128)})
    s = EmbeddingSet([short, long], (128,))
    chunk0 = chunk_prompt("bad hands, bad", embeddings=s)[0]
    assert chunk0.fixes == [(0, long), (4, short)] and chunk0.ids[1:7] == [0, 0, 0, COMMA, 0, EOS]


@torch.no_grad()
def test_sd1_vectors_replace_exactly_their_slots(models, sd1_set):
    refs, ours = models
    emb = sd1_set["mystyle"]
    text = "a photo of (mystyle:1.2), red"
    got = encode_text(text, ours["sd1"], "sd1", embeddings=sd1_set).context
    ids, w = ids_weights([chunk(TOK.encode("a photo of") + [0, 0] + TOK.encode(", red"),
                                [1.0, 1.0, 1.0, 1.2, 1.2, 1.0, 1.0])])
    expected = original(with_rows(refs["l"], emb.vectors[""])(spare(ids[0].tolist(), 3, 2)).last_hidden_state, w)
    assert rel_err(got, expected) < 1e-5
    # the token embeddings fed to the encoder differ from the plain lookup only at ids 4 and 5
    seen = {}
    encoder = ours["sd1"][0]
    hook = encoder.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        encode_text(text, ours["sd1"], "sd1", embeddings=sd1_set)
    finally:
        hook.remove()
    changed = (seen["token_embeds"] != encoder.text_model.embeddings.token_embedding(ids)).any(-1)[0]
    assert changed.nonzero().flatten().tolist() == [4, 5]
    assert torch.equal(seen["token_embeds"][0, 4:6], emb.vectors[""])


@torch.no_grad()
def test_sd2_one_vector_bin(models, sd1_set):
    refs, ours = models
    got = encode_text("cattoy on a sofa", ours["sd2"], "sd2", embeddings=EmbeddingSet(sd1_set, (128,))).context
    ids = chunk([0] + TOK.encode("on a sofa"))[0]
    ref = with_rows(refs["h"], sd1_set["cattoy"].vectors[""])
    expected = ref.ln_final(open_clip_penultimate(ref, zero_after_end(spare(ids, 0, 1))))
    assert rel_err(got, expected) < 1e-5


@torch.no_grad()
def test_sdxl_each_tower_gets_its_part(models, files):
    refs, ours = models
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        xl = load_embeddings(files, ours["sdxl"])
    assert sorted(str(w.message).split("'")[1] for w in caught) == ["cattoy", "kohyaemb", "mystyle"]
    emb = xl["xlstyle"]
    sched = encode_schedule("(xlstyle:0.9) castle", ours["sdxl"], "sdxl", steps=10, embeddings=xl)
    got = sched.cond_at(0)
    assert sched.embeddings == (emb,)
    ids, w = ids_weights([chunk([0, 0] + TOK.encode("castle"), [0.9, 0.9, 1.0])])
    ref_l, ref_g = with_rows(refs["xl_l"], emb.vectors["clip_l"]), with_rows(refs["xl_g"], emb.vectors["clip_g"])
    g_ids = zero_after_end(spare(ids[0].tolist(), 0, 2))
    expected = torch.cat([original(clip_ref(ref_l, spare(ids[0].tolist(), 0, 2), -2, False), w),
                          original(open_clip_penultimate(ref_g, g_ids), w)], dim=-1)
    assert rel_err(got.context, expected) < 1e-5
    assert rel_err(got.pooled, ref_g.encode_text(g_ids)) < 1e-5


@torch.no_grad()
def test_comma_wrap_leaves_vectors_behind_as_a1111(models, sd1_set):
    """A1111 moves ids and weights after the last comma to the next chunk but not the embedding's vectors: they are
    written over the padding of the closed chunk and the moved slots stay id 0. sdlite reproduces it."""
    refs, ours = models
    emb = sd1_set["mystyle"]
    text = "cat " * 60 + ", " + "dog " * 12 + "mystyle" + " dog" * 5
    chunks = chunk_prompt(text, embeddings=sd1_set)
    first, second = chunk([CAT] * 60 + [COMMA]), chunk([DOG] * 12 + [0, 0] + [DOG] * 5)
    assert [c.ids for c in chunks] == [first[0], second[0]]
    assert chunks[0].fixes == [(73, emb)] and chunks[1].fixes == []
    got = encode_text(text, ours["sd1"], "sd1", embeddings=sd1_set).context
    ref = with_rows(refs["l"], emb.vectors[""])
    assert rel_err(got[:, :77], ref(spare(first[0], 73, 2)).last_hidden_state) < 1e-5
    assert rel_err(got[:, 77:], refs["l"](torch.tensor([second[0]])).last_hidden_state) < 1e-5


def test_ti_hashes(files, sd1_set):
    sched_used = chunk_prompt("mystyle and cattoy and mystyle", embeddings=sd1_set)[0].fixes
    assert [e.name for _, e in sched_used] == ["mystyle", "cattoy", "mystyle"]
    hashes = ti_hashes(e for _, e in sched_used)
    digest = {n: hashlib.sha256((files / f).read_bytes()).hexdigest()[:12]
              for n, f in [("mystyle", "mystyle.pt"), ("cattoy", "cattoy.bin")]}
    assert hashes == f"mystyle: {digest['mystyle']}, cattoy: {digest['cattoy']}"
    odd = Embedding("a:b,c", {"": torch.zeros(1, 4)}, sha256="f" * 64)
    assert ti_hashes([odd, Embedding("memory", {"": torch.zeros(1, 4)})]) == "abc: ffffffffffff"


@torch.no_grad()
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_token_embeds_hook_is_the_lookup(models, family):
    _, ours = models
    encoder = ours[family][0]
    ids = TOK(["a cat", "a dog on a mat"], pad_id=EOS)
    table = encoder.text_model.embeddings.token_embedding if family == "sd1" else encoder.token_embedding
    plain = encoder(ids, layer=-2, pooled=True)
    hooked = encoder(ids, layer=-2, pooled=True, token_embeds=table(ids))
    assert torch.equal(plain.hidden, hooked.hidden) and torch.equal(plain.pooled, hooked.pooled)
