"""The UNet's attention layer and its one extension point: attention patches.

Everything that changes what an attention layer attends to — IP-Adapter and InstantID (extra image tokens,
Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter"), A1111 hypernetworks (a transformed context),
regional prompts (masks) — is an ``AttentionPatch`` handed to the model call::

    out = unet(x, t, context, patches=[patch, ...])        # also ControlNet(x, hint, t, context, patches=[...])

and passed down, unchanged, to every ``CrossAttention`` (``attn1``, self-attention, and ``attn2``, over the text
context). There are no globals and nothing is replaced: the same module with ``patches=None`` runs exactly the
unpatched code (one ``if`` per layer; ``torch.compile(fullgraph=True)`` sees no patch code at all).

A patch is a subclass of ``AttentionPatch`` that overrides the hooks it needs; each hook is asked per layer and
per call with an ``AttentionSite``: the layer's original key (``input_blocks.4.1.transformer_blocks.0.attn2``, the
checkpoint's key prefix of that layer, set once when the model is built), the layer itself (its ``to_k``/``to_v``
for patches that project tokens of their own), the (h, w) grid of its query tokens and the batch size. Hooks:

* ``kv_inputs(site, k_in, v_in) -> (k_in, v_in)``: what ``to_k`` and ``to_v`` are applied to (the context for
  ``attn2``, the hidden tokens for ``attn1``). Hypernetworks transform them separately, chosen by width.
  Several patches chain in list order.
* ``extra_tokens(site) -> [ExtraTokens]``: further key/value sets, already projected ([B or 1, T, heads*head_dim]),
  each attended to by the layer's queries on its own; the result times ``scale`` (a number or a per-row tensor)
  and times its ``mask`` is added to the layer's own attention output (IP-Adapter's decoupled cross-attention:
  ``attn(q, k, v) + scale * attn(q, k_ip, v_ip)``).
* ``output_mask(site) -> [B or 1, h*w, 1]``: multiplies the layer's own attention output per query position
  (regional composition; masks of several patches multiply). ``token_mask`` resizes a mask to the layer's grid.
* ``attention_bias(site) -> [B or 1, heads or 1, h*w, T]``: added to the layer's own attention scores before the
  softmax (per-token weighting, -inf to forbid a token); biases of several patches add.

All contributions are summed in the heads' output space, before ``to_out`` (as IP-Adapter does). Tensors a patch
returns have the batch of the call (rows aligned with the UNet batch, e.g. cond rows then uncond rows of a CFG
step) or batch 1 for "the same for every row". A patch decides where it applies from ``site.key`` (returning
nothing elsewhere); the caller decides which model gets which patches (IP-Adapter patches the UNet, not ControlNets).

Example, a patch adding 4 image tokens to every cross-attention layer with projections of its own::

    class ImagePrompt(AttentionPatch):
        def __init__(self, tokens, to_k_ip, to_v_ip, scale):   # tokens [B, 4, C]; dicts of Linear by layer key
            self.tokens, self.to_k_ip, self.to_v_ip, self.scale = tokens, to_k_ip, to_v_ip, scale

        def extra_tokens(self, site):
            if site.key not in self.to_k_ip:
                return ()
            return [ExtraTokens(self.to_k_ip[site.key](self.tokens), self.to_v_ip[site.key](self.tokens), self.scale)]
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """One call of one attention layer, as the patches see it."""

    key: str  # the layer's original key, e.g. "input_blocks.4.1.transformer_blocks.0.attn2"
    layer: "CrossAttention"
    size: tuple[int, int] | None  # (h, w) of the query tokens (row-major); None when called outside a model
    batch: int

    @property
    def self_attention(self) -> bool:
        return self.layer.is_self_attention


@dataclasses.dataclass(frozen=True)
class ExtraTokens:
    """A set of keys and values [B or 1, T, heads*head_dim] (already projected) attended to by the layer's queries;
    ``scale`` (a number or a tensor broadcasting to [B, h*w, 1], e.g. [B, 1, 1] per row) and ``mask`` ([B or 1,
    h*w, 1], or None) multiply the result before it is added to the layer's output."""

    k: torch.Tensor
    v: torch.Tensor
    scale: float | torch.Tensor = 1.0
    mask: torch.Tensor | None = None


class AttentionPatch:
    """Base of every attention patch: each hook leaves the layer as it is; override the ones you need (module
    docstring). A patch may also be an ``nn.Module`` (``class P(AttentionPatch, nn.Module)``) holding its weights."""

    def kv_inputs(self, site: AttentionSite, k_in: torch.Tensor,
                  v_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k_in, v_in

    def extra_tokens(self, site: AttentionSite) -> Sequence[ExtraTokens]:
        return ()

    def output_mask(self, site: AttentionSite) -> torch.Tensor | None:
        return None

    def attention_bias(self, site: AttentionSite) -> torch.Tensor | None:
        return None


def token_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A mask [H, W] or [B, 1, H, W] (any resolution) as [B or 1, h*w, 1] on a layer's (h, w) token grid, averaged
    over the area each token covers (so a mask of ones stays exactly ones)."""
    if mask.ndim == 2:
        mask = mask[None, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"a mask is [H, W] or [B, 1, H, W], got {list(mask.shape)}")
    h, w = size
    if tuple(mask.shape[-2:]) != (h, w):
        mask = F.interpolate(mask.float(), size=(h, w), mode="area").to(mask.dtype)
    return mask.reshape(mask.shape[0], h * w, 1)


def name_attention_layers(model: nn.Module) -> None:
    """Give each CrossAttention of ``model`` its key (its name in ``model``, the checkpoint's key prefix); called
    once by the models' constructors."""
    for name, module in model.named_modules():
        if isinstance(module, CrossAttention):
            module.key = name


def _check_batch(t: torch.Tensor, batch: int, what: str, site: AttentionSite) -> None:
    if t.shape[0] not in (1, batch):
        raise ValueError(f"{what} for attention layer {site.key} has batch {t.shape[0]}, the call has {batch} rows "
                         "(give one row per row of the model's batch, or one for all)")


class CrossAttention(nn.Module):
    """Multi-head attention of queries from ``x`` over ``context`` (or over ``x`` itself), bias-free q/k/v, with
    the attention patches of the module docstring."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.is_self_attention = context_dim is None
        self.key = ""  # set by name_attention_layers
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        # [B, T, heads*d] -> [B, heads, T, d]
        return t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                patches: Sequence[AttentionPatch] | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self._split(self.to_q(x))
        if not patches:
            context = x if context is None else context
            out = F.scaled_dot_product_attention(q, self._split(self.to_k(context)), self._split(self.to_v(context)))
            # [B, heads, N, d] -> [B, N, heads*d]
            return self.to_out(out.transpose(1, 2).reshape(b, n, -1))
        return self.to_out(self._patched(q, x, context, patches, size))

    def _patched(self, q: torch.Tensor, x: torch.Tensor, context: torch.Tensor | None,
                 patches: Sequence[AttentionPatch], size: tuple[int, int] | None) -> torch.Tensor:
        """The attention output [B, N, heads*d] before ``to_out``, with every patch's hooks applied."""
        b, n, _ = x.shape
        site = AttentionSite(self.key, self, size, b)
        k_in = v_in = x if context is None else context
        bias = mask = None
        for patch in patches:
            k_in, v_in = patch.kv_inputs(site, k_in, v_in)
            b_p, m_p = patch.attention_bias(site), patch.output_mask(site)
            if b_p is not None:
                _check_batch(b_p, b, "attention_bias", site)
                bias = b_p if bias is None else bias + b_p
            if m_p is not None:
                _check_batch(m_p, b, "output_mask", site)
                mask = m_p if mask is None else mask * m_p
        k, v = self._split(self.to_k(k_in)), self._split(self.to_v(v_in))
        if bias is not None:
            bias = bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, n, -1)
        if mask is not None:
            out = out * mask.to(out.dtype)
        for patch in patches:
            for extra in patch.extra_tokens(site):
                _check_batch(extra.k, b, "extra tokens", site)
                k = self._split(extra.k.expand(b, -1, -1))
                v = self._split(extra.v.expand(b, -1, -1))
                add = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
                if extra.mask is not None:
                    _check_batch(extra.mask, b, "extra tokens' mask", site)
                    add = add * extra.mask.to(add.dtype)
                out = out + extra.scale * add
        return out
