"""Configuration of the KL autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models"), and its inference from an original checkpoint's tensors.

The original yaml files (`first_stage_config.params.ddconfig`) spell the same fields: `ch`, `ch_mult`,
`num_res_blocks`, `z_channels`, `in_channels`, `out_ch`. Every SD release uses ch 128, ch_mult (1,2,4,4),
2 res blocks and 4 latent channels; only the latent scale factor differs by family (docs/formats.md §1.5; the
loader takes it from ``sdlite.checkpoint.family_table``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from sdlite.checkpoint.shapes import ShapeReader
from sdlite.errors import CheckpointError

# GroupNorm(32, C) everywhere in the original, so every width must split into 32 groups.
NORM_GROUPS = 32


@dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """Shape of an `AutoencoderKL`; `scale_factor` maps raw latents to the UNet's latents (z_unet = scale · z_vae)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    # Required on purpose: 0.18215 (SD1/SD2) and 0.13025 (SDXL) are both common, and a wrong one
    # silently produces washed-out or burnt images rather than an error.
    scale_factor: float

    def __post_init__(self) -> None:
        # Accept a list from callers (e.g. parsed yaml) but store a tuple so the config stays hashable.
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        for name in ("in_channels", "out_channels", "ch", "num_res_blocks", "z_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"VAEConfig.{name} must be a positive int, got {value!r}")
        if not self.ch_mult:
            raise ValueError("VAEConfig.ch_mult must name at least one level")
        for m in self.ch_mult:
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise ValueError(f"VAEConfig.ch_mult must hold positive ints, got {self.ch_mult!r}")
            if (self.ch * m) % NORM_GROUPS:
                raise ValueError(
                    f"VAEConfig width ch*mult = {self.ch}*{m} is not divisible by the {NORM_GROUPS} GroupNorm groups"
                )
        if isinstance(self.scale_factor, bool) or not isinstance(self.scale_factor, (int, float)):
            raise ValueError(f"VAEConfig.scale_factor must be a float, got {self.scale_factor!r}")
        if not (math.isfinite(self.scale_factor) and self.scale_factor > 0):
            raise ValueError(f"VAEConfig.scale_factor must be finite and positive, got {self.scale_factor!r}")
        object.__setattr__(self, "scale_factor", float(self.scale_factor))

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side (8 for every SD VAE): one stride-2 step between levels."""
        return 2 ** (len(self.ch_mult) - 1)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise CheckpointError(None, message)


def infer_vae_config(sd: Mapping[str, torch.Tensor], *, scale_factor: float, prefix: str = "") -> VAEConfig:
    """Read a `VAEConfig` from the tensor shapes of a VAE state dict in the original layout.

    `sd` is keyed without the `first_stage_model.` prefix (`prefix` names it in messages). Only the structure is
    read here; every other tensor is checked by the strict `load_state_dict` that follows. Raises
    `CheckpointError` (path None, filled in by the loader) naming the key when a required tensor is missing or its
    shape disagrees.
    """
    shape = ShapeReader(sd, "VAE", prefix)

    def conv(key: str) -> tuple[int, ...]:
        return shape(key, ndim=4)

    ch, in_channels, _, _ = conv("encoder.conv_in.weight")
    levels = shape.count("encoder.down.")
    num_res_blocks = shape.count("encoder.down.0.block.")

    ch_mult = []
    for i in range(levels):
        key = f"encoder.down.{i}.block.0.conv1.weight"
        width = conv(key)[0]
        _require(
            width % ch == 0 and width % NORM_GROUPS == 0,
            f"VAE key {shape.file_key(key)!r} has {width} output channels, expected a multiple of ch = {ch} "
            f"(from 'encoder.conv_in.weight') and of the {NORM_GROUPS} GroupNorm groups",
        )
        ch_mult.append(width // ch)
        blocks = shape.count(f"encoder.down.{i}.block.")
        _require(
            blocks == num_res_blocks,
            f"VAE keys 'encoder.down.{i}.block.N.*' name {blocks} res blocks, expected {num_res_blocks} as on level 0",
        )

    # The decoder mirrors the encoder with one extra res block per level.
    up_levels = shape.count("decoder.up.")
    _require(
        up_levels == levels, f"VAE has {up_levels} 'decoder.up.N' levels, expected {levels} as in 'encoder.down.N'"
    )
    for i in range(levels):
        blocks = shape.count(f"decoder.up.{i}.block.")
        _require(
            blocks == num_res_blocks + 1,
            f"VAE keys 'decoder.up.{i}.block.N.*' name {blocks} res blocks, expected {num_res_blocks + 1}",
        )

    two_z = conv("quant_conv.weight")[0]
    _require(two_z % 2 == 0,
             f"VAE key {shape.file_key('quant_conv.weight')!r} has {two_z} channels, expected an even number")
    z_channels = two_z // 2
    out_channels = conv("decoder.conv_out.weight")[0]

    # Cross-check the tensors at the seams between encoder, latent space and decoder.
    top = ch * ch_mult[-1]
    shape("encoder.conv_in.weight", expected=(ch, in_channels, 3, 3))
    shape("encoder.conv_out.weight", expected=(two_z, top, 3, 3))
    shape("quant_conv.weight", expected=(two_z, two_z, 1, 1))
    shape("post_quant_conv.weight", expected=(z_channels, z_channels, 1, 1))
    shape("decoder.conv_in.weight", expected=(top, z_channels, 3, 3))
    shape("decoder.conv_out.weight", expected=(out_channels, ch, 3, 3))

    return VAEConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        ch=ch,
        ch_mult=tuple(ch_mult),
        num_res_blocks=num_res_blocks,
        z_channels=z_channels,
        scale_factor=scale_factor,
    )
