"""Linear layers at decode's few token rows: decode_linear / decode_swiglu against cuBLAS.

Shapes: the Llama-3.1-8B layer's seven matrices (q and o 4096 x 4096, k and v 1024 x 4096, gate
and up 14336 x 4096, down 4096 x 14336) and its lm_head (128256 x 4096), bf16, 1, 2, 4 and 8 token
rows. Anchors: torch.nn.functional.linear (cuBLAS), and for the MLP's gate and up: two cuBLAS
linears plus flux's fused silu_mul (what fuse_ops ran before decode_swiglu). "q+k+v" is
decode_linear_group over the three projections (one launch, what fuse_ops runs at decode) against
three cuBLAS linears.
Timing: CUDA-graph replay over rotated weight copies (>= 256 MB per round, so the 50 MB L2 is
cold, as in a decode step that walks 32 layers), median of bench.common.time_ms.
TB/s = weight bytes / time (the activations are < 0.3 MB).
"Layer" rows sum one layer's launches as fuse_ops runs them: q+k+v, o, gate + up, down.
Writes h200_decode_linear.json to bench/results and --out-dir.

    python bench/decode_linear.py [--quick] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import graph_time_ms, print_table, write_results  # noqa: E402

import flux_attention as fa  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN, KV, FFN, VOCAB = 4096, 1024, 14336, 128256
# name -> (out_features, in_features, swiglu)
MATRICES = {"q_proj": (HIDDEN, HIDDEN, False), "k_proj": (KV, HIDDEN, False), "v_proj": (KV, HIDDEN, False),
            "o_proj": (HIDDEN, HIDDEN, False), "gate+up": (FFN, HIDDEN, True), "down_proj": (HIDDEN, FFN, False),
            "lm_head": (VOCAB, HIDDEN, False)}
GROUPS = {"q+k+v": ["q_proj", "k_proj", "v_proj"]}
LAYER = ["q+k+v", "o_proj", "gate+up", "down_proj"]


def measure_group(name, rows, dtype=torch.bfloat16, round_bytes=256 << 20):
    shapes = [MATRICES[m][:2] for m in GROUPS[name]]
    per_copy = sum(n * k * 2 for n, k in shapes)
    copies = max(1, -(-round_bytes // per_copy))
    k = shapes[0][1]
    sets = [[torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5 for n, _ in shapes] for _ in range(copies)]
    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    ours = [lambda ws=ws: fa.decode_linear_group(x, ws) for ws in sets]
    anchor = [lambda ws=ws: [F.linear(x, w) for w in ws] for ws in sets]
    err = max((o.double() - F.linear(x.double(), w.double())).abs().max().item()
              for o, w in zip(fa.decode_linear_group(x, sets[0]), sets[0]))
    t_ours = graph_time_ms(ours)["median_ms"]
    t_cublas = graph_time_ms(anchor)["median_ms"]
    del sets
    torch.cuda.empty_cache()
    return {"matrix": name, "rows": rows, "out_features": sum(n for n, _ in shapes), "in_features": k,
            "weight_bytes": per_copy, "ours_us": t_ours * 1e3, "cublas_us": t_cublas * 1e3,
            "ours_tbps": per_copy / (t_ours * 1e-3) / 1e12, "cublas_tbps": per_copy / (t_cublas * 1e-3) / 1e12,
            "speedup": t_cublas / t_ours, "max_abs_err_vs_fp64": err}


def measure(name, rows, dtype=torch.bfloat16, round_bytes=256 << 20):
    n, k, swiglu = MATRICES[name]
    per_copy = n * k * 2 * (2 if swiglu else 1)
    copies = max(1, -(-round_bytes // per_copy))
    ws = [torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5 for _ in range(copies * (2 if swiglu else 1))]
    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    if swiglu:
        pairs = [(ws[2 * i], ws[2 * i + 1]) for i in range(copies)]
        ours = [lambda g=g, u=u: fa.decode_swiglu(x, g, u) for g, u in pairs]
        anchor = [lambda g=g, u=u: fa.silu_mul(F.linear(x, g), F.linear(x, u)) for g, u in pairs]
        err = (fa.decode_swiglu(x, *pairs[0]).float()
               - (F.silu(F.linear(x.double(), pairs[0][0].double())) * F.linear(x.double(), pairs[0][1].double())))
    else:
        ours = [lambda w=w: fa.decode_linear(x, w) for w in ws]
        anchor = [lambda w=w: F.linear(x, w) for w in ws]
        err = fa.decode_linear(x, ws[0]).double() - F.linear(x.double(), ws[0].double())
    t_ours = graph_time_ms(ours)["median_ms"]
    t_cublas = graph_time_ms(anchor)["median_ms"]
    del ws
    torch.cuda.empty_cache()
    return {"matrix": name, "rows": rows, "out_features": n, "in_features": k, "weight_bytes": per_copy,
            "ours_us": t_ours * 1e3, "cublas_us": t_cublas * 1e3,
            "ours_tbps": per_copy / (t_ours * 1e-3) / 1e12, "cublas_tbps": per_copy / (t_cublas * 1e-3) / 1e12,
            "speedup": t_cublas / t_ours, "max_abs_err_vs_fp64": err.abs().max().item()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="rows 1 and 4 only")
    ap.add_argument("--rows", type=lambda s: [int(r) for r in s.split(",")], default=None)
    ap.add_argument("--results-dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--out-dir", default=os.environ.get("OUT", ""))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    rows_list = args.rows or ([1, 4] if args.quick else [1, 2, 4, 8])
    bad = [r for r in rows_list if not 1 <= r <= 8]
    if bad:
        ap.error(f"--rows: each must be 1..8; got {bad}")
    results = []
    with torch.no_grad():
        for rows in rows_list:
            for name in [*MATRICES, *GROUPS]:
                results.append(measure_group(name, rows) if name in GROUPS else measure(name, rows))
                r = results[-1]
                print(f"rows {rows} {name:9s} ours {r['ours_us']:8.1f} us ({r['ours_tbps']:.2f} TB/s)  "
                      f"cuBLAS {r['cublas_us']:8.1f} us ({r['cublas_tbps']:.2f} TB/s)  x{r['speedup']:.2f}",
                      flush=True)
            layer = [r for r in results if r["rows"] == rows and r["matrix"] in LAYER]
            nbytes = sum(r["weight_bytes"] for r in layer)
            ours, cublas = sum(r["ours_us"] for r in layer), sum(r["cublas_us"] for r in layer)
            results.append({"matrix": "layer", "rows": rows, "weight_bytes": nbytes, "ours_us": ours,
                            "cublas_us": cublas, "ours_tbps": nbytes / (ours * 1e-6) / 1e12,
                            "cublas_tbps": nbytes / (cublas * 1e-6) / 1e12, "speedup": cublas / ours})
    table = print_table(
        ["rows", "matrix", "MB", "ours us", "TB/s", "cuBLAS us", "TB/s", "speedup"],
        [[r["rows"], r["matrix"], r["weight_bytes"] / 1e6, r["ours_us"], r["ours_tbps"], r["cublas_us"],
          r["cublas_tbps"], r["speedup"]] for r in results])
    print(table)
    write_results("h200_decode_linear", {"settings": vars(args), "results": results, "table": table},
                  [args.results_dir, args.out_dir])


if __name__ == "__main__":
    main()
