"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", appendix G), as shipped in every SD 1.x / 2.x / XL checkpoint.

Attribute names are the original `first_stage_model.*` keys minus that prefix (docs/formats.md §1.4), so an
original VAE loads with a strict `load_state_dict` and no key conversion. The modules hold parameters only,
no buffers, and construct under `torch.device("meta")`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlite.vae.config import NORM_GROUPS, VAEConfig
from sdlite.conv import Conv2d


def _norm(channels: int) -> nn.GroupNorm:
    # eps 1e-6 (not torch's 1e-5 default) as in the original Normalize().
    return nn.GroupNorm(NORM_GROUPS, channels, eps=1e-6, affine=True)


def _conv3(in_channels: int, out_channels: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=padding)


def _norm_silu(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    # GroupNorm returns a fresh tensor and its backward needs only its input, so SiLU may overwrite it.
    return F.silu(norm(x), inplace=True)


class ResnetBlock(nn.Module):
    """Two GroupNorm-SiLU-conv3x3 steps plus a residual; a 1x1 `nin_shortcut` when the width changes.

    The VAE's blocks take no time embedding and its dropout is 0, so neither appears here.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = _conv3(in_channels, out_channels)
        self.norm2 = _norm(out_channels)
        self.conv2 = _conv3(out_channels, out_channels)
        # Present in the checkpoint only when the width changes; None registers no key.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_norm_silu(self.norm1, x))
        h = self.conv2(_norm_silu(self.norm2, h))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        # conv2's output is ours alone, so the residual is added in place rather than into a third tensor.
        return h.add_(skip)


def _tokens(x: Tensor) -> Tensor:
    # [B, C, H, W] -> [B, 1, H*W, C]; contiguous because SDPA's fused kernels need unit stride in the last
    # dimension, and the fallback would materialise the (H*W)^2 score matrix.
    b, c, height, width = x.shape
    return x.reshape(b, 1, c, height * width).transpose(2, 3).contiguous()


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with q/k/v/proj_out stored as 1x1 convolutions."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        # One head of width C, so SDPA's default scale 1/sqrt(C) is the original's C**-0.5.
        out = F.scaled_dot_product_attention(_tokens(self.q(h)), _tokens(self.k(h)), _tokens(self.v(h)))
        out = out.transpose(2, 3).reshape(b, c, height, width)  # [B, 1, H*W, C] -> [B, C, H, W]
        return self.proj_out(out).add_(x)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after padding one zero row/column at the bottom/right only.

    The original pads asymmetrically (0, 1, 0, 1) with no conv padding, so each window starts on an
    even pixel; symmetric padding would shift the sampling grid and change every weight's meaning.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3(channels, channels, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 enlargement followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """res - attention - res at the lowest resolution (`mid.block_1`, `mid.attn_1`, `mid.block_2`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class EncoderLevel(nn.Module):
    """One `encoder.down.{i}`: res blocks at one resolution, then a `downsample` except on the last level."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels) for j in range(num_blocks)
        )
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class DecoderLevel(nn.Module):
    """One `decoder.up.{i}`: res blocks at one resolution, then an `upsample` except on level 0."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels) for j in range(num_blocks)
        )
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """Images [B, in_channels, H, W] -> moments [B, 2*z_channels, H/f, W/f] (mean and logvar, before quant_conv)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        self.conv_in = _conv3(config.in_channels, config.ch)
        levels = []
        in_channels = config.ch
        for i, width in enumerate(widths):
            levels.append(EncoderLevel(in_channels, width, config.num_res_blocks, downsample=i != len(widths) - 1))
            in_channels = width
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(widths[-1])
        self.norm_out = _norm(widths[-1])
        self.conv_out = _conv3(widths[-1], 2 * config.z_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(_norm_silu(self.norm_out, h))


class Decoder(nn.Module):
    """Latents [B, z_channels, h, w] (after post_quant_conv) -> images [B, out_channels, h*f, w*f].

    `up` is indexed by resolution level like the encoder's `down`, so `up[-1]` runs first at the lowest
    resolution and `up[0]` last at full size: the original builds the list back to front, and its keys follow.
    Each level has one res block more than the encoder's.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        self.conv_in = _conv3(config.z_channels, widths[-1])
        self.mid = MidBlock(widths[-1])
        levels = []
        in_channels = widths[-1]
        for i in reversed(range(len(widths))):
            levels.append(DecoderLevel(in_channels, widths[i], config.num_res_blocks + 1, upsample=i != 0))
            in_channels = widths[i]
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = _norm(widths[0])
        self.conv_out = _conv3(widths[0], config.out_channels)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(_norm_silu(self.norm_out, h))


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, diag(exp(logvar))) over RAW (unscaled) latents.

    `logvar` is clamped to [-30, 20] as in the original DiagonalGaussianDistribution, which keeps
    `std` finite even in float16.
    """

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * noise; the noise is drawn on the generator's device, so a CPU seed gives the same latents
        whatever device the model runs on."""
        device = self.mean.device if generator is None else generator.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)


# Half-precision dtypes whose results are checked for overflow; float32 and float64 are trusted as they come.
HALF_DTYPES = (torch.float16, torch.bfloat16)


class VAEUpcastWarning(UserWarning):
    """A half-precision VAE overflowed and now runs that direction in float32 (``AutoencoderKL``)."""


class AutoencoderKL(nn.Module):
    """`first_stage_model` of an SD checkpoint: `encode` images in [-1, 1], `decode` raw latents.

    Latents here are raw; the diffusion model sees `latents * scale_factor`, and callers apply that factor.

    Each direction computes in its own modules' dtype and returns the caller's dtype. SDXL's original VAE overflows
    float16 inside the decoder (activations beyond 65504 that a later GroupNorm would bring back), which gives
    inf/NaN images; so when a half-precision encode or decode comes out non-finite, that direction's modules
    (encoder + quant_conv, or post_quant_conv + decoder) are converted to float32 for good, the call is redone, and
    a `VAEUpcastWarning` says so, once per VAE. "fp16-fix" VAEs, finetuned not to overflow, stay in float16. To pay
    for float32 from the start instead of one overflowing call, convert the VAE yourself: `pipe.vae.float()`.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)

    @property
    def scale_factor(self) -> float:
        return self.config.scale_factor

    def encode(self, images: Tensor) -> DiagonalGaussian:
        """images [B, in_channels, H, W] in [-1, 1], H and W multiples of the downsample factor."""
        mean, logvar = self.moments(images).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def moments(self, images: Tensor) -> Tensor:
        """The posterior's mean and log-variance stacked on the channels [B, 2*z_channels, h, w], in the images'
        dtype (what tiled encoding blends)."""
        return self._guarded(images, lambda x: self.quant_conv(self.encoder(x)), (self.encoder, self.quant_conv),
                             "encode")

    def decode(self, latents: Tensor) -> Tensor:
        """Raw latents [B, z_channels, h, w] -> images [B, out_channels, h*f, w*f] in about [-1, 1], not clamped,
        in the latents' dtype."""
        return self._guarded(latents, lambda z: self.decoder(self.post_quant_conv(z)),
                             (self.post_quant_conv, self.decoder), "decode")

    def _guarded(self, x: Tensor, run: Callable[[Tensor], Tensor], modules: tuple[nn.Module, ...], what: str) -> Tensor:
        """`run(x)` in the modules' dtype; a non-finite half-precision result upcasts the modules and runs again."""
        dtype = next(modules[0].parameters()).dtype
        out = run(x.to(dtype))
        # One reduction (and, on a GPU, one sync) per call, paid by half-precision VAEs only.
        if dtype in HALF_DTYPES and not torch.isfinite(out).all():
            # Outside inference mode, or a caller's inference_mode would make the new weights inference tensors
            # that no later in-place load (load_state_dict) may touch.
            with torch.inference_mode(False), torch.no_grad():
                for module in modules:
                    module.float()
            warnings.warn(f"the VAE's {str(dtype).removeprefix('torch.')} {what} gave inf/NaN (its activations "
                          f"overflow that dtype, as SDXL's original VAE does in float16), so it was redone in float32 "
                          f"and the VAE will {what} in float32 from now on; an fp16-fix VAE avoids the overflow",
                          VAEUpcastWarning, stacklevel=3)
            out = run(x.float())
        return out.to(x.dtype)
