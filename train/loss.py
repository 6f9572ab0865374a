"""The objective: next-token cross-entropy over the packed sequences (optionally plus KL
distillation to the all-FA model) plus the per-task Lagrangian sparsity term,
``lambda1[t] * |s - s_t| + lambda2[t] * (s - s_t)^2`` (DESIGN.md section 1)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Multipliers", "head_loss", "sparsity_loss", "class_onehot"]


class Multipliers(nn.Module):
    """Lagrange multipliers, one pair per task class (trained by ascent in their own optimizer)."""

    def __init__(self, num_classes: int, init: float, generator: torch.Generator):
        super().__init__()
        # The reference draws U[0, 0.5): both terms are active from the first step.
        self.lambda1 = nn.Parameter(torch.rand(num_classes, generator=generator) * init)
        self.lambda2 = nn.Parameter(torch.rand(num_classes, generator=generator) * init)


def _chunk_loss(h: Tensor, weight: Tensor, y: Tensor, h_teacher: Optional[Tensor], lm_w: float,
                kl_w: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``(ce_sum, kl_sum, dlogits)`` of one chunk of rows; rows with label -100 count nothing.

    dlogits (fp32, the gradient of ``lm_w * ce_sum + kl_w * kl_sum`` w.r.t. the student logits)
    is ``lm_w * (p - onehot(y)) + kl_w * (p - p_teacher)`` on labelled rows, 0 elsewhere."""
    valid = (y != -100).float()
    rows = torch.arange(y.shape[0], device=y.device)
    target = y.clamp(min=0)
    acc = torch.promote_types(h.dtype, torch.float32)  # fp32 for bf16/fp16 models (fp64 stays fp64)
    valid = valid.to(acc)
    logp = (h @ weight.t()).to(acc)
    logp -= torch.logsumexp(logp, dim=1, keepdim=True)  # in place: one [rows, vocab] fp32 buffer
    ce = -(logp[rows, target] * valid).sum()
    kl = ce.new_zeros(())
    q = None
    if h_teacher is not None:
        logq = (h_teacher @ weight.t()).to(acc)
        logq -= torch.logsumexp(logq, dim=1, keepdim=True)
        # KL(q || p) = sum_v q (log q - log p), per row
        kl = (F.kl_div(logp, logq, reduction="none", log_target=True).sum(1) * valid).sum()
        q = logq.exp_()
    grad = logp.exp_()  # p, reusing the buffer
    if q is not None:
        grad.mul_(lm_w + kl_w).sub_(q, alpha=kl_w)
        del q
    else:
        grad.mul_(lm_w)
    grad[rows, target] -= lm_w * valid  # unique (row, column) pairs: deterministic, no atomics
    grad.mul_(valid[:, None])
    return ce, kl, grad


class _HeadLoss(torch.autograd.Function):
    """Chunked vocabulary projection + loss whose gradient w.r.t. ``hidden`` is formed in the
    forward, chunk by chunk: the ``[T, vocab]`` logits never exist at once and are never
    recomputed (the frozen head needs no weight gradient, so ``dhidden = dlogits @ W`` is all the
    backward needs)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, h_teacher, lm_w, kl_w, chunk):
        grad_hidden = torch.empty_like(hidden)
        acc = torch.promote_types(hidden.dtype, torch.float32)
        ce = hidden.new_zeros((), dtype=acc)
        kl = hidden.new_zeros((), dtype=acc)
        for a in range(0, hidden.shape[0], chunk):
            b = a + chunk
            ht = None if h_teacher is None else h_teacher[a:b]
            c_ce, c_kl, g = _chunk_loss(hidden[a:b], weight, labels[a:b], ht, lm_w, kl_w)
            ce += c_ce
            kl += c_kl
            grad_hidden[a:b] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            del g
        ctx.save_for_backward(grad_hidden)
        ctx.mark_non_differentiable(ce, kl)
        return lm_w * ce + kl_w * kl, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None, None, None, None


def head_loss(head: nn.Module, hidden: Tensor, labels: Tensor, chunk: int, lm_weight: float = 1.0,
              kl_weight: float = 0.0, teacher_hidden: Optional[Tensor] = None,
              rows: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``(loss_sum, ce_sum, kl_sum)`` over the labelled rows of ``hidden [T, H]``.

    ``loss_sum = lm_weight * ce_sum + kl_weight * kl_sum`` is differentiable w.r.t. ``hidden``;
    ``ce_sum`` (next-token cross-entropy) and ``kl_sum`` (KL(teacher || student) of the next-token
    distributions; needs ``teacher_hidden [T, H]``, the all-FA model's final hidden states) are
    detached, for logging. ``head`` is the frozen output projection (a bias-free ``nn.Linear``);
    ``chunk`` rows are projected at a time. No host sync.

    ``rows`` (int64 indices, on ``hidden``'s device), when given, lists the labelled rows: only they
    go through the vocabulary projection (with ``loss_on: answer`` a tenth of the pack); the others
    contribute nothing to the loss either way, so the result is the same sum."""
    weight = head.weight
    if weight.requires_grad:
        raise ValueError("head_loss: the output head is trainable; it computes no weight gradient")
    if getattr(head, "bias", None) is not None:
        raise ValueError("head_loss: output heads with a bias are not supported")
    if kl_weight and teacher_hidden is None:
        raise ValueError("head_loss: kl_weight > 0 needs teacher_hidden")
    teacher = teacher_hidden if kl_weight else None
    if rows is not None:
        hidden, labels = hidden.index_select(0, rows), labels.index_select(0, rows)
        teacher = None if teacher is None else teacher.index_select(0, rows)
    return _HeadLoss.apply(hidden, weight, labels, teacher, float(lm_weight), float(kl_weight), int(chunk))


def sparsity_loss(s: Tensor, tasks: Tensor, mult: Multipliers, targets: Sequence[float]) -> Tensor:
    """The reference's regulariser: per sequence ``R_b = l1[t_b] |s_b - s*_b| + l2[t_b] (s_b - s*_b)^2``,
    averaged within each task class present, then over those classes.

    ``s [n]`` is the SA fraction of each sequence (``flux_attention.collect_sparsity``), ``tasks [n]``
    their class indices. No host sync."""
    target = torch.tensor(targets, dtype=s.dtype, device=s.device)[tasks]
    diff = s - target
    per_seq = mult.lambda1[tasks] * diff.abs() + mult.lambda2[tasks] * diff.pow(2)
    onehot = class_onehot(tasks, mult.lambda1.shape[0], per_seq.dtype)
    sums, counts = per_seq @ onehot, onehot.sum(0)
    present = (counts > 0).to(per_seq.dtype)
    return (sums / counts.clamp(min=1)).sum() / present.sum()


def class_onehot(tasks: Tensor, classes: int, dtype: torch.dtype) -> Tensor:
    """``[n, classes]`` one-hot of the class indices: per-class sums as a matmul, which unlike
    ``index_add`` on CUDA has no atomics (bitwise-repeatable losses)."""
    return (tasks[:, None] == torch.arange(classes, device=tasks.device)[None]).to(dtype)
