"""Converting and pruning checkpoints, one tensor at a time (docs/formats.md §13).

* Any input sdlite reads (``.safetensors``, weights-only ``.ckpt``/``.pt`` pickles, never executed) → ``.safetensors``.
* ``dtype``: floating-point tensors to fp16 / bf16 / fp32 (integer tables such as ``position_ids`` stay as they are).
* ``ema="drop"`` removes the EMA shadow weights (``model_ema.*``: A1111's "prune"); ``ema="only"`` replaces each
  ``model.diffusion_model.X`` by its EMA twin ``model_ema.diffusion_model<X without dots>`` and drops the rest.
* ``vae=False`` / ``text_encoder=False`` drop those components; ``bake_vae`` replaces ``first_stage_model.*`` by a
  standalone VAE file's weights (keys with or without that prefix; its ``loss.*`` and ``model_ema.*`` are ignored);
  ``extract="vae"`` writes the VAE alone with bare keys (the layout of standalone VAE files), ``extract="unet"`` the
  UNet alone (``model.diffusion_model.*`` keys).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from ..checkpoint import open_tensor_file
from ..checkpoint.files import TensorFile
from ..checkpoint.write import check_output, stream_safetensors
from .blocks import UNET
from .common import Progress, ToolError, Written, dtype_of, listing, with_progress, written

VAE = "first_stage_model."
EMA = "model_ema."
TEXT_ENCODERS = ("cond_stage_model.", "conditioner.embedders.")


def ema_key(key: str) -> str:
    """The EMA twin of a UNet key: ``model.diffusion_model.input_blocks.0.0.weight`` →
    ``model_ema.diffusion_modelinput_blocks00weight`` (LitEma drops every dot of the parameter name)."""
    return EMA + key[len("model."):].replace(".", "")


def _vae_sources(vae: TensorFile, tf: TensorFile) -> dict[str, str]:
    """Checkpoint key → key in the VAE file, refusing a VAE whose keys or shapes differ from the checkpoint's."""
    found = {}
    for key in vae.keys():
        bare = key[len(VAE):] if key.startswith(VAE) else key
        if bare.startswith(("loss.", EMA)) or bare in ("loss", "model_ema"):
            continue
        found[VAE + bare] = key
    wanted = [k for k in tf.keys() if k.startswith(VAE)]
    missing, extra = set(wanted) - found.keys(), found.keys() - set(wanted)
    if not wanted:
        raise ToolError(tf.path, f"has no VAE ({VAE}*) to replace")
    if missing or extra:
        parts = [f"lacks {listing(k[len(VAE):] for k in missing)}"] if missing else []
        parts += [f"has keys the checkpoint's VAE lacks: {listing(found[k] for k in extra)}"] if extra else []
        raise ToolError(vae.path, f"is not a VAE in the original layout of {tf.path}: it {'; '.join(parts)}")
    for key, source in found.items():
        if vae.shapes[source] != tf.shapes[key]:
            raise ToolError(vae.path, f"tensor {source!r} has shape {list(vae.shapes[source])}, the checkpoint's "
                                      f"{key!r} has {list(tf.shapes[key])}")
    return found


def _plan(tf: TensorFile, ema: str | None, vae: bool, text_encoder: bool, extract: str | None,
          notes: list[str]) -> dict[str, str]:
    """Output key → input key, in the input's order."""
    keys = list(tf.keys())
    ema_keys = [k for k in keys if k.startswith(EMA)]
    sources = {k: k for k in keys if not k.startswith(EMA)}
    if ema == "only":
        if not ema_keys:
            raise ToolError(tf.path, "has no EMA weights (model_ema.*): it cannot be reduced to them")
        unet = [k for k in sources if k.startswith(UNET)]
        swapped = [k for k in unet if ema_key(k) in tf and tf.shapes[ema_key(k)] == tf.shapes[k]]
        sources.update({k: ema_key(k) for k in swapped})
        notes.append(f"{len(swapped)} UNet tensors replaced by their EMA weights")
        if len(swapped) < len(unet):
            notes.append(f"{len(unet) - len(swapped)} UNet tensors have no EMA twin and were kept: "
                         f"{listing(set(unet) - set(swapped))}")
    elif ema is None:
        sources.update({k: k for k in ema_keys})
        sources = {k: sources[k] for k in keys}
    if ema in ("drop", "only") and ema_keys:
        notes.append(f"{len(ema_keys)} EMA tensors (model_ema.*) dropped")
    drop = ((VAE,) if not vae else ()) + (TEXT_ENCODERS if not text_encoder else ())
    if extract == "vae":
        sources = {k[len(VAE):]: v for k, v in sources.items() if k.startswith(VAE)}
    elif extract == "unet":
        sources = {k: v for k, v in sources.items() if k.startswith(UNET)}
    elif drop:
        dropped = [k for k in sources if k.startswith(drop)]
        sources = {k: v for k, v in sources.items() if not k.startswith(drop)}
        notes.append(f"{len(dropped)} tensors under {', '.join(p + '*' for p in drop)} dropped")
    if not sources:
        raise ToolError(tf.path, f"nothing is left to write (extract={extract!r}, vae={vae}, "
                                 f"text_encoder={text_encoder})")
    return sources


def convert_checkpoint(path: str | os.PathLike, *, output: str | os.PathLike, dtype: str | torch.dtype | None = None,
                       ema: str | None = None, vae: bool = True, text_encoder: bool = True,
                       bake_vae: str | os.PathLike | None = None, extract: str | None = None,
                       progress: Progress | None = None) -> Written:
    """Write ``path`` as ``output`` (.safetensors) with the changes asked for; see the module docstring.

    ``ema``: None (keep as is), "drop" or "only". ``extract``: None, "vae" or "unet". A baked VAE's tensors take
    the dtype the checkpoint's VAE had (then ``dtype``, when given).
    """
    if ema not in (None, "drop", "only"):
        raise ValueError(f"ema must be None, 'drop' or 'only', not {ema!r}")
    if extract not in (None, "vae", "unet"):
        raise ValueError(f"extract must be None, 'vae' or 'unet', not {extract!r}")
    out_dtype = dtype_of(dtype)
    inputs = [Path(path)] + ([Path(bake_vae)] if bake_vae is not None else [])
    check_output(output, inputs)
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        tf = stack.enter_context(open_tensor_file(path))
        sources = _plan(tf, ema, vae, text_encoder, extract, notes)
        readers = {k: tf for k in sources}
        own = {k: tf.dtypes[v] for k, v in sources.items()}  # a baked VAE keeps the checkpoint's dtypes
        if bake_vae is not None:
            vae_file = stack.enter_context(open_tensor_file(bake_vae))
            baked = _vae_sources(vae_file, tf)
            prefix = "" if extract == "vae" else VAE
            for key, source in baked.items():
                out = prefix + key[len(VAE):]
                if out in sources:
                    sources[out], readers[out] = source, vae_file
            notes.append(f"VAE baked in from {vae_file.path.name} ({len(baked)} tensors)")
        if tf.extras:
            notes.append(f"pickle entries that are not tensors left out: {listing(map(str, tf.extras))}")

        def result_dtype(out: str) -> torch.dtype:
            return out_dtype if out_dtype is not None and own[out].is_floating_point else own[out]

        entries = [(k, readers[k].shapes[v], result_dtype(k)) for k, v in sources.items()]
        tensors = (readers[k].read(v).to(dtype) for (k, v), (_, _, dtype) in zip(sources.items(), entries))
        stream_safetensors(output, entries, with_progress(tensors, len(entries), progress), inputs=inputs)
    return written(output, len(entries), notes)


def bake_vae(checkpoint: str | os.PathLike, vae: str | os.PathLike, *, output: str | os.PathLike,
             dtype: str | torch.dtype | None = None, progress: Progress | None = None) -> Written:
    """``checkpoint`` with its VAE replaced by the standalone VAE file ``vae``, written to ``output``."""
    return convert_checkpoint(checkpoint, output=output, dtype=dtype, bake_vae=vae, progress=progress)
