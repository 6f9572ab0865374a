"""Checkpoints: router weights as safetensors (``flux_attention.save_router``, loadable by
``flux_attention.load_router``) plus one ``torch.save`` file per rank with everything else a resume
needs: optimiser and scheduler states, multipliers, step, RNG states and the data position.

Layout: ``<dir>/step-00000042/{router.safetensors, rank-<r>.pt, meta.json}``. A checkpoint is
written into ``step-N.tmp`` and renamed once every rank has written, so a crash while saving never
leaves a directory that looks complete; ``meta.json`` is the completeness mark. The frozen base is
not saved (it is the model the config names). The directory must be shared by all ranks.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Dict, List, Optional

import numpy as np
import torch

import flux_attention as fa

from .parallel import World

__all__ = ["CheckpointManager", "rng_state", "set_rng_state"]

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def rng_state(device: torch.device) -> dict:
    """Every random stream of this rank. The Gumbel noise of the routers comes from torch's default
    generator of the model's device (``gumbel_route`` is called without a generator)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class CheckpointManager:
    def __init__(self, directory: str, keep_latest: int, world: World):
        self.dir, self.keep, self.world = directory, keep_latest, world
        if world.main:
            os.makedirs(directory, exist_ok=True)

    def complete(self) -> List[int]:
        """Steps of the complete checkpoints, oldest first."""
        if not os.path.isdir(self.dir):
            return []
        steps = []
        for name in os.listdir(self.dir):
            m = _STEP_DIR.match(name)
            if m and os.path.exists(os.path.join(self.dir, name, "meta.json")):
                steps.append(int(m.group(1)))
        return sorted(steps)

    def path(self, step: int) -> str:
        return os.path.join(self.dir, f"step-{step:08d}")

    def save(self, step: int, model: torch.nn.Module, state: Dict, meta: Dict) -> str:
        """Collective: every rank calls it with its own ``state``; returns the directory."""
        final = self.path(step)
        tmp = final + ".tmp"
        if self.world.main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self.world.barrier()
        if self.world.main:
            fa.save_router(model, os.path.join(tmp, "router.safetensors"))
        torch.save(state, os.path.join(tmp, f"rank-{self.world.rank}.pt"))
        self.world.barrier()
        if self.world.main:
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({"step": step, "world_size": self.world.size, **meta}, f, indent=1)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            if self.keep:
                for old in self.complete()[:-self.keep]:
                    shutil.rmtree(self.path(old), ignore_errors=True)
        self.world.barrier()
        return final

    def load_latest(self, model: torch.nn.Module) -> Optional[Dict]:
        """Load the routers of the latest complete checkpoint into ``model`` and return this rank's
        state, or None when there is no checkpoint."""
        steps = self.complete()
        if not steps:
            return None
        path = self.path(steps[-1])
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        if meta["world_size"] != self.world.size:
            raise RuntimeError(f"checkpoint {path} was written by {meta['world_size']} ranks; this job "
                               f"has {self.world.size}. Resume with the same --nproc-per-node (the "
                               "data position is per rank)")
        fa.load_router(model, os.path.join(path, "router.safetensors"))
        # Our own files; weights_only would refuse the numpy RNG state.
        state = torch.load(os.path.join(path, f"rank-{self.world.rank}.pt"), weights_only=False)
        if "qkv" not in state and self.world.rank != 0:
            main = torch.load(os.path.join(path, "rank-0.pt"), weights_only=False)
            if "qkv" in main:
                state["qkv"] = main["qkv"]
        state["path"] = path
        return state
