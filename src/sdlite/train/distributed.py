"""Data-parallel training over several processes, as ``torchrun --nproc-per-node N`` starts them (PyTorch
DistributedDataParallel's scheme on ``torch.distributed``: NCCL between GPUs, Gloo between CPU processes).

Every process holds the whole model and runs the same steps. The whole batch of a step (``batch_size`` examples,
the same on every rank because the batch order is a function of the seed) is cut into one contiguous shard per rank,
and each rank draws the whole batch's noise and timesteps and keeps its rows (``Run.draw``), so N processes train on
exactly the examples and noise one process would. After the backward pass every trained gradient is averaged over
the ranks (an all-reduce, as DDP's reducer does), so the optimiser steps agree everywhere; the starting weights are
broadcast from rank 0. Only rank 0 writes: samples, logs, states and the output file.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn

from .batches import Batch
from .loop import Method, Run


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup(device: str | torch.device = "cpu") -> str | torch.device:
    """Join the process group torchrun describes in the environment (when WORLD_SIZE > 1) and return this rank's
    device: ``cuda`` becomes ``cuda:LOCAL_RANK`` (NCCL), anything else stays (Gloo)."""
    _, world = rank_and_world()
    if world < 2:
        return device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def shutdown() -> None:
    """Leave the process group (the command line's last step under torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class ShardedBatches:
    """This rank's rows of each whole batch (instance rows and class rows sharded apart in a DreamBooth batch)."""

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world, self.data = batches, rank, world, batches.data

    def _rows(self, first: int, count: int) -> list[int]:
        if count % self.world:
            raise ValueError(f"a batch of {count} examples does not split over {self.world} processes: make the "
                             "batch size a multiple of the process count (the last batch of an epoch included)")
        per = count // self.world
        return list(range(first + self.rank * per, first + (self.rank + 1) * per))

    def __getitem__(self, step: int) -> Batch:
        b = self.batches[step]
        total = b.latents.shape[0]
        instances = getattr(b, "instances", total)
        rows = self._rows(0, instances) + self._rows(instances, total - instances)
        extra = {"instances": instances // self.world} if hasattr(b, "instances") else {}
        return dataclasses.replace(b, latents=b.latents[rows], captions=[b.captions[i] for i in rows],
                                   original_sizes=[b.original_sizes[i] for i in rows],
                                   crops=[b.crops[i] for i in rows], indices=[b.indices[i] for i in rows],
                                   shard=(rows, total), **extra)


class DataParallel(Method):
    """``inner`` with its starting weights broadcast from rank 0 and its gradients averaged over the ranks."""

    def __init__(self, inner: Method, world: int):
        self.inner, self.world = inner, world
        self.name, self.trains_text = inner.name, inner.trains_text
        self._hooks = []

    @property
    def embeddings(self):
        return self.inner.embeddings

    def attach(self, pipe) -> list[dict]:
        groups = self.inner.attach(pipe)
        for p in self.inner.named_parameters().values():
            with torch.no_grad():
                dist.broadcast(p.data, 0)
            self._hooks.append(p.register_post_accumulate_grad_hook(self._average))
        return groups

    def _average(self, p: nn.Parameter) -> None:
        dist.all_reduce(p.grad)
        p.grad.div_(self.world)

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return self.inner.named_parameters()

    def loss(self, r: Run, batch: Batch) -> torch.Tensor:
        return self.inner.loss(r, batch)

    def save(self, r: Run, path):
        return self.inner.save(r, path)

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.inner.detach()


def distribute(run: Run) -> Run:
    """``run`` as this process's part of a distributed run (unchanged in a single process)."""
    rank, world = rank_and_world()
    if world < 2:
        return run
    run.batches = ShardedBatches(run.batches, rank, world)
    run.method = DataParallel(run.method, world)
    run.writes = rank == 0
    if rank != 0:
        run.progress = None
    return run
