"""Process group and data parallelism over the trainable (router) parameters.

The frozen base is replicated on every rank; only the router (and optional q/k/v) gradients are
averaged, by one all-reduce of a flat buffer per step. Gloo on CPU, NCCL on GPU, both with a
timeout so that a dead rank ends the job with an error instead of a hang.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import List

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["World", "init_distributed", "all_reduce_grads", "all_reduce_sum", "close"]


@dataclasses.dataclass
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_distributed(device: str, timeout_s: int) -> World:
    """Join the torchrun job (``RANK``/``WORLD_SIZE`` in the environment) or run as one process."""
    rank = int(os.environ.get("RANK", 0))
    size = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if size > 1:
        # Without async error handling a NCCL collective stuck on a dead peer never times out.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if use_cuda else None)
    return World(rank, size, local, dev)


def all_reduce_grads(params: List[Tensor], world: World) -> None:
    """Average the gradients of ``params`` over the ranks (a missing grad counts as zero)."""
    if not world.distributed or world.size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


def all_reduce_sum(x: Tensor, world: World) -> Tensor:
    if world.distributed and world.size > 1:
        dist.all_reduce(x)
    return x


def close(world: World) -> None:
    if world.distributed:
        dist.destroy_process_group()
