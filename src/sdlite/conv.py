"""Fast 3x3 convolutions for inference on the CPU, where oneDNN's direct convolution leaves time on the table.

Two paths, each taken only where it pays (``Conv2d.forward`` decides; everything else calls ``F.conv2d``):

* **Winograd F(4x4, 3x3)**, or F(2x2, 3x3) on smaller maps (Lavin & Gray, "Fast Algorithms for Convolutional
  Neural Networks", 2016). A 4x4 output tile from a 6x6 input tile needs 36 multiplications per channel pair in the
  Winograd domain instead of 144: input tiles and kernels are transformed (V = Bᵀ d B, U = G g Gᵀ), the 36 positions
  become 36 matrix products over the channels (M = V·U) at the machine's sgemm rate, and the products are transformed
  back (Y = Aᵀ M A). The float32 error stays at a direct convolution's level (about 2e-6 relative to float64).
* **One matrix product over gathered 3x3 patches** (im2col) for large kernels on small maps (the UNet's 1280-channel
  levels). oneDNN reorders such a kernel into a fresh buffer of 60-120 MiB on every call, and those pages' first
  touch costs more than the convolution's arithmetic; the product reads the kernel where it lies.

Every block these paths allocate stays under ``BLOCK_BYTES``: glibc serves blocks above its 32 MiB mmap threshold
with fresh pages on every call. Results are channels-last in memory (NCHW in shape), the layout both paths write.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The standard F(4, 3) matrices, interpolation points 0, ±1, ±2 and ∞ (Lavin & Gray, section 4.2), and F(2, 3)'s,
# points 0, ±1 and ∞: fewer multiplications saved (2.25x instead of 4x) for half the kernel transform, which pays on
# maps too small for 4x4 tiles.
_F43 = ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]])
_F23 = ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]])


def _kron(m: list) -> torch.Tensor:
    # The 2-D transform X ↦ P X Pᵀ of a flattened tile is one product with kron(P, P).
    p = torch.tensor(m, dtype=torch.float64)
    return torch.kron(p, p)


# output tile side -> (Bᵀ⊗Bᵀ, G⊗G, Aᵀ⊗Aᵀ) in float64, cast per call: [a², a²], [a², 9], [m², a²] for a = m + 2
TRANSFORMS = {4: tuple(map(_kron, _F43)), 2: tuple(map(_kron, _F23))}

# Winograd with m x m output tiles from this many tiles (batch included) and MIN_CHANNELS channels in and out on:
# with fewer tiles the kernel transform ((m+2)²·C_in·C_out values per call) costs more than it saves. 4x4 tiles where
# there are enough of them, else 2x2 (the UNet's 16x16 level at batch 2). Tests lower them to force a path.
MIN_TILES = {4: 96, 2: 64}
MIN_CHANNELS = 32
# The patch product for kernels of at least this size (1280x1280x3x3 in float32 is 56 MiB), where oneDNN's reorder
# buffer goes past the mmap threshold; below it, oneDNN's direct convolution is the faster one.
GEMM_MIN_KERNEL_BYTES = 32 << 20
# The largest block either path allocates (see the module docstring); within it, blocks are as large as possible for
# the matrix products' sake.
BLOCK_BYTES = 24 << 20


def _even_split(total: int, most: int) -> int:
    """The size of the fewest equal parts, each at most ``most`` (at least 1), that ``total`` splits into."""
    parts = -(-total // max(1, most))
    return -(-total // parts)


def _padded_rows(x: torch.Tensor, start: int, stop: int, width: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``x`` [N, C, H, W] zero-padded by one pixel at the top and left (and with zeros to
    ``width`` columns and past the bottom), as a channels-last [N, stop - start, width, C] band.

    Bands rather than one padded copy of the whole input: on a VAE-sized map that copy would be one more full-size
    feature map at the memory peak.
    """
    n, c, h, w = x.shape
    band = x.new_zeros(n, stop - start, width, c)
    first, last = max(start - 1, 0), min(stop - 1, h)  # the image rows inside the band
    if last > first:
        band[:, first + 1 - start:last + 1 - start, 1:w + 1] = x[:, :, first:last].permute(0, 2, 3, 1)
    return band


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     tile: int = 4) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 kernel by F(4x4, 3x3), or F(2x2, 3x3) with ``tile=2``.

    The result is channels-last in memory (NCHW in shape), the layout the tile products write naturally.
    """
    n, c, h, w = x.shape
    co = weight.shape[0]
    if weight.shape != (co, c, 3, 3):
        raise ValueError(f"winograd_conv3x3 needs a [C_out, {c}, 3, 3] kernel for {c} input channels, "
                         f"got {list(weight.shape)}")
    kb, kg, ka = (t.to(x.dtype) for t in TRANSFORMS[tile])
    m, a = tile, tile + 2
    th, tw = -(-h // m), -(-w // m)  # tiles down and across
    per_value = a * a * x.element_size()  # bytes per value of an [a², ...] block
    rows = _even_split(th, BLOCK_BYTES // (per_value * n * tw * c))  # tile rows per band
    cols = _even_split(co, BLOCK_BYTES // (per_value * max(c, n * rows * tw)))  # output channels per block

    kernels = weight.reshape(co * c, 9).T  # [9, C_out·C_in], a view
    out = x.new_empty(n, m * th, m * tw, co)
    for r0 in range(0, th, rows):
        r1 = min(th, r0 + rows)
        tiles = n * (r1 - r0) * tw
        # [N, rows, tw, C, a, a] overlapping tiles (a view) -> [a², tiles·C] -> Bᵀ d B
        d = _padded_rows(x, m * r0, m * r1 + 2, m * tw + 2).unfold(1, a, m).unfold(2, a, m)
        v = (kb @ d.permute(4, 5, 0, 1, 2, 3).reshape(a * a, tiles * c)).view(a * a, tiles, c)
        band = out[:, m * r0:m * r1].view(n, r1 - r0, m, tw, m, co)
        for c0 in range(0, co, cols):
            c1 = min(co, c0 + cols)
            u = (kg @ kernels[:, c0 * c:c1 * c]).view(a * a, c1 - c0, c)  # G g Gᵀ for this block of outputs
            prod = torch.bmm(v, u.transpose(1, 2))  # [a², tiles, block]
            y = (ka @ prod.view(a * a, -1)).view(m, m, n, r1 - r0, tw, c1 - c0)  # Aᵀ prod A
            band[..., c0:c1].copy_(y.permute(2, 3, 0, 4, 1, 5))
    if bias is not None:
        out += bias
    # a view when the tiles cover the image exactly (the usual case), else a channels-last copy of the crop
    return out[:, :h, :w].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def gemm_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 stride: int = 1) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=stride, padding=1)`` for a 3x3 kernel as one product over 3x3 patches.

    Patches are gathered in the kernel's own (C_in, 3, 3) order, so the kernel is read in place as a
    [C_out, 9·C_in] matrix. The result is channels-last in memory.
    """
    n, c, h, w = x.shape
    co = weight.shape[0]
    if weight.shape != (co, c, 3, 3):
        raise ValueError(f"gemm_conv3x3 needs a [C_out, {c}, 3, 3] kernel for {c} input channels, "
                         f"got {list(weight.shape)}")
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    kernel = weight.reshape(co, 9 * c).T  # a view
    out = x.new_empty(n, ho, wo, co)
    row_bytes = wo * 9 * c * x.element_size()  # one output row's patches
    if n * ho * row_bytes <= BLOCK_BYTES:
        blocks = [(slice(None), 0, ho)]
    else:  # bands of rows of one image at a time, so that each band of ``out`` is contiguous
        rows = _even_split(ho, BLOCK_BYTES // row_bytes)
        blocks = [(slice(i, i + 1), r0, min(ho, r0 + rows)) for i in range(n) for r0 in range(0, ho, rows)]
    for images, r0, r1 in blocks:
        # [n, rows, wo, C, 3, 3] patches (a view) -> [n·rows·wo, 9·C]
        band = _padded_rows(x[images], r0 * stride, (r1 - 1) * stride + 3, w + 2)
        patches = band.unfold(1, 3, stride).unfold(2, 3, stride)
        target = out[images, r0:r1].view(-1, co)
        if bias is None:
            torch.mm(patches.reshape(-1, 9 * c), kernel, out=target)
        else:
            torch.addmm(bias, patches.reshape(-1, 9 * c), kernel, out=target)
    return out.permute(0, 3, 1, 2)


def fast_path(conv: nn.Conv2d, x: torch.Tensor) -> str | None:
    """"winograd4", "winograd2", "gemm" or None (``F.conv2d``): the path ``conv`` takes on ``x``; see the module
    docstring."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.ndim != 4 or torch.compiler.is_compiling():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad):
        return None  # training keeps the direct convolution's smaller autograd graph
    if conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 \
            or conv.padding_mode != "zeros" or conv.stride not in ((1, 1), (2, 2)):
        return None
    n, c, h, w = x.shape
    if conv.stride == (1, 1) and min(c, conv.out_channels) >= MIN_CHANNELS:
        for tile in (4, 2):
            if n * -(-h // tile) * -(-w // tile) >= MIN_TILES[tile]:
                return f"winograd{tile}"
    # from the layer's shape, not its weight: a LoRA parametrization would compute the weight anew on each access
    if conv.out_channels * conv.in_channels * 9 * x.element_size() >= GEMM_MIN_KERNEL_BYTES:
        return "gemm"
    return None


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same arguments, parameters and keys) whose 3x3 layers take a faster path on the CPU where one
    pays: Winograd or one patch product (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = fast_path(self, x)
        if path is None:
            return super().forward(x)
        if path == "gemm":
            return gemm_conv3x3(x, self.weight, self.bias, stride=self.stride[0])
        return winograd_conv3x3(x, self.weight, self.bias, tile=int(path[-1]))
