"""Process groups, the data-parallel gradient average, and FSDP2 sharding of the frozen base.

Ranks form a ``dp x cp`` grid, ``rank = dp_rank * cp + cp_rank``: the ``cp`` ranks of one
context-parallel group are neighbours (one node, the fastest links) and work on the same pack;
the ``dp`` groups read different packs. Gloo on CPU, NCCL on GPU, both with ``dist.timeout_s`` on
every collective, and NCCL's async error handling on, so that a dead or stuck rank ends the job
with an error instead of a hang.

Trainable parameters (routers, optional q/k/v, multipliers) are replicated; their gradients are
summed over all ranks by one all-reduce of a flat buffer per step and divided by ``dp``: every
rank of a context-parallel group holds a share of its pack's gradient (see ``train.context_parallel``),
so the sum over the group is the pack's gradient and the mean over ``dp`` is the step's.

The frozen base is replicated (plain data parallel), or with ``dist.fsdp`` sharded over all
ranks by FSDP2 (``fully_shard`` per decoder layer): it has no gradients, so FSDP only all-gathers
a layer's weights before its forward and again before its backward (checkpoint recompute and
activation gradients), and frees them after.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["World", "init_distributed", "all_reduce_grads", "all_reduce_sum", "shard_frozen_base", "close"]


@dataclasses.dataclass
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device
    cp: int = 1
    """Context-parallel degree: ranks per pack."""
    cp_group: Optional[object] = None
    """Process group of this rank's context-parallel group (None when cp == 1)."""

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def dp(self) -> int:
        return self.size // self.cp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_distributed(device: str, timeout_s: int, cp: int = 1) -> World:
    """Join the torchrun job (``RANK``/``WORLD_SIZE`` in the environment) or run as one process."""
    rank = int(os.environ.get("RANK", 0))
    size = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if size % cp:
        raise ValueError(f"dist.context_parallel={cp} must divide the number of ranks ({size})")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    world = World(rank, size, local, dev, cp)
    if size > 1:
        # Without async error handling a NCCL collective stuck on a dead peer never times out;
        # 3 = tear the process down on a timeout or error (the job ends with the watchdog's report).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if use_cuda else None)
        if cp > 1:
            # new_group is collective: every rank creates every group, keeps its own.
            for first in range(0, size, cp):
                group = dist.new_group(list(range(first, first + cp)),
                                       timeout=datetime.timedelta(seconds=timeout_s))
                if first == world.dp_rank * cp:
                    world.cp_group = group
    return world


def all_reduce_grads(params: List[Tensor], world: World) -> None:
    """Sum the gradients of ``params`` over all ranks and divide by ``dp`` (a missing grad counts
    as zero). One flat fp32 buffer: one collective per step, whatever the number of layers."""
    if not world.distributed or world.size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world.dp
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


def all_reduce_sum(x: Tensor, world: World) -> Tensor:
    if world.distributed and world.size > 1:
        dist.all_reduce(x)
    return x


def shard_frozen_base(model: nn.Module, world: World, keep_replicated: List[nn.Parameter]) -> Tuple[int, int]:
    """FSDP2 over all ranks for every decoder layer of ``model`` (a transformers causal LM).

    ``keep_replicated`` (the trainable parameters) stay plain tensors, so the optimiser, the
    gradient all-reduce and ``save_router`` see ordinary parameters. The embeddings, the final
    norm and the output head stay replicated too: the loss reads the head weight directly, and
    a head tied to the embeddings must not be sharded underneath it. The decoder is the FSDP root
    (it orders the layers' all-gathers and prefetches the next layer's). Returns (base parameters
    held by this rank, base parameters in all)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not world.distributed:
        raise ValueError("dist.fsdp needs a distributed job (torchrun with --nproc-per-node >= 2)")
    mesh = init_device_mesh(world.device.type, (world.size,), mesh_dim_names=("fsdp",))
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"dist.fsdp: {type(decoder).__name__} has no 'layers' ModuleList to shard")
    ignored = set(keep_replicated)
    ignored |= {p for n, p in decoder.named_parameters() if not n.startswith("layers.")}
    ignored |= set(model.get_output_embeddings().parameters())
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=ignored)
    fully_shard(decoder, mesh=mesh, ignored_params=ignored)
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                for p in model.parameters() if not p.requires_grad)
    total = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return local, total


def close(world: World) -> None:
    if world.distributed:
        dist.destroy_process_group()
