"""Component offload: a pipeline's weights wait on the CPU and each component visits the execution device only
while it runs, so that a small GPU holds about one component at a time (text encoders, then the UNet with its
ControlNets, then the VAE) instead of all of them.

``StableDiffusion.enable_offload`` installs an :class:`Offload`; the generation core wraps each stage in
``pipe.using(*modules)``, which is a no-op without offload. Moves are ``nn.Module.to``, which swaps each parameter's
data in place: parameter objects stay the same, so LoRA merges, injected parametrizations and compiled modules keep
pointing at them.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["Offload", "Visit", "move"]


class Offload:
    """Where an offloaded pipeline computes (``device``) and where its weights wait (``offload_device``).

    Modules are reference-counted, so a stage that asks for a module another stage already brought (a ControlNet
    listed twice, ``encode_prompt`` called inside a ``using`` block) neither moves it twice nor sends it back early.
    """

    def __init__(self, device: torch.device | str, offload_device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self._users: dict[int, tuple[nn.Module, int]] = {}  # id(module) -> (module, number of open visits)

    def acquire(self, modules: Iterable[nn.Module]) -> None:
        """Move ``modules`` to the execution device (those not there on behalf of another visit)."""
        for module in modules:
            _, count = self._users.get(id(module), (module, 0))
            if count == 0:
                move(module, self.device)
            self._users[id(module)] = (module, count + 1)

    def release(self, modules: Iterable[nn.Module]) -> None:
        """Send ``modules`` back to the offload device once no open visit needs them."""
        for module in modules:
            if id(module) not in self._users:
                raise RuntimeError(f"{type(module).__name__} is released but was never acquired")
            _, count = self._users[id(module)]
            if count == 1:
                del self._users[id(module)]
                move(module, self.offload_device)
            else:
                self._users[id(module)] = (module, count - 1)

    @property
    def resident(self) -> list[nn.Module]:
        """The modules on the execution device right now."""
        return [module for module, _ in self._users.values()]

    def __repr__(self) -> str:
        return f"Offload(device={str(self.device)!r}, offload_device={str(self.offload_device)!r})"


def move(module: nn.Module, device: torch.device) -> None:
    """``module.to(device)`` outside inference mode."""
    # Moves happen inside the sampler's inference_mode (the refiner's handoff) or a caller's; weights copied there
    # would become inference tensors, which a later LoRA merge (an in-place copy outside that mode) may not touch.
    with torch.inference_mode(False), torch.no_grad():
        module.to(device)


class Visit:
    """A with-block during which ``modules`` sit on their pipeline's execution device; nothing moves when
    ``offload`` is None (the pipeline keeps everything on one device).

    ``switch`` hands the device to another set of modules, possibly of another pipeline, before the block ends: the
    SDXL refiner takes over from the base UNet half-way through sampling, and the two need not be on at once.
    Whatever is on when the block ends (normally or by an error) goes back.
    """

    def __init__(self, offload: Offload | None, modules: Iterable[nn.Module | None]):
        self._offload, self._modules = offload, [m for m in modules if m is not None]

    def __enter__(self) -> "Visit":
        if self._offload is not None:
            self._offload.acquire(self._modules)
        return self

    def __exit__(self, *exc) -> None:
        if self._offload is not None:
            self._offload.release(self._modules)
        self._offload, self._modules = None, []

    def switch(self, offload: Offload | None, modules: Iterable[nn.Module | None]) -> None:
        """Send this visit's modules back and bring ``modules`` (on ``offload``'s device) in their place."""
        self.__exit__()
        self._offload, self._modules = offload, [m for m in modules if m is not None]
        self.__enter__()
