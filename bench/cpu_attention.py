"""CPU attention benchmark: our full and sparse (streaming) attention against PyTorch's CPU SDPA.

Shapes: B = 1, 8 heads (q and kv), head_dim 128, fp32, forward only, S in {1K, 4K, 8K}. Sparse is the
production pattern (128 sink tokens + 16 local blocks of 128). Baselines: SDPA dense (non-causal and
is_causal=True) and SDPA with an explicit boolean mask of the sparse pattern (what a user without our
op would run). Each of ours is checked against its SDPA counterpart first (a mismatch is reported,
recorded in the JSON and makes the script exit non-zero), then every case is timed as the median
of several runs after warmup. Writes bench/results/cpu.json.

    python bench/cpu_attention.py            # full run (a few minutes on 2 cores)
    python bench/cpu_attention.py --quick    # CI-sized: short sequences, fewer runs
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import flux_attention as fa

HEADS, HEAD_DIM = 8, 128
SINK, LOCAL, BLOCK = 128, 16, 128
MAX_ERR = 1e-3  # fp32 against SDPA's fp32; real differences are ~1e-6


def streaming_mask(seqlen):
    """Bool [S, S] of the sparse pattern (DESIGN.md section 1), for SDPA's attn_mask."""
    i = torch.arange(seqlen).unsqueeze(1)
    j = torch.arange(seqlen).unsqueeze(0)
    return (j <= i) & ((j < SINK) | (j // BLOCK >= i // BLOCK - (LOCAL - 1)))


def median_ms(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), samples


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bench_length(seqlen, warmup, runs):
    torch.manual_seed(seqlen)
    q, k, v = (torch.randn(1, seqlen, HEADS, HEAD_DIM) for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # SDPA wants [B, H, S, D]
    mask = streaming_mask(seqlen)

    cases = {
        "ours_full": lambda: fa.full_attention(q, k, v, causal=False)[0],
        "ours_full_causal": lambda: fa.full_attention(q, k, v, causal=True)[0],
        "ours_sparse": lambda: fa.sparse_attention(q, k, v, sink_tokens=SINK, local_blocks=LOCAL,
                                                   block_size=BLOCK)[0],
        "sdpa_full": lambda: F.scaled_dot_product_attention(qt, kt, vt),
        "sdpa_full_causal": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
        "sdpa_sparse_mask": lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask),
    }
    pairs = {"ours_full": "sdpa_full", "ours_full_causal": "sdpa_full_causal",
             "ours_sparse": "sdpa_sparse_mask"}
    with torch.inference_mode():
        errors = {}
        for ours, baseline in pairs.items():
            errors[ours] = (cases[ours]() - cases[baseline]().transpose(1, 2)).abs().max().item()
            if not errors[ours] < MAX_ERR:
                print(f"WARNING S={seqlen}: {ours} differs from {baseline} by {errors[ours]:.3e}: its time "
                      "is of a wrong result", file=sys.stderr)
        medians, samples = {}, {}
        for name, fn in cases.items():
            medians[name], samples[name] = median_ms(fn, warmup, runs)
    return medians, samples, errors


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized run: S = 512, 1024; 3 runs")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "cpu.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lengths = [512, 1024] if args.quick else [1024, 4096, 8192]
    warmup, runs = (1, 3) if args.quick else (2, 5)
    results = {}
    for seqlen in lengths:
        medians, samples, errors = bench_length(seqlen, warmup, runs)
        results[seqlen] = dict(medians_ms=medians, samples_ms=samples, max_abs_err_vs_sdpa=errors)
        print(f"S={seqlen}: " + ", ".join(f"{n} {m:.2f} ms" for n, m in medians.items()), flush=True)

    # Speedups > 1 mean ours is faster. The dense comparisons use 4K and the sparse one 8K (where the
    # window is a quarter of the sequence); --quick uses its longest length for all three.
    dense_len = 4096 if 4096 in results else lengths[-1]
    sparse_len = 8192 if 8192 in results else lengths[-1]
    med = {s: r["medians_ms"] for s, r in results.items()}
    ratios = {
        f"sdpa_full/ours_full@{dense_len}": med[dense_len]["sdpa_full"] / med[dense_len]["ours_full"],
        f"sdpa_full_causal/ours_full_causal@{dense_len}":
            med[dense_len]["sdpa_full_causal"] / med[dense_len]["ours_full_causal"],
        f"ours_full_causal/ours_sparse@{sparse_len}":
            med[sparse_len]["ours_full_causal"] / med[sparse_len]["ours_sparse"],
        f"sdpa_sparse_mask/ours_sparse@{sparse_len}":
            med[sparse_len]["sdpa_sparse_mask"] / med[sparse_len]["ours_sparse"],
    }

    names = list(next(iter(med.values())))
    print()
    print(f"CPU attention forward, fp32, B=1, H={HEADS}, D={HEAD_DIM}, {torch.get_num_threads()} threads, "
          f"median ms of {runs} runs")
    print(f"{'S':>6} " + " ".join(f"{n:>17}" for n in names))
    for s in lengths:
        print(f"{s:>6} " + " ".join(f"{med[s][n]:>17.2f}" for n in names))
    print()
    for name, value in ratios.items():
        print(f"  speedup {name:<45} {value:6.2f}x")

    report = dict(
        benchmark="cpu_attention",
        torch=torch.__version__,
        python=platform.python_version(),
        cpu=cpu_model(),
        threads=torch.get_num_threads(),
        git_sha=git_sha(),
        quick=args.quick,
        shapes=dict(batch=1, heads_q=HEADS, heads_kv=HEADS, head_dim=HEAD_DIM, dtype="fp32", seqlens=lengths,
                    sparse=dict(sink_tokens=SINK, local_blocks=LOCAL, block_size=BLOCK)),
        timing=dict(warmup=warmup, runs=runs, statistic="median"),
        results={str(s): r for s, r in results.items()},
        ratios=ratios,
    )
    wrong = [f"{name}@{s}" for s, r in results.items() for name, err in r["max_abs_err_vs_sdpa"].items()
             if not err < MAX_ERR]
    report["wrong_results"] = wrong
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.out}")
    if wrong:
        sys.exit(f"wrong results (max |ours - SDPA| >= {MAX_ERR}): {', '.join(wrong)}")


if __name__ == "__main__":
    main()
