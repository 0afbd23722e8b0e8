"""The training loop every method shares, and what a method adds to it.

A :class:`Method` says which parameters train (``attach``), how a batch becomes a loss (``loss``, by default the
denoising loss of the batch's captions), and how the result is saved (``save``). :class:`Run` does the rest: AdamW
(Loshchilov & Hutter 2019) with a learning-rate schedule, gradient accumulation and clipping, bf16/fp16 autocast
over float32 trained weights (fp16 with a GradScaler), gradient checkpointing of the UNet blocks, an EMA of the
trained weights, seeded noise, resumable state, sample images with their infotext every N steps, a progress line,
and the loss log (CSV and PNG) next to the output.

A resumable training state (``state_dir``, ``resume``) is a folder holding everything an uninterrupted run would still
have in memory:

    trainable.safetensors  the method's trained tensors (and ``ema.<name>`` for their moving averages)
    optimizer.pt           the optimiser's state dict (read back with ``weights_only=True``: tensors and numbers only)
    rng.safetensors        the noise generator's state and torch's global CPU (and CUDA) generator states
    state.json             the step, the GradScaler's state, the loss log so far, the settings it was made with

Every file is written through ``sdlite.checkpoint.write`` (temporary name, renamed when complete) and state.json last,
so a folder with a state.json is complete.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..checkpoint.files import open_tensor_file
from ..checkpoint.write import atomic_path, check_output, save_safetensors
from ..errors import SdliteError
from .batches import Batch, Batches, adm_vector, encode_captions
from .loss import denoising_loss, rescale_zero_terminal_snr, training_alphas
from .optim import EMA, channels_last_kernels, checkpointed_blocks, lr_factor, lr_scheduler
from .report import LogRow, draw_loss_curve, write_csv, write_samples

PRECISIONS = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainConfig:
    """Settings common to every method (the CLI's common flags, under the same names)."""

    steps: int = 1000  # optimiser steps
    lr: float = 1e-4
    batch_size: int = 1
    grad_accum: int = 1  # micro-batches per optimiser step
    lr_schedule: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    weight_decay: float = 1e-2
    mixed_precision: str = "no"  # no | fp16 | bf16 (autocast; trained weights stay float32)
    gradient_checkpointing: bool = False
    ema_decay: float | None = None  # e.g. 0.999: save (and sample with) the moving average
    seed: int = 0
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    zero_terminal_snr: bool = False
    clip_skip: int = 1
    sample_every: int = 0  # steps; 0 = no samples
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 20
    save_state_every: int = 0  # steps; 0 = only at the end when state_dir is set
    state_dir: str | None = None
    resume: str | None = None


class Method:
    """A training method: which parameters train, how a batch becomes a loss, how the result is saved."""

    name = "method"
    trains_text = False  # whether gradients must flow through the text encoders
    embeddings = None  # an EmbeddingSet the captions are encoded with (textual inversion trains its vectors)

    def attach(self, pipe) -> list[dict]:
        """Make the method's parameters trainable (float32) on ``pipe``; returns AdamW parameter groups."""
        raise NotImplementedError

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """The trained parameters by a stable name (saved in resume states and averaged by the EMA)."""
        raise NotImplementedError

    def loss(self, r: "Run", batch: Batch) -> torch.Tensor:
        """Per-sample (or scalar) loss of a batch; by default the denoising loss of its captions."""
        return r.denoising_loss(batch)

    def save(self, r: "Run", path: Path) -> Path:
        raise NotImplementedError

    def accumulating(self) -> contextlib.AbstractContextManager:
        """Context of a micro-batch whose gradients are only accumulated, not yet stepped on (a distributed method
        defers its gradient exchange to the last micro-batch)."""
        return contextlib.nullcontext()

    def detach(self) -> None:
        """Undo ``attach`` (the trained weights leave the model)."""


@dataclass
class Result:
    output: Path
    losses: list[float]
    steps: int
    log_csv: Path
    loss_png: Path
    samples: list[Path] = field(default_factory=list)


class Run:
    """One training run of ``method`` on ``pipe`` over ``batches``; ``execute()`` trains and saves."""

    def __init__(self, pipe, method: Method, batches: Batches, config: TrainConfig, output: str | Path,
                 progress: Callable[[dict], None] | None = None, data_options: dict | None = None):
        self.pipe, self.method, self.batches, self.config = pipe, method, batches, config
        self.data_options = data_options or {}  # how the data was read and varied (for the output's metadata)
        self.output = check_output(output, [pipe.path])
        self.progress = progress
        if config.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {list(PRECISIONS)}, not {config.mixed_precision!r}")
        self.device = pipe.device
        self.generator = torch.Generator().manual_seed(config.seed)
        alphas = training_alphas(pipe)
        self.alphas_cumprod = rescale_zero_terminal_snr(alphas) if config.zero_terminal_snr else alphas
        self.settings = {"method": method.name, "model": Path(pipe.path).name}
        self.log: list[LogRow] = []
        self.step = 0
        self.writes = True  # False on the ranks of a distributed run other than 0: they write nothing

    # --- the default loss -----------------------------------------------------------------------------------------

    def condition(self, batch: Batch, captions: list[str] | None = None):
        """(context, y) of a batch's captions (or of ``captions``), with SDXL's size conditioning."""
        cond = encode_captions(self.pipe, captions if captions is not None else batch.captions,
                               clip_skip=self.config.clip_skip, grad=self.method.trains_text,
                               embeddings=self.method.embeddings)
        return cond.context, adm_vector(self.pipe, cond.pooled, batch.original_sizes, batch.crops, batch.target_size)

    def draw(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noise, timesteps, offset noise) of a batch from the run's generator. A rank's shard of a distributed
        batch (``batch.shard`` = (its rows, rows of the whole batch)) takes its rows of the whole batch's draws, so
        that N processes see the noise one process would."""
        latents = batch.latents
        rows, total = batch.shard or (slice(None), latents.shape[0])
        noise = torch.randn((total, *latents.shape[1:]), generator=self.generator)[rows]
        timesteps = torch.randint(0, len(self.alphas_cumprod), (total,), generator=self.generator)[rows]
        offset = torch.randn(total, latents.shape[1], 1, 1, generator=self.generator)[rows]
        return noise.to(self.device), timesteps.to(self.device), offset.to(self.device)

    def denoising_loss(self, batch: Batch, model=None, **overrides) -> torch.Tensor:
        """The denoising loss of a batch with noise and timesteps from the run's generator; ``model``: what
        predicts instead of the pipeline's UNet (a ControlNet-guided UNet), with the pipeline's prediction type."""
        latents = batch.latents.to(self.device)
        context, y = self.condition(batch)
        noise, timesteps, offset = self.draw(batch)
        c = self.config
        kw = dict(min_snr_gamma=c.min_snr_gamma, noise_offset=c.noise_offset, offset_noise=offset,
                  alphas_cumprod=self.alphas_cumprod, prediction=self.pipe.prediction) | overrides
        return denoising_loss(self.pipe if model is None else model, latents, context, noise, timesteps, y, **kw)

    # --- the loop -------------------------------------------------------------------------------------------------

    def _autocast(self):
        dtype = PRECISIONS[self.config.mixed_precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def execute(self) -> Result:
        pipe = self.pipe
        modules = (pipe.unet, pipe.vae, *pipe.text_encoders)
        flags = [(p, p.requires_grad) for module in modules for p in module.parameters()]
        for module in modules:
            module.requires_grad_(False)
        # The kernels change memory order before the method sees them, so that a distributed method's gradient
        # buckets are laid out as the gradients will be.
        with channels_last_kernels(pipe.unet):
            # New parameters are initialised from the run's seed (and the caller's global generator is left alone),
            # so that a run is the same whatever ran before it in the process.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed)
                groups = self.method.attach(pipe)
            try:
                return self._train(groups)
            finally:
                self.method.detach()
                for p, flag in flags:
                    p.requires_grad_(flag)

    def _train(self, groups: list[dict]) -> Result:
        c, pipe = self.config, self.pipe
        params = self.method.named_parameters()
        optimizer = torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay)
        scheduler = lr_scheduler(optimizer, c.lr_schedule, c.steps, c.warmup_steps)
        scaler = torch.amp.GradScaler(self.device.type, enabled=c.mixed_precision == "fp16")
        ema = EMA(params.items(), c.ema_decay) if c.ema_decay else None
        self.settings["shape"] = {n: list(p.shape) for n, p in params.items()}.__repr__()
        if c.resume:
            self._resume(Path(c.resume), params, optimizer, scheduler, scaler, ema)
        samples: list[Path] = []
        start, first = time.perf_counter(), self.step
        pipe.unet.train()
        checkpointing = checkpointed_blocks(pipe.unet) if c.gradient_checkpointing else contextlib.nullcontext()
        with checkpointing:
            while self.step < c.steps:
                loss = self._optimizer_step(optimizer, scheduler, scaler, params)
                if ema is not None:
                    ema.update()
                self.step += 1
                self.log.append(LogRow(self.step, loss, scheduler.get_last_lr()[0], time.perf_counter() - start))
                if self.progress is not None:
                    recent = [r.loss for r in self.log[-20:]]
                    self.progress({"step": self.step, "total": c.steps, "loss": loss,
                                   "done_this_run": self.step - first, "loss_avg": sum(recent) / len(recent),
                                   "elapsed": time.perf_counter() - start})
                if self.writes and c.sample_every and c.sample_prompts and self.step % c.sample_every == 0:
                    with ema.swapped() if ema is not None else contextlib.nullcontext():
                        samples += write_samples(self, self.step)
                if self.writes and c.state_dir and c.save_state_every and self.step % c.save_state_every == 0:
                    self._save_state(params, optimizer, scheduler, scaler, ema)
        pipe.unet.eval()
        csv_path, png_path = self.output.with_suffix(".loss.csv"), self.output.with_suffix(".loss.png")
        if self.writes:
            if c.state_dir:
                self._save_state(params, optimizer, scheduler, scaler, ema)
            with ema.swapped() if ema is not None else contextlib.nullcontext():
                self.method.save(self, self.output)
            write_csv(csv_path, self.log)
            draw_loss_curve(png_path, self.log)
        return Result(self.output, [r.loss for r in self.log], self.step, csv_path, png_path, samples)

    def _optimizer_step(self, optimizer, scheduler, scaler, params: dict[str, nn.Parameter]) -> float:
        c = self.config
        total = 0.0
        for micro in range(c.grad_accum):
            batch = self.batches[self.step * c.grad_accum + micro]
            last = micro == c.grad_accum - 1
            with contextlib.nullcontext() if last else self.method.accumulating():
                with self._autocast():
                    loss = self.method.loss(self, batch).float().mean() / c.grad_accum
                scaler.scale(loss).backward()
            total += loss.item()
        if c.max_grad_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(list(params.values()), c.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return total

    # --- resumable state ------------------------------------------------------------------------------------------

    def _save_state(self, params, optimizer, scheduler, scaler, ema) -> None:
        save_state(Path(self.config.state_dir), step=self.step, tensors=state_tensors(params, ema), optimizer=optimizer,
                   generator=self.generator, scaler_state=scaler.state_dict() if scaler.is_enabled() else {},
                   log=self.log, settings=self.settings | {"ema_updates": ema.updates if ema else 0})

    def _resume(self, folder: Path, params, optimizer, scheduler, scaler, ema) -> None:
        state = restore_state(folder, self.settings, params, optimizer, self.generator, ema)
        if state["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        self.step, self.log = state["step"], state["log"]
        c = self.config
        scheduler.last_epoch = self.step
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * lr_factor(c.lr_schedule, self.step, c.steps, c.warmup_steps)


# --- the state folder -----------------------------------------------------------------------------------------------

class StateError(SdliteError):
    """A --resume folder that is missing, incomplete, or from a different training setup."""


def save_state(folder: Path, *, step: int, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               generator: torch.Generator, scaler_state: dict, log: list[LogRow], settings: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / "trainable.safetensors", tensors)
    with atomic_path(folder / "optimizer.pt") as tmp:
        torch.save(optimizer.state_dict(), tmp)
    rng = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    save_safetensors(folder / "rng.safetensors", rng)
    with atomic_path(folder / "state.json") as tmp:
        tmp.write_text(json.dumps({"step": step, "scaler": {k: v for k, v in scaler_state.items()
                                                            if isinstance(v, (int, float, bool))},
                                   "log": [asdict(r) for r in log], "settings": settings}, indent=1))


def load_state(folder: Path, settings: dict) -> dict:
    """The saved state as a dict (step, tensors, optimizer, rng, scaler, log); refuses a folder made for another
    method, model or rank."""
    if not (folder / "state.json").exists():
        raise StateError(f"{folder}: not a training state folder (no state.json; a state is complete once it has one)")
    meta = json.loads((folder / "state.json").read_text())
    saved = meta["settings"]
    for key in ("method", "model", "shape"):
        if saved.get(key) != settings.get(key):
            raise StateError(f"{folder}: was saved for {key} {saved.get(key)!r}, this run has {settings.get(key)!r}")
    with open_tensor_file(folder / "trainable.safetensors") as tf:
        tensors = {k: tf.read(k) for k in tf.keys()}
    with open_tensor_file(folder / "rng.safetensors") as tf:
        rng = {k: tf.read(k) for k in tf.keys()}
    optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    return {"step": meta["step"], "tensors": tensors, "optimizer": optimizer, "rng": rng, "scaler": meta["scaler"],
            "log": [LogRow(**r) for r in meta["log"]]}


def state_tensors(params: dict[str, nn.Parameter], ema: EMA | None) -> dict[str, torch.Tensor]:
    """What a state folder keeps of the trained weights: each by name, and its moving average as ``ema.<name>``."""
    tensors = {n: p.detach() for n, p in params.items()}
    if ema is not None:
        tensors |= {f"ema.{n}": t for n, t in ema.shadow.items()}
    return tensors


def restore_state(folder: Path, settings: dict, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                  generator: torch.Generator, ema: EMA | None = None) -> dict:
    """Load a saved state (``load_state``) into the weights, their EMA, the optimiser and the generators, in place;
    returns it for what the caller restores itself (step, log, GradScaler)."""
    state = load_state(folder, settings)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["tensors"][name])
    if ema is not None:
        ema.shadow = {n: state["tensors"][f"ema.{n}"].float().to(p.device) for n, p in params.items()}
        ema.updates = state["step"]
    optimizer.load_state_dict(state["optimizer"])
    restore_rng(state["rng"], generator)
    return state


def restore_rng(rng: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
