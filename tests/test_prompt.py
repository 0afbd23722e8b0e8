"""sdlite.prompt against A1111's prompt rules (docs/formats.md §7), with expected values written from the rules by hand.

Weights are written as the products the rules give, in the order A1111 applies them (innermost bracket first, open
brackets at the end of the text, round before square): R = 1.1, S = 1/1.1. A1111's own doctest examples are included;
its example ``a [{b|d{:.5] c`` is stale (its grammar cannot parse a "|" there) and is listed with the rule's answer.
"""

from __future__ import annotations

import math
import random

import pytest

from sdlite.prompt import NetworkTag, extract_networks, parse_attention, schedules, split_and

R, S = 1.1, 1 / 1.1
BRK = ("BREAK", -1.0)

ATTENTION = [
    # plain text and A1111's doctests
    ("", [("", 1.0)]),
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", R)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * R * R), (" ", R), ("on", S * R), (" a ", R), ("hill", 0.5 * R),
      (", sun, ", R), ("sky", R * R * R * R), (".", R)]),
    # nesting
    ("((a))", [("a", R * R)]),
    ("(((a)))", [("a", R * R * R)]),
    ("[[a]]", [("a", S * S)]),
    ("[[[a]]]", [("a", S * S * S)]),
    ("(a:1.5)", [("a", 1.5)]),
    ("((a:1.5))", [("a", 1.5 * R)]),
    ("[(a:1.5)]", [("a", 1.5 * S)]),
    ("(a) b (c)", [("a", R), (" b ", 1.0), ("c", R)]),
    ("(a)(b)", [("ab", R)]),
    ("(a:1.2)(b:1.2)", [("ab", 1.2)]),
    ("(a:1.0) b", [("a b", 1.0)]),
    ("(a:1) b", [("a b", 1.0)]),
    ("a (b (c) d) e", [("a ", 1.0), ("b ", R), ("c", R * R), (" d", R), (" e", 1.0)]),
    ("a [b [c] d] e", [("a ", 1.0), ("b ", S), ("c", S * S), (" d", S), (" e", 1.0)]),
    ("([a])", [("a", 1.0)]),  # S·R is exactly 1.0 in binary floating point
    ("x ([a]) y", [("x a y", 1.0)]),
    ("[(a)]", [("a", 1.0)]),
    ("(a [b])", [("a ", R), ("b", 1.0)]),
    ("[a (b)]", [("a ", S), ("b", 1.0)]),
    ("((a) b:1.5)", [("a", R * 1.5), (" b", 1.5)]),
    ("(a:1.2) [b] (c:0.8) [[d]]", [("a", 1.2), (" ", 1.0), ("b", S), (" ", 1.0), ("c", 0.8), (" ", 1.0), ("d", S * S)]),
    ("(a:1.1) (b:1.1)", [("a", 1.1), (" ", 1.0), ("b", 1.1)]),
    ("(a:1.5)(b)", [("a", 1.5), ("b", R)]),
    # weight numbers
    ("(a: 1.3 )", [("a", 1.3)]),
    ("(a :1.3)", [("a ", 1.3)]),
    ("(a : 1.5)", [("a ", 1.5)]),
    ("(a:\t2\n)", [("a", 2.0)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:+2)", [("a", 2.0)]),
    ("(a:.5)", [("a", 0.5)]),
    ("(a:5.)", [("a", 5.0)]),
    ("(a:0)", [("a", 0.0)]),
    ("(a:1.50)", [("a", 1.5)]),
    ("(a:1.2.3)", [("a:1.2.3", R)]),  # A1111 raises; sdlite reads ":1.2.3" as text
    ("(a:.)", [("a:.", R)]),
    ("(a:1e3)", [("a:1e3", R)]),
    ("(a:x)", [("a:x", R)]),
    ("(a:1,5)", [("a:1,5", R)]),
    ("(a:1.5:2)", [("a:1.5", 2.0)]),
    ("(a:b)", [("a:b", R)]),
    ("(:1.5)", [("", 1.0)]),
    ("a (:1.5) b", [("a  b", 1.0)]),
    # unbalanced and stray brackets
    ("[a:1.5]", [("a:1.5", S)]),
    ("(a:1.5", [("a:1.5", R)]),
    ("a:1.5)", [("a:1.5)", 1.0)]),
    ("a)", [("a)", 1.0)]),
    ("a]", [("a]", 1.0)]),
    ("a))", [("a))", 1.0)]),
    ("(a]", [("a]", R)]),
    ("[a)", [("a)", S)]),
    ("((a)", [("a", R * R)]),
    ("[[a]", [("a", S * S)]),
    ("([a)", [("a", R * S)]),
    ("(a] b)", [("a] b", R)]),
    ("a (b)))", [("a ", 1.0), ("b", R), ("))", 1.0)]),
    ("(a:1.5))", [("a", 1.5), (")", 1.0)]),
    ("(a:1.5)b)", [("a", 1.5), ("b)", 1.0)]),
    ("))((", [("))", 1.0)]),
    ("()", [("", 1.0)]),
    ("[]", [("", 1.0)]),
    ("( )", [(" ", R)]),
    (":", [(":", 1.0)]),
    ("a:b", [("a:b", 1.0)]),
    ("a (b [c) d] e", [("a ", 1.0), ("b ", R), ("c", R * S), (" d", S), (" e", 1.0)]),
    # escapes
    (r"\(a\)", [("(a)", 1.0)]),
    ("\\\\", [("\\", 1.0)]),
    (r"a\b", [("ab", 1.0)]),
    (r"a\nb", [("anb", 1.0)]),
    ("a\\", [("a", 1.0)]),
    (r"(a\)", [("a)", R)]),
    (r"\((a)\)", [("(", 1.0), ("a", R), (")", 1.0)]),
    (r"(a\:1.2)", [("a", 1.2)]),
    (r"\[a\]", [("[a]", 1.0)]),
    (r"(\(a\):1.3)", [("(a)", 1.3)]),
    (r"\\(a)", [("\\", 1.0), ("a", R)]),
    # BREAK
    ("a BREAK b", [("a", 1.0), BRK, ("b", 1.0)]),
    ("BREAK", [("", 1.0), BRK, ("", 1.0)]),
    ("a BREAK", [("a", 1.0), BRK, ("", 1.0)]),
    ("BREAKfast", [("BREAKfast", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("a,BREAK,b", [("a,", 1.0), BRK, (",b", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), BRK, ("", 1.0), BRK, ("b", 1.0)]),
    ("a BREAK\nb", [("a", 1.0), BRK, ("b", 1.0)]),
    ("(a) BREAK (b)", [("a", R), ("", 1.0), BRK, ("", 1.0), ("b", R)]),
    ("(a BREAK b)", [("a", R), ("BREAK", -R), ("b", R)]),
    ("(BREAK:-1)", [("", -1.0), ("BREAK", 1.0), ("", -1.0)]),
    (r"a \BREAK b", [("a ", 1.0), BRK, ("b", 1.0)]),  # the backslash vanishes; BREAK still breaks
    # other syntax is text here
    ("[a:b:0.5]", [("a:b:0.5", S)]),
    ("[a|b]", [("a|b", S)]),
    ("<lora:x:1>", [("<lora:x:1>", 1.0)]),
    ("(猫:1.2)、犬", [("猫", 1.2), ("、犬", 1.0)]),
    ("(🐱)", [("🐱", R)]),
]

REAL_PROMPTS = [
    ("masterpiece, best quality, (ultra-detailed:1.2), 1girl, solo",
     [("masterpiece, best quality, ", 1.0), ("ultra-detailed", 1.2), (", 1girl, solo", 1.0)]),
    ("(worst quality, low quality:1.4), lowres", [("worst quality, low quality", 1.4), (", lowres", 1.0)]),
    ("photo of a cat, (blue eyes:1.3), [[blurry]], BREAK city background",
     [("photo of a cat, ", 1.0), ("blue eyes", 1.3), (", ", 1.0), ("blurry", S * S), (",", 1.0), BRK,
      ("city background", 1.0)]),
    ("((masterpiece)), ((best quality)), 8k, (photorealistic:1.37)",
     [("masterpiece", R * R), (", ", 1.0), ("best quality", R * R), (", 8k, ", 1.0), ("photorealistic", 1.37)]),
    ("portrait of an old sailor, (oil painting:1.1), dramatic light, [cartoon]",
     [("portrait of an old sailor, ", 1.0), ("oil painting", 1.1), (", dramatic light, ", 1.0), ("cartoon", S)]),
    ("(((detailed face)))", [("detailed face", R * R * R)]),
    ("landscape, (mountains:0.8), (lake:1.2), [fog:0.5]",
     [("landscape, ", 1.0), ("mountains", 0.8), (", ", 1.0), ("lake", 1.2), (", ", 1.0), ("fog:0.5", S)]),
    ("a (red:1.5) [cat] BREAK dog",
     [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("cat", S), ("", 1.0), BRK, ("dog", 1.0)]),
    (r"emoticon \(^_^\), happy", [("emoticon (^_^), happy", 1.0)]),
    ("smile :)", [("smile :)", 1.0)]),
    ("(smile :))", [("smile :", R), (")", 1.0)]),
    ("1girl, (school uniform:1.2), (cherry blossoms), [[[bad hands]]], watermark",
     [("1girl, ", 1.0), ("school uniform", 1.2), (", ", 1.0), ("cherry blossoms", R), (", ", 1.0),
      ("bad hands", S * S * S), (", watermark", 1.0)]),
    ("(best quality:1.2) BREAK (dark background:0.9) BREAK rim light",
     [("best quality", 1.2), ("", 1.0), BRK, ("", 1.0), ("dark background", 0.9), ("", 1.0), BRK,
      ("rim light", 1.0)]),
    ("(((house:1.3)))", [("house", 1.3 * R * R)]),
    ("a cat (wearing a hat:1.2) and (((sunglasses))) on the beach",
     [("a cat ", 1.0), ("wearing a hat", 1.2), (" and ", 1.0), ("sunglasses", R * R * R), (" on the beach", 1.0)]),
    ("(masterpiece:1.2), (best quality:1.2), (highres:1.2)",
     [("masterpiece", 1.2), (", ", 1.0), ("best quality", 1.2), (", ", 1.0), ("highres", 1.2)]),
    ("(masterpiece, best quality:1.2)", [("masterpiece, best quality", 1.2)]),
    ("(cat:1.2), (dog:0.8) ,[bird]", [("cat", 1.2), (", ", 1.0), ("dog", 0.8), (" ,", 1.0), ("bird", S)]),
    ("(forest:1.3) (river:1.3)", [("forest", 1.3), (" ", 1.0), ("river", 1.3)]),
    ("(nsfw:-1), safe", [("nsfw", -1.0), (", safe", 1.0)]),
]


def close(got, expected) -> bool:
    return len(got) == len(expected) and all(
        gt == et and math.isclose(gw, ew, rel_tol=1e-12, abs_tol=1e-15) for (gt, gw), (et, ew) in zip(got, expected))


@pytest.mark.parametrize("text, expected", ATTENTION + REAL_PROMPTS)
def test_parse_attention(text, expected):
    got = parse_attention(text)
    assert close(got, expected), got
    assert all(isinstance(t, str) and isinstance(w, float) for t, w in got)


def test_attention_weights_round_as_a1111():
    # The doctest digits of A1111: the products are taken in closing order, 1/1.1 is multiplied in.
    got = dict(parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."))
    assert got["house"] == 1.5730000000000004 and got["sky"] == 1.4641000000000006 and got["on"] == 1.0


def test_attention_plain_text_is_one_run():
    rng = random.Random(0)
    alphabet = "abc XYZ,.;!?-_'\"0123456789\n\té猫"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        if "BREAK" not in text:
            assert parse_attention(text) == [(text, 1.0)]


def test_attention_composed_prompts():
    """Random prompts built from (words, weight) runs: the expected runs come from the rule, not from the parser."""
    rng = random.Random(1)
    words = ["cat", "blue sky", "oil painting", "8k", "1girl", "city lights", "détaillé"]
    for _ in range(300):
        runs, prompt = [], []
        for _ in range(rng.randint(1, 6)):
            word, form = rng.choice(words), rng.randrange(5)
            if form == 0:
                prompt.append(word), runs.append((word, 1.0))
            elif form == 1:
                w = rng.choice([0.5, 0.8, 1.2, 1.5, 2.0])
                prompt.append(f"({word}:{w})"), runs.append((word, w))
            elif form == 2:
                prompt.append(f"({word})"), runs.append((word, R))
            elif form == 3:
                prompt.append(f"[{word}]"), runs.append((word, S))
            else:
                prompt.append(f"({word}:1)"), runs.append((word, 1.0))
            prompt.append(", "), runs.append((", ", 1.0))
        merged: list[list] = []
        for text, w in runs:
            if merged and merged[-1][1] == w:
                merged[-1][0] += text
            else:
                merged.append([text, w])
        assert close(parse_attention("".join(prompt)), [tuple(m) for m in merged]), "".join(prompt)


# --- schedules ------------------------------------------------------------------------------------------------------

SCHEDULES = [  # (text, steps, hires_steps, expected)
    # A1111's doctests
    ("test", 10, None, [(10, "test")]),
    ("a [b:3]", 10, None, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", 10, None, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, None, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", 10, None, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, None, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, None, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", 10, None, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, None, [(5, "a  c"), (10, "a b c")]),
    ("a [{b|d{:.5] c", 10, None, [(10, "a [{b|d{:.5] c")]),  # stale doctest: "|" outside an alternation
    ("((a][:b:c [d:3]", 10, None, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", 4, None, [(1, "a"), (2, "(b:1.1)"), (3, "a"), (4, "(b:1.1)")]),
    ("[fe|]male", 4, None, [(1, "female"), (2, "male"), (3, "female"), (4, "male")]),
    ("[fe|||]male", 5, None, [(1, "female"), (2, "male"), (3, "male"), (4, "male"), (5, "female")]),
    ("a [b:.5] c", 10, 10, [(10, "a b c")]),
    ("a [b:1.5] c", 10, 10, [(5, "a  c"), (10, "a b c")]),
    # when: fraction or step, capped
    ("a [cat:dog:0.5] b", 10, None, [(5, "a cat b"), (10, "a dog b")]),
    ("a [cat:dog:5] b", 10, None, [(5, "a cat b"), (10, "a dog b")]),
    ("[cat:dog:0]", 10, None, [(10, "dog")]),
    ("[cat:dog:10]", 10, None, [(10, "cat")]),
    ("[cat:dog:20]", 10, None, [(10, "cat")]),
    ("[cat:dog:1.0]", 10, None, [(10, "cat")]),
    ("[cat:dog:1]", 10, None, [(1, "cat"), (10, "dog")]),
    ("[cat:dog:0.25]", 10, None, [(2, "cat"), (10, "dog")]),
    ("[cat:dog:0.29]", 100, None, [(int(0.29 * 100), "cat"), (100, "dog")]),  # 28: int() of 28.999…
    ("[cat:dog:3.7]", 10, None, [(10, "cat")]),
    ("[cat:dog:-1]", 10, None, [(10, "dog")]),
    ("[cat:dog:+3]", 10, None, [(3, "cat"), (10, "dog")]),
    ("[cat:dog: 3 ]", 10, None, [(3, "cat"), (10, "dog")]),
    ("[cat:dog:\n3]", 10, None, [(3, "cat"), (10, "dog")]),
    ("[cat:dog:1e1]", 10, None, [(10, "cat")]),
    ("[cat:dog:5e-1]", 10, None, [(10, "dog")]),  # no ".": a step number, 0.5 → step 0
    ("[cat:dog:.5e1]", 10, None, [(10, "cat")]),
    ("[cat:dog:1.]", 10, None, [(10, "cat")]),
    ("[cat:dog:1e999]", 10, None, [(10, "cat")]),  # A1111 raises on int(inf)
    ("[a:b:0.5]", 20, None, [(10, "a"), (20, "b")]),
    # forms
    ("[:dog:3]", 10, None, [(3, ""), (10, "dog")]),
    ("[cat::3]", 10, None, [(3, "cat"), (10, "")]),
    ("[::3]", 10, None, [(3, ""), (10, "")]),
    ("[dog:3]", 10, None, [(3, ""), (10, "dog")]),
    ("[ dog : 3 ]", 10, None, [(3, ""), (10, " dog ")]),
    ("[a:(b:1.2):3]", 10, None, [(3, "a"), (10, "(b:1.2)")]),
    ("[(a:1.2):(b:0.8):0.5]", 10, None, [(5, "(a:1.2)"), (10, "(b:0.8)")]),
    ("a [b:c:3] [d:e:3]", 10, None, [(3, "a b d"), (10, "a c e")]),
    ("[a:b:2] and [c:d:4]", 10, None, [(2, "a and c"), (4, "b and c"), (10, "b and d")]),
    # nesting and emphasis around edits
    ("[[a:b:2]:c:4]", 10, None, [(2, "a"), (4, "b"), (10, "c")]),
    ("[[a:b:2]]", 10, None, [(2, "[a]"), (10, "[b]")]),
    ("([a:b:2])", 10, None, [(2, "(a)"), (10, "(b)")]),
    ("(x [a:b:2]:1.2)", 10, None, [(2, "(x a:1.2)"), (10, "(x b:1.2)")]),
    ("(x:1.2 [a:b:2])", 10, None, [(2, "(x:1.2 a)"), (10, "(x:1.2 b)")]),
    ("(a:[b:c:3])", 10, None, [(3, "(a:b)"), (10, "(a:c)")]),
    ("(x:1.2:[a:b:2])", 10, None, [(2, "(x:1.2:a)"), (10, "(x:1.2:b)")]),  # "(" group invalid: strays
    ("[[a:b:1]", 10, None, [(1, "[a"), (10, "[b")]),
    ("[a:b:1]]", 10, None, [(1, "a]"), (10, "b]")]),
    ("(a [b:c:1]", 10, None, [(1, "(a b"), (10, "(a c")]),
    ("a [b:c:1]))", 10, None, [(1, "a b))"), (10, "a c))")]),  # the well-formed group is taken
    # alternation
    ("[a|b]", 4, None, [(1, "a"), (2, "b"), (3, "a"), (4, "b")]),
    ("[a|b|c]", 5, None, [(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b")]),
    ("[|a]", 2, None, [(1, ""), (2, "a")]),
    ("[a|b] [c|d|e]", 3, None, [(1, "a c"), (2, "b d"), (3, "a e")]),
    ("[a|b] [x:y:2]", 4, None, [(1, "a x"), (2, "b x"), (3, "a y"), (4, "b y")]),
    ("[[a|b]:c:2]", 4, None, [(1, "a"), (2, "b"), (3, "c"), (4, "c")]),
    ("[a|[b:c:2]]", 4, None, [(1, "a"), (2, "b"), (3, "a"), (4, "c")]),
    ("([a|b]:1.2)", 2, None, [(1, "(a:1.2)"), (2, "(b:1.2)")]),
    # text that does not parse is used as it is
    ("[a|b:c]", 10, None, [(10, "[a|b:c]")]),
    ("a | b", 10, None, [(10, "a | b")]),
    ("a | [b:c:2]", 10, None, [(10, "a | [b:c:2]")]),
    ("(a|b) [c:d:2]", 10, None, [(10, "(a|b) [c:d:2]")]),
    ("a\\", 10, None, [(10, "a\\")]),
    ("[b:c:2] a\\", 10, None, [(10, "[b:c:2] a\\")]),
    ("a\\\n[b:c:2]", 10, None, [(10, "a\\\n[b:c:2]")]),
    # escapes are plain text and stay in the text
    ("a \\| b [c:d:2]", 10, None, [(2, "a \\| b c"), (10, "a \\| b d")]),
    ("[a\\:b:c:2]", 10, None, [(2, "a\\:b"), (10, "c")]),
    ("[a\\]:2]", 10, None, [(2, ""), (10, "a\\]")]),
    ("a\\ [b:c:2]", 10, None, [(2, "a\\ b"), (10, "a\\ c")]),
    # brackets that are no edit
    ("", 10, None, [(10, "")]),
    ("((a:1.2)) [b]", 10, None, [(10, "((a:1.2)) [b]")]),
    ("[a:b:c:3]", 10, None, [(10, "[a:b:c:3]")]),
    ("[a:b]", 10, None, [(10, "[a:b]")]),
    ("[a:b:]", 10, None, [(10, "[a:b:]")]),
    ("[a:b: ]", 10, None, [(10, "[a:b: ]")]),
    ("[a:b:3:]", 10, None, [(10, "[a:b:3:]")]),
    ("[a:b:3)", 10, None, [(10, "[a:b:3)")]),
    ("[a:b:3x]", 10, None, [(10, "[a:b:3x]")]),
    ("[a:b:1 2]", 10, None, [(10, "[a:b:1 2]")]),
    # hires pass: steps count from the first pass, fractions from 1.0
    ("[a:b:25]", 20, 10, [(5, "a"), (10, "b")]),
    ("[a:b:1.5]", 20, 10, [(5, "a"), (10, "b")]),
    ("[a:b:0.5]", 20, 10, [(10, "b")]),
    ("[a:b:10]", 20, 10, [(10, "b")]),
    ("[a:b:2.0]", 20, 10, [(10, "a")]),
    ("[a|b]", 20, 3, [(1, "a"), (2, "b"), (3, "a")]),
    ("plain", 20, 10, [(10, "plain")]),
]


@pytest.mark.parametrize("text, steps, hires, expected", SCHEDULES)
def test_schedules(text, steps, hires, expected):
    assert schedules(text, steps, hires) == expected


@pytest.mark.parametrize("text, steps, hires, expected", [
    ("[a:b:0.5]", 10, None, [(5, "a"), (10, "b")]),
    ("[a:b:5]", 10, None, [(5, "a"), (10, "b")]),
    ("[a:b:1.0]", 10, None, [(1, "a"), (10, "b")]),  # legacy: only values below 1 are fractions
    ("[a:b:0]", 10, None, [(10, "b")]),
    ("[a:b:5]", 10, 4, [(5, "a"), (10, "b")]),  # legacy ignores the hires steps
])
def test_old_scheduling(text, steps, hires, expected):
    assert schedules(text, steps, hires, use_old_scheduling=True) == expected


def test_schedules_without_edits_keep_the_text():
    """Without digits, "|" and backslashes no edit or alternation can form: every bracket text is its own schedule."""
    rng = random.Random(2)
    for _ in range(500):
        text = "".join(rng.choice("ab ()[]:,\n") for _ in range(rng.randint(0, 30)))
        assert schedules(text, 7) == [(7, text)]


def test_schedules_composed_edits():
    """Random prompts with several [from:to:n] edits: each end step reads "from" of the edits with n >= it."""
    rng = random.Random(3)
    for _ in range(200):
        steps = rng.randint(2, 30)
        edits = [(rng.choice(["cat", "a dog", "(red:1.2)", ""]), rng.choice(["owl", "blue", "[old]"]),
                  rng.randint(1, steps - 1)) for _ in range(rng.randint(1, 4))]
        prompt = "photo, " + ", ".join(f"[{a}:{b}:{n}]" for a, b, n in edits)
        ends = sorted({n for _, _, n in edits} | {steps})
        expected = [(e, "photo, " + ", ".join(a if e <= n else b for a, b, n in edits)) for e in ends]
        assert schedules(prompt, steps) == expected


# --- AND --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("a cat AND a dog", [("a cat", 1.0), (" a dog", 1.0)]),
    ("a cat:1.2 AND a dog:0.8", [("a cat", 1.2), (" a dog", 0.8)]),
    ("a cat :1.2", [("a cat", 1.2)]),
    ("a cat : 1.2 ", [("a cat", 1.2)]),
    ("a cat:1.2.3", [("a cat:1.2.3", 1.0)]),
    ("a cat:-1", [("a cat", -1.0)]),
    ("a cat:+.5", [("a cat", 0.5)]),
    ("a cat:1.", [("a cat", 1.0)]),
    ("(a cat:1.2)", [("(a cat:1.2)", 1.0)]),
    ("a AND", [("a", 1.0), ("", 1.0)]),
    ("AND", [("", 1.0), ("", 1.0)]),
    ("ANDROID", [("ANDROID", 1.0)]),
    ("a and b", [("a and b", 1.0)]),
    ("a\nAND\nb:2", [("a", 1.0), ("\nb", 2.0)]),
    ("a AND b AND c:0.5", [("a", 1.0), (" b", 1.0), (" c", 0.5)]),
    ("(x)AND(y)", [("(x)", 1.0), ("(y)", 1.0)]),
    ("xAND y", [("xAND y", 1.0)]),
    ("a:1.5 b", [("a:1.5 b", 1.0)]),
    ("a: 2", [("a", 2.0)]),
    ("a:2 ", [("a", 2.0)]),
    ("  a", [("  a", 1.0)]),
    ("a :", [("a :", 1.0)]),
    ("[cat:dog:0.5] AND forest:0.3", [("[cat:dog:0.5]", 1.0), (" forest", 0.3)]),
])
def test_split_and(text, expected):
    assert split_and(text) == expected


# --- extra networks -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, rest, tags", [
    ("a <lora:film:0.8> b", "a  b", [NetworkTag("lora", "film", ("0.8",))]),
    ("<lora:x>", "", [NetworkTag("lora", "x")]),
    ("<lora:x:0.5:0.7>", "", [NetworkTag("lora", "x", ("0.5", "0.7"))]),
    ("<lora:x:te=0.5:unet=0.7>", "", [NetworkTag("lora", "x", (), {"te": "0.5", "unet": "0.7"})]),
    ("<lora:x:1:dyn=8>", "", [NetworkTag("lora", "x", ("1",), {"dyn": "8"})]),
    ("<hypernet:anime:0.6>, cat", ", cat", [NetworkTag("hypernet", "anime", ("0.6",))]),
    ("<lyco:abc:1>", "", [NetworkTag("lyco", "abc", ("1",))]),
    ("<a:b><c:d>", "", [NetworkTag("a", "b"), NetworkTag("c", "d")]),
    ("<lora:a=b=c:1>", "", [NetworkTag("lora", "a=b=c", ("1",))]),
    ("<lora:name with spaces:1>", "", [NetworkTag("lora", "name with spaces", ("1",))]),
    ("<LORA:x:1>", "", [NetworkTag("LORA", "x", ("1",))]),
    ("<lora:te=1>", "", [NetworkTag("lora", "", (), {"te": "1"})]),
    ("<lora:x:1> (cat:1.2) <lora:y:0.5>", " (cat:1.2) ", [NetworkTag("lora", "x", ("1",)),
                                                         NetworkTag("lora", "y", ("0.5",))]),
    ("<lora:>", "<lora:>", []),
    ("<lora x:1>", "<lora x:1>", []),
    ("<lora:x:1", "<lora:x:1", []),
    ("a cat", "a cat", []),
])
def test_extract_networks(text, rest, tags):
    assert extract_networks(text) == (rest, tags)


@pytest.mark.parametrize("tag, weights", [
    ("<lora:x>", (1.0, 1.0, None)),
    ("<lora:x:0.5>", (0.5, 0.5, None)),
    ("<lora:x:0.5:0.7>", (0.5, 0.7, None)),
    ("<lora:x:0.5:0.7:8>", (0.5, 0.7, 8)),
    ("<lora:x:0.5:te=0.3>", (0.3, 0.3, None)),  # unet defaults to te after te= has overridden it
    ("<lora:x:unet=0.2>", (1.0, 0.2, None)),
    ("<lora:x:1:dyn=4>", (1.0, 1.0, 4)),
])
def test_lora_weights(tag, weights):
    assert extract_networks(tag)[1][0].lora_weights() == weights


def test_lora_weights_bad_number_names_the_tag():
    with pytest.raises(ValueError, match="film"):
        extract_networks("<lora:film:strong>")[1][0].lora_weights()


def test_processing_order_on_a_full_prompt():
    prompt = "<lora:ink:0.7>masterpiece, [cat:(dog:1.3):0.5] in snow BREAK night AND aurora:0.6"
    text, tags = extract_networks(prompt)
    assert tags == [NetworkTag("lora", "ink", ("0.7",))]
    parts = split_and(text)
    assert parts == [("masterpiece, [cat:(dog:1.3):0.5] in snow BREAK night", 1.0), (" aurora", 0.6)]
    plan = schedules(parts[0][0], 20)
    assert plan == [(10, "masterpiece, cat in snow BREAK night"), (20, "masterpiece, (dog:1.3) in snow BREAK night")]
    assert close(parse_attention(plan[1][1]), [("masterpiece, ", 1.0), ("dog", 1.3), (" in snow", 1.0), BRK,
                                               ("night", 1.0)])
