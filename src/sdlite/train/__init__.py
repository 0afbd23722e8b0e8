"""Training on the original modules: the denoising loss, data folders, the training loop and its methods.

    import sdlite.train
    loss = sdlite.train.denoising_loss(pipe, latents, context, noise, timesteps)   # per-sample [B]
    result = sdlite.train.lora("model.safetensors", "data/", output="style.safetensors", rank=16, alpha=8, steps=500)
    sdlite.train.dreambooth(model, "instance/", output="db.safetensors", instance_prompt="a photo of sks dog",
                            class_prompt="a photo of dog")
    sdlite.train.textual_inversion(model, "images/", output="sksdog.safetensors", token="sksdog", init_word="dog")
    sdlite.train.controlnet(model, "images/", hint_dir="hints/", output="control.safetensors")

Every method also runs under ``torchrun`` (``sdlite.train.distributed``: one shard of each batch per process).

A method (``sdlite.train.loop.Method``) says which parameters train, how a batch becomes a loss and how the result is
saved; ``sdlite.train.api.build_run`` and ``sdlite.train.loop.Run`` do the rest for every method.
"""

from __future__ import annotations

from .controlnet_train import controlnet
from .dreambooth import dreambooth
from .loop import Method, Result, Run, TrainConfig
from .loss import denoising_loss
from .lora import LoraMethod, lora
from .textual_inversion import TextualInversionMethod, textual_inversion

__all__ = ["controlnet", "denoising_loss", "dreambooth", "lora", "LoraMethod", "Method", "Result", "Run",
           "TrainConfig", "textual_inversion", "TextualInversionMethod"]
