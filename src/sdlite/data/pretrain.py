"""Training the built-in "shapes" model from scratch: ``python -m sdlite.data.shapes train --out shapes.safetensors``.

The recipe (``Recipe`` below, seeded; its settings are written into the model's metadata) has three phases, each
with its resumable state in a folder (``--state``, ``<out>.state`` by default):

1. ``vae``: the autoencoder (recipe.VAE) on random crops of the data set's images (the VAE is convolutional and a crop
   of flat shapes looks like a small picture of flat shapes, at a quarter of the cost), then a few steps on whole
   images so the middle attention sees a whole latent; loss L1 + MSE + a small KL, as latent diffusion's first stage
   trains without its GAN and perceptual terms (flat colours need neither). Then ``recipe.fit_latent_scale`` makes
   SD 1.x's fixed latent factor give unit-variance latents.
2. ``latents``: every training image encoded once (posterior mean and standard deviation, saved with the state).
3. ``unet``: the UNet and the text encoder together with ``sdlite.train.denoising_loss`` (ε, SD's scaled-linear
   schedule, min-SNR-γ weighting), captions framed exactly as generation frames prompts (``encode_captions``), 10%
   of captions dropped for classifier-free guidance, AdamW with warm-up and a cosine tail, an EMA of the weights
   (the EMA is what ships). Every ``eval_every`` steps the EMA model draws the one-object held-out prompts
   (``quality.evaluate``, two seeds) and the log records its measures (``<out>.state/eval.csv``: the time-vs-quality
   curve).

A run stops by itself after ``--max-minutes`` (90 by default), saving its state; the same command continues it.
Everything goes through the ordinary paths: the model is built by ``recipe.build``, saved by ``recipe.save`` and
read back by ``sdlite.load`` before the diffusion phase, so the trained modules are the loaded pipeline's own.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint.files import open_tensor_file
from ..checkpoint.write import atomic_path, save_safetensors
from ..train.batches import encode_captions
from ..train.loop import restore_state, save_state, state_tensors
from ..train.loss import denoising_loss
from ..train.optim import EMA, lr_factor
from ..train.report import LogRow, draw_loss_curve, write_csv
from . import recipe
from .quality import evaluate, held_out_prompts
from .shapes import dataset


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    images: int = 20_000  # training images, drawn once from the "train" split
    vae_steps: int = 1200  # on crops
    vae_full_steps: int = 100  # then on whole images
    vae_batch: int = 64
    vae_crop: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6  # per latent value, against L1 + MSE per pixel value
    unet_steps: int = 5600
    unet_batch: int = 64
    unet_lr: float = 6e-4
    text_lr: float = 3e-4
    warmup: int = 300
    min_snr_gamma: float = 5.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    eval_every: int = 800
    save_every: int = 250
    decoder_steps: int = 3000  # phase 4: the decoder again, on the cached latents (the encoder stays as it was)
    decoder_full_steps: int = 200
    decoder_batch: int = 64
    decoder_lr: float = 5e-4


class Stop(Exception):
    """The run's time is up; its state is saved."""


class Clock:
    def __init__(self, max_minutes: float):
        self.start, self.limit = time.monotonic(), max_minutes * 60

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def up(self) -> bool:
        return self.elapsed > self.limit


def training_images(r: Recipe) -> tuple[torch.Tensor, list[str]]:
    """The training set as uint8 [N, 3, 64, 64] and its captions."""
    data = dataset(r.images, seed=r.seed, split="train")
    images = np.empty((r.images, recipe.RESOLUTION, recipe.RESOLUTION, 3), dtype=np.uint8)
    captions = []
    for i in range(r.images):
        image, caption, _ = data[i]
        images[i] = np.asarray(image)
        captions.append(caption)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def _pixels(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def _settings(r: Recipe, phase: str) -> dict:
    """What a phase's saved state must agree with: the recipe up to that phase (the decoder's settings do not
    concern the phases before it)."""
    fields = {k: v for k, v in asdict(r).items() if phase == "decoder" or not k.startswith("decoder_")}
    return {"method": f"pretrain-{phase}", "model": "shapes", "shape": json.dumps(fields, sort_keys=True)}


def _schedule_lr(optimizer, bases: list[float], step: int, total: int, warmup: int) -> None:
    """Linear warm-up, constant, then a cosine over the last 20% down to 10% of the base rate."""
    tail = int(total * 0.8)
    if step < warmup:
        f = lr_factor("constant", step, total, warmup)
    elif step < tail:
        f = 1.0
    else:
        f = 0.1 + 0.9 * lr_factor("cosine", step - tail, total - tail)
    for group, base in zip(optimizer.param_groups, bases):
        group["lr"] = base * f


def _resume(folder: Path, settings: dict, params: dict, optimizer, generator, ema: EMA | None = None):
    """(step, log) from a saved phase state, restoring the weights, optimiser, generator (and EMA) in place."""
    if not (folder / "state.json").exists():
        return 0, []
    state = restore_state(folder, settings, params, optimizer, generator, ema)
    return state["step"], state["log"]


def _save(folder: Path, settings: dict, step: int, params: dict, optimizer, generator, log, ema=None) -> None:
    save_state(folder, step=step, tensors=state_tensors(params, ema), optimizer=optimizer, generator=generator,
               scaler_state={}, log=log, settings=settings)


def _optimizer_step(params: dict, optimizer, ema: EMA | None = None) -> None:
    """Every phase's update after its backward pass: gradients clipped to norm 1, the step, the EMA."""
    torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update()


def _log_step(log: list[LogRow], step: int, total: int, loss: float, optimizer, clock: Clock, say, phase: str,
              measure: str) -> None:
    """The step's row of the phase's log, and a progress line every 50 steps (the mean of the last 50)."""
    log.append(LogRow(step, loss, optimizer.param_groups[0]["lr"], clock.elapsed))
    if step % 50 == 0:
        say(f"{phase} step {step}/{total}  {measure} {np.mean([row.loss for row in log[-50:]]):.4f}  "
            f"{clock.elapsed / 60:.1f} min")


def _save_or_stop(folder: Path, settings: dict, step: int, total: int, r: Recipe, params: dict, optimizer,
                  generator, log, clock: Clock, ema: EMA | None = None) -> None:
    """The phase's state saved every ``save_every`` steps, at its end and when the run's time is up (then Stop)."""
    if step % r.save_every == 0 or step == total or clock.up():
        _save(folder, settings, step, params, optimizer, generator, log, ema)
        if clock.up() and step < total:
            raise Stop


# --- phase 1: the autoencoder ----------------------------------------------------------------------------------------

def _crops(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    if size >= x.shape[-1]:
        return x
    offsets = torch.randint(0, x.shape[-1] - size + 1, (x.shape[0], 2), generator=generator).tolist()
    return torch.stack([img[:, t:t + size, l:l + size] for img, (t, l) in zip(x, offsets)])


def vae_loss(vae, x: torch.Tensor, kl_weight: float, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    posterior = vae.encode(x)
    rec = vae.decode(posterior.sample(generator))
    l1 = (rec - x).abs().mean()
    kl = 0.5 * (posterior.mean.pow(2) + posterior.logvar.exp() - 1 - posterior.logvar).sum() / x.numel()
    return l1 + (rec - x).pow(2).mean() + kl_weight * kl * x[0].numel() / posterior.mean[0].numel(), l1.item()


def train_vae(vae, images: torch.Tensor, r: Recipe, folder: Path, clock: Clock, say) -> list[LogRow]:
    settings = _settings(r, "vae")
    params = dict(vae.named_parameters())
    optimizer = torch.optim.AdamW(params.values(), lr=r.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    generator = torch.Generator().manual_seed(r.seed + 1)
    step, log = _resume(folder, settings, params, optimizer, generator)
    total = r.vae_steps + r.vae_full_steps
    device = next(vae.parameters()).device
    while step < total:
        _schedule_lr(optimizer, [r.vae_lr], step, total, 100)
        whole = step >= r.vae_steps
        batch = images[torch.randint(0, len(images), (r.vae_batch // 4 if whole else r.vae_batch,),
                                     generator=generator)].to(device)
        x = _pixels(batch) if whole else _crops(_pixels(batch), r.vae_crop, generator)
        loss, l1 = vae_loss(vae, x, r.kl_weight, generator)
        loss.backward()
        _optimizer_step(params, optimizer)
        step += 1
        _log_step(log, step, total, l1, optimizer, clock, say, "vae", "L1")
        _save_or_stop(folder, settings, step, total, r, params, optimizer, generator, log, clock)
    return log


def train_decoder(vae, latents: tuple[torch.Tensor, torch.Tensor], images: torch.Tensor, r: Recipe, folder: Path,
                  clock: Clock, say) -> list[LogRow]:
    """Phase 4: ``post_quant_conv`` + decoder on samples of the cached posteriors (crops of 4x4 latents and their
    32x32 pixels, then whole images). The encoder, and so the latents the UNet learnt, do not change; the phase
    depends on the first two only, so it can run beside phase 3 in another process (``phase="decoder"``)."""
    settings = _settings(r, "decoder")
    vae.post_quant_conv.requires_grad_(True)
    vae.decoder.requires_grad_(True).train()
    params = {f"post_quant_conv.{n}": p for n, p in vae.post_quant_conv.named_parameters()}
    params |= {f"decoder.{n}": p for n, p in vae.decoder.named_parameters()}
    optimizer = torch.optim.AdamW(params.values(), lr=r.decoder_lr, betas=(0.9, 0.99), weight_decay=0.0)
    generator = torch.Generator().manual_seed(r.seed + 3)
    step, log = _resume(folder, settings, params, optimizer, generator)
    mean, std = latents
    f = recipe.RESOLUTION // mean.shape[-1]
    total = r.decoder_steps + r.decoder_full_steps
    device = next(vae.parameters()).device
    while step < total:
        _schedule_lr(optimizer, [r.decoder_lr], step, total, 100)
        whole = step >= r.decoder_steps
        idx = torch.randint(0, len(mean), (r.decoder_batch // 4 if whole else r.decoder_batch,), generator=generator)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)
        x = _pixels(images[idx])
        if not whole:
            side = r.vae_crop // f
            offsets = torch.randint(0, mean.shape[-1] - side + 1, (len(idx), 2), generator=generator).tolist()
            z = torch.stack([zi[:, t:t + side, l:l + side] for zi, (t, l) in zip(z, offsets)])
            x = torch.stack([xi[:, f * t:f * (t + side), f * l:f * (l + side)] for xi, (t, l) in zip(x, offsets)])
        rec = vae.decode(z.to(device))
        x = x.to(device)
        l1 = (rec - x).abs().mean()
        (l1 + (rec - x).pow(2).mean()).backward()
        _optimizer_step(params, optimizer)
        step += 1
        _log_step(log, step, total, l1.item(), optimizer, clock, say, "decoder", "L1")
        _save_or_stop(folder, settings, step, total, r, params, optimizer, generator, log, clock)
    return log


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of uint8 ``images``, computed where the VAE is, kept on the CPU."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for i in range(0, len(images), batch):
        posterior = vae.encode(_pixels(images[i:i + batch].to(device)))
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


# --- phase 3: text encoder + UNet -------------------------------------------------------------------------------------

def train_unet(pipe, latents: tuple[torch.Tensor, torch.Tensor], captions: list[str], r: Recipe, folder: Path,
               clock: Clock, say) -> list[LogRow]:
    settings = _settings(r, "unet")
    unet, text = pipe.unet, pipe.text_encoders[0]
    unet.requires_grad_(True).train()
    text.requires_grad_(True).train()
    params = {f"unet.{n}": p for n, p in unet.named_parameters()} | {f"text.{n}": p for n, p in text.named_parameters()}
    groups = [{"params": list(unet.parameters()), "lr": r.unet_lr},
              {"params": list(text.parameters()), "lr": r.text_lr}]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.99), weight_decay=0.01)
    ema = EMA(params.items(), r.ema_decay)
    generator = torch.Generator().manual_seed(r.seed + 2)
    step, log = _resume(folder, settings, params, optimizer, generator, ema)
    mean, std = latents
    scale = pipe.vae.scale_factor
    evals = folder.parent / "eval.csv"
    while step < r.unet_steps:
        _schedule_lr(optimizer, [r.unet_lr, r.text_lr], step, r.unet_steps, r.warmup)
        idx = torch.randint(0, len(mean), (r.unet_batch,), generator=generator)
        # Every random draw on the CPU generator, so a seed means the same batches on any device.
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)) * scale
        drop = (torch.rand(r.unet_batch, generator=generator) < r.caption_dropout).tolist()
        context = encode_captions(pipe, ["" if d else captions[i] for d, i in zip(drop, idx.tolist())],
                                  grad=True).context
        noise = torch.randn(z.shape, generator=generator)
        t = torch.randint(0, 1000, (r.unet_batch,), generator=generator)
        loss = denoising_loss(pipe, z.to(pipe.device), context, noise.to(pipe.device), t.to(pipe.device),
                              min_snr_gamma=r.min_snr_gamma).mean()
        loss.backward()
        _optimizer_step(params, optimizer, ema)
        step += 1
        _log_step(log, step, r.unet_steps, loss.item(), optimizer, clock, say, "unet", "loss")
        if r.eval_every and step % r.eval_every == 0:
            with ema.swapped():
                s = evaluate(pipe, held_out_prompts(("one",)), seeds=2).measures()
            unet.requires_grad_(True)  # the pipeline may set inference flags
            text.requires_grad_(True)
            say(f"eval at step {step}: background {s['background']:.0%}, object {s['one_object']:.0%}")
            _append_eval(evals, step, clock.elapsed, s)
        _save_or_stop(folder, settings, step, r.unet_steps, r, params, optimizer, generator, log, clock, ema)
    with torch.no_grad():  # the EMA weights are the result
        for name, p in params.items():
            p.copy_(ema.shadow[name])
    return log


def _append_eval(path: Path, step: int, elapsed: float, s: dict[str, float]) -> None:
    rows = list(csv.reader(path.open())) if path.exists() else [["step", "run_elapsed_s", "background", "one_object"]]
    rows = [row for row in rows if row[0] != str(step)]  # a resumed run evaluates that step again
    rows.append([str(step), f"{elapsed:.0f}", f"{s['background']:.3f}", f"{s['one_object']:.3f}"])
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(rows)


# --- the whole recipe -------------------------------------------------------------------------------------------------

def pretrain(out: str | Path, *, state: str | Path | None = None, r: Recipe = Recipe(), max_minutes: float = 90.0,
             phase: str | None = None, device: str | torch.device = "cpu", say=print) -> Path | None:
    """Run (or continue) the recipe; returns the model's path when it is complete, None when the run stopped at
    ``max_minutes`` with its state saved (run it again to continue). ``phase="decoder"`` runs only phase 4 (once
    the latents are cached), so that it can run beside phase 3 in a second process; the main run then finds it
    done. ``device``: where the modules train ("cuda" on a GPU); the data, the cached latents and every random draw
    of the recipe stay on the CPU, so the batches are the same on any device (the arithmetic is not)."""
    from ..pipeline import load  # the pipeline imports sdlite.data for the built-in model

    device = torch.device(device)  # an unknown device name fails here, before any work
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"pretrain: asked to train on {device}, but torch finds no CUDA GPU here; use device='cpu'")
    out = Path(out)
    folder = Path(state) if state is not None else out.with_name(out.name + ".state")
    folder.mkdir(parents=True, exist_ok=True)
    clock = Clock(max_minutes)
    torch.manual_seed(r.seed)
    say(f"drawing {r.images} training images (seed {r.seed})")
    images, captions = training_images(r)
    init = folder / "init.safetensors"
    latents_file = folder / "latents.safetensors"
    try:
        if not latents_file.exists():
            unet, vae, text = recipe.build(r.seed)
            vae.to(device)
            vae_log = train_vae(vae, images, r, folder / "vae", clock, say)
            k = recipe.fit_latent_scale(vae, _pixels(images[:1024].to(device)), seed=r.seed)
            say(f"latent scale fitted (k = {k:.4f}); encoding {len(images)} images")
            mean, std = encode_latents(vae, images)
            recipe.save(init, unet, vae, text, dtype=torch.float32)
            save_safetensors(latents_file, {"mean": mean, "std": std},
                             {"vae_l1": f"{np.mean([row.loss for row in vae_log[-100:]]):.5f}"})
            write_csv(folder / "vae_loss.csv", vae_log)
            draw_loss_curve(folder / "vae_loss.png", vae_log)
        with open_tensor_file(latents_file) as tf:
            latents = (tf.read("mean"), tf.read("std"))
        pipe = load(init, device=device)
        if phase != "decoder":
            log = train_unet(pipe, latents, captions, r, folder / "unet", clock, say)
        decoder_log = train_decoder(pipe.vae, latents, images, r, folder / "decoder", clock, say)
        if phase == "decoder":
            return None
    except Stop:
        say(f"stopped after {clock.elapsed / 60:.1f} min with the state saved in {folder}; "
            f"run the same command again to continue")
        return None
    write_csv(folder / "decoder_loss.csv", decoder_log)
    draw_loss_curve(folder / "decoder_loss.png", decoder_log)
    write_csv(out.with_suffix(".csv"), log)
    draw_loss_curve(out.with_suffix(".png"), log)
    tail = np.mean([row.loss for row in log[-200:]])
    where = "" if device.type == "cpu" else f" --device {device}"
    meta = {"sdlite.recipe": json.dumps(asdict(r), sort_keys=True),
            "sdlite.command": f"python -m sdlite.data.shapes train --out {out.name} --seed {r.seed}{where}",
            "sdlite.device": str(device),
            "sdlite.final_loss": f"{tail:.5f}",
            "sdlite.train_hours": f"{sum(_phase_seconds(folder)) / 3600:.2f}"}
    recipe.save(out, pipe.unet, pipe.vae, pipe.text_encoders[0], metadata=meta)
    say(f"wrote {out} (final loss {tail:.4f})")
    return out


def _phase_seconds(folder: Path) -> list[float]:
    """Training seconds of each phase, summed over runs (each run's log restarts its clock)."""
    seconds = []
    for phase in ("vae", "unet", "decoder"):
        path = folder / phase / "state.json"
        if path.exists():
            rows = json.loads(path.read_text())["log"]
            seconds.append(sum(b["elapsed"] - a["elapsed"] for a, b in zip(rows, rows[1:])
                               if b["elapsed"] >= a["elapsed"]))
    return seconds
