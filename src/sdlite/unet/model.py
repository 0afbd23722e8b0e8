"""The latent-diffusion UNet (openaimodel.UNetModel) for SD 1.x, SD 2.x and SDXL, in the original layout."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ..conv import Conv2d
from .attention import AttentionPatch, name_attention_layers
from .blocks import Downsample, ResBlock, SpatialTransformer, TimestepBlock, Upsample, normalization, timestep_embedding
from .config import UNetConfig, UNetEncoderConfig


def build_encoder(module: nn.Module, c: UNetEncoderConfig) -> list[int]:
    """Give ``module`` the UNet's ``time_embed``, ``label_emb``, ``input_blocks`` and ``middle_block`` (the part a
    ControlNet copies), under their original names; returns the width of each input block's output."""
    emb_dim = c.time_embed_dim
    module.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
    if c.adm_in_channels is not None:
        # Doubly nested as in the original: label_emb.0.0 / label_emb.0.2.
        module.label_emb = nn.Sequential(
            nn.Sequential(nn.Linear(c.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        )
    module.input_blocks = nn.ModuleList([TimestepBlock(Conv2d(c.in_channels, c.model_channels, 3, padding=1))])
    widths = [c.model_channels]
    ch = c.model_channels
    depths = iter(c.transformer_depth)
    for level, width in enumerate(c.level_channels):
        for _ in range(c.num_res_blocks[level]):
            layers: list[nn.Module] = [ResBlock(ch, emb_dim, width)]
            ch = width
            depth = next(depths)
            if depth:
                layers.append(spatial_transformer(c, ch, depth))
            module.input_blocks.append(TimestepBlock(*layers))
            widths.append(ch)
        if level != len(c.channel_mult) - 1:
            module.input_blocks.append(TimestepBlock(Downsample(ch)))
            widths.append(ch)
    middle: list[nn.Module] = [ResBlock(ch, emb_dim, ch)]
    if c.transformer_depth_middle > 0:
        middle.append(spatial_transformer(c, ch, c.transformer_depth_middle))
    if c.transformer_depth_middle >= 0:
        middle.append(ResBlock(ch, emb_dim, ch))
    module.middle_block = TimestepBlock(*middle)
    return widths


def spatial_transformer(c: UNetEncoderConfig, channels: int, depth: int) -> SpatialTransformer:
    heads, head_dim = c.attention_heads(channels)
    return SpatialTransformer(channels, heads, head_dim, depth, c.context_dim, c.use_linear_in_transformer)


def parameter_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the model's weights. Read from its first parameter rather than a named layer's ``weight``: a
    layer replaced by a training wrapper may not have one, and a parametrized weight is computed anew on access."""
    return next(module.parameters()).dtype


def embed_timesteps(module: nn.Module, c: UNetEncoderConfig, timesteps, batch: int, device: torch.device,
                    y: torch.Tensor | None) -> torch.Tensor:
    """The time (+ ADM) embedding of a module built by ``build_encoder``; timesteps may be a scalar."""
    if (y is None) != (c.adm_in_channels is None):
        raise ValueError("y (the ADM vector) must be given exactly when the model has label_emb "
                         f"(adm_in_channels={c.adm_in_channels})")
    timesteps = torch.as_tensor(timesteps, device=device)
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(batch)
    dtype = parameter_dtype(module)
    emb = module.time_embed(timestep_embedding(timesteps, c.model_channels).to(dtype))
    if y is not None:
        emb = emb + module.label_emb(y.to(dtype))
    return emb


class UNetModel(nn.Module):
    """Noise-prediction UNet of "High-Resolution Image Synthesis with Latent Diffusion Models" (Rombach et al. 2022),
    with SDXL's additional "ADM" vector conditioning (Podell et al. 2023).

    ``state_dict()`` keys equal the checkpoint keys after ``model.diffusion_model.``.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        emb_dim = c.time_embed_dim
        skip_channels = build_encoder(self, c)
        ch = skip_channels[-1]

        self.output_blocks = nn.ModuleList()
        depths = iter(c.transformer_depth_output)
        for level, width in reversed(list(enumerate(c.level_channels))):
            for i in range(c.num_res_blocks[level] + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, width)]
                ch = width
                depth = next(depths)
                if depth:
                    layers.append(spatial_transformer(c, ch, depth))
                if level and i == c.num_res_blocks[level]:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepBlock(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), Conv2d(ch, c.out_channels, 3, padding=1))
        name_attention_layers(self)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, control: Sequence[torch.Tensor] | None = None,
                patches: Sequence[AttentionPatch] | None = None,
                features: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Predict from latents ``x`` [B, C, H, W] at ``timesteps`` (scalar or [B], may be fractional).

        ``context`` [B, T, context_dim] is the text conditioning, ``y`` [B, adm_in_channels] SDXL's vector
        conditioning, and ``control`` ControlNet residuals in input-block order followed by the middle-block one:
        the last is added to the middle block's output, the others to the skip connections they match.
        ``patches`` are attention patches (``sdlite.unet.attention``), given to every attention layer. ``features``
        (T2I-Adapters) are added to the hidden state, and so to the skip connection, after the input block of their
        key; the key ``len(input_blocks)`` means after the middle block.
        """
        emb = embed_timesteps(self, self.config, timesteps, x.shape[0], x.device, y)
        controls = list(control) if control is not None else []
        if controls and len(controls) != len(self.input_blocks) + 1:
            raise ValueError(f"control has {len(controls)} residuals, this UNet takes {len(self.input_blocks) + 1} "
                             "(one per input block and one for the middle block)")
        dtype = parameter_dtype(self)
        controls = [c.to(dtype) for c in controls]
        if context is not None:
            context = context.to(dtype)

        h = x.to(dtype)
        skips = []
        features = features or {}
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context, patches=patches)
            if i in features:
                h = h + features[i].to(dtype)
            skips.append(h)
        h = self.middle_block(h, emb, context, patches=patches)
        if len(self.input_blocks) in features:
            h = h + features[len(self.input_blocks)].to(dtype)
        if controls:
            h = h + controls.pop()
        for block in self.output_blocks:
            skip = skips.pop()
            if controls:
                skip = skip + controls.pop()
            h = torch.cat([h, skip], dim=1)
            h = block(h, emb, context, size=skips[-1].shape[-2:] if skips else None, patches=patches)
        return self.out(h).to(x.dtype)
