"""Context parallelism (Ulysses style) for long packs: the ``cp`` ranks of a group share one pack.

Each rank holds a contiguous ``T / cp`` slice of the pack's tokens through the whole model
(embeddings, norms, projections, MLPs and the loss are per token). Around attention only, an
all-to-all over heads turns the sequence shards into head shards: q ``[T/cp, Hq, D]`` ->
``[T, Hq/cp, D]`` (k, v alike with Hkv/cp heads, so GQA groups stay whole), the ``flux_attention``
ops see whole sequences with the pack's own ``cu_seqlens``, and a second all-to-all brings the
output back to ``[T/cp, Hq, D]``.

The router must decide once per sequence and layer on all ranks. Its input, the pre-RoPE
queries, takes the same all-to-all; ``pool_queries`` then averages the local heads, and a
differentiable all-reduce (mean over the group) completes the mean over all heads before the
router MLP (a forward pre-hook on each router), so every rank computes the same logits. The
ranks of a group share their Gumbel seed (``train.seed + dp_rank``), hence the same draws and the
same decisions; the trainer checks that once per step.

Loss shares: rank r of a group computes the cross-entropy of its own tokens divided by the
pack's labelled-token count, plus ``1/cp`` of the pack's regulariser; the sum over the group is
the pack's loss, and ``parallel.all_reduce_grads`` sums the group's gradients.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flux_attention import hf

from .data import Pack

__all__ = ["enable_context_parallel", "local_shard", "check_same_decisions", "seq_to_heads", "heads_to_seq"]

IMPLEMENTATION = "flux_cp"
_group = None  # the context-parallel process group of this rank (set by enable_context_parallel)


def _size(group) -> int:
    return dist.get_world_size(group)


def _seq_to_heads(x: Tensor, group) -> Tensor:
    """``[T/cp, H, D]`` (this rank's tokens, all heads) -> ``[T, H/cp, D]`` (all tokens, this
    rank's heads); rank i's tokens come i-th, i.e. in sequence order."""
    c = _size(group)
    t, h, d = x.shape
    send = x.reshape(t, c, h // c, d).transpose(0, 1).contiguous()  # (c: head group, t, h/c, d)
    recv = torch.empty_like(send)  # (c: source rank = token slice, t, h/c, d)
    dist.all_to_all_single(recv, send, group=group)
    return recv.view(c * t, h // c, d)


def _heads_to_seq(y: Tensor, group) -> Tensor:
    """Inverse of :func:`_seq_to_heads`: ``[T, H/cp, D]`` -> ``[T/cp, H, D]``."""
    c = _size(group)
    total, hc, d = y.shape
    send = y.reshape(c, total // c, hc, d).contiguous()  # (c: destination = token slice, t, h/c, d)
    recv = torch.empty_like(send)  # (c: source rank = head group, t, h/c, d)
    dist.all_to_all_single(recv, send, group=group)
    return recv.transpose(0, 1).reshape(total // c, c * hc, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad.contiguous(), ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group):
        ctx.group = group
        return _heads_to_seq(y, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad.contiguous(), ctx.group), None


class _MeanAcross(torch.autograd.Function):
    """Mean over the group; its backward is the mean of the incoming gradients (every rank's
    loss share depends on the mean)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out / _size(group)

    @staticmethod
    def backward(ctx, grad):
        g = grad.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g / _size(ctx.group), None


def seq_to_heads(x: Tensor, group) -> Tensor:
    return _SeqToHeads.apply(x, group)


def heads_to_seq(y: Tensor, group) -> Tensor:
    return _HeadsToSeq.apply(y, group)


def _routed(module: nn.Module) -> bool:
    """The layer's router will pool queries in this forward (not forced to a branch)."""
    router = getattr(module, "mask_allocator", None)
    if router is None:
        return False
    cfg = router.config
    return cfg.force is None and module.layer_idx not in cfg.force_sparse_layers


def cp_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                         dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers attention function ``"flux_cp"``: the all-to-alls around
    :func:`flux_attention.hf.flux_attention_forward` (packed input with ``cu_seq_lens_q`` only).

    ``query [1, Hq, T/cp, D]``, ``key/value [1, Hkv, T/cp, D]`` -> ``(out [1, T/cp, Hq, D], None)``."""
    group = _group
    if kwargs.get("cu_seq_lens_q") is None or query.shape[0] != 1:
        raise ValueError("context parallelism runs packed training input only (one row, "
                         "cu_seq_lens_q of the whole pack)")
    rows = lambda x: x[0].transpose(0, 1)  # noqa: E731  [1, H, t, D] -> [t, H, D]
    q, k, v = (seq_to_heads(rows(x), group) for x in (query, key, value))
    q_pre = module.__dict__.get("_flux_q")
    if q_pre is not None:
        if _routed(module):
            # [t, Hq, D] of this rank's rows -> [1, T, Hq / cp, D]: the [batch, rows, heads, D] that
            # hf.flux_attention_forward reads from a captured q_proj output.
            module.__dict__["_flux_q"] = seq_to_heads(q_pre.reshape(query.shape[2], query.shape[1], -1), group)[None]
        else:
            del module._flux_q  # a forced layer does not pool: skip its all-to-all
    cols = lambda x: x.transpose(0, 1)[None]  # noqa: E731  [T, h, D] -> [1, h, T, D]
    out, _ = hf.flux_attention_forward(module, cols(q), cols(k), cols(v), attention_mask, dropout,
                                       scaling, is_causal, **kwargs)
    return heads_to_seq(out[0], group)[None], None


def _pooled_mean_hook(router, args):
    return (_MeanAcross.apply(args[0], _group),) + tuple(args[1:])


def enable_context_parallel(model: nn.Module, group) -> None:
    """Switch a model with attached routers to ``"flux_cp"`` over ``group``."""
    global _group
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    c = _size(group)
    cfg = model.config
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    if heads % c or kv % c:
        raise ValueError(f"dist.context_parallel={c} must divide the attention heads ({heads}) and "
                         f"the kv heads ({kv}): the all-to-all splits heads over the group")
    _group = group
    AttentionInterface.register(IMPLEMENTATION, cp_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, hf.flux_attention_mask)
    model.set_attn_implementation(IMPLEMENTATION)
    for router in hf.routers(model).values():
        router.register_forward_pre_hook(_pooled_mean_hook)


def local_shard(pack: Pack, cp_rank: int, cp: int) -> Pack:
    """This rank's contiguous token slice of ``pack`` (``cu_seqlens``, ``max_seqlen`` and
    ``tasks`` stay those of the whole pack)."""
    total = pack.input_ids.numel()
    if total % cp:
        raise ValueError(f"a pack of {total} tokens does not split over {cp} context-parallel ranks")
    t = total // cp
    part = slice(cp_rank * t, (cp_rank + 1) * t)
    return dataclasses.replace(pack, input_ids=pack.input_ids[part], labels=pack.labels[part],
                               position_ids=pack.position_ids[part])


def check_same_decisions(use_sparse: Tensor, world) -> None:
    """Raise unless every rank of this rank's context-parallel group routed as it did (one small
    all-reduce): a mismatch would mix FA and SA heads within one layer."""
    mine = use_sparse.to(world.device, torch.float32)
    top = mine.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=world.cp_group)
    if not torch.equal(mine, top):
        raise RuntimeError(f"rank {world.rank}: the ranks of its context-parallel group routed "
                           "differently; they must share train.seed and see the same pack")
