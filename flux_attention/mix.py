"""The training-time mix of the two branches, ``out = z * FA + (1 - z) * SA`` per sequence, for a hard
straight-through gate ``z`` (0/1 in value, the soft Gumbel gradient behind it).

With ``z`` hard, the branch that was not taken is multiplied by 0, so its backward contributes
exactly nothing to dq, dk, dv. :func:`routed_mix` therefore runs both forwards (the router's
gradient needs both outputs: ``dL/dz_b = <dout, FA - SA>`` over the rows of sequence b) but only
one backward, the ``flux_attention`` backward of the taken branch per sequence, instead of the
backward of both (autograd through ``z * fa + (1 - z) * sa`` would run both, plus three
full-size elementwise temporaries).

The two forward outputs are the ``full_attention`` and ``sparse_attention`` op outputs themselves,
so a selective activation-checkpointing policy that saves those ops (``train.model``) also keeps
this function from recomputing attention.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops

__all__ = ["routed_mix"]

_ROWS_PER_CHUNK = 4096  # rows of the fp32 <dout, FA - SA> reduction at a time (bounds its memory)
_FLUX_MODE = 2  # attention_backward's sparse_mode for per-sequence FA/SA (csrc/ops/autograd.cpp)


def _row_dots(dout: Tensor, fa: Tensor, sa: Tensor) -> Tensor:
    """``<dout[r], fa[r] - sa[r]>`` for every leading-dim row r, accumulated in fp32."""
    rows = dout.shape[0]
    d, f, s = dout.reshape(rows, -1), fa.reshape(rows, -1), sa.reshape(rows, -1)
    out = torch.empty(rows, dtype=torch.float32, device=dout.device)
    for a in range(0, rows, _ROWS_PER_CHUNK):
        b = a + _ROWS_PER_CHUNK
        out[a:b] = (d[a:b].float() * (f[a:b].float() - s[a:b].float())).sum(1)
    return out


class _RoutedMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, z, cu_q, cu_k, max_q, max_k, scale, sink_tokens, local_blocks, block_size):
        kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, scale=scale)
        fa, lse_fa = ops.full_attention(q, k, v, causal=True, **kw)
        sa, lse_sa = ops.sparse_attention(q, k, v, sink_tokens=sink_tokens, local_blocks=local_blocks,
                                          block_size=block_size, **kw)
        use_sparse = z < 0.5
        if cu_q is None:  # padded [B, S, H, D]: sequence b is batch row b; lse [B, H, S]
            out = torch.where(use_sparse.view(-1, 1, 1, 1), sa, fa)
            lse = torch.where(use_sparse.view(-1, 1, 1), lse_sa, lse_fa)
        else:  # varlen [total, H, D]; lse [H, total]
            n = cu_q.shape[0] - 1
            seq = torch.repeat_interleave(torch.arange(n, device=q.device), cu_q.diff().long(),
                                          output_size=q.shape[0])
            rows = use_sparse[seq]
            out = torch.where(rows.view(-1, 1, 1), sa, fa)
            lse = torch.where(rows.view(1, -1), lse_sa, lse_fa)
        ctx.save_for_backward(q, k, v, out, lse, fa, sa, use_sparse, cu_q, cu_k)
        ctx.args = (max_q, max_k, scale, sink_tokens, local_blocks, block_size)
        ctx.z_dtype = z.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, fa, sa, use_sparse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, scale, sink_tokens, local_blocks, block_size = ctx.args
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        dout = dout.contiguous()
        dq = dk = dv = None
        if any(ctx.needs_input_grad[:3]):
            dq, dk, dv = torch.ops.flux_attention.attention_backward(
                dout, None, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, True, scale, _FLUX_MODE,
                use_sparse, sink_tokens, local_blocks, block_size)
        dz = None
        if ctx.needs_input_grad[3]:
            if cu_q is None:  # rows = the B * S tokens of the padded batch
                b, s = dout.shape[:2]
                dz = _row_dots(dout.reshape(b * s, -1), fa.reshape(b * s, -1), sa.reshape(b * s, -1))
                dz = dz.view(b, s).sum(1)
            else:
                # Per-sequence sums of the per-row dots by differences of one fp64 prefix sum:
                # deterministic (no atomics) and exact enough at 128K rows.
                csum = torch.nn.functional.pad(_row_dots(dout, fa, sa).double().cumsum(0), (1, 0))
                cu = cu_q.long()
                dz = csum[cu[1:]] - csum[cu[:-1]]
            dz = dz.to(ctx.z_dtype)
        return dq, dk, dv, dz, None, None, None, None, None, None, None, None


def routed_mix(q: Tensor, k: Tensor, v: Tensor, z: Tensor, *, cu_seqlens_q: Optional[Tensor] = None,
               cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: Optional[int] = None,
               max_seqlen_k: Optional[int] = None, scale: Optional[float] = None,
               sink_tokens: int = 128, local_blocks: int = 16, block_size: int = 128) -> Tensor:
    """``z * full_attention(causal) + (1 - z) * sparse_attention`` per sequence, for a hard gate.

    Args:
        q, k, v: as :func:`flux_attention.full_attention` (padded ``[B, S, H, D]`` or varlen).
        z: ``[B]``, 1.0 = FA, 0.0 = SA (the straight-through gate of ``gumbel_route(hard=True)``);
            differentiable. Values other than 0/1 are not supported (the backward of the branch
            not taken is skipped).
        the rest: as :func:`flux_attention.sparse_attention`.

    Returns:
        ``out`` like q. Gradients: dq, dk, dv of the taken branch of each sequence (one
        ``flux_attention`` backward) and ``dz[b] = <dout, FA - SA>`` over sequence b's rows.
    """
    return _RoutedMix.apply(q, k, v, z, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                            sink_tokens, local_blocks, block_size)
