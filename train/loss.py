"""The objective: next-token cross-entropy over the packed sequences plus the per-task Lagrangian
sparsity term, ``lambda1[t] * |s - s_t| + lambda2[t] * (s - s_t)^2`` (DESIGN.md section 1)."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["Multipliers", "chunked_lm_loss", "sparsity_loss"]


class Multipliers(nn.Module):
    """Lagrange multipliers, one pair per task class (trained by ascent in their own optimizer)."""

    def __init__(self, num_classes: int, init: float, generator: torch.Generator):
        super().__init__()
        # The reference draws U[0, 0.5): both terms are active from the first step.
        self.lambda1 = nn.Parameter(torch.rand(num_classes, generator=generator) * init)
        self.lambda2 = nn.Parameter(torch.rand(num_classes, generator=generator) * init)


def _ce_sum(head: nn.Module, hidden: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=-100, reduction="sum")


def chunked_lm_loss(head: nn.Module, hidden: Tensor, labels: Tensor, chunk: int) -> Tuple[Tensor, int]:
    """``(sum of token cross-entropies, number of labelled tokens)``.

    ``hidden [T, H]`` goes through the vocabulary projection ``chunk`` rows at a time, each chunk
    recomputed in the backward, so the ``[T, vocab]`` logits never exist at once (at 64K tokens and a
    128K vocabulary they would take 32 GiB in fp32)."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk], labels[start:start + chunk]
        if bool((y != -100).any()):
            total = total + checkpoint(_ce_sum, head, h, y, use_reentrant=False)
    return total, int((labels != -100).sum())


def sparsity_loss(s: Tensor, tasks: Tensor, mult: Multipliers, targets: Sequence[float]) -> Tensor:
    """The reference's regulariser: per sequence ``R_b = l1[t_b] |s_b - s*_b| + l2[t_b] (s_b - s*_b)^2``,
    averaged within each task class present, then over those classes.

    ``s [n]`` is the SA fraction of each sequence (``flux_attention.collect_sparsity``), ``tasks [n]``
    their class indices."""
    target = torch.tensor(targets, dtype=s.dtype, device=s.device)[tasks]
    diff = s - target
    per_seq = mult.lambda1[tasks] * diff.abs() + mult.lambda2[tasks] * diff.pow(2)
    classes = torch.unique(tasks)
    means = [per_seq[tasks == c].mean() for c in classes.tolist()]
    return torch.stack(means).mean()
