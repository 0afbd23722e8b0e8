"""The CLIP byte-level BPE tokenizer (Radford et al. 2021, CLIP; vocabulary ``bpe_simple_vocab_16e6.txt.gz``, MIT).

The vocabulary is rebuilt from the packaged merges file the way OpenAI's ``simple_tokenizer.py`` builds it, and the
text pipeline reproduces Hugging Face transformers 5's ``CLIPTokenizer`` (sdlite's reference), so ids match it
exactly:

* normalisation: Unicode NFC, every run of whitespace replaced by one space, lowercase;
* pre-tokenisation: CLIP's split regex (``'s 't 're 've 'm 'll 'd``, letter runs, single digits, runs of other
  non-space characters; whitespace dropped), then GPT-2's byte-level mapping and split;
* ``<|startoftext|>`` / ``<|endoftext|>`` written literally in a prompt are matched as the special tokens
  (case-sensitively, before normalisation).

Unlike OpenAI's and open_clip's own tokenizers, transformers 5 runs neither ``ftfy.fix_text`` nor
``html.unescape``, and so neither does this one. Prompts those steps would change tokenise differently there:
HTML entities (``&amp;`` stays "&", "amp", ";"), full-width forms (CJK "，" and "！" are not folded to "," and "!"),
curly quotes, ligatures such as "ﬁ", control characters and mojibake. On other text the ids agree with OpenAI's
tokenizer too (tests/test_clip_tokenizer.py checks both).
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

BOS = 49406  # <|startoftext|>
EOS = 49407  # <|endoftext|>
CONTEXT_LENGTH = 77

_BOS_TEXT = "<|startoftext|>"
_EOS_TEXT = "<|endoftext|>"
# The vocabulary holds 49152 BPE entries (bytes, bytes + "</w>", merges) before the two special tokens.
_MERGE_COUNT = 49152 - 256 - 2
_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte, in CLIP's vocabulary order: bytes that are printable Latin-1
    characters map to themselves and come first; the other 68 bytes map to U+0100 onwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _read_merges(path: Path | None) -> list[tuple[str, str]]:
    if path is None:
        data = resources.files("sdlite.clip").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    else:
        data = Path(path).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    # Line 0 is a version header; CLIP uses only the first _MERGE_COUNT merges of the file.
    return [tuple(line.split()) for line in lines[1 : _MERGE_COUNT + 1]]


def _build(merges: list[tuple[str, str]]) -> Tokenizer:
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [_BOS_TEXT, _EOS_TEXT]
    model = BPE(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=merges,
        end_of_word_suffix="</w>",
        continuing_subword_prefix="",
        fuse_unk=False,
    )
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # invert=True keeps the regex matches as the pieces and drops what lies between them (whitespace).
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
            # GPT-2's regex (use_regex) only splits further a lowercased "<|STARTOFTEXT|>"-like piece, but
            # transformers keeps it on, so it stays on for identical ids.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (_BOS_TEXT, _EOS_TEXT)])
    if tok.get_vocab_size() != EOS + 1 or tok.token_to_id(_BOS_TEXT) != BOS or tok.token_to_id(_EOS_TEXT) != EOS:
        raise ValueError("the BPE merges file does not give CLIP's 49408-entry vocabulary")
    return tok


class CLIPTokenizer:
    """CLIP's BPE tokenizer with Stable Diffusion's 77-token framing."""

    def __init__(self, merges_path: str | Path | None = None):
        """``merges_path``: a ``bpe_simple_vocab_16e6.txt.gz``; by default the copy packaged with sdlite."""
        self._tokenizer = _build(_read_merges(None if merges_path is None else Path(merges_path)))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Content token ids of ``text``, without start/end tokens and without truncation."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` for several texts at once (the Rust side runs them in parallel)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of texts, not a single string")
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def __call__(self, texts: Sequence[str], *, pad_id: int) -> torch.Tensor:
        """Token ids [B, 77]: ``<|startoftext|>``, at most 75 content tokens, ``<|endoftext|>``, then ``pad_id``.

        ``pad_id`` is 49407 (EOS) for OpenAI CLIP-L in SD1/SDXL and 0 for the OpenCLIP towers of SD2/SDXL.
        """
        rows = []
        for ids in self.encode_batch(texts):
            row = [BOS, *ids[: CONTEXT_LENGTH - 2], EOS]
            rows.append(row + [pad_id] * (CONTEXT_LENGTH - len(row)))
        return torch.tensor(rows, dtype=torch.long)


@functools.cache
def get_tokenizer() -> CLIPTokenizer:
    """The tokenizer with the packaged vocabulary, built once per process."""
    return CLIPTokenizer()
