"""Checkpoint tools: merge, convert/prune, bake a VAE, extract / resize / merge LoRAs (docs/formats.md, Checkpoint
tools). Every tool reads its inputs one tensor at a time and writes through ``sdlite.checkpoint.write`` (temporary
name renamed when complete; inputs never overwritten); bad inputs are refused with a ``ToolError`` before writing.

    from sdlite import tools
    tools.merge_checkpoints("a.safetensors", "b.safetensors", output="ab.safetensors", multiplier=0.3)
    tools.convert_checkpoint("model.ckpt", output="model.safetensors", dtype="fp16", ema="drop")
    tools.extract_lora("tuned.safetensors", "base.safetensors", output="diff.safetensors", rank=32)
"""

from .blocks import block_names, block_of, parse_blocks
from .common import ToolError, Written
from .convert import bake_vae, convert_checkpoint
from .extract import LoraWritten, extract_lora
from .merge import MODES, merge_checkpoints
from .resize import merge_loras, resize_lora

__all__ = ["MODES", "LoraWritten", "ToolError", "Written", "bake_vae", "block_names", "block_of", "convert_checkpoint",
           "extract_lora", "merge_checkpoints", "merge_loras", "parse_blocks", "resize_lora"]
