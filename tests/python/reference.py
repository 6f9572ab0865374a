"""Plain-torch references for every flux_attention op.

Nothing here imports flux_attention or shares code with the kernels: the streaming rule is written
again from DESIGN.md section 1 as `arange` comparisons, attention is a dense masked softmax, decode
gathers the cache into a dense sequence, pooling is slicing and `mean`.

Every attention reference works one sequence at a time in `dtype` (float64 by default, the truth).
Called with the inputs' own low dtype it plays "PyTorch in that dtype" (scores, softmax and the
output product rounded to the low dtype, as FlashAttention's tests do with upcast=False), which sets
the error budget of the 2x rule in utils.py.
"""

import math

import torch

# Dtypes the reference runs "as PyTorch would" (rounded scores and probabilities) rather than exactly.
_LOW = (torch.float16, torch.bfloat16, torch.float32)


def visible_mask(seqlen_q, seqlen_k, *, causal, streaming=False, sink_tokens=128, local_blocks=16,
                 block_size=128, device=None):
    """Bool [seqlen_q, seqlen_k]: does query row i see key j.

    Causal rows sit at key position t = i + seqlen_k - seqlen_q (bottom-right aligned) and see j <= t.
    Streaming rows (always causal) additionally need j < sink_tokens or
    floor(j / block_size) >= floor(t / block_size) - (local_blocks - 1).
    """
    i = torch.arange(seqlen_q, device=device).unsqueeze(1)
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)
    if not (causal or streaming):
        return torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    t = i + (seqlen_k - seqlen_q)
    mask = j <= t
    if streaming:
        t_block = torch.div(t, block_size, rounding_mode="floor")
        j_block = torch.div(j, block_size, rounding_mode="floor")
        mask = mask & ((j < sink_tokens) | (j_block >= t_block - (local_blocks - 1)))
    return mask


def _attend(q, k, v, mask, scale, dtype):
    """One sequence: q [Lq, Hq, D], k/v [Lk, Hkv, D], mask [Lq, Lk] -> out [Lq, Hq, D], lse [Hq, Lq].

    In float64 the softmax is written so that rows seeing no key give out = 0 and lse = -inf with
    finite (zero) gradients: the row maximum is detached (it cancels in both results) and every NaN
    that 0 * inf produces lands on masked positions, whose gradient `where` discards.
    """
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if k.shape[0] == 0:  # no keys at all; the 0 * sum keeps every input in the autograd graph
        link = 0 * (q.sum() + k.sum() + v.sum())
        out = torch.zeros_like(q) + link
        lse_dtype = torch.float32 if dtype in _LOW else dtype
        lse = torch.full((q.shape[1], q.shape[0]), -math.inf, dtype=lse_dtype, device=q.device) + link
        return out, lse
    # Keys no row sees may hold anything (tests put NaN there): keep them out of 0 * NaN products.
    seen = mask.to(v.device).any(dim=0)[:, None, None]
    k = torch.where(seen, k, torch.zeros_like(k))
    v = torch.where(seen, v, torch.zeros_like(v))
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q * scale if dtype in _LOW else q, k)
    if dtype not in _LOW:
        scores = scores * scale
    mask = mask.to(scores.device).unsqueeze(0)
    if dtype in _LOW:
        # PyTorch's own low-precision path: scores and probabilities rounded to the input dtype.
        lse = torch.logsumexp(scores.float().masked_fill(~mask, -math.inf), dim=-1)
        probs = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1)
        probs = probs.masked_fill(~mask, 0).to(v.dtype)  # NaN rows (nothing visible) -> 0
        out = torch.einsum("hqk,khd->qhd", probs, v)
        return out, lse
    neg_inf = torch.tensor(-math.inf, dtype=dtype, device=scores.device)
    masked = torch.where(mask, scores, neg_inf)
    row_max = masked.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(masked - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    lse = (torch.log(denom) + row_max).squeeze(-1)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.einsum("hqk,khd->qhd", e / safe, v)
    return out, lse


def _bounds(cu_seqlens, batch, length):
    if cu_seqlens is None:
        return [(b, 0, length) for b in range(batch)]
    cu = cu_seqlens.tolist()
    return [(None, cu[b], cu[b + 1] - cu[b]) for b in range(len(cu) - 1)]


def attention_ref(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, causal=False, scale=None,
                  sparse=False, sink_tokens=128, local_blocks=16, block_size=128, dtype=torch.float64):
    """Reference for full_attention / sparse_attention / flux_attention.

    sparse: False (dense, `causal` as given), True (streaming, causal) or a bool sequence [B] (per
    sequence streaming; dense causal otherwise, the flux_attention rule).
    Padded q [B, Sq, Hq, D] -> out [B, Sq, Hq, D], lse [B, Hq, Sq]; varlen q [total_q, Hq, D] with
    cu_seqlens -> out [cu_q[-1], Hq, D], lse [Hq, cu_q[-1]]: rows past cu_seqlens_q[-1] are not
    part of the result (the caller compares only the rows the op defines).
    Results are in `dtype` (lse float32 for low dtypes), differentiable wrt q, k, v.
    """
    varlen = cu_seqlens_q is not None
    head_dim = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    batch = (len(cu_seqlens_q) - 1) if varlen else q.shape[0]
    if isinstance(sparse, bool):
        flags = [sparse] * batch
    else:
        flags = [bool(x) for x in (sparse.tolist() if torch.is_tensor(sparse) else sparse)]
    if not isinstance(sparse, bool):
        causal = True  # flux_attention: the dense sequences are causal
    q_spans = _bounds(cu_seqlens_q, batch, None if varlen else q.shape[1])
    k_spans = _bounds(cu_seqlens_k, batch, None if varlen else k.shape[1])
    outs, lses = [], []
    for b in range(batch):
        _, q0, lq = q_spans[b]
        _, k0, lk = k_spans[b]
        if varlen:
            qb, kb, vb = q[q0:q0 + lq], k[k0:k0 + lk], v[k0:k0 + lk]
        else:
            qb, kb, vb = q[b], k[b], v[b]
        mask = visible_mask(lq, lk, causal=causal or flags[b], streaming=flags[b],
                            sink_tokens=sink_tokens, local_blocks=local_blocks,
                            block_size=block_size, device=q.device)
        out, lse = _attend(qb, kb, vb, mask, scale, dtype)
        outs.append(out)
        lses.append(lse)
    if varlen:
        return torch.cat(outs, dim=0), torch.cat(lses, dim=1)
    return torch.stack(outs, dim=0), torch.stack(lses, dim=0)


def gather_cache(cache, b, length, block_table=None):
    """Keys/values 0..length-1 of sequence b from a contiguous [B, cap, H, D] or paged
    [pages, page_size, H, D] cache, as a dense [length, H, D] tensor."""
    if block_table is None:
        return cache[b, :length]
    page_size = cache.shape[1]
    n_pages = -(-length // page_size)
    pages = block_table[b, :n_pages].long().to(cache.device)
    return cache[pages].reshape(-1, *cache.shape[2:])[:length]


def decode_ref(q, k_cache, v_cache, cache_seqlens, *, block_table=None, use_sparse=None, scale=None,
               sink_tokens=128, local_blocks=16, block_size=128, dtype=torch.float64):
    """Reference for decode_attention. q [B, Hq, D] is the token at position cache_seqlens[b] - 1;
    q [B, Tq, Hq, D] holds Tq tokens at positions cache_seqlens[b] - Tq + t, causal among themselves
    (bottom-right aligned). Each attends to the cached keys (with the streaming rule of its own
    position where use_sparse[b]). -> out shaped like q, lse [B, Hq] (or [B, Hq, Tq])."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    multi = q.dim() == 4
    qq = q if multi else q[:, None]
    new_tokens = qq.shape[1]
    lengths = cache_seqlens.tolist()
    flags = [False] * len(lengths) if use_sparse is None else [bool(x) for x in use_sparse.tolist()]
    outs, lses = [], []
    for b, length in enumerate(lengths):
        kb = gather_cache(k_cache, b, length, block_table)
        vb = gather_cache(v_cache, b, length, block_table)
        mask = visible_mask(new_tokens, length, causal=True, streaming=flags[b], sink_tokens=sink_tokens,
                            local_blocks=local_blocks, block_size=block_size, device=q.device)
        out, lse = _attend(qq[b], kb, vb, mask, scale, dtype)  # [Tq, Hq, D], [Hq, Tq]
        outs.append(out if multi else out[0])
        lses.append(lse if multi else lse[:, 0])
    return torch.stack(outs, dim=0), torch.stack(lses, dim=0)


def append_kv_ref(k_cache, v_cache, k_new, v_new, positions, *, block_table=None):
    """Reference for append_kv: copies of the caches with row t of sequence b written at position
    positions[b] + t (through block_table when paged). k_new [B, Hkv, D] or [B, Tn, Hkv, D]."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    if k_new.dim() == 3:
        k_new, v_new = k_new[:, None], v_new[:, None]
    for b, start in enumerate(positions.tolist()):
        for t in range(k_new.shape[1]):
            pos = start + t
            if block_table is None:
                page, row = b, pos
            else:
                page, row = int(block_table[b, pos // k_cache.shape[1]]), pos % k_cache.shape[1]
            k_cache[page, row] = k_new[b, t]
            v_cache[page, row] = v_new[b, t]
    return k_cache, v_cache


def pool_ref(q, cu_seqlens=None, pool_size=150, *, attention_mask=None, dtype=torch.float64):
    """Reference for pool_queries: per sequence, the mean over heads of the mean over the first
    min(P, n) and the last min(P, n) tokens (a token in both counted twice); zeros when n = 0.
    q varlen [total, H, D] with cu_seqlens, or padded [B, S, H, D] with an optional [B, S] mask of
    valid tokens. -> [B, D] in `dtype`, differentiable wrt q."""
    seqs = []
    if cu_seqlens is not None:
        cu = cu_seqlens.tolist()
        seqs = [q[cu[b]:cu[b + 1]] for b in range(len(cu) - 1)]
    else:
        for b in range(q.shape[0]):
            if attention_mask is None:
                seqs.append(q[b])
            else:
                seqs.append(q[b][attention_mask[b].to(torch.bool).to(q.device)])
    rows = []
    for x in seqs:
        x = x.to(dtype)
        n = x.shape[0]
        if n == 0:
            rows.append(torch.zeros(q.shape[-1], dtype=dtype, device=q.device) + 0 * x.sum())
            continue
        m = min(pool_size, n)
        picked = torch.cat([x[:m], x[n - m:]], dim=0)
        rows.append(picked.mean(dim=(0, 1)))
    return torch.stack(rows, dim=0)


def gumbel_noise(u):
    """Gumbel noise from uniform draws, with the op's 1e-10 guards inside both logs."""
    return -torch.log(-torch.log(u + 1e-10) + 1e-10)


def gumbel_route_ref(logits, u, tau=1.0, hard=True):
    """Reference gate for gumbel_route given the op's uniform draws u (same shape as logits).

    Soft: softmax((logits + g) / tau)[:, 1]. Hard: the one-hot of the argmax in value, the soft
    gradient in backward (straight-through). -> z [B] in float64, differentiable wrt logits.
    """
    y = torch.softmax((logits.double() + gumbel_noise(u.double())) / tau, dim=-1)[:, 1]
    if not hard:
        return y
    hard_value = (y > 0.5).double()  # argmax over two logits; ties have probability zero
    return y + (hard_value - y).detach()
