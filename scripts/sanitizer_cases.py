"""Every CUDA op once, on small ragged shapes, for compute-sanitizer (memcheck / racecheck).

Shapes are chosen to hit tile edges (lengths not multiples of any tile), GQA, varlen with an empty
sequence, and the streaming window. No assertions here: the sanitizer's verdict is the test.
"""

import sys

import torch

import flux_attention as fa


def run(small: bool) -> None:
    dev = "cuda"
    dt = torch.bfloat16
    torch.manual_seed(0)
    dims = (64,) if small else (64, 128)
    for d in dims:
        for (b, s) in ((1, 1), (2, 129), (1, 300)):
            q = torch.randn(b, s, 8, d, device=dev, dtype=dt, requires_grad=True)
            k = torch.randn(b, s, 2, d, device=dev, dtype=dt, requires_grad=True)
            v = torch.randn(b, s, 2, d, device=dev, dtype=dt, requires_grad=True)
            for causal in (False, True):
                out, lse = fa.full_attention(q, k, v, causal=causal)
                (out.float().sum() + lse.sum()).backward()
            out, lse = fa.sparse_attention(q, k, v, sink_tokens=16, local_blocks=2, block_size=16)
            out.float().sum().backward()
            flags = torch.arange(b, device=dev) % 2 == 0
            out, lse = fa.flux_attention(q, k, v, flags, sink_tokens=16, local_blocks=2, block_size=16)
            out.float().sum().backward()
        cu = torch.tensor([0, 5, 5, 140], dtype=torch.int32, device=dev)
        q = torch.randn(140, 4, d, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(140, 4, d, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(140, 4, d, device=dev, dtype=dt, requires_grad=True)
        out, lse = fa.full_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=135,
                                     max_seqlen_k=135, causal=True)
        out.float().sum().backward()
        # decode, contiguous and paged
        cache_k = torch.randn(3, 300, 2, d, device=dev, dtype=dt)
        cache_v = torch.randn(3, 300, 2, d, device=dev, dtype=dt)
        seqlens = torch.tensor([1, 77, 300], dtype=torch.int32, device=dev)
        qd = torch.randn(3, 8, d, device=dev, dtype=dt)
        flags = torch.tensor([False, True, True], device=dev)
        fa.decode_attention(qd, cache_k, cache_v, seqlens, use_sparse=flags, sink_tokens=16,
                            local_blocks=2, block_size=16)
        pages_k = cache_k.reshape(3 * 300 // 20, 20, 2, d)
        pages_v = cache_v.reshape(3 * 300 // 20, 20, 2, d)
        table = torch.randperm(45, device=dev, dtype=torch.int32).reshape(3, 15)
        fa.decode_attention(qd, pages_k, pages_v, seqlens, block_table=table)
        # several new tokens (speculative decoding), and the KV append of a decode step
        q4 = torch.randn(3, 5, 8, d, device=dev, dtype=dt)
        fa.decode_attention(q4, pages_k, pages_v, seqlens, block_table=table, use_sparse=flags, sink_tokens=16,
                            local_blocks=2, block_size=16)
        k_new = torch.randn(3, 2, 2, d, device=dev, dtype=dt)
        fa.append_kv(pages_k, pages_v, k_new, k_new.clone(), seqlens - 2, block_table=table)
        fa.append_kv(cache_k, cache_v, k_new[:, 0], k_new[:, 0].clone(), seqlens - 1)
        # router pooling
        qp = torch.randn(2, 333, 8, d, device=dev, dtype=dt, requires_grad=True)
        fa.pool_queries(qp, pool_size=150).float().sum().backward()
    # the fused model ops: vector and element-wise paths, the three RMSNorm row groupings (8
    # threads, a warp, a block per row)
    with torch.no_grad():
        for rows, cols in ((37, 128), (70, 576), (3, 4096), (37, 576), (37, 13)):
            x = torch.randn(rows, cols, device=dev, dtype=dt)
            fa.rms_norm(x, torch.ones(cols, device=dev, dtype=dt))
        for n in (14336 * 3, 1001):
            g = torch.randn(n, device=dev, dtype=dt)
            fa.silu_mul(g, g)
        for d, hk, s in ((128, 8, 33), (6, 3, 33), (64, 2, 150)):  # 66 positions split heads, 300 not
            qr = torch.randn(2, s, 32, d, device=dev, dtype=dt).transpose(1, 2)
            kr = torch.randn(2, s, hk, d, device=dev, dtype=dt).transpose(1, 2)
            cs = torch.randn(1, s, d, device=dev, dtype=dt)
            fa.rotary_embedding(qr, kr, cs, cs)
        # decode linears: the tensor-core ring (8 and 16 warps, 4 and 8 stages, warps with no k step,
        # partial last blocks) and the CUDA-core paths (element-wise, in_features % 32 != 0)
        for rows, k, n in ((1, 4096, 1030), (6, 160, 2049), (2, 14336, 64), (5, 2080, 100), (3, 1001, 70),
                           (4, 512, 33), (8, 136, 5)):
            x = torch.randn(rows, k, device=dev, dtype=dt)
            w = torch.randn(n, k, device=dev, dtype=dt)
            fa.decode_linear(x, w, torch.randn(n, device=dev, dtype=dt))
            fa.decode_swiglu(x, w, w)
    torch.cuda.synchronize()
    print("sanitizer cases ran")


if __name__ == "__main__":
    run(small="--small" in sys.argv)
