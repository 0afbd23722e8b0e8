"""Helpers shared by the test modules: random weights that exercise every parameter, and the error measure."""

from __future__ import annotations

import math

import pytest
import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error ‖a−b‖/‖b‖ (the measure DESIGN.md sets the tolerances in)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values, zero-initialised ones included, at scales that keep activations sane.

    Matrices and kernels get N(0, 1/fan_in); vectors (biases, norm scales and shifts) get values around their
    usual level, so that a norm weight swapped with its bias, or a missing bias, shows in the output.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        elif name.endswith("weight") and ("norm" in name or "ln_" in name or name.split(".")[-2].startswith("ln")):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return module


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny float64 models run fastest on one thread, and the test suite shares its CPU cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def take_off_loras(models):
    """A failing test must not leave its LoRAs on the module's shared ``models``."""
    yield
    for model in models.values():
        for handle in model.pipe.loras:
            handle.remove()
