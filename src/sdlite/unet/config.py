"""UNet architecture, read from the tensor shapes of an original (ldm/sgm layout) checkpoint.

One frozen config describes SD 1.x, SD 2.x, SDXL base and refiner, their inpainting variants and the reduced
(distilled) variants of these layouts: the per-block lists below are exactly what differs between them. The input
side and middle block form their own config because a ControlNet is a copy of exactly that part.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

from ..checkpoint.shapes import ShapeReader
from ..errors import CheckpointError

# The head rule for a context width (``sdlite.checkpoint.family_table.heads_for_context``): the files do not store it.
HeadRule = Callable[[int | None], Mapping[str, int]]


@dataclass(frozen=True, kw_only=True)
class UNetEncoderConfig:
    """The input blocks and middle block of openaimodel.UNetModel: the part a UNet and its ControlNet share.

    ``transformer_depth`` has one entry per input res block (level-major); 0 means "no SpatialTransformer in that
    block". ``transformer_depth_middle`` is -1 when the middle block is a single res block, 0 for two res blocks and
    >0 for res, transformer, res.
    Attention heads come either as a fixed count (``num_heads``, SD 1.x) or a fixed width (``head_dim``, SD 2.x/XL).
    """

    in_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    transformer_depth: tuple[int, ...]
    transformer_depth_middle: int
    context_dim: int | None
    use_linear_in_transformer: bool
    num_heads: int | None = None
    head_dim: int | None = None
    adm_in_channels: int | None = None

    def __post_init__(self):
        levels = len(self.channel_mult)
        if levels == 0 or len(self.num_res_blocks) != levels:
            raise ValueError(f"num_res_blocks {self.num_res_blocks} needs one entry per level {self.channel_mult}")
        if len(self.transformer_depth) != sum(self.num_res_blocks):
            raise ValueError(f"transformer_depth {self.transformer_depth} needs one entry per input res block")
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError("give exactly one of num_heads and head_dim")
        if self._uses_attention() and self.context_dim is None:
            raise ValueError("a UNet with transformer blocks needs context_dim")
        for width in self.level_channels:
            if width % 32:
                raise ValueError(f"level width {width} is not a multiple of the 32 GroupNorm groups")
            heads, dim = self.attention_heads(width)
            if heads * dim != width:
                raise ValueError(f"level width {width} cannot be split into heads (num_heads={self.num_heads}, head_dim={self.head_dim})")

    def _uses_attention(self) -> bool:
        return any(self.transformer_depth) or self.transformer_depth_middle > 0

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    def attention_heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, channels per head) of a transformer working at ``channels``."""
        if self.num_heads is not None:
            return self.num_heads, channels // self.num_heads
        return channels // self.head_dim, self.head_dim


@dataclass(frozen=True, kw_only=True)
class UNetConfig(UNetEncoderConfig):
    """The openaimodel.UNetModel hyper-parameters that shape the weights: the encoder's, plus the output side.

    ``transformer_depth_output`` has one entry per output res block; 0 means "no SpatialTransformer in that block".
    """

    out_channels: int
    transformer_depth_output: tuple[int, ...]

    def __post_init__(self):
        if len(self.transformer_depth_output) != sum(n + 1 for n in self.num_res_blocks):
            raise ValueError(f"transformer_depth_output {self.transformer_depth_output} needs one entry per output block")
        super().__post_init__()

    def _uses_attention(self) -> bool:
        return super()._uses_attention() or any(self.transformer_depth_output)


_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.")


def _depth(keys: set[str], block: str) -> int:
    """Number of BasicTransformerBlocks in ``block`` (a prefix such as ``input_blocks.4.1``)."""
    depth = 0
    while f"{block}.transformer_blocks.{depth}.norm1.weight" in keys:
        depth += 1
    return depth


def _block_count(keys: set[str], name: str) -> int:
    return max((int(m[2]) + 1 for m in map(_BLOCK.match, keys) if m and m[1] == name), default=0)


def _attention(shape: ShapeReader, block: str) -> tuple[int, bool]:
    """(context_dim, use_linear_in_transformer) of the SpatialTransformer at ``block``."""
    context_dim = shape(f"{block}.transformer_blocks.0.attn2.to_k.weight", ndim=2)[1]
    return context_dim, len(shape(f"{block}.proj_in.weight")) == 2


def read_encoder_fields(shape: ShapeReader) -> dict:
    """The UNetEncoderConfig fields (heads aside) read from the shapes of ``input_blocks.*``, ``middle_block.*``,
    ``time_embed`` and ``label_emb``.

    ``context_dim`` is None when no input or middle block has a transformer (a UNet may still find one on its
    output side); pass the completed fields to ``config_from_fields``.
    """
    keys, what = set(shape), shape.what
    model_channels, in_channels = shape("input_blocks.0.0.weight", ndim=4)[:2]
    channel_mult: list[int] = []
    num_res_blocks: list[int] = []
    depth_in: list[int] = []
    attention: tuple[int, bool] | None = None
    res_in_level = 0
    for i in range(1, _block_count(keys, "input_blocks")):
        if f"input_blocks.{i}.0.op.weight" in keys:
            if res_in_level == 0:
                raise CheckpointError(None, f"{what} input block {i} downsamples a level that has no res block")
            num_res_blocks.append(res_in_level)
            res_in_level = 0
            continue
        width = shape(f"input_blocks.{i}.0.out_layers.3.weight", ndim=4)[0]
        if width % model_channels:
            raise CheckpointError(None, f"{what} input block {i} is {width} wide, not a multiple of {model_channels}")
        if res_in_level == 0:
            channel_mult.append(width // model_channels)
        elif width != model_channels * channel_mult[-1]:
            raise CheckpointError(None, f"{what} input block {i} is {width} wide inside a level of width "
                                        f"{model_channels * channel_mult[-1]}")
        res_in_level += 1
        depth = _depth(keys, f"input_blocks.{i}.1")
        depth_in.append(depth)
        if depth and attention is None:
            attention = _attention(shape, f"input_blocks.{i}.1")
    if res_in_level == 0:
        raise CheckpointError(None, f"{what} has no res block in its last level (input_blocks end with a downsample)")
    num_res_blocks.append(res_in_level)

    if "middle_block.0.in_layers.0.weight" not in keys:
        raise shape.missing("middle_block.0.in_layers.0.weight")
    middle = _depth(keys, "middle_block.1")
    if middle and attention is None:
        attention = _attention(shape, "middle_block.1")
    if not middle:
        middle = 0 if "middle_block.1.in_layers.0.weight" in keys else -1

    context_dim, use_linear = attention or (None, False)
    adm = shape("label_emb.0.0.weight", ndim=2)[1] if "label_emb.0.0.weight" in keys else None
    return dict(in_channels=in_channels, model_channels=model_channels, channel_mult=tuple(channel_mult),
                num_res_blocks=tuple(num_res_blocks), transformer_depth=tuple(depth_in),
                transformer_depth_middle=middle, context_dim=context_dim, use_linear_in_transformer=use_linear,
                adm_in_channels=adm)


def config_from_fields(cls: type, fields: dict, heads: HeadRule, what: str = "UNet"):
    """Build ``cls`` from inferred fields, its attention heads from ``heads`` for the context width found."""
    try:
        return cls(**fields, **heads(fields["context_dim"]))
    except ValueError as e:
        raise CheckpointError(None, f"{what} shapes do not form a valid architecture: {e}") from None


def infer_unet_config(sd: Mapping, heads: HeadRule, *, prefix: str = "") -> UNetConfig:
    """Read a UNetConfig from a state dict whose ``model.diffusion_model.`` prefix was removed (``prefix`` names
    it in messages); only shapes are read. ``heads`` gives the head rule (``family_table.heads_for_context``)."""
    shape = ShapeReader(sd, "UNet", prefix)
    fields = read_encoder_fields(shape)
    keys = set(sd)
    fields["out_channels"] = shape("out.2.weight", ndim=4)[0]
    expected_out = sum(n + 1 for n in fields["num_res_blocks"])
    found_out = _block_count(keys, "output_blocks")
    if found_out != expected_out:
        raise CheckpointError(None, f"UNet has {found_out} output blocks, expected {expected_out} "
                                    f"for {list(fields['num_res_blocks'])} res blocks per level")
    depth_out = []
    for i in range(expected_out):
        depth = _depth(keys, f"output_blocks.{i}.1")
        depth_out.append(depth)
        if depth and fields["context_dim"] is None:
            fields["context_dim"], fields["use_linear_in_transformer"] = _attention(shape, f"output_blocks.{i}.1")
    fields["transformer_depth_output"] = tuple(depth_out)
    return config_from_fields(UNetConfig, fields, heads)
