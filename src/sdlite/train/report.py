"""What a training run shows and leaves behind besides its result: the progress line (step, loss, it/s, ETA), the loss
log as CSV and the loss curve as a PNG drawn with PIL, next to the output file; and sample images every N steps: the
run's prompts generated through ``pipe.txt2img`` with the weights as they are at that step, saved as PNGs with their
A1111 infotext next to the output (``<output stem>-samples/``)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..checkpoint.write import atomic_path
from ..images import write_png
from ..progress import ProgressLine


class TrainProgress(ProgressLine):
    """The training run's line, redrawn at each optimiser step: bar, step, loss (running mean), it/s and ETA."""

    def __call__(self, info: dict) -> None:
        self.draw(info["step"], info["total"], info["elapsed"], counted=info["done_this_run"],
                  extra=f"loss {info['loss_avg']:.4f} ")


@dataclass
class LogRow:
    step: int
    loss: float
    lr: float
    elapsed: float


def write_csv(path: Path, rows: list[LogRow]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["step", "loss", "lr", "elapsed_s"])
        for r in rows:
            out.writerow([r.step, f"{r.loss:.6g}", f"{r.lr:.6g}", f"{r.elapsed:.3f}"])


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    span = high - low or 1.0
    raw = span / count
    unit = 10 ** math.floor(math.log10(raw))
    step = min((m * unit for m in (1, 2, 5, 10) if m * unit >= raw), default=unit)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def draw_loss_curve(path: Path, rows: list[LogRow], size: tuple[int, int] = (800, 450)) -> None:
    """The loss per step (light) and its moving average (dark) on labelled axes, as a PNG."""
    image = Image.new("RGB", size, "white")
    if not rows:
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        return
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 70, 30, size[0] - 20, size[1] - 45
    steps = [r.step for r in rows]
    losses = [r.loss for r in rows]
    smooth = moving_average(losses, max(1, len(losses) // 20))
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(losses), max(losses)
    y0, y1 = (y0 - 0.05, y1 + 0.05) if y1 - y0 < 1e-12 else (y0, y1)

    def xy(step: float, loss: float) -> tuple[float, float]:
        return (left + (step - x0) / (x1 - x0) * (right - left), bottom - (loss - y0) / (y1 - y0) * (bottom - top))

    for tick in _ticks(y0, y1):
        y = xy(x0, tick)[1]
        draw.line([(left, y), (right, y)], fill=(230, 230, 230))
        draw.text((5, y - 6), f"{tick:.3g}", fill="black")
    for tick in _ticks(x0, x1):
        x = xy(tick, y0)[0]
        draw.line([(x, bottom), (x, bottom + 5)], fill="black")
        draw.text((x - 10, bottom + 8), f"{tick:g}", fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    if len(rows) > 1:
        draw.line([xy(s, v) for s, v in zip(steps, losses)], fill=(150, 180, 230), width=1)
        draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(20, 60, 160), width=2)
    else:
        x, y = xy(steps[0], losses[0])
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(20, 60, 160))
    draw.text((left, 8), "training loss (light: per step, dark: moving average)", fill="black")
    draw.text(((left + right) // 2 - 15, size[1] - 18), "step", fill="black")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_samples(run, step: int) -> list[Path]:
    """One image per sample prompt at the training resolution, seeded with the run's seed; returns the paths."""
    c, pipe = run.config, run.pipe
    folder = run.output.parent / f"{run.output.stem}-samples"
    folder.mkdir(exist_ok=True)
    side = run.batches.data.resolution
    training = pipe.unet.training
    pipe.unet.eval()
    paths = []
    try:
        with torch.no_grad():
            for i, prompt in enumerate(c.sample_prompts):
                result = pipe.txt2img(prompt, width=side, height=side, steps=c.sample_steps, seed=c.seed + i)
                paths.append(write_png(folder / f"step{step:06d}-{i}.png", result.images[0], result.infotexts[0]))
    finally:
        pipe.unet.train(training)
    return paths
