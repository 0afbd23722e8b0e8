"""The prompt side of one generation, as AUTOMATIC1111 1.10 processes it: ``<lora:…>`` tags, AND parts, prompt
schedules counted in model calls, SDXL's size and aesthetic conditioning, and what the infotext records about the
prompts (``Lora hashes`` is the pipeline's; ``TI hashes``, ``Emphasis`` and ``Old prompt editing timelines`` are
collected here while encoding, the way A1111's text encoder wrapper and ``get_conds_with_caching`` write them).
"""

from __future__ import annotations

import functools
import os

import torch

from .adapters.embeddings import ti_hashes
from .checkpoint.family_table import FAMILIES
from .conditioning import encode_schedule
from .guidance import Cond, pad_parts
from .prompt import extract_networks, schedules, split_and
from .unet.blocks import timestep_embedding

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


def find_lora(folders, name: str, suffixes=LORA_SUFFIXES) -> str | None:
    """The file called ``name`` (+ one of ``suffixes``) in ``folders`` or their subfolders, first match in sorted
    order."""
    for folder in folders:
        for root, dirs, files in sorted(os.walk(folder)):
            dirs.sort()
            for suffix in suffixes:
                if name + suffix in files:
                    return os.path.join(root, name + suffix)
    return None


def size_embedding(values: list[float], batch: int) -> torch.Tensor:
    """SDXL's size/crop/aesthetic conditioning: each number as a 256-wide sinusoidal embedding, concatenated."""
    emb = timestep_embedding(torch.tensor(values, dtype=torch.float32), 256)
    return emb.reshape(1, -1).expand(batch, -1)


class Prompts:
    """A job's prompts: the text without extra-network tags, split on AND, encoded per pass with :meth:`cond_at`."""

    def __init__(self, job):
        self.job = job
        self.text, self.networks = extract_networks(job.prompt)
        self.negative = extract_networks(job.negative_prompt)[0]
        self.parts = split_and(self.text)
        self._ti_hashes: list[str] = []  # one entry per encoder call, the latest first (A1111's accumulation)
        self.emphasis_shown = False
        self.old_timelines_differ = False

    def loras(self, lora_dirs) -> list[tuple[str, str, float, float]]:
        """``<lora:name:te:unet>`` tags as (name, file, te weight, unet weight), files found by name (file stem) in
        ``lora_dirs``; a name that is not found is an error, not a silent no-op."""
        found = []
        for tag in self.networks:
            if tag.kind not in ("lora", "lyco", "hypernet"):
                raise ValueError(f"<{tag.kind}:{tag.name}> extra networks are not supported (lora, hypernet)")
            if tag.kind == "hypernet":
                continue
            te, unet, _ = tag.lora_weights()
            path = find_lora(lora_dirs, tag.name)
            if path is None:
                raise ValueError(f"<lora:{tag.name}>: no {tag.name}.safetensors/.pt/.ckpt/.bin in pipe.lora_dirs "
                                 f"{list(map(str, lora_dirs))}")
            found.append((tag.name, path, te, unet))
        return found

    def hypernetworks(self, folders) -> list[tuple[str, str, float]]:
        """``<hypernet:name:multiplier>`` tags (multiplier default 1) as (name, file, multiplier), files
        (``name.pt``) found in ``folders``; a name that is not found is an error."""
        found = []
        for tag in self.networks:
            if tag.kind != "hypernet":
                continue
            try:
                multiplier = float(tag.args[0]) if tag.args else 1.0
            except ValueError:
                raise ValueError(f"<hypernet:{tag.name}:…> has a multiplier that is not a number: {tag.args}") from None
            path = find_lora(folders, tag.name, (".pt",))
            if path is None:
                raise ValueError(f"<hypernet:{tag.name}>: no {tag.name}.pt in pipe.hypernetwork_dirs "
                                 f"{list(map(str, folders))}")
            found.append((tag.name, path, multiplier))
        return found

    # --- conditioning ---------------------------------------------------------------------------------------------

    def _adm(self, pooled: torch.Tensor, width: int, height: int, negative: bool, family: str) -> torch.Tensor | None:
        """SDXL's ``y``: the pooled text vector, then the family's size/crop (and aesthetic score) numbers, each
        embedded as a timestep (``family_table``)."""
        fields = FAMILIES[family]
        if not fields.adm_fields:
            return None
        job = self.job
        values = fields.adm_values(original_size=job.original_size or (width, height), crop=job.crop,
                                   target_size=(width, height),
                                   aesthetic_score=job.negative_aesthetic_score if negative else job.aesthetic_score)
        return torch.cat([pooled, size_embedding(values, pooled.shape[0]).to(pooled)], dim=1)

    def _cond(self, c, width: int, height: int, negative: bool, family: str) -> Cond:
        b = self.job.batch_size
        y = None if c.pooled is None else self._adm(c.pooled.expand(b, -1), width, height, negative, family)
        return Cond(c.context.expand(b, -1, -1), y)

    def cond_at(self, pipe, width: int, height: int, calls: int, hires_calls: int | None = None):
        """``cond_at(call)`` → (conds, uncond) for ``pipe``'s encoders over a pass of ``calls`` model calls
        (``hires_calls``: the hires pass's, whose schedule continues the first pass's, A1111 rules)."""
        job = self.job
        kw = dict(hires_steps=hires_calls, clip_skip=job.clip_skip, embeddings=pipe.embeddings,
                  emphasis=job.emphasis, use_old_scheduling=job.use_old_scheduling)
        encode = functools.partial(encode_schedule, encoders=pipe.text_encoders, family=pipe.family, steps=calls)
        self._note_schedules([self.negative, *(t for t, _ in self.parts)], calls, hires_calls)
        # Every text of the pass is encoded here, up front, so offloaded encoders visit the device once.
        with pipe.using(*pipe.text_encoders):
            parts = [(encode(text, **kw), weight) for text, weight in self.parts]
            negative = encode(self.negative, negative=True, **kw)
        self._note_embeddings(negative, parts, len(pipe.text_encoders))
        cache: dict = {}

        def cond_at(call: int):
            key = (tuple(id(s.cond_at(call)) for s, _ in parts), id(negative.cond_at(call)))
            if key not in cache:
                conds = [(self._cond(s.cond_at(call), width, height, False, pipe.family), w) for s, w in parts]
                cache[key] = (pad_parts(conds), self._cond(negative.cond_at(call), width, height, True, pipe.family))
            return cache[key]

        return cond_at

    # --- what the infotext says about the prompts ----------------------------------------------------------------

    def _note_schedules(self, texts: list[str], calls: int, hires_calls: int | None) -> None:
        """A1111 writes "Emphasis" when a scheduled text holds "(" or "[" and the mode is not "Original", and "Old
        prompt editing timelines" when that option is on and changes a schedule."""
        job = self.job
        for text in texts:
            plan = schedules(text, calls, hires_calls, use_old_scheduling=job.use_old_scheduling)
            if job.emphasis != "Original" and any("(" in t or "[" in t for _, t in plan):
                self.emphasis_shown = True
            if job.use_old_scheduling and plan != schedules(text, calls, hires_calls):
                self.old_timelines_differ = True

    def _note_embeddings(self, negative, parts, encoders: int) -> None:
        """A1111's text encoder wrapper, once per encoder and per distinct prompt encoded (negative first), puts the
        embeddings it used in front of the "TI hashes" written so far."""
        seen, calls = set(), [negative]
        for (text, _), (scheduled, _) in zip(self.parts, parts):
            if text not in seen:
                seen.add(text)
                calls.append(scheduled)
        for scheduled in calls:
            value = ti_hashes(scheduled.embeddings)
            if value:
                self._ti_hashes[:0] = [value] * encoders

    def infotext_params(self) -> dict:
        return {"Old prompt editing timelines": True if self.old_timelines_differ else None,
                "TI hashes": ", ".join(self._ti_hashes) or None,
                "Emphasis": self.job.emphasis if self.emphasis_shown else None}
