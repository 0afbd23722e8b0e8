"""The LoRA method: low-rank updates of the UNet's attention and feed-forward layers (optionally its 3x3 convolutions,
LoCon, and the text encoders), saved as a kohya-format file that AUTOMATIC1111, ComfyUI, diffusers' load_lora_weights
and sdlite's ``pipe.add_lora`` all load.

File layout (kohya ``networks/lora.py``, docs/formats.md §12): per layer ``<name>.lora_down.weight`` [r, in] (a
conv: [r, in, k, k]), ``<name>.lora_up.weight`` [out, r] (a conv: [out, r, 1, 1]) and ``<name>.alpha`` (0-dim), with
kohya's ``ss_*`` training metadata and the ``modelspec.*`` fields (Stability AI's model spec).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint.write import save_safetensors
from .api import build_run
from .loop import Method, Result, Run
from .lora_layers import LoraWeights, attach, detach_all
from .lora_targets import LoraTarget, lora_targets

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# kohya's ss_base_model_version and the model spec's architecture per family (and prediction).
_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "sdxl-refiner": "sdxl_refiner_v1-0"}
_ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base",
                 "sdxl-refiner": "stable-diffusion-xl-v1-refiner"}


class LoraMethod(Method):
    """kohya-style LoRA: ``rank``/``alpha`` for linear and 1x1 layers, ``conv_rank``/``conv_alpha`` for 3x3 convs
    (LoCon; None: not trained), ``text_encoder`` to train the text encoders too (``text_encoder_lr``, default
    ``lr``)."""

    name = "lora"

    def __init__(self, rank: int = 16, alpha: float = 8.0, *, conv_rank: int | None = None,
                 conv_alpha: float | None = None, unet: bool = True, text_encoder: bool = False,
                 unet_lr: float | None = None, text_encoder_lr: float | None = None, save_precision: str = "fp16"):
        if rank < 1 or (conv_rank is not None and conv_rank < 1):
            raise ValueError(f"ranks must be at least 1 (rank={rank}, conv_rank={conv_rank})")
        if save_precision not in SAVE_DTYPES:
            raise ValueError(f"save_precision must be one of {list(SAVE_DTYPES)}, not {save_precision!r}")
        if not (unet or text_encoder):
            raise ValueError("nothing to train: neither the UNet nor the text encoder")
        self.rank, self.alpha = rank, float(alpha)
        self.conv_rank = conv_rank
        self.conv_alpha = float(conv_alpha if conv_alpha is not None else (conv_rank or 1))
        self.unet, self.text_encoder = unet, text_encoder
        self.trains_text = text_encoder
        self.unet_lr, self.text_encoder_lr = unet_lr, text_encoder_lr
        self.save_precision = save_precision
        self.layers: list[tuple[LoraTarget, LoraWeights]] = []

    def attach(self, pipe) -> list[dict]:
        targets = lora_targets(pipe, unet=self.unet, text_encoder=self.text_encoder, conv=self.conv_rank is not None)
        for t in targets:
            rank, alpha = (self.conv_rank, self.conv_alpha) if t.conv3x3 else (self.rank, self.alpha)
            self.layers.append((t, attach(t.target, rank, alpha)))
        groups = []
        for is_unet, lr in ((True, self.unet_lr), (False, self.text_encoder_lr)):
            params = [p for t, w in self.layers if (t.target.component == "unet") == is_unet for p in (w.down, w.up)]
            if params:
                groups.append({"params": params} | ({} if lr is None else {"lr": lr}))
        return groups

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        out = {}
        for t, w in self.layers:
            out[f"{t.name}.lora_down.weight"], out[f"{t.name}.lora_up.weight"] = w.down, w.up
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """The kohya file's tensors (in the save precision): down, up and alpha of every layer."""
        dtype = SAVE_DTYPES[self.save_precision]
        out = {}
        for t, w in self.layers:
            down, up = w.down.detach(), w.up.detach()
            if down.ndim == 2 or t.target.rows is not None:
                down, up = down.flatten(1), up.flatten(1)
            out[f"{t.name}.lora_down.weight"] = down.to("cpu", dtype).contiguous()
            out[f"{t.name}.lora_up.weight"] = up.to("cpu", dtype).contiguous()
            out[f"{t.name}.alpha"] = torch.tensor(w.alpha, dtype=dtype)
        return out

    def save(self, r: Run, path: Path) -> Path:
        tensors = self.tensors()
        return save_safetensors(path, tensors, kohya_metadata(r, self, tensors), inputs=[r.pipe.path])

    def detach(self) -> None:
        detach_all([(t.target, w) for t, w in self.layers])
        self.layers = []


def _addnet_hashes(tensors: dict[str, torch.Tensor]) -> tuple[str, str]:
    """kohya's sshs_model_hash (sha256 of the safetensors bytes after the header, as A1111's "addnet" hash reads the
    file) and sshs_legacy_hash (8 hex digits of the sha256 of 64 KiB at 1 MiB into those bytes)."""
    from safetensors.torch import save

    blob = save(tensors)
    body = blob[8 + int.from_bytes(blob[:8], "little"):]
    return hashlib.sha256(body).hexdigest(), hashlib.sha256(body[0x100000:0x110000]).hexdigest()[:8]


def kohya_metadata(r: Run, method: LoraMethod, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """kohya sd-scripts' ``ss_*`` training metadata and the ``modelspec.*`` fields, all strings."""
    c, pipe, data = r.config, r.pipe, r.batches.data
    finished = time.time()
    v = pipe.prediction == "v"
    base = _BASE_VERSION[pipe.family] + ("_v" if pipe.family == "sd2" and v else "")
    architecture = _ARCHITECTURE[pipe.family]
    if pipe.family == "sd2" and v:
        architecture = "stable-diffusion-v2-768-v"
    args = {}
    if method.conv_rank is not None:
        args = {"conv_dim": str(method.conv_rank), "conv_alpha": str(method.conv_alpha)}
    per_epoch = max(1, -(-data.num_images // c.batch_size) // c.grad_accum)
    side = data.resolution
    model_hash, legacy_hash = _addnet_hashes(tensors)
    opts = r.data_options
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(method.rank), "ss_network_alpha": str(method.alpha),
        "ss_network_args": json.dumps(args), "ss_base_model_version": base, "ss_v2": str(pipe.family == "sd2"),
        "ss_v_parameterization": str(v), "ss_sd_model_name": Path(pipe.path).name,
        "ss_output_name": r.output.stem, "ss_resolution": f"({side}, {side})", "ss_steps": str(r.step),
        "ss_max_train_steps": str(c.steps), "ss_epoch": str(-(-r.step // per_epoch)),
        "ss_learning_rate": str(c.lr), "ss_unet_lr": str(method.unet_lr if method.unet_lr is not None else c.lr),
        "ss_text_encoder_lr": str(method.text_encoder_lr if method.text_encoder_lr is not None else c.lr),
        "ss_lr_scheduler": c.lr_schedule, "ss_lr_warmup_steps": str(c.warmup_steps),
        "ss_batch_size_per_device": str(c.batch_size), "ss_gradient_accumulation_steps": str(c.grad_accum),
        "ss_max_grad_norm": str(c.max_grad_norm), "ss_mixed_precision": c.mixed_precision,
        "ss_gradient_checkpointing": str(c.gradient_checkpointing), "ss_optimizer": "torch.optim.AdamW",
        "ss_num_train_images": str(data.num_images), "ss_tag_frequency": json.dumps(data.tag_frequency()),
        "ss_seed": str(c.seed), "ss_min_snr_gamma": str(c.min_snr_gamma), "ss_noise_offset": str(c.noise_offset),
        "ss_zero_terminal_snr": str(c.zero_terminal_snr), "ss_clip_skip": str(c.clip_skip),
        "ss_caption_dropout_rate": str(opts.get("caption_dropout", 0.0)),
        "ss_shuffle_caption": str(opts.get("shuffle_tags", False)), "ss_keep_tokens": str(opts.get("keep_tokens", 0)),
        "ss_flip_aug": str(opts.get("flip", False)), "ss_enable_bucket": str(opts.get("buckets", True)),
        "ss_network_train_unet_only": str(not method.text_encoder),
        "ss_training_started_at": str(finished - (r.log[-1].elapsed if r.log else 0.0)),
        "ss_training_finished_at": str(finished), "ss_training_comment": "trained by sdlite",
        "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash,
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models"
                                     if pipe.family.startswith("sdxl") else "diffusers"),
        "modelspec.title": r.output.stem, "modelspec.resolution": f"{side}x{side}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(finished)).isoformat(),
        "modelspec.prediction_type": "v" if v else "epsilon",
    }
    if c.clip_skip != 1:
        meta["modelspec.encoder_layer"] = str(c.clip_skip)
    return meta


def lora(model, data: str | os.PathLike, *, output: str | os.PathLike, rank: int = 16, alpha: float = 8.0,
         conv_rank: int | None = None, conv_alpha: float | None = None, text_encoder: bool = False,
         unet_lr: float | None = None, text_encoder_lr: float | None = None, save_precision: str = "fp16",
         device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         progress: Callable[[dict], None] | None = None, **options) -> Result:
    """Train a kohya-format LoRA on ``model`` (a path or a loaded pipeline) from the images in ``data``.

    ``options``: the common training settings (``steps``, ``lr``, ``batch_size``, ``resolution``, ``seed``, and the
    rest of :class:`~sdlite.train.loop.TrainConfig`) and the data settings (``prompt``, ``caption_dropout``,
    ``shuffle_tags``, ``keep_tokens``, ``flip``, ``cache_dir``, ``buckets``). Writes ``output`` (and its
    ``.loss.csv`` / ``.loss.png``); returns the run's :class:`~sdlite.train.loop.Result`.
    """
    method = LoraMethod(rank, alpha, conv_rank=conv_rank, conv_alpha=conv_alpha, text_encoder=text_encoder,
                        unet_lr=unet_lr, text_encoder_lr=text_encoder_lr, save_precision=save_precision)
    return build_run(model, data, method, output, device=device, dtype=dtype, progress=progress, **options).execute()

