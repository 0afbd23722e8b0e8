"""ControlNet of Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models", in the original
(lllyasviel cldm.py) checkpoint layout, and how its residuals are applied during sampling.

A ControlNet is a trainable copy of the UNet's time embedding, input blocks and middle block. A small conv stack
(``input_hint_block``) turns the control image into a feature map added once after the copy's first convolution,
and a zero-initialised 1x1 convolution after every input block (``zero_convs``) and after the middle block
(``middle_block_out``) produces the residuals the UNet adds to its skip connections and middle block
(``UNetModel.forward(..., control=...)``).

Files: keys under ``control_model.`` (ControlNet 1.0 ``control_sd15_*.pth`` also carry a whole SD1.5 model, which
is set aside: only ``control_model.*`` is read), the same keys without the prefix, or the diffusers layout
(``controlnet_cond_embedding.*``, ``controlnet_down_blocks.N``, ``down_blocks.*``), renamed by one set of rules.

In a generation core (details at ``control_residuals``)::

    hints = [prepare_hint(unit, width, height) for unit in units]        # once per pass; again for hires fix
    control = control_residuals(units, hints, x, t, context, y, progress=i / steps, cond=is_cond_row)
    out = unet(x, t, context, y=y, control=control)                       # control is None when no unit is active
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import torch
from torch import nn

from ..checkpoint import identify, open_tensor_file
from ..checkpoint.family_table import heads_for_context
from ..checkpoint.files import RenamedFile, TensorFile
from ..checkpoint.materialize import materialize, plan
from ..checkpoint.shapes import ShapeReader
from ..conv import Conv2d
from ..errors import CheckpointError
from ..unet import UNetModel
from ..unet.attention import AttentionPatch, name_attention_layers
from ..unet.model import build_encoder, embed_timesteps
from ..unet.config import UNetEncoderConfig, config_from_fields, read_encoder_fields
from . import preprocess
from .controlnet_keys import from_diffusers

__all__ = ["ControlNet", "ControlNetConfig", "ControlUnit", "control_residuals", "create_from_unet",
           "infer_controlnet_config", "load", "prepare_hint", "soft_scales"]

PREFIX = "control_model."
HINT_DOWNSAMPLING = 8  # the hint is given at pixel resolution, the latents are 8x smaller


@dataclasses.dataclass(frozen=True, kw_only=True)
class ControlNetConfig(UNetEncoderConfig):
    """The UNet encoder the ControlNet copies, plus its hint block: ``hint_channels`` input channels (3 for RGB) and
    the widths of its four stages (``input_hint_block.0/4/8/12`` outputs); each stage after the first halves the
    resolution, so three halvings bring the pixel-resolution hint to the latent size."""

    hint_channels: int = 3
    hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)

    def __post_init__(self):
        super().__post_init__()
        if 2 ** (len(self.hint_block_channels) - 1) != HINT_DOWNSAMPLING:
            raise ValueError(f"hint block stages {self.hint_block_channels} do not downsample x{HINT_DOWNSAMPLING}")


def infer_controlnet_config(sd, *, prefix: str = "") -> ControlNetConfig:
    """Read a ControlNetConfig from the shapes of a state dict in the original layout (``control_model.`` removed;
    ``prefix`` names it in messages). Heads follow the UNet's rule for the context width (docs/formats.md §5)."""
    shape = ShapeReader(sd, "ControlNet", prefix)
    fields = read_encoder_fields(shape)
    convs = sorted(int(m[1]) for m in map(re.compile(r"^input_hint_block\.(\d+)\.weight$").match, sd) if m)
    if not convs or convs != list(range(0, 2 * len(convs), 2)) or len(convs) % 2:
        raise CheckpointError(None, f"ControlNet {shape.file_key('input_hint_block')} has convolutions at {convs}, "
                                    "expected an even number of them at indices 0, 2, 4, … (SiLU between)")
    fields["hint_channels"] = shape("input_hint_block.0.weight", ndim=4)[1]
    fields["hint_block_channels"] = tuple(shape(f"input_hint_block.{i}.weight", ndim=4)[0] for i in convs[:-1:2])
    return config_from_fields(ControlNetConfig, fields, heads_for_context, "ControlNet")


def _conv1x1(channels: int) -> nn.Sequential:
    # A Sequential of one conv: the original wraps it in TimestepEmbedSequential, hence the ".0" in the keys.
    return nn.Sequential(nn.Conv2d(channels, channels, 1))


class ControlNet(nn.Module):
    """ControlNet (Zhang et al. 2023) in the cldm.py layout; ``state_dict()`` keys are the file's keys after
    ``control_model.``. Returns one residual per UNet input block plus one for the middle block."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = c = config
        # The UNet's input side and middle block, built by the UNet's own code; one zero conv per output.
        widths = build_encoder(self, c)
        self.zero_convs = nn.ModuleList(_conv1x1(w) for w in widths)
        self.middle_block_out = _conv1x1(widths[-1])

        # Conv stack at pixel resolution: two 3x3 convs per stage, the first of each later stage with stride 2,
        # SiLU between all of them (odd indices), and a last conv to the UNet's width.
        hint: list[nn.Module] = [Conv2d(c.hint_channels, c.hint_block_channels[0], 3, padding=1), nn.SiLU()]
        for ch_in, ch_out in zip(c.hint_block_channels, c.hint_block_channels[1:]):
            hint += [Conv2d(ch_in, ch_in, 3, padding=1), nn.SiLU(),
                     Conv2d(ch_in, ch_out, 3, padding=1, stride=2), nn.SiLU()]
        hint.append(Conv2d(c.hint_block_channels[-1], c.model_channels, 3, padding=1))
        self.input_hint_block = nn.Sequential(*hint)
        name_attention_layers(self)

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor | float,
                context: torch.Tensor | None = None, y: torch.Tensor | None = None,
                patches: Sequence[AttentionPatch] | None = None) -> list[torch.Tensor]:
        """Residuals for the UNet from latents ``x`` [B, C, H, W] and the control image ``hint`` [B, hint_channels,
        8H, 8W] (RGB in [0, 1]); ``timesteps``, ``context`` and ``y`` as the UNet takes them. ``patches``:
        attention patches for the ControlNet's own attention layers (keys as in its state dict, e.g.
        ``input_blocks.4.1.transformer_blocks.0.attn2``), given only to this model."""
        expected = (x.shape[-2] * HINT_DOWNSAMPLING, x.shape[-1] * HINT_DOWNSAMPLING)
        if tuple(hint.shape[-2:]) != expected:
            raise ValueError(f"hint is {hint.shape[-1]}x{hint.shape[-2]} pixels, but latents of {x.shape[-1]}x"
                             f"{x.shape[-2]} need a {expected[1]}x{expected[0]} hint (prepare it at the generation size)")
        emb = embed_timesteps(self, self.config, timesteps, x.shape[0], x.device, y)
        dtype = self.dtype
        if context is not None:
            context = context.to(dtype)
        guided_hint = self.input_hint_block(hint.to(dtype))

        h = x.to(dtype)
        outs = []
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context, patches=patches)
            if i == 0:
                h = h + guided_hint
            outs.append(zero_conv(h))
        h = self.middle_block(h, emb, context, patches=patches)
        outs.append(self.middle_block_out(h))
        return outs


@torch.no_grad()
def create_from_unet(unet: UNetModel, hint_channels: int = 3) -> ControlNet:
    """A fresh ControlNet for ``unet`` as tool_add_control.py makes one: the UNet's time embedding, input blocks
    and middle block copied, the zero convolutions and the hint block's last convolution at zero, the other hint
    convolutions at PyTorch's default initialisation. Its residuals are all zero, so it leaves the UNet's output
    unchanged until trained — the starting point of ControlNet training."""
    encoder = {f.name: getattr(unet.config, f.name) for f in dataclasses.fields(UNetEncoderConfig)}
    param = unet.time_embed[0].weight
    with torch.device(param.device):
        net = ControlNet(ControlNetConfig(**encoder, hint_channels=hint_channels)).to(param.dtype)
    copied = {k: v for k, v in unet.state_dict().items()
              if k.split(".")[0] in ("time_embed", "label_emb", "input_blocks", "middle_block")}
    net.load_state_dict(copied, strict=False)  # the hint block and the output convolutions are new
    for conv in [*(z[0] for z in net.zero_convs), net.middle_block_out[0], net.input_hint_block[-1]]:
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    return net.eval().requires_grad_(False)


# --- files ------------------------------------------------------------------------------------------------------

def _layout(tf: TensorFile) -> tuple[TensorFile, str]:
    """The file as original-layout keys, and the prefix they sit under; or a CheckpointError saying what it is."""
    keys = tf.keys()
    if "difference" in tf:
        raise CheckpointError(tf.path, "this is a 'difference' ControlNet: its weights are stored as changes to a base "
                                       "SD1.5 UNet, which sdlite does not load; use a standalone ControlNet file "
                                       "(e.g. ControlNet 1.1 control_v11*_sd15_*.pth)")
    if "lora_controlnet" in tf:
        raise CheckpointError(tf.path, "this is a Stability control-LoRA (low-rank changes to the base UNet), which "
                                       "sdlite does not load")
    if any(k.startswith(PREFIX) for k in keys):
        return tf, PREFIX
    if "input_hint_block.0.weight" in tf or "zero_convs.0.0.weight" in tf:
        return tf, ""
    if "controlnet_cond_embedding.conv_in.weight" in tf:
        sources = from_diffusers(keys)
        if len(sources) != len(tf):
            raise CheckpointError(tf.path, "diffusers-layout ControlNet whose keys map onto the same original keys twice")
        return RenamedFile(tf, sources), ""
    try:
        found = identify(tf)
    except CheckpointError as e:
        what = e.detail
    else:
        what = f"this is a full {found.family} checkpoint, not a ControlNet: load it with sdlite.load(path)"
    raise CheckpointError(tf.path, f"not a ControlNet ({what})")


def load(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ControlNet:
    """Load a ControlNet file (``.safetensors`` or ``.pth``/``.ckpt``) for SD 1.x, 2.x or XL.

    The architecture is read from the tensor shapes and every key is checked before any weight is read. Keys of a
    ControlNet 1.0 file outside ``control_model.`` (the SD1.5 model it was trained on) are set aside unread.
    Errors are ``sdlite.errors.CheckpointError``, naming the file and, for a file of another kind, what it is.
    """
    with open_tensor_file(path) as tf:
        try:
            view, prefix = _layout(tf)
            config = infer_controlnet_config(view.meta(prefix), prefix=prefix)
            p = plan(view, lambda: ControlNet(config), prefix, name="ControlNet")
        except CheckpointError as e:
            if e.path is None:
                e.path = str(path)
            raise
        return materialize(view, p, dtype, device)


# --- applying ControlNets during sampling ---------------------------------------------------------------------------

SOFT_BASE = 0.825


def soft_scales(count: int) -> list[float]:
    """Guess-mode weights of the residuals, shallow to deep: 0.825^(12-i) for i = 0 … count-1.

    The values are lllyasviel's guess mode and sd-webui-controlnet's soft injection: SD 1.x/2.x ControlNets give
    13 residuals (0.099 for the first skip connection up to 1.0 for the middle block); SDXL ones give 10 and use
    the first 10 of these weights, as sd-webui-controlnet does (the middle block gets 0.825^3).
    """
    return [SOFT_BASE ** (12 - i) for i in range(count)]


@dataclasses.dataclass
class ControlUnit:
    """One ControlNet with its control image and settings, as a sd-webui-controlnet unit.

    ``image``: PIL image, numpy [H, W(, C)] or torch [C, H, W] in [0, 1]; fitted to the generation size by
    ``resize_mode`` ("just resize", "crop and resize", "resize and fill") and run through ``preprocessor`` (None: the
    image already is a map for this ControlNet; "canny" with ``canny_thresholds``; "invert"; an annotator network:
    "softedge_hed", "softedge_hedsafe", "lineart_realistic", "lineart_coarse", "openpose", run at
    ``detect_resolution`` with ``annotator`` (a module from ``sdlite.adapters.annotators.load``) or, when None, the
    weight file found in the pipeline's ``annotator_dirs``).
    ``weight``: every residual is multiplied by it. ``start``/``end``: the fraction of the sampling steps during
    which the unit is applied. ``guess_mode``: "ControlNet is more important" — soft weights (``soft_scales``) and
    control on the conditional rows of a CFG batch only, so that classifier-free guidance amplifies the control's
    effect as it amplifies the prompt's (with a plain prompt, the ControlNet alone "guesses" the content).
    """

    net: ControlNet
    image: Any
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    preprocessor: str | None = None
    resize_mode: str = "crop and resize"
    canny_thresholds: tuple[float, float] = (100, 200)
    annotator: nn.Module | None = None
    detect_resolution: int = 512

    def __post_init__(self):
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"need 0 <= start <= end <= 1, got start={self.start}, end={self.end}")
        if self.preprocessor not in preprocess.PREPROCESSORS:
            raise ValueError(f"preprocessor must be one of {preprocess.PREPROCESSORS}, not {self.preprocessor!r}")
        if self.resize_mode not in preprocess.RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {preprocess.RESIZE_MODES}, not {self.resize_mode!r}")

    def active(self, progress: float) -> bool:
        """Whether the unit applies at ``progress`` = step / steps (sd-webui-controlnet: start <= progress <= end)."""
        return self.weight != 0 and self.start <= progress <= self.end


def prepare_hint(unit: ControlUnit, width: int, height: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, annotator_dirs=()) -> torch.Tensor:
    """The unit's control image for a width x height generation: [1, 3, height, width] in [0, 1], on the
    ControlNet's device and dtype unless given. Done once per generation (and once more at the hires-fix size).
    ``annotator_dirs``: where an annotator preprocessor's weights are looked up when the unit has none."""
    if unit.net.config.hint_channels != 3:
        raise ValueError(f"this ControlNet takes a {unit.net.config.hint_channels}-channel hint; prepare_hint makes "
                         "RGB ones: give the ControlNet a hint tensor of your own")
    array = preprocess.prepare(unit.image, width, height, preprocessor=unit.preprocessor,
                               resize_mode=unit.resize_mode, canny_thresholds=unit.canny_thresholds,
                               annotator=unit.annotator, annotator_dirs=annotator_dirs,
                               detect_resolution=unit.detect_resolution)
    hint = torch.from_numpy(array).permute(2, 0, 1)[None]
    return hint.to(device=unit.net.time_embed[0].weight.device if device is None else device,
                   dtype=dtype or unit.net.dtype)


def _rows(t: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or rows is None else t[rows]


def control_residuals(units: Sequence[ControlUnit], hints: Sequence[torch.Tensor], x: torch.Tensor,
                      timesteps: torch.Tensor | float, context: torch.Tensor, y: torch.Tensor | None = None, *,
                      progress: float, cond: torch.Tensor | None = None) -> list[torch.Tensor] | None:
    """The summed residuals of the units active at ``progress``, for ``UNetModel.forward(..., control=...)``;
    None when no unit is active (the UNet then runs without control).

    Called by the generation core at every model evaluation with exactly what it gives the UNet: ``x`` (the UNet's
    latent batch; an inpainting UNet's extra mask channels are dropped for the ControlNet), ``timesteps``,
    ``context`` and SDXL's ``y``. ``hints`` are ``prepare_hint`` results, one per unit, repeated over the batch.
    ``progress`` is i / n for the i-th of n sampling steps (0-based, the same i for every model call within a step).
    ``cond`` is a boolean mask [B] of the rows carrying the positive prompt when the batch stacks conditional and
    unconditional rows for CFG; guess-mode units run on those rows only and leave zeros in the others. None means
    every row is conditional.

    Each unit's residuals are multiplied by its weight (and by ``soft_scales`` in guess mode), then units are summed.
    """
    if len(units) != len(hints):
        raise ValueError(f"{len(units)} control units but {len(hints)} hints")
    batch = x.shape[0]
    timesteps = torch.as_tensor(timesteps, device=x.device)
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(batch)
    total: list[torch.Tensor] | None = None
    for unit, hint in zip(units, hints):
        if not unit.active(progress):
            continue
        rows = cond if unit.guess_mode else None
        if rows is not None and not rows.any():
            continue
        net = unit.net
        if batch % hint.shape[0]:
            raise ValueError(f"a hint batch of {hint.shape[0]} does not divide the latent batch of {batch}")
        hint = hint.to(x.device).repeat(batch // hint.shape[0], 1, 1, 1)
        adm = y if net.config.adm_in_channels is not None else None
        outs = net(_rows(x[:, :net.config.in_channels], rows), _rows(hint, rows), _rows(timesteps, rows),
                   _rows(context, rows), _rows(adm, rows))
        scales = soft_scales(len(outs)) if unit.guess_mode else [1.0] * len(outs)
        outs = [out * (unit.weight * scale) for out, scale in zip(outs, scales)]
        if rows is not None:
            full = [out.new_zeros((batch, *out.shape[1:])) for out in outs]
            for f, out in zip(full, outs):
                f[rows] = out
            outs = full
        if total is None:
            total = outs
        elif len(outs) != len(total):
            raise ValueError(f"ControlNets with {len(total)} and {len(outs)} residuals cannot be combined: "
                             "they were made for different UNets")
        else:
            total = [a + b.to(a.dtype) for a, b in zip(total, outs)]
    return total
