"""Data-parallel training over several processes, as ``torchrun --nproc-per-node N`` starts them: PyTorch's
DistributedDataParallel on ``torch.distributed`` (NCCL between GPUs, Gloo between CPU processes).

Every process holds the whole model and runs the same steps. The whole batch of a step (``batch_size`` examples,
the same on every rank because the batch order is a function of the seed) is cut into one contiguous shard per rank,
and each rank draws the whole batch's noise and timesteps and keeps its rows (``Run.draw``), so N processes train on
exactly the examples and noise one process would. DDP broadcasts the starting trained weights from rank 0 and
averages their gradients over the ranks during the backward pass (skipped on the micro-batches of a gradient
accumulation but the last), so the optimiser steps agree everywhere. Only rank 0 writes: samples, logs, states and
the output file.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

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


class _Trained(nn.Module):
    """The method's trained parameters as one module, and its loss as that module's forward: the shape
    DistributedDataParallel wraps (the parameters stay where the method put them; this only lists them)."""

    def __init__(self, method: Method, params: list[nn.Parameter]):
        super().__init__()
        self.method = [method]  # in a list: not a submodule
        self.trained = nn.ParameterList(params)

    def forward(self, run: Run, batch: Batch) -> torch.Tensor:
        return self.method[0].loss(run, batch)


class DataParallel(Method):
    """``inner`` under :class:`torch.nn.parallel.DistributedDataParallel`: its starting weights broadcast from rank 0
    when it wraps them, its gradients averaged over the ranks by DDP's reducer in the backward pass."""

    def __init__(self, inner: Method):
        self.inner = inner
        self.name, self.trains_text = inner.name, inner.trains_text
        self.ddp: DistributedDataParallel | None = None

    @property
    def embeddings(self):
        return self.inner.embeddings

    def attach(self, pipe) -> list[dict]:
        groups = self.inner.attach(pipe)
        # find_unused_parameters: a step may leave trained weights out of the graph (a dropped caption skips a
        # textual-inversion vector; clip skip skips the text encoder's last layers), which DDP must be told.
        self.ddp = DistributedDataParallel(_Trained(self.inner, list(self.inner.named_parameters().values())),
                                           find_unused_parameters=True)
        return groups

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return self.inner.named_parameters()

    def loss(self, r: Run, batch: Batch) -> torch.Tensor:
        return self.ddp(r, batch)

    def accumulating(self):
        return self.ddp.no_sync()

    def save(self, r: Run, path):
        return self.inner.save(r, path)

    def detach(self) -> None:
        self.ddp = None  # the reducer, and with it its gradient hooks, goes with the wrapper
        self.inner.detach()


def distribute(run: Run) -> Run:
    """``run`` as this process's part of a distributed run (unchanged in a single process)."""
    rank, world = rank_and_world()
    if world < 2:
        return run
    run.batches = ShardedBatches(run.batches, rank, world)
    run.method = DataParallel(run.method)
    run.writes = rank == 0
    if rank != 0:
        run.progress = None
    return run
