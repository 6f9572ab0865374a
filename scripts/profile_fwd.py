"""One attention forward shape, run a few times, for a profiler to attach to:

    ncu --clock-control none -k regex:attention_fwd_sm90 -s 2 -c 1 --set full -o ours \\
        python3 scripts/profile_fwd.py --impl ours --seqlen 8192 --head-dim 128 --causal

``--impl ours`` runs flux_attention.full_attention (or sparse_attention with ``--sparse``),
``--impl cudnn`` / ``flash`` SDPA's backends on the same tensors (K/V expanded, as bench/attention.py
does). B is 32K tokens / seqlen, 32 query heads, 8 KV heads, bf16.
"""

import argparse

import torch
import torch.nn.functional as F

import flux_attention as fa


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["ours", "cudnn", "flash"], default="ours")
    p.add_argument("--seqlen", type=int, default=8192)
    p.add_argument("--head-dim", type=int, default=128, choices=[64, 128])
    p.add_argument("--causal", action="store_true")
    p.add_argument("--sparse", action="store_true", help="ours: streaming SA (sink 128, 16 local blocks)")
    p.add_argument("--iters", type=int, default=4)
    a = p.parse_args()
    b, hq, hkv = max(1, 32768 // a.seqlen), 32, 8
    mk = lambda h: torch.randn(b, a.seqlen, h, a.head_dim, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, k, v = mk(hq), mk(hkv), mk(hkv)
    if a.impl == "ours":
        if a.sparse:
            run = lambda: fa.sparse_attention(q, k, v, sink_tokens=128, local_blocks=16)  # noqa: E731
        else:
            run = lambda: fa.full_attention(q, k, v, causal=a.causal)  # noqa: E731
    else:
        backend = {"cudnn": torch.nn.attention.SDPBackend.CUDNN_ATTENTION,
                   "flash": torch.nn.attention.SDPBackend.FLASH_ATTENTION}[a.impl]
        qt = q.transpose(1, 2)
        kt = k.transpose(1, 2).repeat_interleave(hq // hkv, 1)
        vt = v.transpose(1, 2).repeat_interleave(hq // hkv, 1)

        def run():
            with torch.nn.attention.sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=a.causal)
    for _ in range(a.iters):
        run()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
