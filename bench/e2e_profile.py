"""Where the end-to-end time goes: GPU kernel time of one prefill (and one decode step) through
transformers, grouped into GEMM / attention / elementwise / normalisation / copies, per layer.

bench/e2e.py says how fast a configuration is; this says why. It builds the same Llama-3.1-8B-shaped
model as bench/e2e.py with fewer layers (``--layers``, default 4: every layer is the same, so the
per-layer numbers are those of the 32-layer model), runs each configuration under torch.profiler
(CUDA activity only) and sums the kernel durations by category. The difference between a config's
per-layer time and the sdpa anchor's, category by category, is what a change has to win back.

Kernels launched with programmatic dependent launch (flux's decode linears, model ops, append and
decode attention) start before the kernel ahead of them ends and wait on the GPU: their duration
here includes that wait, so at decode their sum exceeds the step and only the kernels launched
plainly (torch's) read as their own cost. bench/e2e.py's step time is the number to compare.

    python bench/e2e_profile.py [--length 131072] [--layers 4] [--configs sdpa,flux_fa,flux_sa100]
                                [--decode-batch 4] [--out-dir DIR]

Writes ``bench/results/e2e_profile_h200.json`` (and into ``--out-dir``) and prints the tables.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict
from typing import Callable, Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import e2e  # noqa: E402
from bench.common import print_table, write_results  # noqa: E402
from flux_attention.decode_loop import StaticDecodeLoop  # noqa: E402

# First match wins: our kernels are in namespace flux (some instantiate CUTLASS templates, so they
# are tested before the GEMM patterns).
CATEGORIES = [
    ("flux model ops", r"flux::.*(rms_norm|silu_mul|rope)_kernel"),
    ("flux attention", r"flux::"),
    ("sdpa attention", r"cudnn|fmha|flash|sdpa|attention"),
    ("gemm", r"gemm|nvjet|xmma|cutlass|cublas|splitk"),
    ("reduce", r"reduce"),
    ("copy / cat / index", r"copy|cat_|catarray|index|gather|scatter|memcpy"),
    ("elementwise", r"elementwise|vectorized|unrolled"),
    ("memset", r"memset|fill"),
]


def category(name: str) -> str:
    low = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, low):
            return label
    return "other"


RUNTIME_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMalloc",
                 "cudaFree", "cudaMemcpy", "cudaHostAlloc")


def kernel_times(fn: Callable[[], object]) -> Dict[str, object]:
    """GPU kernel time of one ``fn()`` call (it must synchronise at its end): per category and per
    kernel name (ms), the wall time, the GPU's idle time between the first and the last kernel
    with the longest gaps (what the GPU waited for), and the host's synchronising / allocating
    runtime calls."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) * 1e3
    per_name: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0])
    spans = []
    runtime: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        start, end = ev.time_range.start, ev.time_range.end
        if getattr(ev, "device_type", None) == torch.autograd.DeviceType.CUDA:
            per_name[ev.name][0] += (end - start) / 1e3
            per_name[ev.name][1] += 1
            spans.append((start, end, ev.name))
        elif any(ev.name.startswith(r) for r in RUNTIME_CALLS):
            runtime[ev.name][0] += (end - start) / 1e3
            runtime[ev.name][1] += 1
    per_cat: Dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_name.items():
        per_cat[category(name)] += ms
    kernels = sorted(({"name": n, "ms": ms, "count": c, "category": category(n)}
                      for n, (ms, c) in per_name.items()), key=lambda r: -r["ms"])
    spans.sort()
    gaps, busy_end, prev = [], None, None
    for start, end, name in spans:
        if busy_end is not None and start > busy_end:
            gaps.append({"ms": (start - busy_end) / 1e3, "after": short(prev, 70), "before": short(name, 70)})
        if busy_end is None or end > busy_end:
            busy_end, prev = end, name
    gaps.sort(key=lambda g: -g["ms"])
    span_ms = (spans[-1][1] - spans[0][0]) / 1e3 if spans else 0.0
    return {"wall_ms": wall, "kernel_ms": sum(per_cat.values()), "categories": dict(per_cat),
            "kernels": kernels, "gpu_span_ms": span_ms, "gpu_idle_ms": sum(g["ms"] for g in gaps),
            "gaps": gaps[:8], "runtime_calls": {k: {"ms": v[0], "count": v[1]} for k, v in runtime.items()}}


def short(name: str, width: int = 90) -> str:
    name = re.sub(r"\s+", " ", name)
    return name if len(name) <= width else name[: width - 3] + "..."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=128 * 1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--configs", type=lambda s: s.split(","), default=["sdpa", "flux_fa", "flux_sa100"])
    ap.add_argument("--decode-batch", type=int, default=4, help="0: no decode profile")
    ap.add_argument("--fused-ops", action="store_true", help="flux configs (and sdpa_fused) use "
                    "flux_attention.fuse_ops")
    ap.add_argument("--decode-linears", action=argparse.BooleanOptionalAction, default=True,
                    help="with --fused-ops: fuse_ops(decode_linears=...)")
    ap.add_argument("--decode-steps", type=int, default=4)
    ap.add_argument("--name", default="e2e_profile_h200")
    ap.add_argument("--results-dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--out-dir", default=os.environ.get("OUT", ""))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    unknown = [c for c in args.configs if c not in e2e.CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {unknown}; known: {e2e.CONFIGS}")
    if args.layers < 1:
        ap.error(f"--layers must be >= 1; got {args.layers}")

    e2e.LLAMA_8B = {**e2e.LLAMA_8B, "num_hidden_layers": args.layers}
    bench_args = e2e.parse(["--lengths", str(args.length), "--configs", ",".join(["sdpa"] + args.configs),
                            "--no-largest", "--out-dir", ""] + (["--fused-ops"] if args.fused_ops else [])
                           + ([] if args.decode_linears else ["--no-decode-linears"]))
    bench = e2e.Bench(bench_args)
    bench.build()
    n_layers = args.layers
    results = []
    for config in args.configs:
        bench.use(config)
        bench.warm_attention(config, args.length)
        reserve = 8 + 2 * (args.decode_steps + 4)
        cache, ids, ms, _ = bench.run_prefill(config, args.length, reserve)  # warm
        del cache
        e2e.free_memory()
        holder = {"ids": torch.randint(3, bench.shape.vocab, (1, args.length), device=bench.device),
                  "cache": bench.new_cache(config, reserve)}

        def prefill():  # what bench/e2e.py times: one forward into a fresh cache
            with torch.no_grad():
                logits = bench.model(input_ids=holder["ids"], use_cache=True, logits_to_keep=1,
                                     **{bench.cache_kw: holder["cache"]}).logits
            holder["next"] = logits[:, -1].argmax(-1)

        prof = kernel_times(prefill)
        rec = {"config": config, "phase": "prefill", "length": args.length, "batch": 1,
               "sa_layers": len(bench.sa_layers(config)), **prof}
        results.append(rec)
        e2e.log(f"{config} prefill: wall {prof['wall_ms']:.1f} ms, kernels {prof['kernel_ms']:.1f} ms, "
                f"GPU idle {prof['gpu_idle_ms']:.1f} ms of {prof['gpu_span_ms']:.1f}; runtime calls "
                + ", ".join(f"{k} x{v['count']} {v['ms']:.1f} ms" for k, v in prof["runtime_calls"].items()))
        for g in prof["gaps"][:4]:
            e2e.log(f"  gap {g['ms']:.2f} ms after {g['after']} / before {g['before']}")
        cache, ids = holder["cache"], holder["next"]
        if args.decode_batch > 0:
            b = args.decode_batch
            e2e._replicate(cache, b, bench.device)
            graph = not e2e.is_sdpa(config)
            loop = StaticDecodeLoop(bench.model, cache, cuda_graph=graph, warmup_steps=2)
            try:
                loop.start(e2e._rows(ids, b), e2e._rows(args.length, b), 2 * args.decode_steps + 4)
                loop.step(2)
                prof = kernel_times(lambda: loop.step(args.decode_steps))
            finally:
                loop.close()
            for key in ("wall_ms", "kernel_ms", "gpu_span_ms", "gpu_idle_ms"):
                prof[key] /= args.decode_steps
            prof["categories"] = {k: v / args.decode_steps for k, v in prof["categories"].items()}
            for k in prof["kernels"]:
                k["ms"] /= args.decode_steps
                k["count"] /= args.decode_steps
            results.append({"config": config, "phase": f"decode step ({'graph' if graph else 'eager'})",
                            "length": args.length, "batch": b, "sa_layers": len(bench.sa_layers(config)),
                            **prof})
            e2e.log(f"{config} decode B={b}: wall {prof['wall_ms']:.2f} ms/step, kernels "
                    f"{prof['kernel_ms']:.2f} ms/step")
        del cache, holder
        e2e.free_memory()

    cats = [c for c, _ in CATEGORIES] + ["other"]
    lines = []
    for phase in sorted({r["phase"].split(" (")[0] for r in results}):
        rows = [r for r in results if r["phase"].startswith(phase)]
        title = (f"{phase}: GPU kernel ms per layer ({n_layers}-layer model, context {args.length}, "
                 f"batch {rows[0]['batch']}); lm head and embedding included in 'gemm'/'other'")
        table = [[r["config"], f"{r['wall_ms'] / n_layers:.3f}", f"{r['kernel_ms'] / n_layers:.3f}",
                  f"{r['gpu_idle_ms'] / n_layers:.3f}"]
                 + [f"{r['categories'].get(c, 0.0) / n_layers:.3f}" for c in cats] for r in rows]
        print(f"\n{title}")
        lines += [title, print_table(["config", "wall", "kernels", "GPU idle"] + cats, table)]
        for r in rows:
            head = f"{r['config']} {r['phase']}: top kernels (ms per layer, launches per layer)"
            print(f"\n{head}")
            lines += [head, print_table(["ms", "n", "category", "kernel"],
                                        [[f"{k['ms'] / n_layers:.3f}", f"{k['count'] / n_layers:.1f}",
                                          k["category"], short(k["name"])] for k in r["kernels"][:14]])]
    for r in results:
        r["kernels"] = r["kernels"][:40]
    write_results(args.name, {"settings": vars(args), "results": results, "summary": "\n".join(lines)},
                  [args.results_dir, args.out_dir])
    return 0


if __name__ == "__main__":
    sys.exit(main())
