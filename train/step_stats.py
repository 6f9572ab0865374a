"""One optimiser step's statistics: each rank adds its share of every pack it worked on, on the
device (no host sync per micro-batch), and one all-reduce at the end of the step sums the ranks.

A rank of a context-parallel group holds ``1/cp`` of a pack, so it adds ``1/cp`` of the pack-level
quantities (regulariser, SA fractions, token and pack counts) and its own tokens' share of the
token-level ones (the loss terms are already divided by the pack's labelled-token count)."""

from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import Tensor

from .loss import class_onehot
from .parallel import World, all_reduce_sum

__all__ = ["StepStats"]

_SCALARS = ("loss", "lm_loss", "kl_loss", "reg_loss", "tokens", "packs")


class StepStats:
    def __init__(self, class_names: Sequence[str], layers: int, device: torch.device):
        self.names, self.layers = tuple(class_names), layers
        c = len(self.names)
        # scalars | SA sum per class | sequences per class | SA per layer
        self.sums = torch.zeros(len(_SCALARS) + 2 * c + layers, dtype=torch.float64, device=device)
        self.per_layer = torch.zeros(layers, dtype=torch.float64)  # host: decisions arrive there

    def add_pack(self, share: float, loss: Tensor, ce: Tensor, kl: Tensor, reg: Tensor, s: Tensor,
                 tasks: Tensor, labelled: int, real_tokens: int) -> None:
        """``loss`` this rank's loss share; ``ce``, ``kl`` sums over its tokens; ``reg`` the pack's
        regulariser; ``s [n]`` the SA fraction and ``tasks [n]`` the class of each real sequence."""
        c, k = len(self.names), len(_SCALARS)
        x = self.sums
        x[:4] += torch.stack([loss.detach().double(), ce.double() / labelled, kl.double() / labelled,
                              reg.detach().double() * share])
        x[4] += real_tokens * share  # host scalars are kernel arguments: no copy
        x[5] += share
        onehot = class_onehot(tasks, c, torch.float64)
        x[k:k + c] += (s.detach().double() * share) @ onehot
        x[k + c:k + 2 * c] += onehot.sum(0) * share

    def add_decisions(self, use_sparse: Tensor, share: float) -> None:
        """``use_sparse [layers, n]`` (host bool) of the pack's real sequences."""
        self.per_layer += use_sparse.double().mean(1) * share

    def finish(self, world: World) -> Dict:
        c, k = len(self.names), len(_SCALARS)
        x = self.sums
        x[k + 2 * c:] += self.per_layer.to(x.device)
        x = all_reduce_sum(x, world).cpu()
        packs = x[5].item()
        per_class, counts = x[k:k + c], x[k + c:k + 2 * c]
        out = {name: x[i].item() / packs for i, name in enumerate(_SCALARS[:4])}
        out.update({
            "sa_fraction": (per_class.sum() / counts.sum()).item(),
            "sa_fraction_per_task": {self.names[i]: (per_class[i] / counts[i]).item()
                                     for i in range(c) if counts[i] > 0},
            "sa_fraction_per_layer": (x[k + 2 * c:] / packs).tolist(),
            "tokens": int(round(x[4].item())),
        })
        return out
