"""Shared benchmark plumbing: CUDA-event timing with warmup, medians, environment record, JSON out."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from typing import Callable, Dict, List, Sequence

import torch


def time_ms(fn: Callable[[], object], warmup_ms: float = 25.0, rep_ms: float = 100.0,
            min_reps: int = 5, max_reps: int = 1000) -> Dict[str, float]:
    """Median / p20 / p80 milliseconds of fn() on the current CUDA stream (host clock on CPU).

    Warms up for warmup_ms, then times individual calls (an event pair each on CUDA) until rep_ms
    of samples or max_reps calls. The median is what the tables report.
    """
    cuda = torch.cuda.is_available() and torch.cuda.current_device() is not None
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    while (time.perf_counter() - t0) * 1e3 < warmup_ms:
        fn()
        sync()
    samples: List[float] = []
    spent = 0.0
    while len(samples) < max_reps and (spent < rep_ms or len(samples) < min_reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t) * 1e3
        samples.append(ms)
        spent += ms
    samples.sort()
    pick = lambda f: samples[min(len(samples) - 1, int(f * len(samples)))]  # noqa: E731
    return {"median_ms": pick(0.5), "p20_ms": pick(0.2), "p80_ms": pick(0.8), "reps": len(samples)}


def graph_time_ms(fns: Sequence[Callable[[], object]], calls: int = 0, warmup_ms: float = 25.0,
                  rep_ms: float = 100.0) -> Dict[str, float]:
    """Milliseconds per call when fns (called round-robin: one per rotated input copy) run from a
    CUDA graph: launch overhead gone, as a decode step in a captured generation loop sees it.

    The graph holds max(calls, len(fns)) calls; one replay is timed with time_ms and divided by
    that count. Raises if capture fails (callers fall back to eager time_ms).
    """
    n = max(calls, len(fns))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture: lazy init, kernel attributes
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            fns[i % len(fns)]()
    t = time_ms(graph.replay, warmup_ms=warmup_ms, rep_ms=rep_ms)
    del graph
    return {k: (v / n if k.endswith("_ms") else v) for k, v in t.items()} | {"calls_per_graph": n}


def git_sha() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.check_output(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> Dict[str, object]:
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    env["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = p.name
        env["sms"] = p.multi_processor_count
    return env


def write_results(name: str, payload: Dict[str, object], out_dirs: List[str]) -> None:
    """Writes <dir>/<name>.json into each directory (bench/results and, on the GPU, $OUT)."""
    payload = {"environment": environment(), **payload}
    for d in out_dirs:
        if not d:
            continue
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, name + ".json"), "w") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {os.path.join(d, name + '.json')}")


def print_table(headers: List[str], rows: List[List[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r]
                                          for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text)
    return text


def with_env(name, value, fn):
    """fn, run with environment variable name=value (the kernels' A/B knobs are read per call)."""
    def run():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old
    return run
