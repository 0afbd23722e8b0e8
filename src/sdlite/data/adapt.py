"""Adapting the built-in model with sdlite's training methods, measured with the detector (minutes on a CPU).

Three examples, each training through ``sdlite.train``'s public functions on images of the shapes world that
pre-training never showed, then generating and reading the pictures back (``sdlite.data.quality``). The training
latents are refined by decoder inversion (``REFINE`` steps, the ``refine_latents`` training option): the model's
encoder cannot carry stars or rings, its decoder can draw large ones (``quality.roundtrip(vae, refine=...)``).

* ``dreambooth``: 5 images of a large yellow star captioned "a sks shape" (never on blue), the UNet fine-tuned with
  and without prior preservation (class prompt "a shape", class images drawn by the model itself). Measured: how often
  "a sks shape on a blue background" is a star; how often the model still draws a circle, square or triangle when
  asked (the class-prompt accuracy), and how often plain "a shape on a blue background" has become a star: the
  DreamBooth paper's language drift (Ruiz et al. 2022), which prior preservation is meant to prevent.
* ``ti``: textual inversion of "<heart>" from 5 hearts captioned "a green <heart> on a black background" and so on
  (never red on white); measured: how often "a red <heart> on a white background" is a red heart on white.
* ``lora``: a LoRA on large shapes drawn as outlines (``outline_images``, the ordinary captions); saved as
  ``outline.safetensors`` and switched on by ``<lora:outline:1>`` in the prompt; measured: how often the detector
  reads outlines, and the right colour and shape, with and without the tag.

    python -m sdlite.data.shapes adapt dreambooth --work adapt/      # also: ti, lora; --model, --steps, --seeds
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .quality import Evaluation, Prompt, evaluate
from .scene import POSITIONS, Obj, Scene, render
from .shapes import dataset, save_example

SUBJECT = ("yellow", "star")
SUBJECT_BACKGROUNDS = ("black", "purple", "green", "red", "white")  # never blue: that is the measured prompt's
INSTANCE_PROMPT, CLASS_PROMPT = "a sks shape", "a shape"
HEARTS = (("green", "black"), ("yellow", "blue"), ("white", "purple"), ("orange", "green"), ("black", "yellow"))
TOKEN = "<heart>"
# circle, square and triangle on trained combinations (none in HELD_OUT): the class prompt's shapes, asked for by name
CLASS_CHECK = (("red", "circle", "white"), ("green", "square", "yellow"), ("blue", "triangle", "white"),
               ("white", "circle", "purple"), ("orange", "square", "black"), ("purple", "triangle", "green"))
# Steps of decoder inversion for every training image's latents (``sdlite.vae.refine_latents``): the model's VAE
# encoder, trained on circles, squares and triangles only, maps a star to a pentagon's latents and a ring to a
# smudge's, while its decoder can draw both from refined latents.
REFINE = 200
OUTLINE_PROMPTS = (("red", "circle", "blue"), ("yellow", "square", "black"), ("white", "triangle", "green"),
                   ("blue", "circle", "yellow"))


def _plain(colour: str, shape: str, background: str, word: str | None = None, suffix: str = "") -> Prompt:
    return Prompt(f"a {colour} {word or shape} on a {background} background{suffix}", background, ((colour, shape),))


def _draw(folder: str | Path, scenes: list[Scene], captions: list[str] | None, seed: int) -> Path:
    """Write ``scenes`` as folder/0.png … (with .txt captions when given), sizes and positions jittered."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, scene in enumerate(scenes):
        save_example(folder / f"{i}.png", render(scene, rng), None if captions is None else captions[i])
    return folder


def _placed(rng: np.random.Generator, colour: str, shape: str, background: str) -> Scene:
    """One large object at a random position: the model's decoder draws stars and hearts at the large size only
    (``quality.roundtrip`` after decoder inversion), so the subjects are large ones."""
    return Scene(background, (Obj(colour, shape, "large", str(rng.choice(list(POSITIONS)))),))


def star_images(folder: str | Path, seed: int = 0) -> Path:
    """The DreamBooth subject: a yellow star on five backgrounds (captioned by the instance prompt, no .txt)."""
    rng = np.random.default_rng(seed)
    return _draw(folder, [_placed(rng, *SUBJECT, bg) for bg in SUBJECT_BACKGROUNDS], None, seed)


def heart_images(folder: str | Path, seed: int = 0) -> Path:
    """Five hearts of other colours on other backgrounds than red on white, captioned with the token."""
    rng = np.random.default_rng(seed)
    scenes = [_placed(rng, colour, "heart", bg) for colour, bg in HEARTS]
    return _draw(folder, scenes, [_plain(c, "heart", bg, TOKEN).text for c, bg in HEARTS], seed)


@dataclass
class Report:
    """What an adaptation measured: one row per model variant, each a dict of measure → fraction."""

    title: str
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # images behind each measure
    seconds: dict[str, float] = field(default_factory=dict)  # training time per variant
    files: dict[str, Path] = field(default_factory=dict)

    def table(self) -> str:
        measures = list(next(iter(self.rows.values())))
        head = " | ".join(f"{m} ({self.counts.get(m, '?')} images)" for m in measures)
        lines = [self.title, "", f"| model | {head} | training time |", "|---" * (len(measures) + 2) + "|"]
        for name, row in self.rows.items():
            cells = " | ".join(f"{row[m]:.0%}" for m in measures)
            train = f"{self.seconds[name]:.0f} s" if name in self.seconds else "-"
            lines.append(f"| {name} | {cells} | {train} |")
        return "\n".join(lines)


def _shape_share(result: Evaluation, shape: str) -> float:
    """Images with exactly one object, of ``shape`` (whatever its colour)."""
    hits = [len(r.read.found) == 1 and r.read.found[0].obj.shape == shape for r in result.records]
    return sum(hits) / len(hits)


def _load(model, **kw):
    from ..pipeline import load

    return load(model, **kw)


def _dreambooth_row(pipe, seeds: int) -> dict[str, float]:
    with torch.no_grad():
        subject = evaluate(pipe, [Prompt(f"{INSTANCE_PROMPT} on a blue background", "blue", (SUBJECT,))], seeds)
        drift = evaluate(pipe, [Prompt("a shape on a blue background", "blue", ())], seeds)
        classes = evaluate(pipe, [_plain(*c) for c in CLASS_CHECK], seeds)
    return {'star for "a sks shape on a blue background"': _shape_share(subject, "star"),
            "blue background there": subject.background,
            "circle/square/triangle right when asked": classes.one_object,
            'star for "a shape on a blue background"': _shape_share(drift, "star")}


def dreambooth(model="shapes", work: str | Path = "adapt", *, steps: int = 1500, lr: float = 2e-4,
               num_class_images: int = 40, seeds: int = 8, variants=("without prior", "with prior"),
               refine: int = REFINE, progress=None) -> Report:
    """Fine-tune the UNet on the star with ``sdlite.train.dreambooth`` for each of ``variants``, and measure."""
    from ..train import dreambooth as train

    work = Path(work)
    instance = star_images(work / "star")
    report = Report(f"DreamBooth: 5 yellow stars as {INSTANCE_PROMPT!r}, {steps} steps, lr {lr}; {seeds} seeds "
                    f"per prompt, 20 Euler a steps, CFG 5")
    report.rows["base model"] = _dreambooth_row(_load(model), seeds)
    for variant in variants:
        out = work / f"dreambooth-{variant.replace(' ', '-')}.safetensors"
        prior = dict(class_prompt=CLASS_PROMPT, class_dir=work / "class", num_class_images=num_class_images)
        start = time.perf_counter()
        train(model, instance, output=out, instance_prompt=INSTANCE_PROMPT, steps=steps, lr=lr, batch_size=1,
              save_dtype="fp16", refine_latents=refine, progress=progress,
              **(prior if variant == "with prior" else {}))
        report.seconds[variant] = time.perf_counter() - start
        report.rows[variant] = _dreambooth_row(_load(out), seeds)
        report.files[variant] = out
    report.counts = {m: seeds * (len(CLASS_CHECK) if m.startswith("circle") else 1) for m in report.rows["base model"]}
    return report


def textual_inversion(model="shapes", work: str | Path = "adapt", *, steps: int = 300, lr: float = 5e-3,
                      init_word: str = "circle", seeds: int = 8, refine: int = REFINE, progress=None) -> Report:
    """Learn ``<heart>`` with ``sdlite.train.textual_inversion`` and measure "a red <heart> on a white background"."""
    from ..train import textual_inversion as train

    work = Path(work)
    out = work / "embeddings" / f"{TOKEN}.safetensors"  # A1111 and sdlite name an embedding by its file
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train(model, heart_images(work / "heart"), output=out, token=TOKEN, init_word=init_word, steps=steps, lr=lr,
          batch_size=1, refine_latents=refine, progress=progress)
    trained = f'"a red {TOKEN} on a white background"'
    report = Report(f"Textual inversion: {TOKEN} from 5 hearts, {steps} steps, lr {lr}, init word {init_word!r}; "
                    f"{seeds} seeds, 20 Euler a steps, CFG 5", seconds={trained: time.perf_counter() - start},
                    files={"embedding": out})
    pipe = _load(model)
    for word in ("heart", TOKEN):  # the base model's own word for it, then the learnt one
        if word == TOKEN:
            pipe.load_embeddings(out)
        with torch.no_grad():
            result = evaluate(pipe, [_plain("red", "heart", "white", word)], seeds)
        right = [r.background_ok and r.objects_ok for r in result.records]
        report.rows[f'"a red {word} on a white background"'] = {
            "heart": _shape_share(result, "heart"), "red heart on white": sum(right) / len(right)}
    report.counts = {"heart": seeds, "red heart on white": seeds}
    return report


def outline_images(folder: str | Path, count: int = 40, seed: int = 0) -> Path:
    """The LoRA's data: the first ``count`` samples of ``shapes.dataset(..., outline=True)`` whose objects are all
    large (the decoder cannot draw a small ring), with their ordinary captions."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for image, text, scene in dataset(50 * count, seed, outline=True):
        if written == count:
            break
        if all(o.size == "large" for o in scene.objects):
            save_example(folder / f"{written}.png", image, text)
            written += 1
    return folder


def lora(model="shapes", work: str | Path = "adapt", *, images: int = 40, steps: int = 600, lr: float = 1e-3,
         rank: int = 8, seeds: int = 8, refine: int = REFINE, progress=None) -> Report:
    """Train ``outline.safetensors`` with ``sdlite.train.lora`` on outlined shapes; measure with and without
    ``<lora:outline:1>``."""
    from ..train import lora as train

    work = Path(work)
    data = work / "outline"
    outline_images(data, images)
    out = work / "loras" / "outline.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train(model, data, output=out, rank=rank, alpha=rank, steps=steps, lr=lr, batch_size=4, refine_latents=refine,
          progress=progress)
    report = Report(f"LoRA 'outline': {images} large outlined shapes, rank {rank}, {steps} steps of 4, lr {lr}; "
                    f"{len(OUTLINE_PROMPTS)} prompts x {seeds} seeds, 20 Euler a steps, CFG 5",
                    seconds={"<lora:outline:1>": time.perf_counter() - start}, files={"lora": out})
    pipe = _load(model)
    pipe.lora_dirs = [out.parent]
    for name, suffix in (("no tag", ""), ("<lora:outline:1>", " <lora:outline:1>")):
        with torch.no_grad():
            result = evaluate(pipe, [_plain(*p, suffix=suffix) for p in OUTLINE_PROMPTS], seeds)
        outlined = [any(f.obj.outline for f in r.read.found) for r in result.records]
        report.rows[name] = {"outlines": sum(outlined) / len(outlined), "colour + shape right": result.one_object,
                             "background right": result.background}
    report.counts = dict.fromkeys(report.rows["no tag"], len(OUTLINE_PROMPTS) * seeds)
    return report


METHODS = {"dreambooth": dreambooth, "ti": textual_inversion, "lora": lora}


def add_command(sub) -> None:
    p = sub.add_parser("adapt", help="train an adaptation example on the model and measure it with the detector")
    p.add_argument("method", choices=list(METHODS))
    p.add_argument("--model", default="shapes", help="checkpoint to adapt (default: the built-in model)")
    p.add_argument("--work", default="adapt", help="folder for the images and the trained files (default adapt/)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: 1500 for dreambooth, 300 for ti, 600 for lora)")
    p.add_argument("--seeds", type=int, default=8, help="images per measured prompt (default 8)")
    p.add_argument("--refine", type=int, default=REFINE,
                   help=f"decoder-inversion steps per training latent (default {REFINE}; 0: the encoder's latents)")


def run_command(args) -> int:
    from ..train.report import TrainProgress

    options = {"seeds": args.seeds, "refine": args.refine} | ({} if args.steps is None else {"steps": args.steps})
    report = METHODS[args.method](args.model, args.work, progress=TrainProgress(), **options)
    print(report.table())
    for name, path in report.files.items():
        print(f"{name}: {path}")
    return 0
