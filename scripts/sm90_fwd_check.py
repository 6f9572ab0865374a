"""Correctness of the attention forward on a GPU, case by case, against the float64 reference.

A compact grid that reaches every branch of the sm_90a kernel (csrc/cuda/sm90/): head dims 64 / 128,
bf16 / fp16, causal and not, Lq != Lk, GQA / MQA, varlen with NaN rows past cu_seqlens[-1],
streaming (small patterns and the production one), per-sequence FA/SA, odd lengths, long sequences.
Outputs are NaN-poisoned before each call; every element of out and lse is checked with the 2x rule
(tests/python/utils.py). Each case reports PASS/FAIL and the run continues after a failure; the exit
status is the number of failures (capped at 100).

    python scripts/sm90_fwd_check.py [--quick]
"""

import argparse
import os
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))

import flux_attention as fa  # noqa: E402
from reference import attention_ref  # noqa: E402
from utils import assert_matches, pack_varlen  # noqa: E402

BF16, FP16 = torch.bfloat16, torch.float16


def rand(*shape, dtype):
    return torch.randn(*shape, device="cuda", dtype=torch.float32).to(dtype)


def check(name, out, lse, q, k, v, dtype, **ref):
    ref_out, ref_lse = attention_ref(q, k, v, **ref)
    rows = ref_out.shape[0]
    varlen = ref.get("cu_seqlens_q") is not None
    o = out[:rows] if varlen else out
    l = lse[:, :rows] if varlen else lse
    cache = {}

    def lowp():
        if not cache:
            cache["v"] = attention_ref(q, k, v, dtype=dtype, **ref)
        return cache["v"]

    assert_matches(f"{name} out", o, ref_out, lambda: lowp()[0], dtype)
    assert_matches(f"{name} lse", l, ref_lse, lambda: lowp()[1], dtype)


def padded_case(b, sq, sk, hq, hk, d, dtype, causal):
    def run():
        q, k, v = rand(b, sq, hq, d, dtype=dtype), rand(b, sk, hk, d, dtype=dtype), rand(b, sk, hk, d, dtype=dtype)
        out, lse = fa.full_attention(q, k, v, causal=causal)
        check("full", out, lse, q, k, v, dtype, causal=causal)
    return run


def sparse_case(b, s, hq, hk, d, dtype, block, sink, local):
    def run():
        q, k, v = rand(b, s, hq, d, dtype=dtype), rand(b, s, hk, d, dtype=dtype), rand(b, s, hk, d, dtype=dtype)
        kw = dict(block_size=block, sink_tokens=sink, local_blocks=local)
        out, lse = fa.sparse_attention(q, k, v, **kw)
        check("sparse", out, lse, q, k, v, dtype, sparse=True, **kw)
    return run


def varlen_case(lens_q, lens_k, hq, hk, d, dtype, causal, sparse_flags=None, pattern=None):
    def run():
        q, cu_q = pack_varlen(lens_q, hq, d, dtype=dtype, device="cuda")
        k, cu_k = pack_varlen(lens_k, hk, d, dtype=dtype, device="cuda", extra_rows=7)
        v, _ = pack_varlen(lens_k, hk, d, dtype=dtype, device="cuda", extra_rows=7)
        kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))
        pat = pattern or {}
        if sparse_flags is None:
            out, lse = fa.full_attention(q, k, v, causal=causal, **kw)
            check("varlen", out, lse, q, k, v, dtype, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        else:
            flags = torch.tensor(sparse_flags, dtype=torch.bool, device="cuda")
            out, lse = fa.flux_attention(q, k, v, flags, **kw, **pat)
            check("flux", out, lse, q, k, v, dtype, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, sparse=sparse_flags, **pat)
    return run


def cases(quick):
    c = []
    for d in (64, 128):
        for dtype in (BF16, FP16):
            for causal in (False, True):
                c.append((f"padded d{d} {str(dtype)[6:]} causal={causal} 2x300 gqa4",
                          padded_case(2, 300, 300, 8, 2, d, dtype, causal)))
        c.append((f"d{d} lengths q113 k203 causal", padded_case(1, 113, 203, 4, 4, d, BF16, True)))
        c.append((f"d{d} lengths q203 k113 causal", padded_case(1, 203, 113, 4, 4, d, BF16, True)))
        c.append((f"d{d} lengths q1 k1000", padded_case(3, 1, 1000, 4, 1, d, BF16, False)))
        c.append((f"d{d} lengths 129 mqa", padded_case(2, 129, 129, 6, 1, d, BF16, True)))
        c.append((f"d{d} 1024x1023 noncausal", padded_case(1, 1024, 1023, 4, 2, d, FP16, False)))
        c.append((f"d{d} varlen causal", varlen_case([5, 0, 129, 1, 300, 64], [5, 0, 129, 1, 300, 64], 8, 2, d, BF16, True)))
        c.append((f"d{d} varlen q<k", varlen_case([3, 0, 50, 129, 1], [10, 7, 70, 129, 200], 4, 2, d, BF16, True)))
        c.append((f"d{d} varlen noncausal k<q", varlen_case([10, 7, 70, 129, 200], [3, 0, 50, 129, 1], 4, 2, d, FP16, False)))
        for block, sink, local in ((16, 16, 2), (8, 8, 1), (4, 12, 5), (128, 128, 2)):
            c.append((f"d{d} sparse b{block} s{sink} l{local} L=333", sparse_case(2, 333, 8, 2, d, BF16, block, sink, local)))
        c.append((f"d{d} flux alternating", varlen_case([100, 37, 0, 64, 129, 1, 700], [100, 37, 0, 64, 129, 1, 700], 4, 2, d, BF16,
                                                        True, [i % 2 == 0 for i in range(7)], dict(block_size=16, sink_tokens=16, local_blocks=2))))
    # Production pattern and long sequences.
    c.append(("d128 sparse default L=17*128+1", sparse_case(1, 17 * 128 + 1, 8, 2, 128, BF16, 128, 128, 16)))
    c.append(("d128 sparse default L=4224 gqa", sparse_case(1, 4224, 8, 2, 128, BF16, 128, 128, 16)))
    c.append(("d64 sparse default L=5000", sparse_case(1, 5000, 4, 1, 64, FP16, 128, 128, 16)))
    c.append(("d128 causal 4224", padded_case(1, 4224, 4224, 4, 2, 128, BF16, True)))
    c.append(("d128 flux default mix", varlen_case([3000, 2500, 129, 2177], [3000, 2500, 129, 2177], 4, 2, 128, BF16, True,
                                                   [False, True, False, True])))
    if not quick:
        c.append(("d128 causal 8192 h32/8", padded_case(1, 8192, 8192, 8, 2, 128, BF16, True)))
        c.append(("d64 noncausal 8192", padded_case(1, 8192, 8192, 4, 1, 64, BF16, False)))
        c.append(("d128 sparse default 16384", sparse_case(1, 16384, 4, 1, 128, BF16, 128, 128, 16)))
    return c


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True  # NaN-poisons every torch.empty
    info = fa.build_info()
    print(f"device {torch.cuda.get_device_name()}  build {info}  sm90 disabled by env: "
          f"{os.environ.get('FLUX_DISABLE_SM90', '0')}  pingpong: {os.environ.get('FLUX_SM90_PINGPONG', '1')}")
    failures = 0
    for name, run in cases(args.quick):
        torch.manual_seed(0)
        t0 = time.time()
        try:
            run()
            torch.cuda.synchronize()
            print(f"PASS  {name}  ({time.time() - t0:.1f}s)", flush=True)
        except Exception as e:  # report and continue; a CUDA fault poisons the context, stop then
            failures += 1
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"FAIL  {name}: {type(e).__name__}: {msg}", flush=True)
            if "CUDA" in msg or "illegal" in msg:
                traceback.print_exc()
                break
    print(f"sm90_fwd_check: {failures} failure(s)")
    return min(failures, 100)


if __name__ == "__main__":
    sys.exit(main())
