"""The sm90 attention backward on one H200: correctness, then speed against SDPA (cuDNN, flash).

    python scripts/check_bwd_sm90.py [--no-timing] [--out-dir DIR]      (build excluded, ~1-2 min)

Correctness (every element of dq, dk, dv, under one random (dout, dlse)): float64 autograd through
tests/python/reference.py (float32 for the large shapes) with the 2x rule of tests/python/utils.py
against PyTorch's own bf16/fp16 error. Cases: ragged lengths against the 64/128-row tiles, GQA,
non-causal, causal with Lq != Lk (bottom-right), streaming with test-size and production patterns,
per-sequence FA/SA routing, varlen whose rows past cu_seqlens[-1] are NaN (and zero-length
sequences), fp16, head dims 64 and 128, an lse-only loss. Rows outside every sequence must come back
zero. Deterministic mode: two backward passes must agree bitwise. A subprocess with
FLUX_DISABLE_SM90=1 recomputes one case on the portable kernels: both must be right and must differ
bitwise (proof that this process ran the sm90 kernels).
Timing: TFLOP/s of backward alone and forward+backward, ours vs SDPA cuDNN / flash, at the issue's
shapes (bf16, Hq 32 / Hkv 8, D 128, B*S = 32K tokens), plus SA (sink 128 + 16 local blocks) at 32K.
FLOPs: forward 4 B S^2 H D (halved for causal), backward 2.5x forward; SA counts visited pairs.
Every case catches its own failure and the run continues; the last lines are the summary. Writes
bwd_sm90_check.json to bench/results and --out-dir ($OUT by default). Exit 0 iff all checks pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))

import flux_attention as fa  # noqa: E402
from reference import attention_ref  # noqa: E402
from utils import assert_within_2x, pack_varlen  # noqa: E402
from bench.common import time_ms as bench_time_ms  # noqa: E402

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
# FLUX_BWD_CHECK_DEVICE=cpu runs the correctness flow on the CPU kernels (a smoke test of this
# script on a machine without a GPU; the timing and the sm90 path check are then skipped).
DEV = os.environ.get("FLUX_BWD_CHECK_DEVICE", "cuda")


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()
TEST_PATTERN = dict(block_size=16, sink_tokens=32, local_blocks=3)
PROD_PATTERN = dict(block_size=128, sink_tokens=128, local_blocks=16)


def randn(*shape, dtype):
    return torch.randn(*shape, device=DEV).to(dtype)


# ---- correctness -----------------------------------------------------------------------------------

class Case:
    """One backward check: inputs, the op, the reference kwargs."""

    def __init__(self, name, dtype, *, lens_q=None, lens_k=None, shape=None, heads=(8, 2), d=128,
                 causal=False, sparse=False, pattern=TEST_PATTERN, with_dout=True, with_dlse=True,
                 ref_dtype=FP64):
        self.name, self.dtype, self.lens_q, self.lens_k, self.shape = name, dtype, lens_q, lens_k, shape
        self.heads, self.d, self.causal, self.sparse, self.pattern = heads, d, causal, sparse, pattern
        self.with_dout, self.with_dlse, self.ref_dtype = with_dout, with_dlse, ref_dtype

    def build(self, seed):
        torch.manual_seed(seed)
        hq, hk = self.heads
        if self.lens_q is not None:  # varlen, rows past cu_seqlens[-1] NaN
            lk = self.lens_k or self.lens_q
            q, cu_q = pack_varlen(self.lens_q, hq, self.d, dtype=self.dtype, device=DEV)
            k, cu_k = pack_varlen(lk, hk, self.d, dtype=self.dtype, device=DEV, extra_rows=5)
            v, _ = pack_varlen(lk, hk, self.d, dtype=self.dtype, device=DEV, extra_rows=5)
            kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(self.lens_q), max_seqlen_k=max(lk))
            ref_kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        else:
            b, sq, sk = self.shape
            q, k, v = randn(b, sq, hq, self.d, dtype=self.dtype), randn(b, sk, hk, self.d, dtype=self.dtype), \
                randn(b, sk, hk, self.d, dtype=self.dtype)
            kw, ref_kw = {}, {}
        if isinstance(self.sparse, list):
            flags = torch.tensor(self.sparse, device=DEV)
            op = lambda a, b_, c: fa.flux_attention(a, b_, c, flags, **kw, **self.pattern)  # noqa: E731
            ref_kw.update(sparse=self.sparse, **self.pattern)
        elif self.sparse:
            op = lambda a, b_, c: fa.sparse_attention(a, b_, c, **kw, **self.pattern)  # noqa: E731
            ref_kw.update(sparse=True, **self.pattern)
        else:
            op = lambda a, b_, c: fa.full_attention(a, b_, c, causal=self.causal, **kw)  # noqa: E731
            ref_kw.update(causal=self.causal)
        return q, k, v, op, ref_kw


def grads_of(fn, q, k, v, dout, dlse):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v)
    outs, gs = [], []
    if dout is not None:
        outs.append(out)
        gs.append(dout.to(out.dtype))
    if dlse is not None:
        outs.append(lse)
        gs.append(dlse.to(lse.dtype))
    found = torch.autograd.grad(outs, (q, k, v), gs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip((q, k, v), found)]


def case_grads(case, seed=0):
    """(op grads, reference grads, low-precision reference grads, varlen row counts)."""
    q, k, v, op, ref_kw = case.build(seed)
    with torch.no_grad():
        out, lse = op(q, k, v)
    varlen = "cu_seqlens_q" in ref_kw
    rows_q = int(ref_kw["cu_seqlens_q"][-1]) if varlen else None
    rows_k = int(ref_kw["cu_seqlens_k"][-1]) if varlen else None
    dout = torch.randn(out.shape, device=DEV).to(out.dtype) if case.with_dout else None
    dlse = torch.randn(lse.shape, device=DEV) if case.with_dlse else None
    if varlen:  # the op's output past cu_seqlens_q[-1] is unspecified: its gradient must not be read
        if dout is not None:
            dout[rows_q:] = float("nan")
        if dlse is not None:
            dlse[:, rows_q:] = float("nan")
    got = grads_of(op, q, k, v, dout, dlse)

    def ref(dtype):
        fn = lambda a, b_, c: attention_ref(a, b_, c, dtype=dtype, **ref_kw)  # noqa: E731
        rd = None if dout is None else (dout[:rows_q] if varlen else dout)
        rl = None if dlse is None else (dlse[:, :rows_q] if varlen else dlse)
        return grads_of(fn, q.to(dtype), k.to(dtype), v.to(dtype), rd, rl)

    return got, ref(case.ref_dtype), ref(case.dtype), (rows_q, rows_k)


def check_case(case):
    got, want, lowp, (rows_q, rows_k) = case_grads(case)
    notes = []
    for i, g in enumerate(("dq", "dk", "dv")):
        rows = rows_q if i == 0 else rows_k
        x = got[i]
        if rows is not None:  # varlen: rows outside every sequence must be exactly zero
            tail = x[rows:]
            assert torch.all(tail == 0), f"{g}: {int((tail != 0).sum())} nonzero elements past cu_seqlens[-1]"
            x = x[:rows]
            w, lo = want[i][:rows], lowp[i][:rows]
        else:
            w, lo = want[i], lowp[i]
        assert_within_2x(f"{case.name} {g}", x, w, lo, case.dtype)
        err = (x.double() - w.double()).abs().max().item()
        pt = (lo.double() - w.double()).abs().max().item()
        notes.append(f"{g} {err:.1e}/{pt:.1e}")
    return "max err ours/pytorch-lowp: " + ", ".join(notes)


def check_deterministic(case):
    q, k, v, op, _ = case.build(1)
    with torch.no_grad():
        out, lse = op(q, k, v)
    dout = torch.randn(out.shape, device=DEV).to(out.dtype)
    dlse = torch.randn(lse.shape, device=DEV)
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        first = grads_of(op, q, k, v, dout, dlse)
        second = grads_of(op, q, k, v, dout, dlse)
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)
    for a, b, g in zip(first, second, ("dq", "dk", "dv")):
        assert torch.equal(a, b), f"{g} differs between two deterministic backward passes " \
                                  f"(max diff {(a.float() - b.float()).abs().max().item():.3e})"
    return "bitwise equal over 2 runs"


PATH_CASE = Case("path check", BF16, shape=(2, 1000, 1000), causal=True)


def emit_portable(path):
    """Subprocess body (FLUX_DISABLE_SM90=1): the path case's grads on the portable kernels."""
    got, _, _, _ = case_grads(PATH_CASE)
    torch.save([g.cpu() for g in got], path)


def check_path(out_dir):
    path = os.path.join(out_dir or "/tmp", "bwd_portable_grads.pt")
    env = dict(os.environ, FLUX_DISABLE_SM90="1")
    subprocess.run([sys.executable, os.path.abspath(__file__), "--emit-portable", path], env=env, check=True,
                   timeout=300)
    portable = torch.load(path)
    got, want, lowp, _ = case_grads(PATH_CASE)
    same = all(torch.equal(a.cpu(), b) for a, b in zip(got, portable))
    assert not same, "grads bitwise equal to the portable kernels': the sm90 backward did not run"
    for i, g in enumerate(("dq", "dk", "dv")):
        assert_within_2x(f"portable {g}", portable[i].to(DEV), want[i], lowp[i], BF16)
    diff = max((a.float().cpu() - b.float()).abs().max().item() for a, b in zip(got, portable))
    return f"sm90 and portable differ (max {diff:.1e}), both within the 2x rule"


def correctness_cases():
    c = []
    c.append(Case("dense non-causal ragged B2 S1000 GQA4 D128", BF16, shape=(2, 1000, 1000)))
    c.append(Case("dense causal Lq700<Lk1100 D128", BF16, shape=(2, 700, 1100), causal=True))
    c.append(Case("dense causal Lq1100>Lk700 D64", BF16, shape=(2, 1100, 700), causal=True, d=64))
    c.append(Case("dense non-causal Lq333 Lk77 D64 MHA", BF16, shape=(3, 333, 77), heads=(4, 4), d=64))
    c.append(Case("fp16 causal S777 D64 MQA", FP16, shape=(1, 777, 777), heads=(6, 1), d=64, causal=True))
    c.append(Case("fp16 causal S513 D128", FP16, shape=(2, 513, 513), heads=(4, 2), causal=True))
    c.append(Case("lse-only loss causal D128", BF16, shape=(1, 300, 300), causal=True, with_dout=False))
    c.append(Case("dout-only loss non-causal D64", BF16, shape=(1, 300, 200), d=64, with_dlse=False))
    c.append(Case("varlen causal NaN tail D128", BF16, lens_q=[1, 129, 500, 0, 1000, 77], causal=True))
    c.append(Case("varlen non-causal q!=k D64", BF16, lens_q=[300, 50, 0, 700, 5],
                  lens_k=[500, 1, 64, 640, 0], d=64))
    c.append(Case("varlen causal k shorter D128", BF16, lens_q=[10, 700, 129, 64], lens_k=[3, 500, 129, 1],
                  causal=True))
    c.append(Case("streaming b16 s32 l3 S1500 D128", BF16, shape=(2, 1500, 1500), sparse=True))
    c.append(Case("streaming b16 s32 l3 Lq600<Lk1500 D64", BF16, shape=(1, 600, 1500), sparse=True, d=64))
    c.append(Case("streaming production S4096 D128", BF16, shape=(1, 4096, 4096), sparse=True,
                  pattern=PROD_PATTERN, ref_dtype=FP32))
    c.append(Case("streaming varlen b4 s12 l5 D128", BF16, lens_q=[200, 0, 333, 17],
                  sparse=True, pattern=dict(block_size=4, sink_tokens=12, local_blocks=5)))
    c.append(Case("per-sequence varlen FA/SA D128", BF16, lens_q=[1000, 37, 0, 513, 129],
                  sparse=[True, False, False, True, True]))
    c.append(Case("per-sequence padded FA/SA D64", BF16, shape=(3, 900, 900), heads=(4, 1), d=64,
                  sparse=[False, True, False]))
    c.append(Case("per-sequence production varlen D128", BF16, lens_q=[3000, 2500],
                  sparse=[True, False], pattern=PROD_PATTERN, ref_dtype=FP32))
    c.append(Case("dense causal S4096 Hq32 Hkv8 D128", BF16, shape=(1, 4096, 4096), heads=(32, 8),
                  causal=True, ref_dtype=FP32))
    return c


def deterministic_cases():
    return [Case("det dense causal GQA D128", BF16, shape=(2, 1500, 1500), causal=True),
            Case("det dense non-causal D64", BF16, shape=(2, 1000, 1000), d=64),
            Case("det varlen causal D128", BF16, lens_q=[700, 1, 0, 1300], causal=True),
            Case("det streaming production D128", BF16, shape=(1, 4096, 4096), sparse=True, pattern=PROD_PATTERN),
            Case("det per-sequence varlen D64", BF16, lens_q=[1000, 513, 129], sparse=[True, False, True], d=64)]


# ---- timing ----------------------------------------------------------------------------------------

def time_ms(fn):
    # bench/common.py's timer: it synchronises after every warmup call. This script's own copy did
    # not, so its 30 ms warmup queued as many 70-95 ms fwd+bwd calls as the launch queue holds and
    # the first synchronize waited for all of them: 45 s of silence at 16K / 32K, which the
    # supervisor took for a hang (2026-12-02 and 2026-12-03 runs).
    return bench_time_ms(fn, warmup_ms=30.0, rep_ms=150.0, min_reps=5)["median_ms"]


HQ, HKV = 32, 8


def ours_fwd(q, k, v, causal, sparse):
    if sparse:
        return lambda: fa.sparse_attention(q, k, v, **PROD_PATTERN)[0]
    return lambda: fa.full_attention(q, k, v, causal=causal)[0]


def sdpa_fwd(backend, q, k, v, causal):
    # [B, H, S, D], K/V expanded to all heads once outside the timed region (bench/attention.py).
    qt = q.detach().transpose(1, 2).requires_grad_()
    kt = k.detach().transpose(1, 2).repeat_interleave(HQ // HKV, 1).requires_grad_()
    vt = v.detach().transpose(1, 2).repeat_interleave(HQ // HKV, 1).requires_grad_()

    def run():
        with torch.nn.attention.sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    return run, (qt, kt, vt)


def no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def timings(fwd, leaves):
    """(fwd+bwd ms, bwd-only ms) of a forward closure whose inputs are `leaves`."""
    out = fwd()
    dout = torch.randn_like(out)

    def both():
        o = fwd()
        torch.autograd.grad(o, leaves, dout)

    def bwd_only():
        torch.autograd.grad(out, leaves, dout, retain_graph=True)
    return time_ms(both), time_ms(bwd_only)


def streaming_pairs(s, sink, local, bs):
    t = torch.arange(s, dtype=torch.int64)
    lo = torch.clamp((t // bs - (local - 1)) * bs, min=0)
    sink_end = torch.clamp(torch.full_like(t, sink), max=t + 1)
    local_start = torch.maximum(lo, sink_end)
    return int((sink_end + (t + 1 - local_start)).sum())


def run_timing(results, summary):
    rows = []
    shapes = [(4, 8192, 128, True), (1, 32768, 128, True), (2, 16384, 128, False), (4, 8192, 64, True)]
    for b, s, d, causal in shapes:
        label = f"{'causal' if causal else 'full'} D{d} S{s} B{b}"
        try:
            q = torch.randn(b, s, HQ, d, device=DEV, dtype=BF16, requires_grad=True)
            k = torch.randn(b, s, HKV, d, device=DEV, dtype=BF16, requires_grad=True)
            v = torch.randn(b, s, HKV, d, device=DEV, dtype=BF16, requires_grad=True)
            fwd_flops = 4 * b * s * s * HQ * d * (0.5 if causal else 1.0)
            rec = {"shape": label, "ms": {}, "tflops": {}}
            impls = {"ours": (ours_fwd(q, k, v, causal, False), (q, k, v))}
            for name, backend in (("cudnn", torch.nn.attention.SDPBackend.CUDNN_ATTENTION),
                                  ("flash", torch.nn.attention.SDPBackend.FLASH_ATTENTION)):
                impls[name] = sdpa_fwd(backend, q, k, v, causal)
            for name, (fwd, leaves) in impls.items():
                # One line per implementation: the parent kills a worker silent for HANG_S, and
                # in the 2026-12-02 run it did so somewhere in the 32K shape; this says where.
                print(f"  timing {label} {name} ...", flush=True)
                try:
                    both, bwd = timings(fwd, leaves)
                    fwd_ms = time_ms(no_grad(fwd))
                except Exception as e:  # an anchor backend may refuse a shape
                    print(f"  {label} {name}: {type(e).__name__}: {e}")
                    both = bwd = fwd_ms = float("nan")
                rec["ms"][name] = dict(fwd=fwd_ms, bwd=bwd, fwd_bwd=both)
                rec["tflops"][name] = dict(fwd=fwd_flops / fwd_ms / 1e9, bwd=2.5 * fwd_flops / bwd / 1e9,
                                           fwd_bwd=3.5 * fwd_flops / both / 1e9)
            t = rec["tflops"]
            print(f"  timed {label}: bwd ours {t['ours']['bwd']:.0f} / cuDNN {t['cudnn']['bwd']:.0f} TFLOP/s, "
                  f"fwd+bwd ours {t['ours']['fwd_bwd']:.0f} / cuDNN {t['cudnn']['fwd_bwd']:.0f}", flush=True)
            rec["bwd_vs_cudnn"] = t["ours"]["bwd"] / t["cudnn"]["bwd"]
            rec["fwd_bwd_vs_cudnn"] = t["ours"]["fwd_bwd"] / t["cudnn"]["fwd_bwd"]
            results["timing"].append(rec)
            rows.append([label, t["ours"]["bwd"], t["cudnn"]["bwd"], t["flash"]["bwd"], rec["bwd_vs_cudnn"],
                         t["ours"]["fwd_bwd"], t["cudnn"]["fwd_bwd"], t["flash"]["fwd_bwd"],
                         rec["fwd_bwd_vs_cudnn"], t["ours"]["fwd"]])
            del q, k, v, impls
            torch.cuda.empty_cache()
        except Exception as e:
            traceback.print_exc()
            summary.append((f"timing {label}", False, f"{type(e).__name__}: {e}"))
    # Streaming SA, production pattern, B = 1, S = 32K.
    try:
        s = 32768
        q = torch.randn(1, s, HQ, 128, device=DEV, dtype=BF16, requires_grad=True)
        k = torch.randn(1, s, HKV, 128, device=DEV, dtype=BF16, requires_grad=True)
        v = torch.randn(1, s, HKV, 128, device=DEV, dtype=BF16, requires_grad=True)
        fwd = ours_fwd(q, k, v, True, True)
        both, bwd = timings(fwd, (q, k, v))
        fwd_ms = time_ms(no_grad(fwd))
        pairs = streaming_pairs(s, 128, 16, 128)
        f = 4 * pairs * HQ * 128
        rec = dict(shape="SA sink128+16x128 S32768 B1", ms=dict(fwd=fwd_ms, bwd=bwd, fwd_bwd=both),
                   tflops_visited=dict(fwd=f / fwd_ms / 1e9, bwd=2.5 * f / bwd / 1e9, fwd_bwd=3.5 * f / both / 1e9),
                   target_fwd_bwd_ms=9.0, flex_anchor_fwd_bwd_ms=13.5)
        results["timing_sa"] = rec
        print(f"\nSA (sink 128 + 16 local blocks), S=32K, B=1: fwd {fwd_ms:.2f} ms, bwd {bwd:.2f} ms, "
              f"fwd+bwd {both:.2f} ms (target <= 9.0; FlexAttention 13.5 ms in DESIGN.md); "
              f"TFLOP/s over visited pairs: fwd {rec['tflops_visited']['fwd']:.0f}, "
              f"bwd {rec['tflops_visited']['bwd']:.0f}")
    except Exception as e:
        traceback.print_exc()
        summary.append(("timing SA 32K", False, f"{type(e).__name__}: {e}"))
    # Deterministic backward speed, causal 8K.
    try:
        b, s = 4, 8192
        q = torch.randn(b, s, HQ, 128, device=DEV, dtype=BF16, requires_grad=True)
        k = torch.randn(b, s, HKV, 128, device=DEV, dtype=BF16, requires_grad=True)
        v = torch.randn(b, s, HKV, 128, device=DEV, dtype=BF16, requires_grad=True)
        torch.use_deterministic_algorithms(True, warn_only=True)
        _, bwd = timings(ours_fwd(q, k, v, True, False), (q, k, v))
        torch.use_deterministic_algorithms(False)
        f = 2.5 * 4 * b * s * s * HQ * 128 * 0.5
        results["timing_deterministic_bwd_causal_8k"] = dict(ms=bwd, tflops=f / bwd / 1e9)
        print(f"deterministic backward, causal D128 S8K B4: {bwd:.2f} ms, {f / bwd / 1e9:.0f} TFLOP/s")
    except Exception as e:
        torch.use_deterministic_algorithms(False)
        traceback.print_exc()
        summary.append(("timing deterministic", False, f"{type(e).__name__}: {e}"))

    hdr = ["shape", "bwd ours", "cudnn", "flash", "x cudnn", "f+b ours", "cudnn", "flash", "x cudnn", "fwd ours"]
    cells = [hdr] + [[r[0]] + [f"{x:.0f}" if i not in (3, 7) else f"{x:.2f}" for i, x in enumerate(r[1:])]
                     for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(hdr))]
    print("\nTFLOP/s (bf16, Hq 32 / Hkv 8; x cudnn = ours / cuDNN, target fwd+bwd >= 0.95 at causal D128 8K, 32K)")
    for j, c in enumerate(cells):
        print("  ".join(x.rjust(w) for x, w in zip(c, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


# ---- workers and supervisor -------------------------------------------------------------------------
# A kernel fault poisons the CUDA context and a kernel deadlock never returns, so the work runs in
# child processes that print one "@@RESULT {json}" line per finished step; the parent restarts a
# child that died or went silent (HANG_S) after the step it was in, and reports that step as failed.

HANG_S = 45  # the largest step takes a few seconds on an H200; a child also needs ~10 s to start


def all_steps():
    """(name, zero-arg callable) for every correctness step, in order."""
    steps = [(c.name, lambda c=c: check_case(c)) for c in correctness_cases()]
    steps += [(c.name, lambda c=c: check_deterministic(c)) for c in deterministic_cases()]
    for i in (8, 15):  # the deterministic path must be right, not only reproducible
        c = correctness_cases()[i]
        steps.append((f"deterministic-mode {c.name}", lambda c=c: with_deterministic(check_case, c)))
    return steps


def with_deterministic(fn, *a):
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return fn(*a)
    finally:
        torch.use_deterministic_algorithms(False)


def emit(record):
    print("@@RESULT " + json.dumps(record, default=str), flush=True)


def selected(name, only):
    return not only or any(s.strip() and s.strip() in name for s in only.split(","))


def worker_checks(start, only):
    torch.use_deterministic_algorithms(False)  # the default (atomic dQ) backward unless a step says otherwise
    for i, (name, fn) in enumerate(all_steps()):
        if i < start or not selected(name, only):
            continue
        print(f"@@START {i} {name}", flush=True)
        t0 = time.time()
        try:
            note, ok = fn() or "", True
        except Exception as e:  # report and continue
            ok, note = False, " | ".join(f"{type(e).__name__}: {e}".splitlines())[:500]
            if not isinstance(e, AssertionError):
                traceback.print_exc()
            if "CUDA" in str(e) or "cuda" in str(e):  # a sticky CUDA error: continue in a fresh process
                emit(dict(index=i, name=name, ok=ok, note=note, seconds=round(time.time() - t0, 2)))
                sys.stdout.flush()
                os._exit(3)
        sync()
        emit(dict(index=i, name=name, ok=ok, note=note, seconds=round(time.time() - t0, 2)))
        empty_cache()


def worker_timing():
    results, summary = {"timing": []}, []
    run_timing(results, summary)
    emit(dict(kind="timing", results=results, failures=summary))


def run_child(args, on_line):
    """Runs this script with `args`; on_line(line) per stdout line. Returns (exit code or None if
    killed for silence, seconds)."""
    import selectors
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-u", os.path.abspath(__file__)] + args, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    last = time.time()
    while True:
        if not sel.select(timeout=5):
            if time.time() - last > HANG_S:
                proc.kill()
                proc.wait()
                return None, time.time() - t0
            continue
        line = proc.stdout.readline()
        if not line:
            break
        last = time.time()
        on_line(line.rstrip("\n"))
    return proc.wait(), time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--budget-s", type=float, default=150.0, help="no new correctness worker after this many "
                    "seconds (a hung kernel costs %ds per step)" % HANG_S)
    ap.add_argument("--only", default="", help="comma-separated substrings: run only the checks whose name "
                    "contains one (e.g. --only varlen,det)")
    ap.add_argument("--out-dir", default=os.environ.get("OUT", ""))
    ap.add_argument("--emit-portable", help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=["checks", "timing", "path"], help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.emit_portable:
        emit_portable(args.emit_portable)
        return 0
    if DEV == "cuda" and not torch.cuda.is_available():
        print("check_bwd_sm90: needs a CUDA GPU (FLUX_BWD_CHECK_DEVICE=cpu smoke-tests this script on the CPU)")
        return 2
    if args.worker == "checks":
        worker_checks(args.start, args.only)
        return 0
    if args.worker == "timing":
        worker_timing()
        return 0
    if args.worker == "path":
        t0 = time.time()
        try:
            note, ok = check_path(args.out_dir), True
        except Exception as e:
            ok, note = False, " | ".join(f"{type(e).__name__}: {e}".splitlines())[:500]
        emit(dict(index=-1, name="sm90 path taken (vs FLUX_DISABLE_SM90=1 subprocess)", ok=ok, note=note,
                  seconds=round(time.time() - t0, 2)))
        return 0

    t_start = time.time()
    gpu = torch.cuda.get_device_properties(0) if DEV == "cuda" else None
    gpu_name = f"{gpu.name}, sm_{gpu.major}{gpu.minor}" if gpu else "CPU (smoke test of this script)"
    print(f"{gpu_name}, torch {torch.__version__}, "
          f"FLUX_DISABLE_SM90={os.environ.get('FLUX_DISABLE_SM90', '')!r}", flush=True)
    names = [n for n, _ in all_steps()]
    results = {"gpu": gpu_name, "checks": [], "timing": []}
    summary = []
    state = {"running": None}

    def on_line(line):
        if line.startswith("@@START "):
            state["running"] = int(line.split()[1])
        elif line.startswith("@@RESULT "):
            rec = json.loads(line[len("@@RESULT "):])
            if rec.get("kind") == "timing":
                results.update(rec["results"])
                summary.extend((n, False, note) for n, _, note in rec["failures"])
                summary.append(("timing", True, "see table above"))
                return
            state["running"] = None
            results["checks"].append(rec)
            summary.append((rec["name"], rec["ok"], rec["note"]))
            print(f"[{'PASS' if rec['ok'] else 'FAIL'}] {rec['name']} ({rec['seconds']}s) {rec['note']}",
                  flush=True)
        else:
            print(line, flush=True)

    start, hangs = 0, 0
    while start < len(names):
        if hangs >= 2 or time.time() - t_start > args.budget_s:
            why = "two hangs in a row" if hangs >= 2 else f"over the {args.budget_s:.0f}s budget"
            summary.append((f"checks from #{start} on", False, f"not run: {why}"))
            break
        state["running"] = None
        code, _ = run_child(["--worker", "checks", "--start", str(start), "--only", args.only], on_line)
        done = [r["index"] for r in results["checks"] if r["index"] >= 0]
        if code == 0:
            break
        if state["running"] is not None:  # the child died or hung inside a step: blame it, resume after
            bad = state["running"]
            why = "hung (no output for %ds)" % HANG_S if code is None else f"process died (exit {code})"
            rec = dict(index=bad, name=names[bad], ok=False, note=why + "; later steps run in a fresh process",
                       seconds=0)
            results["checks"].append(rec)
            summary.append((rec["name"], False, rec["note"]))
            print(f"[FAIL] {rec['name']}: {rec['note']}", flush=True)
            start = bad + 1
            hangs = hangs + 1 if code is None else 0
        elif done and max(done) + 1 > start:  # it reported a step and left (sticky CUDA error)
            start = max(done) + 1
        else:  # no progress at all: the worker cannot start
            summary.append(("correctness worker", False, f"exited with {code} before running a step"))
            break

    if DEV == "cuda" and selected("sm90 path", args.only):
        code, _ = run_child(["--worker", "path", "--out-dir", args.out_dir or "/tmp"], on_line)
        if code != 0:
            summary.append(("sm90 path taken", False, "process died or hung"))
    if DEV == "cuda" and not args.no_timing and not args.only and hangs < 2:
        code, _ = run_child(["--worker", "timing"], on_line)
        if code != 0:
            summary.append(("timing", False, "timing process died or hung (exit %s)" % code))

    failed = [x for x in summary if not x[1]]
    results["passed"] = not failed
    results["seconds"] = time.time() - t_start
    for d in (os.path.join(ROOT, "bench", "results"), args.out_dir):
        if d:
            try:
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, "bwd_sm90_check.json"), "w") as f:
                    json.dump(results, f, indent=1, default=str)
            except OSError as e:
                print(f"could not write results to {d}: {e}")
    print(f"\n=== sm90 backward check: {len(summary) - len(failed)}/{len(summary)} passed "
          f"({time.time() - t_start:.0f}s)")
    for name, ok, note in summary:
        if not ok:
            print(f"  FAIL {name}: {note}")
    print("RESULT:", "PASS" if not failed else "FAIL")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
