"""Image upscalers as published: ESRGAN / Real-ESRGAN / BSRGAN RRDBNets and Real-ESRGAN's SRVGGNetCompact, loaded
from their ``.pth`` files with the architecture read from the keys, and tiled whole-image upscaling as AUTOMATIC1111
does it (the "Hires upscaler" of its hires fix).

    model = sdlite.upscalers.load("RealESRGAN_x4plus.pth")        # model.scale == 4; model(x), x [B, 3, H, W] in [0, 1]
    big = sdlite.upscalers.upscale(image, model)                  # PIL in, PIL out, tiles of 192 with 8 overlap
    path = sdlite.upscalers.find("R-ESRGAN 4x+", ["models/ESRGAN"])   # A1111 names or file stems
"""

from .archs import ESRGAN, RRDBConfig, RRDBNet, SRVGGConfig, SRVGGNetCompact, infer_srvgg_config
from .loader import A1111_NAMES, find, infer_rrdb_config, load, name_of, resolve
from .tiles import fit, tile_starts, upscale, upscale_tensor

__all__ = ["A1111_NAMES", "ESRGAN", "RRDBConfig", "RRDBNet", "SRVGGConfig", "SRVGGNetCompact", "find", "fit",
           "infer_rrdb_config", "infer_srvgg_config", "load", "name_of", "resolve", "tile_starts", "upscale", "upscale_tensor"]
