"""Processes and devices: torchrun's environment, the process group, DDP / FSDP2 wrapping.

NCCL on GPUs, gloo on CPU. A single process (no torchrun) is a world of size 1 and never
touches torch.distributed. Parallelism is applied to the model from outside; the model file
knows nothing of it.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from minimind.devices import pick_device


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> World:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return World(rank, world_size, local_rank, dev)


def teardown() -> None:
    """Destroy the process group, after freeing what still references it: objects left in
    reference cycles would otherwise be freed at interpreter exit, when gloo's worker threads
    can no longer take the GIL and abort the process ("terminate called without an active
    exception")."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor, world: World) -> torch.Tensor:
    """Sum of `value` over all processes (a new tensor; the input is left alone)."""
    out = value.detach().clone()
    if world.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


@contextlib.contextmanager
def main_first(world: World):
    """Rank 0 runs the block before the other ranks do (e.g. it builds a shared cache, which
    the others then find complete and only read). If rank 0 fails, torchrun stops the rest."""
    if not world.is_main:
        barrier(world)
    yield
    if world.is_main:
        barrier(world)


def wrap(model: nn.Module, world: World, fsdp: bool) -> nn.Module:
    """DDP (every rank holds the model) or FSDP2 (parameters sharded per block, then root).

    FSDP2's blocks are those of every decoder in `model`: `model.layers` of the language model
    and, in a module that wraps decoders (PPO's `.lm` and `.critic`), each one's. Both average
    gradients over ranks, which the engine's loss scaling accounts for.
    """
    if not world.distributed:
        if fsdp:
            raise ValueError("--fsdp needs several processes: launch with torchrun")
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in decoder_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of every decoder trunk (a `.model` with `.layers`) in `model`, in order."""
    return [
        block
        for name, module in model.named_modules()
        if name == "model.layers" or name.endswith(".model.layers")
        for block in module
    ]
