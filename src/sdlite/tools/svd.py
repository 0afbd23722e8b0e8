"""Low-rank factors of a weight difference by SVD, as kohya's LoRA extraction and resize scripts make them
(docs/formats.md §13).

ΔW [out, in·kh·kw] = U·diag(S)·Vh; the rank-r LoRA is up = U[:, :r]·diag(S[:r]) and down = Vh[:r] (Eckart–Young: the
best rank-r approximation in the Frobenius norm). A 3x3 convolution's down is [r, in, 3, 3] and its up [out, r, 1, 1],
so the two run as a convolution followed by a 1x1 convolution (LoCon).

Dynamic rank, per module, with the definitions of kohya's ``resize_lora.py``:
* ``sv_ratio`` t: keep the singular values above S[0] / t;
* ``sv_cumulative`` t: the smallest rank whose singular values sum to the fraction t of their total;
* ``sv_fro`` t: the smallest rank keeping the fraction t of the Frobenius norm (Σ S[:r]² ≥ t² · Σ S²).
As in kohya, a dynamic rank is at least 1 and at most len(S) − 1, and never above the rank asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DYNAMIC = ("sv_ratio", "sv_cumulative", "sv_fro")


def parse_dynamic(text: str | None) -> tuple[str, float] | None:
    """``"sv_fro:0.9"`` → ("sv_fro", 0.9)."""
    if text is None:
        return None
    method, _, value = text.partition(":")
    if method not in DYNAMIC or not value:
        raise ValueError(f"dynamic rank is METHOD:VALUE with METHOD one of {DYNAMIC}, got {text!r}")
    return method, float(value)


def dynamic_rank(s: torch.Tensor, method: str, target: float) -> int:
    """The rank kohya's method ``method`` picks for singular values ``s`` (descending)."""
    if method == "sv_ratio":
        rank = int((s > s[0] / target).sum())
    elif method == "sv_cumulative":
        rank = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), torch.tensor(target, dtype=s.dtype))) + 1
    elif method == "sv_fro":
        squared = s.pow(2)
        rank = int(torch.searchsorted(torch.cumsum(squared, 0) / squared.sum(),
                                      torch.tensor(target ** 2, dtype=s.dtype))) + 1
    else:
        raise ValueError(f"unknown dynamic rank method {method!r}; one of {DYNAMIC}")
    return max(1, min(rank, len(s) - 1))


@dataclass
class Factors:
    """One module's LoRA: ``up`` [out, r(, 1, 1)], ``down`` [r, in(, kh, kw)], and how much of ΔW they keep."""

    up: torch.Tensor
    down: torch.Tensor
    kept: float  # ‖rank-r ΔW‖_F / ‖ΔW‖_F before clamping (1.0 at full rank)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def decompose(delta: torch.Tensor, rank: int, dynamic: tuple[str, float] | None = None,
              clamp_quantile: float | None = None) -> Factors:
    """Rank-``rank`` (or dynamic, capped at ``rank``) factors of ``delta``, shaped for a Linear or Conv2d weight.

    ``clamp_quantile`` q clamps up and down to ± the q-quantile of their values (kohya's extraction option), which
    trades exactness for fewer outliers in fp16 files; off by default.
    """
    shape = tuple(delta.shape)
    matrix = delta.reshape(shape[0], -1).to(torch.promote_types(delta.dtype, torch.float32))
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = min(rank, len(s))
    if dynamic is not None and len(s) > 1:
        r = min(r, dynamic_rank(s, *dynamic))
    total = s.pow(2).sum()
    kept = math.sqrt(float(s[:r].pow(2).sum() / total)) if total > 0 else 1.0
    up, down = u[:, :r] * s[:r], vh[:r]
    if clamp_quantile is not None:
        values = torch.cat([up.flatten(), down.flatten()])
        high = torch.quantile(values, clamp_quantile) if values.numel() < 1 << 24 else \
            values.kthvalue(max(1, int(clamp_quantile * values.numel()))).values
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    if len(shape) == 4:
        return Factors(up.reshape(shape[0], r, 1, 1), down.reshape(r, *shape[1:]), kept)
    return Factors(up, down, kept)
