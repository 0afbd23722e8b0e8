"""txt2img end to end: sdlite's pipeline and diffusers' Stable Diffusion pipelines on the same checkpoint file.

One image with classifier-free guidance (so every step is one UNet call at batch 2), 20 Euler steps at the model's
size, text encoding and the VAE decode to a PIL image included:

* sdlite: ``sdlite.load(path)`` and ``pipe.txt2img(..., sampler="Euler")`` (A1111's "Euler": the model's own discrete
  schedule, Karras off);
* diffusers: ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` assembled from the components the suite's
  diffusers loaders convert from the same file (one read of it, as ``from_single_file`` does), an
  ``EulerDiscreteScheduler`` with SD's training schedule, transformers' ``CLIPTokenizer`` from vocab.json/merges.txt
  written from sdlite's packaged BPE merges; no safety checker, no feature extractor, no watermark.

The scheduler's ``timestep_spacing`` is "linspace" (EulerDiscreteScheduler's own default): timesteps 999 → 0 evenly,
the grid A1111's default Euler schedule uses. diffusers' hub configs for SD1.5 and SDXL (and its single-file fallback
config) say "leading", which starts at t=951; the time per step is the same either way. ``steps_offset=1`` as in those
configs (StableDiffusionPipeline warns otherwise); "linspace" does not use it.
"""

from __future__ import annotations

import gzip
import json
import os
from importlib import resources

import numpy as np
import torch

from benchmarks.loaders import load_diffusers, read_state
from benchmarks.models import ModelSpec

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed, (sharp focus:1.2)"
NEGATIVE = "blurry, lowres, watermark"
STEPS = 20
WARMUP_STEPS = 2  # a warm-up generation runs every component at the timed shapes, in a tenth of the time
CFG_SCALE = 7.0
SEED = 1
# CLIP's vocabulary: 256 byte symbols, the same with "</w>", then one entry per merge, then the two special tokens.
_MERGES = 49152 - 256 - 2


def tokenizer_dir(checkpoint: str) -> str:
    """Where the suite writes the tokenizer files, next to the checkpoint they belong to."""
    return os.path.join(os.path.dirname(checkpoint), "clip_tokenizer")


def write_tokenizer(folder: str) -> None:
    """vocab.json and merges.txt of CLIP's BPE, from the merges file packaged with sdlite, built the way OpenAI's
    ``simple_tokenizer.py`` builds its vocabulary (GPT-2's byte symbols from transformers)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    data = resources.files("sdlite.clip").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    merges = gzip.decompress(data).decode("utf-8").split("\n")[1 : _MERGES + 1]  # line 0 is a header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    # transformers skips the first line of merges.txt only when it starts with "#version".
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2", *merges]))


def _diffusers_tokenizer(folder: str, layout: str):
    import transformers

    # The tokenizer configs diffusers' SD2 and SDXL repositories ship pad the OpenCLIP towers with "!" (id 0),
    # CLIP-L with <|endoftext|>; model_max_length is 77 in all of them (without it, nothing would truncate or pad).
    extra = {} if layout == "clip" else {"pad_token": "!"}
    return transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True, model_max_length=77, **extra)


def load_pipeline(impl: str, spec: ModelSpec, path: str, device: str, dtype: torch.dtype):
    """The whole pipeline of one implementation, loaded from the checkpoint at ``path``."""
    if impl == "sdlite":
        import sdlite

        # Every benchmarked release predicts eps (SD2.1 at 512 is the eps base); random weights would fool the guess.
        return sdlite.load(path, device=device, dtype=dtype, prediction="eps")
    import diffusers

    checkpoint = read_state(path)
    unet, vae, encoders = (load_diffusers(c, spec, path, device, dtype, checkpoint) for c in ("unet", "vae", "text"))
    del checkpoint  # converted tensors that the modules did not take (and the fp16 originals) go now
    tokenizers = [_diffusers_tokenizer(tokenizer_dir(path), layout) for _, layout, *_ in spec.text]
    scheduler = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                 beta_schedule="scaled_linear", prediction_type="epsilon",
                                                 timestep_spacing="linspace", steps_offset=1)
    if spec.adm:
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler, add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0], unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def txt2img_call(impl: str, spec: ModelSpec, pipe, steps: int = STEPS):
    """A no-argument function generating one image; it returns the pixels as a uint8 tensor [H, W, 3] (the same
    small conversion for both, so that a checksum can be taken)."""
    size = spec.size
    if impl == "sdlite":
        def generate():
            return pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=steps, sampler="Euler", cfg_scale=CFG_SCALE,
                                seed=SEED, width=size, height=size).images[0]
    else:
        def generate():
            return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=CFG_SCALE,
                        width=size, height=size, generator=torch.Generator().manual_seed(SEED),
                        output_type="pil").images[0]

    return lambda: torch.from_numpy(np.array(generate()))
