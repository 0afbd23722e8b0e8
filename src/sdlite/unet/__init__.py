"""The latent-diffusion UNet in the original checkpoint layout."""

from .config import UNetConfig, infer_unet_config
from .model import UNetModel

__all__ = ["UNetConfig", "UNetModel", "infer_unet_config"]
