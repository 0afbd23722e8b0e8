"""``sdlite info FILE``: what a file is, read from its keys and shapes (no weights are loaded)."""

from __future__ import annotations

import math
import os
from collections import Counter

from .checkpoint import describe, open_tensor_file
from .checkpoint.load import plan_components
from .errors import CheckpointError


def _png(path: str) -> str:
    from .infotext import read_infotext

    params = read_infotext(path)
    lines = [f"{path}: PNG with A1111 infotext", f"  prompt: {params.pop('Prompt')!r}",
             f"  negative prompt: {params.pop('Negative prompt')!r}"]
    lines += [f"  {k}: {v}" for k, v in params.items() if not k.endswith(("-1", "-2"))]
    return "\n".join(lines)


def describe_file(path: str | os.PathLike) -> str:
    path = str(path)
    with open(path, "rb") as f:
        if f.read(8) == b"\x89PNG\r\n\x1a\n":
            return _png(path)
    with open_tensor_file(path) as tf:
        size = sum(math.prod(s) * tf.dtypes[k].itemsize for k, s in tf.shapes.items())
        dtypes = ", ".join(f"{str(d).removeprefix('torch.')} ×{n}" for d, n in Counter(tf.dtypes.values()).items())
        head = f"{path}: {len(tf)} tensors, {size / 2**30:.2f} GiB ({dtypes})"
        try:
            plan = plan_components(tf)
        except CheckpointError:
            lines = [head, f"  {describe(tf)}"]
        else:
            unet, vae, *text = [p.module.config for p in plan.plans]
            lines = [head, f"  Stable Diffusion checkpoint: family {plan.found.family}, prediction {plan.prediction}"
                           f"{', inpainting (9-channel UNet)' if unet.in_channels == 9 else ''}",
                     f"  UNet: {unet.model_channels} channels × {list(unet.channel_mult)}, res blocks "
                     f"{list(unet.num_res_blocks)}, transformer depth {list(unet.transformer_depth)}, context "
                     f"{unet.context_dim}, ADM {unet.adm_in_channels}",
                     f"  VAE: {vae.ch} channels × {list(vae.ch_mult)}, latent scale {vae.scale_factor}"]
            lines += [f"  text encoder: {t.layout}, width {t.width}, {t.layers} layers" for t in text]
            if plan.set_aside:
                lines.append(f"  set aside: {len(plan.set_aside)} keys (EMA, schedule buffers, position ids, …)")
            if plan.unknown:
                lines.append(f"  unknown keys (not loaded): {', '.join(sorted(plan.unknown)[:8])}")
        for key in ("ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_output_name"):
            if key in tf.metadata:
                lines.append(f"  {key}: {tf.metadata[key]}")
    return "\n".join(lines)
