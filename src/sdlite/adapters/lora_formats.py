"""The weight update each LoRA-family format describes for one layer (docs/formats.md §3.2-3.4).

* LoRA (kohya, diffusers, PEFT) and LyCORIS LoCon: ΔW = up @ down, with an optional Tucker core ``lora_mid`` for
  k×k convolutions (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").
* LyCORIS LoHa: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b), or Tucker cores ``hada_t1/t2`` (Hyeon-Woo et al. 2022, FedPara).
* LyCORIS LoKr: ΔW = W1 ⊗ W2 (Kronecker product), each factor whole or low-rank, W2 optionally Tucker.
* LyCORIS full: ΔW = ``diff``, Δbias = ``diff_b``.
* DoRA (Liu et al. 2024) on top of any of them: W' = s ⊙ (W + ΔW) / ‖W + ΔW‖, the norm taken per output row when
  ``dora_scale`` is [out, 1, …] (LyCORIS wd_on_out, PEFT's ``lora_magnitude_vector``) and per input column when it
  is [1, in, …].

Every product is first formed as a matrix [out, in·kh·kw] and then shaped like the weight, so that a file's
flattened conv factors and 4-D Tucker cores come out the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# Roles each algorithm needs, and the optional ones it may have besides alpha and DoRA's magnitude.
_REQUIRED = {
    "lora": {"down", "up"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
    "lokr": set(),  # one of each pair below
    "full": {"diff"},
}
_OPTIONAL = {"lora": {"mid"}, "loha": {"hada_t1", "hada_t2"},
             "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
             "full": {"diff_b"}}
_COMMON = {"alpha", "dora_scale", "magnitude"}
# torch.finfo(float32).eps, which LyCORIS adds to the DoRA norm.
_DORA_EPS = torch.finfo(torch.float32).eps


def _tucker(core: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Rebuild [out, in, kh, kw] from a Tucker core [r, r', kh, kw] with ``rows`` [r, out] and ``cols`` [r', in]."""
    return torch.einsum("ijkl,ip,jq->pqkl", core, rows, cols)


@dataclass(eq=False)
class LayerUpdate:
    """The tensors one file holds for one layer, by role, and the update they describe.

    ``alpha`` may come from the tensors (kohya, LyCORIS) or from adapter metadata (PEFT ``lora_alpha``);
    ``rank_root`` is PEFT's rsLoRA switch (scale alpha/√r).
    """

    name: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # role → file key
    alpha: float | None = None
    rank_root: bool = False

    @property
    def algorithm(self) -> str:
        roles = set(self.tensors)
        if roles & {"down", "up", "mid"}:
            return "lora"
        for algo in ("loha", "lokr", "full"):
            if roles & (_REQUIRED[algo] | _OPTIONAL[algo]):
                return algo
        return "lora"

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.tensors or "magnitude" in self.tensors

    def problem(self) -> str | None:
        """Why these tensors do not make a complete update of one algorithm, or None."""
        algo = self.algorithm
        roles = set(self.tensors)
        allowed = _REQUIRED[algo] | _OPTIONAL[algo] | _COMMON
        if roles - allowed:
            return f"mixes {algo} tensors with {sorted(roles - allowed)}"
        missing = _REQUIRED[algo] - roles
        if algo == "lokr":
            missing = {pair for pair in ("lokr_w1", "lokr_w2") if pair not in roles
                       and not {f"{pair}_a", f"{pair}_b"} <= roles}
        if algo == "loha" and len(roles & {"hada_t1", "hada_t2"}) == 1:
            missing = {"hada_t1", "hada_t2"} - roles
        if missing:
            return f"{algo} layer without {sorted(missing)}"
        if self.dora and algo == "full":
            return "DoRA magnitude on a full-weight difference"
        return None

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if "down" in t:
            return t["down"].shape[0]
        if "hada_w1_b" in t:
            return t["hada_w1_b"].shape[0]
        # LoKr has a rank only where a factor is low-rank (docs/formats.md §3.3).
        for role in ("lokr_w1_b", "lokr_w2_b"):
            if role in t:
                return t[role].shape[0]
        return None

    @property
    def scale(self) -> float:
        """alpha / rank as the trainers define it; 1 without alpha, without a rank, and for full differences.

        kohya, LyCORIS and A1111 read an alpha of 0 as "no alpha" (alpha = rank) too.
        """
        rank = self.rank
        if not self.alpha or rank is None or self.algorithm == "full":
            return 1.0
        return self.alpha / (math.sqrt(rank) if self.rank_root else rank)

    def matrix(self) -> torch.Tensor:
        """ΔW (without scale) as a float32 (or float64) matrix [out, in·kh·kw]."""
        t = {k: v.to(torch.promote_types(v.dtype, torch.float32)) for k, v in self.tensors.items()}
        algo = self.algorithm
        if algo == "lora":
            up, down = t["up"].flatten(1), t["down"].flatten(1)
            if "mid" in t:
                return _tucker(t["mid"], up.T, down).flatten(1)
            return up @ down
        if algo == "loha":
            if "hada_t1" in t:
                return (_tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]).flatten(1)
                        * _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"]).flatten(1))
            return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        if algo == "lokr":
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            if "lokr_w2" in t:
                w2 = t["lokr_w2"].flatten(1)
            elif "lokr_t2" in t:
                w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]).flatten(1)
            else:
                w2 = t["lokr_w2_a"] @ t["lokr_w2_b"].flatten(1)
            # kron of [a, c] and [b, d·kh·kw] read as [a·b, c·d, kh, kw] equals the 4-D kron of W1[a, c, 1, 1]
            # and W2[b, d, kh, kw], so one 2-D product serves linear and conv layers.
            return torch.kron(w1, w2)
        return t["diff"].flatten(1)

    def matrix_shape(self) -> tuple[int, int]:
        """Shape of ``matrix()`` from the tensor shapes alone, for checking a file against a model cheaply."""
        s = {k: tuple(v.shape) for k, v in self.tensors.items()}
        cols = lambda shape: math.prod(shape[1:])  # noqa: E731
        algo = self.algorithm
        if algo == "lora":
            kernel = math.prod(s["mid"][2:]) if "mid" in s else 1
            return s["up"][0], cols(s["down"]) * kernel
        if algo == "loha":
            if "hada_t1" in s:
                return s["hada_w1_a"][1], s["hada_w1_b"][1] * math.prod(s["hada_t1"][2:])
            return s["hada_w1_a"][0], s["hada_w1_b"][1]
        if algo == "lokr":
            a, c = s["lokr_w1"] if "lokr_w1" in s else (s["lokr_w1_a"][0], s["lokr_w1_b"][1])
            if "lokr_w2" in s:
                b, dk = s["lokr_w2"][0], cols(s["lokr_w2"])
            elif "lokr_t2" in s:
                b, dk = s["lokr_w2_a"][1], s["lokr_w2_b"][1] * math.prod(s["lokr_t2"][2:])
            else:
                b, dk = s["lokr_w2_a"][0], cols(s["lokr_w2_b"])
            return a * b, c * dk
        return s["diff"][0], cols(s["diff"])

    def fits(self, shape: tuple[int, ...], pads_inpaint_input: bool = False) -> bool:
        """Whether ΔW can take ``shape`` (the weight's shape)."""
        out, columns = self.matrix_shape()
        kernel = math.prod(shape[2:])
        if out != shape[0]:
            return False
        if "magnitude" in self.tensors and self.tensors["magnitude"].numel() != out:
            return False
        if "dora_scale" in self.tensors and self.dora_shape(shape) is None:
            return False
        if columns == math.prod(shape[1:]):
            return True
        return pads_inpaint_input and shape[1] == 9 and columns == 4 * kernel

    def delta(self, shape: tuple[int, ...], pads_inpaint_input: bool = False) -> torch.Tensor:
        """scale · ΔW shaped like the weight; a 4-channel delta on an inpainting conv_in gets zero input channels."""
        delta = self.matrix() * self.scale
        if delta.shape[1] != math.prod(shape[1:]) and pads_inpaint_input:
            delta = delta.reshape(shape[0], 4, *shape[2:])
            return torch.nn.functional.pad(delta, (0, 0) * (len(shape) - 2) + (0, shape[1] - 4))
        return delta.reshape(shape)

    def update(self, weight: torch.Tensor, multiplier: float, pads_inpaint_input: bool = False) -> torch.Tensor:
        """The changed weight for user weight ``multiplier``; ``weight`` is float32/64 and not modified.

        DoRA: the user weight interpolates between the weight and the DoRA result, W + m·(W' − W), as A1111 and
        ComfyUI apply it; at weight 1 this is exactly LyCORIS' and PEFT's W'.
        """
        delta = self.delta(tuple(weight.shape), pads_inpaint_input).to(weight.device)
        if not self.dora:
            return weight + multiplier * delta
        changed = weight + delta
        magnitude = self._magnitude(tuple(weight.shape)).to(device=weight.device, dtype=weight.dtype)
        if magnitude.shape[0] == weight.shape[0]:  # per output row
            norm = changed.flatten(1).norm(dim=1).reshape(magnitude.shape)
        else:  # per input column
            norm = changed.transpose(0, 1).flatten(1).norm(dim=1).reshape(magnitude.shape)
        decomposed = changed * (magnitude / (norm + _DORA_EPS))
        return decomposed if multiplier == 1 else weight + multiplier * (decomposed - weight)

    def _magnitude(self, shape: tuple[int, ...]) -> torch.Tensor:
        """DoRA's magnitude shaped [out, 1, …] or [1, in, …] to broadcast over the weight."""
        if "magnitude" in self.tensors:  # PEFT stores it flat ([out], or [1, out, 1, 1] for convs)
            return self.tensors["magnitude"].float().reshape(shape[0], *[1] * (len(shape) - 1))
        return self.tensors["dora_scale"].float().reshape(self.dora_shape(shape))

    def dora_shape(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The broadcast shape of a ``dora_scale`` [out, 1, …] or [1, in, …] for a weight of ``shape``, else None."""
        scale = tuple(self.tensors["dora_scale"].shape)
        ones = [1] * (len(shape) - 1)
        if math.prod(scale) == shape[0] and (len(scale) < 2 or scale[0] == shape[0]):
            return (shape[0], *ones)
        if math.prod(scale) == shape[1] and len(scale) >= 2 and scale[1] == shape[1]:
            return (1, shape[1], *ones[1:])
        return None
