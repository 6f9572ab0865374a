"""Python entry points of the op library: one function per op, each a call to
``torch.ops.flux_attention.<op>``. Checks, device dispatch and autograd all live in C++; these
wrappers only give keyword arguments and documentation.

Shapes follow FlashAttention. Padded: ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]``. Varlen: ``q
[total_q, Hq, D]``, ``k, v [total_k, Hkv, D]`` with int32 ``cu_seqlens_q / cu_seqlens_k [B + 1]``
(sequence b owns rows ``cu_seqlens[b] : cu_seqlens[b + 1]``). GQA/MQA: ``Hq % Hkv == 0`` and query
head ``h`` reads kv head ``h // (Hq // Hkv)``; K/V are never expanded.

Every attention op returns ``(out, lse)``: ``out`` like ``q``; ``lse`` fp32, the natural-log
log-sum-exp of ``scale * q.k`` over the keys each row sees, ``[B, Hq, Sq]`` (padded) or ``[Hq,
total_q]`` (varlen), so partial results merge exactly. Both are differentiable. A row that sees no
key (causal with ``Sq > Sk``) gets ``out = 0`` and ``lse = -inf``.

NaN/Inf: a non-finite value in a query row, or in a key/value that row attends to, makes that row's
output non-finite; rows of other sequences are unaffected, and memory outside each sequence (padding,
rows past ``cu_seqlens[-1]``, unused cache pages) is never read.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers torch.ops.flux_attention)

_ops = torch.ops.flux_attention

__all__ = [
    "full_attention",
    "sparse_attention",
    "flux_attention",
    "decode_attention",
    "append_kv",
    "pool_queries",
    "gumbel_route",
    "rms_norm",
    "silu_mul",
    "rotary_embedding",
    "decode_linear",
    "decode_swiglu",
    "decode_linear_group",
]


def full_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    causal: bool = False,
    scale: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """Dense attention: ``softmax(scale * q k^T) v`` per (sequence, head).

    Args:
        q: ``[B, Sq, Hq, D]`` or varlen ``[total_q, Hq, D]``; bf16, fp16, fp32 (fp64 on CPU).
        k, v: ``[B, Sk, Hkv, D]`` or varlen ``[total_k, Hkv, D]``, same dtype and device as q.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` offsets for varlen input (both or neither).
        max_seqlen_q, max_seqlen_k: the longest sequence (an upper bound); CUDA sizes its grid from
            them. When omitted they are computed from ``cu_seqlens`` (a host sync on CUDA).
        causal: causal mask, aligned to the bottom right when ``Sq != Sk`` (row i sees keys
            ``j <= i + Sk - Sq``). For Sq = 2, Sk = 5::

                1 1 1 1 0
                1 1 1 1 1

        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        ``(out, lse)``: ``out`` like q; ``lse`` fp32 ``[B, Hq, Sq]`` or ``[Hq, total_q]``.

    >>> q = torch.randn(1, 256, 8, 64); k = v = torch.randn(1, 256, 2, 64)
    >>> out, lse = full_attention(q, k, v, causal=True)
    >>> out.shape, lse.shape
    (torch.Size([1, 256, 8, 64]), torch.Size([1, 8, 256]))
    """
    return _ops.full_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale
    )


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    scale: Optional[float] = None,
    sink_tokens: int = 128,
    local_blocks: int = 16,
    block_size: int = 128,
) -> Tuple[Tensor, Tensor]:
    """Streaming sparse attention (always causal): sink tokens plus a window of local blocks.

    A query at key position ``t`` (block ``r = t // block_size``) sees key ``j <= t`` iff
    ``j < sink_tokens`` or ``j // block_size >= r - (local_blocks - 1)``. Cost grows as
    ``O(S * (sink_tokens + local_blocks * block_size))``. Toy case, block_size 2, one sink block,
    local_blocks 2, 8 tokens (rows = queries, columns = keys)::

        1 . . . . . . .
        1 1 . . . . . .
        1 1 1 . . . . .
        1 1 1 1 . . . .
        1 1 1 1 1 . . .
        1 1 1 1 1 1 . .
        1 1 . . 1 1 1 .
        1 1 . . 1 1 1 1

    Args: as :func:`full_attention`, plus
        sink_tokens: leading tokens every query sees; a positive multiple of ``block_size``.
        local_blocks: blocks of the window, the query's own block included (positive).
        block_size: the block granularity (positive).

    Returns:
        ``(out, lse)`` as :func:`full_attention`.
    """
    return _ops.sparse_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
        sink_tokens, local_blocks, block_size,
    )


def flux_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    use_sparse: Tensor,
    *,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    scale: Optional[float] = None,
    sink_tokens: int = 128,
    local_blocks: int = 16,
    block_size: int = 128,
) -> Tuple[Tensor, Tensor]:
    """Mixed routing in one call: sequence ``b`` takes :func:`sparse_attention` when
    ``use_sparse[b]`` and causal :func:`full_attention` otherwise.

    Args: as :func:`sparse_attention`, plus
        use_sparse: bool ``[B]`` on q's device; read on the device (no host sync).

    Returns:
        ``(out, lse)`` as :func:`full_attention`; each sequence's rows equal running it alone.
    """
    return _ops.flux_attention(
        q, k, v, use_sparse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
        sink_tokens, local_blocks, block_size,
    )


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    *,
    block_table: Optional[Tensor] = None,
    use_sparse: Optional[Tensor] = None,
    scale: Optional[float] = None,
    sink_tokens: int = 128,
    local_blocks: int = 16,
    block_size: int = 128,
) -> Tuple[Tensor, Tensor]:
    """New query tokens against a KV cache that already holds their keys/values: one token per
    sequence (plain decoding) or a few (speculative decoding, ``q [B, Tq, Hq, D]``).

    Args:
        q: ``[B, Hq, D]`` (one new token), or ``[B, Tq, Hq, D]`` for ``Tq`` new tokens per
            sequence (e.g. ``Tq <= 8`` draft tokens to verify): token ``t`` sits at position
            ``cache_seqlens[b] - Tq + t`` and attends causally, i.e. to the cached prefix and to
            the new tokens before it (bottom-right aligned, as :func:`full_attention` with
            ``Sq < Sk``). For Tq = 3 new tokens n0..n2 after 2 cached ones c0, c1::

                      c0 c1 n0 n1 n2
                  n0   1  1  1  0  0
                  n1   1  1  1  1  0
                  n2   1  1  1  1  1

        k_cache, v_cache: contiguous ``[B, capacity, Hkv, D]``, or paged ``[num_pages, page_size,
            Hkv, D]`` with ``block_table``.
        cache_seqlens: int32 ``[B]``, tokens in each sequence's cache including the new ones.
        block_table: int32 ``[B, max_pages]``: logical page i of sequence b is physical page
            ``block_table[b, i]``.
        use_sparse: optional bool ``[B]``: sequences flagged read only their sink and local window
            (the :func:`sparse_attention` rule at each new token's position), so evicted pages are
            never touched and an SA decode costs O(sink + window) whatever the context length.
        scale, sink_tokens, local_blocks, block_size: as :func:`sparse_attention`.

    Returns:
        ``(out, lse)``: out shaped like q; lse fp32 ``[B, Hq]`` (or ``[B, Hq, Tq]``). Not
        differentiable. Rows that see no key (cache_seqlens[b] <= t's offset) give 0 and -inf.

    CUDA: no host synchronisation and a split count fixed by shapes and the cache capacity, so a
    decode step (:func:`append_kv`, ``cache_seqlens += Tq``, this) replays in a CUDA graph. fp16 /
    bf16 with D in {64, 128} run on tensor cores; ``FLUX_DECODE_KERNEL=simt`` forces the CUDA-core
    kernel that serves every other case.

    >>> k_cache = torch.zeros(2, 4096, 8, 128, dtype=torch.bfloat16, device="cuda")
    >>> v_cache = torch.zeros_like(k_cache)
    >>> lens = torch.tensor([100, 3000], dtype=torch.int32, device="cuda")
    >>> k1 = torch.randn(2, 8, 128, dtype=torch.bfloat16, device="cuda"); v1 = torch.randn_like(k1)
    >>> fa.append_kv(k_cache, v_cache, k1, v1, lens)   # writes position lens[b]
    >>> lens += 1
    >>> q = torch.randn(2, 32, 128, dtype=torch.bfloat16, device="cuda")
    >>> out, lse = fa.decode_attention(q, k_cache, v_cache, lens)
    """
    return _ops.decode_attention(
        q, k_cache, v_cache, cache_seqlens, block_table, use_sparse, scale,
        sink_tokens, local_blocks, block_size,
    )


def append_kv(
    k_cache: Tensor,
    v_cache: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    positions: Tensor,
    *,
    block_table: Optional[Tensor] = None,
) -> None:
    """Write new key/value rows into a KV cache, in place, on the cache's device.

    Args:
        k_cache, v_cache: the cache, laid out as for :func:`decode_attention` (contiguous
            ``[B, capacity, Hkv, D]`` or paged ``[num_pages, page_size, Hkv, D]``); written in
            place, so the last dimension must be contiguous.
        k_new, v_new: ``[B, Hkv, D]`` (one row per sequence) or ``[B, Tn, Hkv, D]``, same dtype as
            the cache.
        positions: int32 ``[B]``: row t of sequence b goes to cache position ``positions[b] + t``
            (pass the cache lengths *before* the append, then add Tn to them).
        block_table: int32 ``[B, max_pages]`` for a paged cache; the pages the rows land on must
            be mapped.

    Rows outside the cache (``positions[b] + t`` not in ``[0, capacity)``, or an unmapped page)
    raise on CPU; on CUDA, where checking would need a host sync, they are not written. No host
    synchronisation or allocation: capturable in a CUDA graph.
    """
    _ops.append_kv(k_cache, v_cache, k_new, v_new, positions, block_table)


def pool_queries(
    q: Tensor,
    cu_seqlens: Optional[Tensor] = None,
    pool_size: int = 150,
    *,
    attention_mask: Optional[Tensor] = None,
) -> Tensor:
    """The Layer Router's input: per sequence, the mean of its first and last ``m = min(pool_size,
    n)`` query rows (a row in both counts twice), then the mean over heads.

    Args:
        q: pre-RoPE queries, varlen ``[total, H, D]`` with ``cu_seqlens``, or padded ``[B, S, H, D]``.
        cu_seqlens: int32 ``[B + 1]`` for varlen input.
        pool_size: P, the number of leading and trailing tokens pooled.
        attention_mask: padded input only, ``[B, S]`` (1 = token): valid tokens must form one
            contiguous run (left or right padding), so padding never changes the result.

    Returns:
        ``[B, D]`` in q's dtype (fp32 accumulation); zeros for an empty sequence. Differentiable.
    """
    return _ops.pool_queries(q, cu_seqlens, pool_size, attention_mask)


def gumbel_route(
    logits: Tensor,
    tau: float = 1.0,
    hard: bool = True,
    *,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Straight-through Gumbel-softmax gate of the Layer Router (training).

    ``u ~ U[0, 1)`` per logit (one ``torch.rand(logits.shape, generator=generator)`` draw),
    ``g = -log(-log(u + 1e-10) + 1e-10)``, ``y = softmax((logits + g) / tau)``. The forward value is
    ``1.0`` if ``y[:, 1] > y[:, 0]`` else ``0.0`` (``hard``; ties go to sparse), or ``y[:, 1]``
    (soft); the backward is always the gradient of ``y[:, 1]``.

    Args:
        logits: ``[B, 2]``, index 1 = full attention, index 0 = sparse attention.
        tau: temperature (> 0).
        hard: straight-through hard gate (default) or the soft probability.
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        ``z [B]`` in logits' dtype.
    """
    return _ops.gumbel_route(logits, tau, hard, generator)


# ---- the transformer block's ops outside attention (inference) ----------------------------------
# Fused, memory-bound kernels: one read of each input, one write, fp32 math, one rounding. They have
# no backward; ``flux_attention.fuse_ops(model)`` routes transformers' modules through them.


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """``weight * x / sqrt(mean(x**2, -1) + eps)`` over the last dimension (Llama's RMSNorm), in
    fp32, rounded once to x's dtype. ``weight``: ``[x.shape[-1]]``, x's dtype. Inference only."""
    return _ops.rms_norm(x, weight, eps)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` (the SwiGLU MLP's activation), in fp32, rounded once. Inference only."""
    return _ops.silu_mul(gate, up)


def rotary_embedding(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor]:
    """transformers' ``apply_rotary_pos_emb`` (rotate_half convention) for q ``[B, Hq, S, D]`` and
    k ``[B, Hk, S, D]`` with ``cos, sin [B or 1, S, D]``, in fp32, rounded once. The outputs keep
    q's and k's memory layouts (a ``[B, H, S, D]`` view of ``[B, S, H, D]`` memory stays one), so
    attention reads them without a transposing copy. Inference only."""
    return _ops.rotary_embedding(q, k, cos, sin)


def decode_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ weight.T + bias`` for decode's few token rows: ``x [..., in]`` with at most 8 rows (the
    product of its leading dimensions), ``weight [out, in]`` (nn.Linear's layout), ``bias [out]``,
    one dtype. A stream of the weight at HBM bandwidth, fp32 accumulation, one rounding. Inference
    only; for more rows use ``torch.nn.functional.linear``."""
    return _ops.decode_linear(x, weight, bias)


def decode_swiglu(x: Tensor, gate_weight: Tensor, up_weight: Tensor) -> Tensor:
    """``silu(x @ gate_weight.T) * (x @ up_weight.T)`` (the SwiGLU MLP before its down projection)
    for at most 8 token rows, in one pass over both weights; gate and up never reach memory.
    Inference only."""
    return _ops.decode_swiglu(x, gate_weight, up_weight)


def decode_linear_group(x: Tensor, weights: Sequence[Tensor],
                        biases: Optional[Sequence[Optional[Tensor]]] = None) -> List[Tensor]:
    """``[decode_linear(x, w, b) for w, b in zip(weights, biases)]`` in one launch: 1-3 weights
    (a layer's q, k and v projections) of one input stream as one grid, which saves the small
    matrices' launch ramp-up and tail. ``biases``: None, or one tensor or None per weight.
    Inference only."""
    return _ops.decode_linear_group(x, list(weights), [] if biases is None else list(biases))
