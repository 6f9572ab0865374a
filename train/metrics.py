"""Metrics on rank 0: a progress bar, one JSON line per logged step, optionally TensorBoard."""

from __future__ import annotations

import json
import os
import resource

import torch

from .config import MetricsConfig

__all__ = ["MetricsLogger", "peak_memory_gib"]


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the peak resident set of this process on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    def __init__(self, cfg: MetricsConfig, enabled: bool, total_steps: int, start_step: int):
        self.cfg, self.enabled = cfg, enabled
        self.bar = self.file = self.tb = None
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(cfg.file)), exist_ok=True)
        # Appending keeps the history of a resumed run in one file; readers take the last line of a step.
        self.file = open(cfg.file, "a")
        if cfg.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(cfg.tensorboard)

    def log(self, step: int, record: dict, force: bool = False) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", sa=f"{record['sa_fraction']:.2f}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
        if step % self.cfg.log_every and not force:
            return
        self.file.write(json.dumps({"step": step, **record}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
                elif isinstance(value, dict):
                    for k, v in value.items():
                        if isinstance(v, (int, float)):
                            self.tb.add_scalar(f"{key}/{k}", v, step)

    def close(self) -> None:
        for h in (self.bar, self.tb, self.file):
            if h is not None:
                h.close()
        self.bar = self.tb = self.file = None
