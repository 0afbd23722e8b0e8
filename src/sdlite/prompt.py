"""AUTOMATIC1111's prompt syntax as plain data (stable-diffusion-webui ``modules/prompt_parser.py`` and
``modules/extra_networks.py``; docs/formats.md §3.6, §7).

A1111 reads a prompt in this order, and so does ``sdlite.conditioning``: extra-network tags such as ``<lora:name:0.8>``
are taken out (:func:`extract_networks`); the rest is split on ``AND`` into weighted parts (:func:`split_and`); each
part becomes a schedule of texts over the sampling steps (:func:`schedules`: prompt editing ``[from:to:when]`` and
alternation ``[a|b]``); each scheduled text is read for emphasis and ``BREAK`` (:func:`parse_attention`) and then
tokenised.

None of these functions raises on malformed input. Unbalanced brackets and stray colons are read the way A1111 reads
them; a prompt its schedule grammar cannot parse is used unchanged for every step, as in A1111. The few inputs on which
A1111 itself raises (a weight such as ``(x:1.2.3)``, a step number such as ``[x:1e999]``) are given a reading instead,
noted where it happens.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterator, Union

__all__ = ["NetworkTag", "extract_networks", "parse_attention", "schedules", "split_and"]

# --- emphasis: (x) [x] (x:w) and BREAK -------------------------------------------------------------------------------

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1  # multiplied in, never divided by, so that weights round exactly as A1111's do

_WEIGHT_CLOSE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_TEXT_RUN = re.compile(r"[^\\()\[\]:]+")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_ESCAPABLE = frozenset("()[]\\")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(text, weight)`` runs by A1111's emphasis syntax (``parse_prompt_attention``).

    ``(x)`` multiplies the weight of x by 1.1, ``[x]`` by 1/1.1, ``(x:w)`` by w; nested brackets multiply, in the
    order they close. ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters; a backslash before anything
    else is dropped. A closing bracket with nothing open is literal text; a bracket left open applies to the end of
    the text. The word ``BREAK`` between whitespace or brackets becomes the marker ``("BREAK", -1.0)``; inside
    brackets it is scaled with them (``-1.1`` ...) and so no longer acts as a break, as in A1111. Neighbouring runs of
    equal weight are merged; runs may be empty strings where A1111 leaves them.

    >>> parse_attention("a (red:1.5) [cat] BREAK dog")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('cat', 0.9090909090909091), ('', 1.0), ('BREAK', -1.0), ('dog', 1.0)]
    """
    reader = _AttentionReader()
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            escaped = text[i + 1 : i + 2]
            escaped = escaped if escaped in _ESCAPABLE else ""
            reader.pieces.append([escaped, 1.0])  # escaped characters are never split at BREAK
            i += 1 + len(escaped)
        elif c == "(":
            reader.round_opens.append(len(reader.pieces))
            i += 1
        elif c == "[":
            reader.square_opens.append(len(reader.pieces))
            i += 1
        elif c == ":":
            i = reader.colon(text, i)
        elif c == ")" and reader.round_opens:
            reader.scale(reader.round_opens.pop(), ROUND_FACTOR)
            i += 1
        elif c == "]" and reader.square_opens:
            reader.scale(reader.square_opens.pop(), SQUARE_FACTOR)
            i += 1
        elif c in ")]":
            reader.add_text(c)
            i += 1
        else:
            run = _TEXT_RUN.match(text, i).group()
            reader.add_text(run)
            i += len(run)
    return reader.finish()


class _AttentionReader:
    """The state of one parse_attention pass: the runs so far and where the open brackets started."""

    def __init__(self) -> None:
        self.pieces: list[list] = []  # [text, weight], mutable so that closing brackets scale them in place
        self.round_opens: list[int] = []
        self.square_opens: list[int] = []

    def scale(self, start: int, factor: float) -> None:
        for piece in self.pieces[start:]:
            piece[1] *= factor

    def add_text(self, run: str) -> None:
        for k, part in enumerate(_BREAK.split(run)):
            if k:
                self.pieces.append(["BREAK", -1.0])
            self.pieces.append([part, 1.0])

    def colon(self, text: str, i: int) -> int:
        """Read the ":" at ``i``: the weight closing ``(x:w)``, or text. Returns the next position."""
        m = _WEIGHT_CLOSE.match(text, i)
        if m is None:
            self.add_text(":")
            return i + 1
        if not self.round_opens:
            self.add_text(m.group())  # ":1.2)" with no "(" open is text, closing bracket included
            return m.end()
        try:
            weight = float(m.group(1))
        except ValueError:
            # "(x:1.2.3)" or "(x:.)": A1111 raises here. sdlite reads the ":" as text and the ")" as a plain close.
            self.add_text(":")
            return i + 1
        self.scale(self.round_opens.pop(), weight)
        return m.end()

    def finish(self) -> list[tuple[str, float]]:
        for start in self.round_opens:  # A1111 applies the open round brackets first, then the square ones
            self.scale(start, ROUND_FACTOR)
        for start in self.square_opens:
            self.scale(start, SQUARE_FACTOR)
        merged: list[list] = []
        for piece in self.pieces or [["", 1.0]]:
            if merged and merged[-1][1] == piece[1]:
                merged[-1][0] += piece[0]
            else:
                merged.append(piece)
        return [(t, w) for t, w in merged]


# --- AND: composable diffusion parts --------------------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"^([\s\S]*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(text: str) -> list[tuple[str, float]]:
    """Split a prompt at the word ``AND`` into ``(text, weight)`` parts (A1111 ``get_multicond_prompt_list``).

    A part ending in ``:number`` takes that weight (default 1.0) and loses it from its text, as does trailing
    whitespace; leading whitespace stays. This applies to a prompt without ``AND`` too: ``"a cat:1.5"`` is the part
    ``("a cat", 1.5)``. ``AND`` must be upper case and a whole word.

    >>> split_and("a cat AND a dog:0.5")
    [('a cat', 1.0), (' a dog', 0.5)]
    """
    parts = []
    for part in _AND.split(text):
        m = _PART_WEIGHT.match(part)  # always matches: the lazy text group can take everything
        parts.append((m.group(1), 1.0 if m.group(2) is None else float(m.group(2))))
    return parts


# --- extra networks: <lora:name:te:unet> --------------------------------------------------------------------------

_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class NetworkTag:
    """One ``<kind:name:arg…>`` tag (A1111 ``ExtraNetworkParams``): ``kind`` is "lora", "hypernet", "lyco", ….

    The ":"-separated items are split as A1111 does: an item with exactly one "=" is named (``te=0.5``), the others
    are positional; ``name`` is the first positional item ("" if there is none) and ``args`` the rest.
    """

    kind: str
    name: str
    args: tuple[str, ...] = ()
    named: dict[str, str] = field(default_factory=dict)

    def lora_weights(self) -> tuple[float, float, int | None]:
        """``(te, unet, dyn)`` as A1111 reads a LoRA tag: ``<lora:name:te:unet:dyn>``, te defaults to 1, unet to te;
        ``te=``, ``unet=``, ``dyn=`` override. Raises ValueError naming the tag when a value is not a number."""
        try:
            te = float(self.named.get("te", self.args[0] if self.args else 1.0))
            unet = float(self.named.get("unet", self.args[1] if len(self.args) > 1 else te))
            dyn = self.named.get("dyn", self.args[2] if len(self.args) > 2 else None)
            return te, unet, None if dyn is None else int(dyn)
        except ValueError:
            raise ValueError(f"<{self.kind}:{self.name}:…> has a weight that is not a number: {self.args} "
                             f"{self.named}") from None


def extract_networks(text: str) -> tuple[str, list[NetworkTag]]:
    """Remove every ``<kind:args>`` tag from ``text`` and return the rest and the tags, in order
    (A1111 ``extra_networks.parse_prompt``). Nothing else of the text changes, whitespace around a tag included.

    >>> extract_networks("a cat <lora:film:0.8>, grain")
    ('a cat , grain', [NetworkTag(kind='lora', name='film', args=('0.8',), named={})])
    """
    tags: list[NetworkTag] = []

    def take(m: re.Match) -> str:
        positional, named = [], {}
        for item in m.group(2).split(":"):
            parts = item.split("=", 2)
            if len(parts) == 2:
                named[parts[0]] = parts[1]
            else:
                positional.append(item)
        tags.append(NetworkTag(m.group(1), positional[0] if positional else "", tuple(positional[1:]), named))
        return ""

    return _NETWORK_TAG.sub(take, text), tags


# --- prompt editing and alternation ---------------------------------------------------------------------------------


@dataclass
class _Edit:
    """``[from:to:when]``; ``before`` is None for ``[to:when]``."""

    before: list | None
    after: list
    number: str  # as written, since A1111 tells fractions from step counts by the "." in it


@dataclass
class _Alternation:
    """``[a|b|c]``."""

    options: list[list]


_Node = Union[str, _Edit, _Alternation]
# lark's SIGNED_NUMBER between the last ":" and "]", optionally surrounded by whitespace.
_WHEN = re.compile(r"\s*([+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+))\s*")


class _ScheduleParser:
    """A1111's lark grammar for prompt editing, read by hand (docs/formats.md §7.2)::

        start:     (prompt | /[][():]/+)*
        prompt:    (emphasized | scheduled | alternate | plain | WHITESPACE)*
        emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
        scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
        alternate: "[" prompt ("|" [prompt])+ "]"
        plain:     /([^\\\\\\[\\]():|]|\\\\.)+/

    Inside a bracket group every bracket must close with its own kind, ``(…)`` holds at most one ":", and ":" or
    "|" separate the parts of a ``[…]``; so the closing bracket of a group is fixed by its content, and groups that
    parse nest without overlapping. Only the top level may hold stray brackets and colons. Where lark could read a
    well-formed group either as a group or as stray characters, the group is taken: A1111's own examples do so, and a
    whole text that parses as one ``prompt`` is always read that way by lark's Earley resolution. The text fails to
    parse (and A1111 then uses it unchanged) when a "|" is outside every alternation, or a backslash ends the text
    or precedes a newline.
    """

    def __init__(self, text: str):
        self.text = text
        self._groups: dict[int, tuple[list[_Node], int] | None] = {}

    def parse(self) -> list[_Node] | None:
        found = self._items(0, top=True)
        return None if found is None else found[0]

    def _items(self, i: int, top: bool) -> tuple[list[_Node], int] | None:
        """Text and groups from ``i``: the whole text at the top level, where brackets that form no group and colons
        are stray characters; inside a group a ``prompt`` up to the next ":", "|", ")" or "]"."""
        text, out = self.text, []
        while i < len(text):
            c = text[i]
            if c in ":|)]" and not top:
                break
            if c == "|":  # "|" exists only inside an alternation
                return None
            if c in "([":
                group = self._group(i)
                if group is not None:
                    nodes, i = group
                    out.extend(nodes)
                    continue
                if not top:
                    return None
            elif c == "\\":
                if i + 1 == len(text) or text[i + 1] == "\n":  # the grammar's "\\." matches no newline
                    return None
                out.append(text[i : i + 2])
                i += 2
                continue
            out.append(c)
            i += 1
        return out, i

    def _group(self, start: int) -> tuple[list[_Node], int] | None:
        """The group opening at ``start`` as nodes and the position after it, or None if it does not parse."""
        if start not in self._groups:
            self._groups[start] = self._read_group(start)
        return self._groups[start]

    def _read_group(self, start: int) -> tuple[list[_Node], int] | None:
        text = self.text
        parts: list[list[_Node]] = []
        separators: list[int] = []
        i = start + 1
        while True:
            seq = self._items(i, top=False)
            if seq is None or seq[1] >= len(text):
                return None
            nodes, i = seq
            parts.append(nodes)
            if text[i] not in ":|":
                break
            separators.append(i)
            i += 1
        closer, end = text[i], i + 1
        kinds = {text[s] for s in separators}
        if text[start] == "(":
            if closer != ")" or "|" in kinds or len(separators) > 1:
                return None
            middle = [":", *parts[1]] if separators else []
            return ["(", *parts[0], *middle, ")"], end  # emphasis stays in the text; parse_attention reads it
        if closer != "]":
            return None
        if "|" in kinds:
            return ([_Alternation(parts)], end) if ":" not in kinds else None
        if not separators:
            return ["[", *parts[0], "]"], end
        when = _WHEN.fullmatch(text, separators[-1] + 1, i)
        if when is None or len(separators) > 2:
            return None
        return [_Edit(parts[0] if len(separators) == 2 else None, parts[-2], when.group(1))], end


def _walk(nodes: list[_Node]) -> Iterator[_Edit | _Alternation]:
    for node in nodes:
        if isinstance(node, _Edit):
            yield node
            yield from _walk(node.before or [])
            yield from _walk(node.after)
        elif isinstance(node, _Alternation):
            yield node
            for option in node.options:
                yield from _walk(option)


def _render(nodes: list[_Node], step: int, whens: dict[int, int]) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Edit):
            out.append(_render((node.before or []) if step <= whens[id(node)] else node.after, step, whens))
        else:
            out.append(_render(node.options[(step - 1) % len(node.options)], step, whens))
    return "".join(out)


def _edit_step(number: str, steps: int, int_offset: int, frac_offset: float, old: bool) -> int:
    value = float(number)
    if old:
        value = value * steps if value < 1 else value
    elif "." in number:
        value = (value - frac_offset) * steps
    else:
        value = value - int_offset
    if math.isinf(value):  # "1e999": A1111 raises (int(inf)); sdlite reads it as "at the end" / "never"
        return steps if value > 0 else -1
    return min(steps, int(value))


def schedules(text: str, steps: int, hires_steps: int | None = None, *,
              use_old_scheduling: bool = False) -> list[tuple[int, str]]:
    """The texts a prompt stands for over the sampling steps, as ``(end_step, text)`` pairs in step order
    (A1111 ``get_learned_conditioning_prompt_schedules``).

    ``[from:to:when]`` reads "from" while the step is <= when, then "to"; ``[to:when]`` adds "to", ``[from::when]``
    removes "from". ``when`` with a "." is a fraction of the steps (``int(when·steps)``), without one a step number;
    both are capped at ``steps``. ``[a|b|c]`` makes step k (1-based) read option (k−1) mod 3, and so gives an entry per
    step. Groups nest. For the hires pass give ``hires_steps``: the schedule then covers the hires steps, a step
    number counts from the start of the first pass (``when − steps``) and a fraction counts from 1.0 (``1.5`` is the
    middle of the hires pass). ``use_old_scheduling`` is A1111's legacy option: values below 1 are fractions, others
    step numbers, always over ``steps``. A text the grammar cannot parse is one entry, unchanged.

    The sampler's step counter starts at 0, so with A1111's lookup (first entry whose end_step >= the counter) the
    first text is used for ``when + 1`` model calls; ``sdlite.conditioning.ScheduledConditioning.cond_at`` does that.

    >>> schedules("a [cat:dog:0.5] b", 10)
    [(5, 'a cat b'), (10, 'a dog b')]
    """
    if hires_steps is None or use_old_scheduling:
        total, int_offset, frac_offset = steps, 0, 0.0
    else:
        total, int_offset, frac_offset = hires_steps, steps, 1.0
    tree = _ScheduleParser(text).parse()
    if tree is None:
        return [(total, text)]
    whens: dict[int, int] = {}
    ends = {total}
    for node in _walk(tree):
        if isinstance(node, _Edit):
            when = whens[id(node)] = _edit_step(node.number, total, int_offset, frac_offset, use_old_scheduling)
            if when >= 1:
                ends.add(when)
        else:
            ends.update(range(1, total + 1))
    return [(end, _render(tree, end, whens)) for end in sorted(ends)]
