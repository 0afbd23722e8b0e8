"""Prompt text to UNet conditioning the way AUTOMATIC1111 encodes it (stable-diffusion-webui
``modules/sd_hijack_clip.py``, ``sd_emphasis.py``, ``sd_hijack.py``, ``prompt_parser.py``; docs/formats.md §7.4-7.5,
§4).

A prompt is read for emphasis (``sdlite.prompt.parse_attention``) and each weighted segment is tokenised on its own.
The tokens fill chunks of 75, each sent to the text encoder as ``<start> 75 tokens <end>`` (77); a chunk that
overflows is cut after its last comma when that comma is among its last 20 tokens, ``BREAK`` closes a chunk, and an
embedding's vectors never straddle two. Every chunk is encoded separately with the family's layer rule and the
results are concatenated to [B, 77·k, D]. "Original" emphasis multiplies each token's hidden state by its weight and
rescales the chunk so that its mean over the whole batch is unchanged.

Use :func:`encode_text` for a batch encoded together, as A1111 encodes the scheduled texts of one prompt, and
:func:`encode_schedule` for what a sampler needs: a prompt's texts over the steps, each distinct text encoded once,
looked up with ``cond_at(step)``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .adapters.embeddings import Embedding, EmbeddingSet
from .checkpoint.family_table import FAMILIES, get_family
from .clip import BOS, EOS, get_tokenizer
from .prompt import parse_attention, schedules

__all__ = ["Conditioning", "PromptChunk", "ScheduledConditioning", "chunk_prompt", "encode_schedule", "encode_text"]

EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")
CHUNK_TOKENS = 75
COMMA_BACKTRACK = 20  # A1111's "Prompt word wrap length limit" (comma_padding_backtrack), at its default


@dataclass
class Conditioning:
    """Text conditioning: ``context`` [B, T, D] for cross-attention; ``pooled`` [B, 1280] (SDXL family) or None."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None


@dataclass
class PromptChunk:
    """One 77-token chunk (A1111 ``PromptChunk``): ``ids`` are ``<start>``, 75 slots padded with ``<end>``, ``<end>``;
    ``weights`` one per id; ``fixes`` the embeddings whose vectors replace the token embeddings of slots
    ``slot … slot+n−1`` (ids ``slot+1 …``, after the start token). Embedding slots hold id 0."""

    ids: list[int]
    weights: list[float]
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)


def _check_emphasis(emphasis: str) -> None:
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"emphasis must be one of {EMPHASIS_MODES}, not {emphasis!r}")


class _Chunker:
    """A1111's ``tokenize_line`` state: the chunks so far and the one being filled."""

    def __init__(self) -> None:
        self.chunks: list[PromptChunk] = []
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.fixes: list[tuple[int, Embedding]] = []
        self.last_comma = -1

    def close(self) -> None:
        pad = CHUNK_TOKENS - len(self.ids)
        ids = [BOS, *self.ids, *[EOS] * pad, EOS]
        self.chunks.append(PromptChunk(ids, [1.0, *self.weights, *[1.0] * pad, 1.0], self.fixes))
        self.ids, self.weights, self.fixes, self.last_comma = [], [], [], -1

    def wrap_at_comma(self) -> None:
        """Move the tokens after the last comma of a full chunk to a new chunk."""
        cut = self.last_comma + 1
        moved_ids, moved_weights = self.ids[cut:], self.weights[cut:]
        del self.ids[cut:], self.weights[cut:]
        # As in A1111, embedding fixes stay with the closed chunk: there they overwrite padding, and the moved
        # slots keep id 0. Reproduced so that such prompts give A1111's conditioning.
        self.close()
        self.ids, self.weights = moved_ids, moved_weights

    def add(self, ids: list[int], weight: float, embeddings: EmbeddingSet | None, comma: int) -> None:
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma:
                self.last_comma = len(self.ids)
            elif (len(self.ids) == CHUNK_TOKENS and self.last_comma != -1
                  and len(self.ids) - self.last_comma <= COMMA_BACKTRACK):
                self.wrap_at_comma()
            if len(self.ids) == CHUNK_TOKENS:
                self.close()
            found = embeddings.match(ids, position) if embeddings is not None else None
            if found is None:
                self.ids.append(token)
                self.weights.append(weight)
                position += 1
                continue
            embedding, name_length = found
            n = embedding.num_vectors
            if len(self.ids) + n > CHUNK_TOKENS:
                self.close()
            self.fixes.append((len(self.ids), embedding))
            self.ids += [0] * n
            self.weights += [weight] * n
            position += name_length


def chunk_prompt(text: str, *, embeddings: EmbeddingSet | None = None,
                 emphasis: str = "Original") -> list[PromptChunk]:
    """The 77-token chunks of one scheduled text (A1111 ``tokenize_line``); at least one, even for "".

    With ``emphasis="None"`` brackets and ``BREAK`` are plain text, as in A1111; the other modes parse them.
    """
    _check_emphasis(emphasis)
    segments = [(text, 1.0)] if emphasis == "None" else parse_attention(text)
    tokenizer = get_tokenizer()
    comma = tokenizer.encode(",")[0]
    chunker = _Chunker()
    for (segment, weight), ids in zip(segments, tokenizer.encode_batch([s for s, _ in segments])):
        if segment == "BREAK" and weight == -1:  # a BREAK scaled by brackets is text (parse_attention)
            chunker.close()
        else:
            chunker.add(ids, weight, embeddings, comma)
    if chunker.ids or not chunker.chunks:
        chunker.close()
    return chunker.chunks


def token_table(encoder: nn.Module) -> nn.Module:
    """The text encoder's token-embedding table (an ``nn.Embedding``), under either layout's key name."""
    return encoder.text_model.embeddings.token_embedding if encoder.config.layout == "clip" else encoder.token_embedding


def _run_encoder(encoder: nn.Module, index: int, chunks: list[PromptChunk], embeddings: EmbeddingSet | None,
                 layer: int, final_norm: bool, pooled: bool):
    device = next(encoder.parameters()).device
    ids = torch.tensor([c.ids for c in chunks], device=device)
    if encoder.config.layout == "openclip":
        # open_clip pads with 0: every id after the first <end> becomes 0 (A1111 process_tokens).
        is_end = (ids == EOS).int()
        ids = ids.masked_fill(is_end.cumsum(1) - is_end > 0, 0)
    token_embeds = None
    if any(c.fixes for c in chunks):
        token_embeds = token_table(encoder)(ids)
        for row, chunk in enumerate(chunks):
            for slot, embedding in chunk.fixes:
                vectors = embeddings.vectors(embedding, index).to(token_embeds)
                n = min(ids.shape[1] - slot - 1, vectors.shape[0])
                token_embeds[row, slot + 1 : slot + 1 + n] = vectors[:n]
    return encoder(ids, layer=layer, final_norm=final_norm, pooled=pooled, token_embeds=token_embeds)


def _emphasize(z: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor, emphasis: str) -> torch.Tensor:
    """Apply token weights to z [k, B, 77, W] (k chunks of a batch of B texts) as A1111's emphasis modes do.

    "Original" rescales each chunk so that its mean over the batch is what it was before weighting; ``counts`` is how
    many times each text stands in A1111's batch (a prompt schedule encodes one text per step). The arithmetic is
    float32, as A1111's float32 weights make it.
    """
    if emphasis in ("Ignore", "None"):
        return z
    z32 = z.float()
    weighted = z32 * weights.to(z32.device)[..., None]
    if emphasis == "Original":
        m = counts.to(z32.device).view(1, -1, 1, 1)
        ratio = (z32 * m).sum(dim=(1, 2, 3)) / (weighted * m).sum(dim=(1, 2, 3))
        weighted = weighted * ratio.view(-1, 1, 1, 1)
    return weighted.to(z.dtype)


def _check(encoders: Sequence[nn.Module], family: str, clip_skip: int, embeddings: EmbeddingSet | None) -> None:
    expected = len(get_family(family).text_encoders)
    if len(encoders) != expected:
        raise ValueError(f"{family} has {expected} text encoder(s), got {len(encoders)}")
    if clip_skip < 1:
        raise ValueError(f"clip_skip counts from 1 (the last layer), got {clip_skip}")
    widths = tuple(e.config.width for e in encoders)
    if embeddings is not None and embeddings.widths != widths:
        raise ValueError(f"the embeddings were matched to text encoders of widths {embeddings.widths}, "
                         f"these are {widths}")


def _encode(rows: list[list[PromptChunk]], counts: list[int], encoders: Sequence[nn.Module], family: str,
            clip_skip: int, embeddings: EmbeddingSet | None, emphasis: str) -> Conditioning:
    b, k = len(rows), max(len(r) for r in rows)
    empty = PromptChunk([BOS] + [EOS] * (CHUNK_TOKENS + 1), [1.0] * (CHUNK_TOKENS + 2))
    flat = [row[i] if i < len(row) else empty for i in range(k) for row in rows]  # chunk-major: [k·B]
    weights = torch.tensor([c.weights for c in flat]).view(k, b, -1)
    multiplicity = torch.tensor(counts, dtype=torch.float32)
    contexts, pooled = [], None
    # Each family's layer rule (docs/formats.md §1.6): SD1 reads layer -clip_skip through the final LayerNorm, SD2
    # the penultimate layer through ln_final, SDXL and its refiner penultimate layers without final norm with the
    # pooled vector from the OpenCLIP tower. Clip skip moves SD1's layer only, as in A1111.
    for index, (encoder, rule) in enumerate(zip(encoders, FAMILIES[family].text_encoders)):
        layer, final_norm, want_pooled = rule.read(clip_skip)
        out = _run_encoder(encoder, index, flat, embeddings, layer, final_norm, want_pooled)
        z = _emphasize(out.hidden.view(k, b, *out.hidden.shape[1:]), weights, multiplicity, emphasis)
        contexts.append(z.transpose(0, 1).reshape(b, -1, z.shape[-1]))
        if want_pooled:
            pooled = out.pooled[:b]  # A1111 takes the pooled vector of the first chunk
    return Conditioning(torch.cat(contexts, dim=-1), pooled)


@torch.no_grad()
def encode_text(texts: str | Sequence[str], encoders: Sequence[nn.Module], family: str, *, clip_skip: int = 1,
                embeddings: EmbeddingSet | None = None, emphasis: str = "Original") -> Conditioning:
    """Encode scheduled texts (no ``AND``, no prompt editing: see :func:`encode_schedule`) as one A1111 batch
    (``FrozenCLIPEmbedderWithCustomWords.forward``).

    ``encoders`` are a pipeline's ``text_encoders`` and ``family`` its family. Every text gets the chunk count of the
    longest, the others padded with empty chunks (``<start>`` + 76 ``<end>``); "Original" emphasis keeps each chunk's
    mean over the whole batch, so texts encoded together can differ in the last bits from texts encoded alone, as
    in A1111. ``emphasis``: "Original" (default), "No norm" (weights without the rescale), "Ignore" (brackets read,
    weights dropped), "None" (brackets and BREAK are plain text). Returns context [B, 77·k, D] and, for the SDXL
    family, the pooled vector [B, P] of the first chunk.
    """
    return encode_text_with_grad(texts, encoders, family, clip_skip=clip_skip, embeddings=embeddings,
                                 emphasis=emphasis)


def encode_text_with_grad(texts: str | Sequence[str], encoders: Sequence[nn.Module], family: str, *,
                          clip_skip: int = 1, embeddings: EmbeddingSet | None = None,
                          emphasis: str = "Original") -> Conditioning:
    """:func:`encode_text` with autograd left as the caller has it: under grad mode the result's graph reaches the
    encoders' parameters and the embeddings' vectors (training text-encoder LoRA or textual-inversion vectors)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("encode_text needs at least one text")
    _check(encoders, family, clip_skip, embeddings)
    rows = [chunk_prompt(t, embeddings=embeddings, emphasis=emphasis) for t in texts]
    return _encode(rows, [1] * len(rows), encoders, family, clip_skip, embeddings, emphasis)


@dataclass
class ScheduledConditioning:
    """One prompt's conditioning over the sampling steps (A1111's list of ``ScheduledPromptConditioning``):
    ``entries`` are ``(end_step, Conditioning)`` with contexts [1, 77·k, D], all of the same k; ``embeddings`` the
    textual-inversion embeddings it uses, for the infotext's ``TI hashes`` (``sdlite.adapters.embeddings.ti_hashes``).
    """

    entries: list[tuple[int, Conditioning]]
    embeddings: tuple[Embedding, ...] = ()

    def cond_at(self, step: int) -> Conditioning:
        """The conditioning of model call ``step``, A1111's counter: 0 for the first call, +1 per call, so
        second-order samplers advance it twice per step. The first entry whose end_step >= step; past the last
        entry A1111 falls back to the first one, and so does this."""
        for end, cond in self.entries:
            if step <= end:
                return cond
        return self.entries[0][1]


@torch.no_grad()
def encode_schedule(text: str, encoders: Sequence[nn.Module], family: str, steps: int, *,
                    hires_steps: int | None = None, clip_skip: int = 1, embeddings: EmbeddingSet | None = None,
                    emphasis: str = "Original", negative: bool = False,
                    use_old_scheduling: bool = False) -> ScheduledConditioning:
    """Encode one prompt for sampling: its ``sdlite.prompt.schedules`` texts (prompt editing, alternation) as one
    batch, each distinct text run through the encoders once (A1111 ``get_learned_conditioning``).

    ``text`` must already be free of ``<lora:…>`` tags and ``AND`` (``extract_networks``, then ``split_and``, whose
    parts are encoded one by one and combined with their weights by the CFG). A1111 does not split the negative
    prompt on AND; pass it with ``negative=True``: for the SDXL family an all-empty negative prompt then encodes to
    zeros, context and pooled (sgm's force_zero_embeddings, as A1111 calls it). ``hires_steps`` gives the hires pass's
    schedule (``schedules``). Other arguments are :func:`encode_text`'s.
    """
    _check(encoders, family, clip_skip, embeddings)
    plan = schedules(text, steps, hires_steps, use_old_scheduling=use_old_scheduling)
    counts = Counter(t for _, t in plan)
    distinct = list(counts)
    rows = [chunk_prompt(t, embeddings=embeddings, emphasis=emphasis) for t in distinct]
    cond = _encode(rows, [counts[t] for t in distinct], encoders, family, clip_skip, embeddings, emphasis)
    if negative and FAMILIES[family].zero_empty_negative and all(t == "" for t in distinct):
        cond = Conditioning(torch.zeros_like(cond.context), torch.zeros_like(cond.pooled))
    row = {t: i for i, t in enumerate(distinct)}
    entries = [(end, Conditioning(cond.context[row[t] : row[t] + 1],
                                  None if cond.pooled is None else cond.pooled[row[t] : row[t] + 1]))
               for end, t in plan]
    # In A1111's order: chunk by chunk over the batch of texts, first use of each name.
    used = {e.name: e for i in range(max(map(len, rows))) for chunks in rows if i < len(chunks)
            for _, e in chunks[i].fixes}
    return ScheduledConditioning(entries, tuple(used.values()))
