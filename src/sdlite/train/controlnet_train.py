"""ControlNet training (Zhang et al. 2023): a ControlNet made from the model's own UNet
(``sdlite.adapters.controlnet.create_from_unet``: encoder copied, zero convolutions at zero) learns to steer the
frozen UNet from hint images; only the ControlNet trains.

Each training image is paired with the hint image of the same file name (any image suffix) in ``hint_dir``; the hint
is resized and cut exactly as its image (the image's bucket placement) and given as RGB in [0, 1], as at inference.
Half of the captions are dropped to "" by default (``caption_dropout=0.5``), as lllyasviel's training recipe does,
so that the ControlNet learns to read the hint without the prompt.

The file holds the ControlNet under ``control_model.`` (the layout of lllyasviel's ``control_*.pth`` and
``control_v11*.pth`` files), which AUTOMATIC1111's ControlNet extension, ComfyUI and ``sdlite.adapters.controlnet.load``
read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ..adapters.controlnet import create_from_unet
from ..checkpoint.write import save_safetensors
from .api import build_run
from .batches import Batch
from .data import IMAGE_SUFFIXES, DataError, ImageFolder, fit
from .loop import Method, Result, Run
from .lora import SAVE_DTYPES


class _Controlled:
    """The frozen UNet guided by the ControlNet's residuals of ``hints``: what predicts the noise in the loss."""

    def __init__(self, base, net, hints: torch.Tensor):
        self.base, self.net, self.hints = base, net, hints

    def __call__(self, x, timesteps, context, y=None):
        adm = y if self.net.config.adm_in_channels is not None else None
        control = self.net(x, self.hints.to(x), timesteps, context, adm)
        return self.base(x, timesteps, context, y=y, control=control)


def hint_paths(data: ImageFolder, hint_dir: str | os.PathLike) -> list[Path]:
    """The hint image of every example (same file stem in ``hint_dir``); a DataError names the first image without
    one."""
    folder = Path(hint_dir)
    if not folder.is_dir():
        raise DataError(f"{folder}: the hint folder does not exist")
    by_stem = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    paths = []
    for e in data.examples:
        if e.path.stem not in by_stem:
            raise DataError(f"{e.path}: no hint image named {e.path.stem}.* in {folder}")
        paths.append(by_stem[e.path.stem])
    return paths


def load_hint(path: Path, example) -> torch.Tensor:
    """[3, H, W] in [0, 1]: the hint at its image's size, placed in the image's bucket as the image was."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize(example.size, Image.Resampling.BICUBIC)
    except OSError as e:
        raise DataError(f"{path}: unreadable hint image ({e})") from None
    image = fit(image, example.placement)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255


class ControlNetMethod(Method):
    """Train a fresh ControlNet of the pipeline's UNet on ``hints`` (one path per example of the data)."""

    name = "controlnet"

    def __init__(self, hints: list[Path], save_dtype: str = "fp32"):
        if save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype must be one of {list(SAVE_DTYPES)}, not {save_dtype!r}")
        self.hints, self.save_dtype = hints, save_dtype
        self.net = None
        self._cache: dict[int, torch.Tensor] = {}

    def attach(self, pipe) -> list[dict]:
        self.net = create_from_unet(pipe.unet).float().requires_grad_(True).train()
        return [{"params": list(self.net.parameters())}]

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.net.named_parameters())

    def hint_batch(self, r: Run, batch: Batch) -> torch.Tensor:
        for i in batch.indices:
            if i not in self._cache:
                self._cache[i] = load_hint(self.hints[i], r.batches.data.examples[i])
        return torch.stack([self._cache[i] for i in batch.indices]).to(r.device)

    def loss(self, r: Run, batch: Batch) -> torch.Tensor:
        return r.denoising_loss(batch, model=_Controlled(r.pipe.unet, self.net, self.hint_batch(r, batch)))

    def save(self, r: Run, path: Path) -> Path:
        dtype = SAVE_DTYPES[self.save_dtype]
        tensors = {f"control_model.{k}": v.detach().to("cpu", dtype) for k, v in self.net.state_dict().items()}
        return save_safetensors(path, tensors, {"sdlite_method": "controlnet", "step": str(r.step)},
                                inputs=[r.pipe.path])

    def detach(self) -> None:
        if self.net is not None:
            self.net.eval().requires_grad_(False)


def controlnet(model, data: str | os.PathLike, *, output: str | os.PathLike, hint_dir: str | os.PathLike,
               save_dtype: str = "fp32", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               progress: Callable[[dict], None] | None = None, **options) -> Result:
    """Train a ControlNet for ``model`` on the images in ``data`` and their same-named hints in ``hint_dir``;
    ``options`` as for :func:`sdlite.train.lora` (``caption_dropout`` defaults to 0.5; ``flip`` is refused, the
    hints are not mirrored). Returns the run's result; the ControlNet is ``result.output``."""
    if options.get("flip"):
        raise ValueError("flip is not available for ControlNet training: the hint would no longer match its image")
    options.setdefault("caption_dropout", 0.5)
    method = ControlNetMethod([], save_dtype)

    def pair(folder: ImageFolder) -> None:  # before any image is encoded
        method.hints = hint_paths(folder, hint_dir)

    return build_run(model, data, method, output, device=device, dtype=dtype, progress=progress, check=pair,
                     **options).execute()
