"""sdlite.clip.tokenizer against transformers 5's CLIPTokenizer built from the same BPE merges file."""

from __future__ import annotations

import gzip
import html
import json
import random
from importlib import resources

import ftfy
import open_clip.tokenizer as open_clip_tokenizer
import pytest
import torch
import transformers

from sdlite.clip import BOS, CONTEXT_LENGTH, EOS, CLIPTokenizer, get_tokenizer

GZ = resources.files("sdlite.clip").joinpath("bpe_simple_vocab_16e6.txt.gz")

HANDWRITTEN = [
    "",
    " ",
    "a photo of an astronaut riding a horse on mars",
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile, blue eyes, (detailed face:1.2)",
    "(masterpiece:1.2), (best quality:1.3), ultra-detailed, 8k, RAW photo, (photorealistic:1.4)",
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst quality",
    "[dog:cat:0.5] sitting on a [red|blue|green] chair",
    "a [fantasy:cyberpunk:10] city at night, neon lights, rain, reflections",
    "((ultra detailed)), (((intricate))), [[blurry]], [simple background]",
    "portrait of a woman, (freckles:0.8), [smile:0.4], soft lighting BREAK city street, bokeh",
    "landscape AND sunset:1.2 AND mountains:0.7",
    "<lora:add_detail:0.8>, <hypernet:anime:1>, a knight in shining armor",
    "\\(escaped parentheses\\) and \\[brackets\\] stay literal",
    "it's a dog's life, don't you think? they're here, we've won, I'm sure, you'll see, he'd go",
    "IT'S LOUD!!! WHAT'S THAT??? ... !!!??? ---- ~~~~ ****",
    "Café crème brûlée, naïve façade, jalapeño, smörgåsbord, Ærøskøbing, Łódź",
    "東京の夜景、ネオン、雨",
    "一个美丽的女孩，长发，微笑，高清，杰作",
    "서울의 밤거리, 네온사인",
    "a cute cat 🐱 with a pizza 🍕 and a rocket 🚀🚀🚀",
    "family 👨‍👩‍👧‍👦, thumbs up 👍🏽, flag 🇯🇵, keycap 1️⃣, heart ❤️",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#39;single&#39; &nbsp;",
    "caf\u00c3\u00a9 mojibake and \u00e2\u0080\u0099 smart quotes",
    "tab\tseparated\twords\nand\nnew lines\r\nwindows   multiple     spaces",
    "  leading and trailing spaces   ",
    "\u3000ideographic\u3000space and no\u00a0break\u00a0space and line\u2028separator",
    "zero\u200bwidth\u200cnon\u200djoiner",
    "combining e\u0301 vs precomposed \u00e9, a\u0308 vs \u00e4",
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ and ① ② ③ circled",
    "İstanbul, STRASSE vs straße, ΣΊΣΥΦΟΣ ς σ, ﬁne ligature, 𝐛𝐨𝐥𝐝 math",
    "Привет мир, Ελληνικά, עברית, العربية, हिन्दी, ไทย",
    "1234567890 3.14159 1e-5 2024-01-31 12:30 100% $99.99 #hashtag @user",
    "1girl, 2boys, 4K UHD, 35mm, f/1.8, ISO 100, 1/250s, 16:9",
    "a<|endoftext|>b <|startoftext|> middle",
    "upper <|ENDOFTEXT|> and <|StartOfText|> are not special",
    "<|endoftext|><|endoftext|>",
    "under_score snake_case kebab-case CamelCase dot.separated path/to/file.png",
    "https://example.com/image?size=512&seed=42",
    "emoticons :) :( :D ;-) <3 xD ^_^ o_O",
    "(((((((((deeply nested)))))))))",
    "word:1.5 (word :1.5) ( word: 1.5 ) (word:+1.5) (word:-0.5)",
    "a" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "'s 't 're 've 'm 'll 'd",
    "''quoted'' `backticks` «guillemets» “curly” ‘single’ „low“",
    "—em dash– en dash … ellipsis · middle dot • bullet",
    "\u0000control\u0007chars\u001b[0m",
    "half‑width ｶﾀｶﾅ and full-width ！？，",
    "(EasyNegative:1.1), (bad-hands-5:0.9), ng_deepnegative_v1_75t, (worst quality, low quality:1.4), monochrome",
    "RAW photo, close-up portrait of a 30 y.o. woman, natural skin texture, (film grain:0.6), Fujifilm XT3, dslr",
    "A cinematic shot of a baby racoon wearing an intricate italian priest robe.",
    "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k",
    "an isometric diorama of a cozy coffee shop, tilt-shift, soft shadows, pastel colors --ar 16:9 --v 5",
    "score_9, score_8_up, score_7_up, source_anime, rating_safe, 1boy, armor, sword, dynamic pose",
    "a painting of a fox in the style of Hokusai's \"The Great Wave off Kanagawa\", ukiyo-e, woodblock print",
    "[[[low contrast]]], (((vivid colors))), ((((sharp)))) , ,, ;; !! ?? .. -- __ ** ## @@",
    "cat:0.5 AND dog:1.5 AND a photo of a (red:1.2) car BREAK (blue sky:0.8) BREAK green grass",
    "Mona Lisa, by Leonardo da Vinci (1503–1506), Musée du Louvre, Paris; sfumato, chiaroscuro",
    "a dragon made of 🔥 and ❄️, epic, 2 heads, 4 wings, 10ft tall, 3/4 view",
    "[portrait of a man:portrait of a robot:0.3], [summer|autumn|winter|spring], [[dark]:0.8]",
    "A1111 style:\n(masterpiece),\n(best quality),\n\n\nthree newlines above\tand a tab",
    "negative: (deformed iris, deformed pupils, semi-realistic, cgi, 3d, render, sketch, cartoon, drawing, anime:1.4)",
    "photo of sks dog in a bucket, <lyco:detail-tweaker:0.5>, embedding:my_style, (hyperrealistic)",
]

FRAGMENTS = [
    "masterpiece", "best quality", "highly detailed", "sharp focus", "cinematic lighting", "volumetric fog",
    "by greg rutkowski", "artstation", "trending on pixiv", "octane render", "unreal engine 5", "8k", "4K",
    "1girl", "solo", "white hair", "red eyes", "school uniform", "smile", "looking at viewer", "outdoors",
    "cherry blossoms", "night sky", "stars", "moon", "cyberpunk", "steampunk", "oil painting", "watercolor",
    "photo of a man", "35mm film", "Kodak Portra 400", "bokeh", "depth of field", "HDR", "ultra-realistic",
    "worst quality", "low quality", "jpeg artifacts", "signature", "watermark", "username", "blurry",
    "extra fingers", "mutated hands", "poorly drawn face", "deformed", "nsfw", "Café", "façade", "東京",
    "猫", "🐶", "🔥🔥", "don't", "it's", "they're", "O'Neill", "rock'n'roll", "&amp;", "&lt;tag&gt;",
    "50mm", "f/2.8", "1990s", "v2.1", "3D", "2.5D", "No.5", "R2-D2", "C-3PO", "α-particle", "x²", "½",
]
SEPARATORS = [", ", ",", " ", " , ", ",\n", "\t", "  ", " BREAK ", ". ", "; ", " | ", " AND "]


def _decorate(rng: random.Random, text: str) -> str:
    other = rng.choice(FRAGMENTS)
    forms = [
        "{t}", "{t}", "{t}", "({t})", "(({t}))", "({t}:{w})", "[{t}]", "[[{t}]]", "[{t}:{o}:{f}]", "[{t}|{o}]",
        "{{{t}}}", "\\({t}\\)", "<lora:{o}:{f}>", "{T}", "{t}!!!", "{t}...", "\"{t}\"", "'{t}'",
    ]
    weight = f"{rng.uniform(0.3, 1.8):.{rng.randint(1, 2)}f}"
    when = rng.choice(["0.5", "10", ".25", "1"])
    return rng.choice(forms).format(t=text, o=other, T=text.upper(), w=weight, f=when)


def _generated(count: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        n = rng.randint(1, 30)
        parts = [_decorate(rng, rng.choice(FRAGMENTS)) for _ in range(n)]
        text = parts[0]
        for part in parts[1:]:
            text += rng.choice(SEPARATORS) + part
        prompts.append(text)
    # Very long prompts (hundreds of words), well past the 75-token window.
    for words in (150, 300, 500):
        prompts.append(", ".join(_decorate(rng, rng.choice(FRAGMENTS)) for _ in range(words)))
    return prompts


CORPUS = HANDWRITTEN + _generated(350)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """transformers' CLIPTokenizer from a vocab.json/merges.txt written from the packaged gz file.

    The vocabulary comes from open_clip's port of OpenAI's SimpleTokenizer reading the same gz, so that it does not
    share code with sdlite; open_clip names the special tokens differently, so they are renamed to CLIP's.
    """
    with resources.as_file(GZ) as gz:
        simple = open_clip_tokenizer.SimpleTokenizer(bpe_path=str(gz))
        lines = gzip.open(gz).read().decode("utf-8").split("\n")
    vocab = {token: i for token, i in simple.encoder.items() if i < BOS}
    vocab.update({"<|startoftext|>": BOS, "<|endoftext|>": EOS})
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    # The gz's first line is a header; transformers skips a first line only when it starts with "#version".
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *lines[1 : 49152 - 256 - 2 + 1]]), encoding="utf-8")
    # transformers 5 ignores vocab_file=/merges_file= in the constructor (it builds an empty vocabulary);
    # from_pretrained on the local folder reads the two files.
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert len(ref) == 49408 and ref.pad_token_id == EOS
    return ref


def test_corpus_is_varied():
    assert len(CORPUS) >= 300
    assert max(len(get_tokenizer().encode(t)) for t in CORPUS) > 400


def test_vocabulary_matches_reference(reference):
    assert get_tokenizer()._tokenizer.get_vocab() == reference.get_vocab()
    assert get_tokenizer().vocab_size == 49408


def test_encode_matches_transformers(reference):
    ours = get_tokenizer()
    mismatches = [t for t in CORPUS if ours.encode(t) != reference(t, add_special_tokens=False)["input_ids"]]
    assert not mismatches, f"{len(mismatches)} prompts differ, e.g. {mismatches[:3]!r}"
    assert ours.encode_batch(CORPUS) == [ours.encode(t) for t in CORPUS]


def test_framing_matches_transformers_eos_padding(reference):
    ours = get_tokenizer()(CORPUS, pad_id=EOS)
    ref = reference(CORPUS, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True)["input_ids"]
    assert ours.dtype == torch.long and ours.shape == (len(CORPUS), CONTEXT_LENGTH)
    assert ours.tolist() == ref


def test_framing_zero_padding(reference):
    # The OpenCLIP framing is transformers' framing with the padding positions (attention mask 0) set to id 0.
    # (Declaring "!", id 0, transformers' pad token is no reference: it would then split "!!!" as a special token.)
    ref = reference(CORPUS, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt")
    expected = ref["input_ids"].masked_fill(ref["attention_mask"] == 0, 0)
    assert torch.equal(get_tokenizer()(CORPUS, pad_id=0), expected)


def test_framing_layout():
    tok = get_tokenizer()
    short, empty = tok(["a cat", ""], pad_id=0).tolist()
    assert short[:4] == [BOS, *tok.encode("a cat"), EOS] and short[4:] == [0] * 73
    assert empty == [BOS, EOS] + [0] * 75
    assert tok([""], pad_id=EOS).tolist() == [[BOS] + [EOS] * 76]


def test_truncation_keeps_first_75_tokens():
    tok = get_tokenizer()
    text = CORPUS[-1]
    ids = tok.encode(text)
    assert len(ids) > 300
    (row,) = tok([text], pad_id=0).tolist()
    assert row == [BOS, *ids[:75], EOS]


def test_rejects_single_string():
    with pytest.raises(TypeError):
        get_tokenizer()("a cat", pad_id=EOS)


def test_get_tokenizer_is_cached():
    assert get_tokenizer() is get_tokenizer()
    assert isinstance(get_tokenizer(), CLIPTokenizer)


def test_agrees_with_openai_tokenizer_where_no_text_repair_applies():
    """OpenAI's/open_clip's tokenizer also runs ftfy.fix_text and html.unescape (which change HTML entities,
    full-width forms such as CJK commas, curly quotes, ligatures, control characters and mojibake) and knows no literal
    special tokens; on the prompts those steps leave alone, both tokenizers give the same ids."""
    with resources.as_file(GZ) as gz:
        simple = open_clip_tokenizer.SimpleTokenizer(bpe_path=str(gz))
    plain = [t for t in CORPUS if ftfy.fix_text(t) == t and html.unescape(t) == t and "<|" not in t]
    assert len(plain) > 250
    ours = get_tokenizer()
    assert [ours.encode(t) for t in plain] == [simple.encode(t) for t in plain]
