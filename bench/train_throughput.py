"""Training throughput: tokens/s per device, step time and peak memory of N training steps of a
config, against the step's FLOP count (train/flops.py), on 1 or more devices.

    python bench/train_throughput.py --config configs/llama3_8b.yaml --steps 3
    python bench/train_throughput.py --config configs/llama3_8b.yaml --nproc 1,2,4   # scaling
    python bench/train_throughput.py --config configs/tiny.yaml --device cpu --steps 2 # plumbing

Packs are exactly ``data.pack_tokens`` tokens of random ids split into ``--docs`` equal sequences
(default 1: one 64K sequence at the llama3_8b config, the attention-heaviest case), so the FLOP
count of a step is known; ``--data config`` uses the config's own data instead. The routers start
FA-biased, so every layer runs FA (the FLOP count assumes that; the measured SA fraction is
reported). Extra ``--section.key=value`` arguments override the config.

Each setting writes ``bench/results/<name>.json`` (and ``--out``), and prints a table with
tokens/s/device, step time (median of the timed steps), peak memory, achieved TFLOP/s per device
against the bf16 matmul ceiling (787 TFLOP/s on H200, DESIGN.md section 6), and the scaling
efficiency from one device (tokens/s/device at N over tokens/s/device at 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

MATMUL_CEILING_TFLOPS = 787.0  # H200 bf16 dense matmul, DESIGN.md section 6


class FixedPacks:
    """Packer stand-in: packs of exactly ``tokens`` random ids in ``docs`` equal sequences, task
    classes cycling; the same data position interface as ``train.data.Packer``."""

    def __init__(self, tokens: int, docs: int, vocab: int, seed: int, rank: int, multiple: int):
        import torch

        self.tokens, self.docs, self.vocab, self.seed, self.rank = tokens, docs, vocab, seed, rank
        self.multiple, self.cursor, self.torch = multiple, 0, torch

    def next_pack(self):
        from train.data import make_pack

        torch = self.torch
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 1009 + self.cursor)
        self.cursor += 1
        base, extra = divmod(self.tokens, self.docs)
        items = []
        for i in range(self.docs):
            n = base + (1 if i < extra else 0)
            ids = torch.randint(3, self.vocab, (n,), generator=g).tolist()
            items.append((ids, [], i % 5))
        return make_pack(items, "all", self.multiple)

    def state_dict(self):
        return {"cursor": self.cursor}

    def load_state_dict(self, state):
        self.cursor = state["cursor"]


def _count_syncs(fn):
    """Run ``fn`` under CUDA sync debug mode; returns (result, number of synchronising calls)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    return result, len(syncs), sorted({f"{os.path.basename(w.filename)}:{w.lineno}" for w in syncs})


def worker(args, overrides) -> dict:
    """One setting, in this process (one rank of a torchrun job, or alone)."""
    import torch

    from train.config import load_config
    from train.flops import Shape, step_flops, step_memory
    from train.parallel import all_reduce_sum
    from train.trainer import Trainer

    tmp = tempfile.mkdtemp(prefix="train_bench_")
    base = [f"--checkpoint.dir={tmp}/ckpt", "--checkpoint.resume=false", f"--metrics.file={tmp}/m.jsonl",
            "--metrics.progress_bar=false", f"--train.steps={args.warmup + args.steps + 1}"]
    if args.device:
        base.append(f"--train.device={args.device}")
    cfg = load_config(args.config, base + overrides)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    w = trainer.world
    setup_s = time.perf_counter() - t0
    shape = Shape.of(trainer.model.config)
    rc = trainer.router_cfg
    if args.data == "fixed":
        trainer.packer = FixedPacks(cfg.data.pack_tokens, args.docs, shape.vocab, cfg.data.seed, w.dp_rank, w.cp)
    cuda = w.device.type == "cuda"
    records, times = [], []
    sync_info = None
    try:
        for i in range(args.warmup + args.steps):
            if i == args.warmup and cuda:
                torch.cuda.reset_peak_memory_stats(w.device)
            trainer.step += 1
            if args.count_syncs and cuda and i == 0:  # the first (warmup) step: its timing is not used
                record, n, where = _count_syncs(trainer.train_step)
                sync_info = {"syncs_per_step": n, "where": where[:20]}
            else:
                record = trainer.train_step()
            if i >= args.warmup:
                records.append(record)
                times.append(record["step_time_s"])
            if w.main:
                print(f"  step {i + 1}{' (warmup)' if i < args.warmup else ''}: {record['step_time_s']:.2f} s, "
                      f"{record['tokens_per_s_per_device']:.0f} tokens/s/device, loss {record['loss']:.3f}, "
                      f"peak {record['peak_mem_gib']:.1f} GiB", flush=True)
            if args.time_budget_s and i + 1 >= args.warmup + 1 and i + 1 < args.warmup + args.steps:
                over = time.perf_counter() - t0 + record["step_time_s"] > args.time_budget_s
                # Steps are collective: the ranks stop together when any of them is over budget.
                flag = all_reduce_sum(torch.tensor([float(over)], device=w.device), w)
                if flag.item() > 0:
                    if w.main:
                        print(f"  stopping after step {i + 1}: the next would pass --time-budget-s "
                              f"{args.time_budget_s}", flush=True)
                    break
    finally:
        trainer.close()
    if not records:
        records, times = [record], [record["step_time_s"]]
    tokens = records[-1]["tokens"]
    step_s = statistics.median(times)
    seqlens = [cfg.data.pack_tokens // args.docs] * args.docs if args.data == "fixed" else None
    flops = step_flops(shape, seqlens, rc.sink_tokens, rc.local_blocks, rc.block_size,
                       checkpointing=cfg.model.activation_checkpointing,
                       save_attention=cfg.model.save_attention, kl=cfg.loss.kl_weight > 0) if seqlens else None
    mem_est = step_memory(shape, cfg.data.pack_tokens, 2 if cfg.model.dtype != "float32" else 4, w.cp,
                          w.size if cfg.dist.fsdp else 1, cfg.model.activation_checkpointing,
                          cfg.model.save_attention, cfg.loss.logit_chunk, cfg.loss.kl_weight > 0)
    packs_per_step = w.dp * cfg.train.grad_accum
    result = {
        "devices": w.size, "dp": w.dp, "cp": w.cp, "fsdp": cfg.dist.fsdp,
        "pack_tokens": cfg.data.pack_tokens, "docs_per_pack": args.docs if seqlens else None,
        "grad_accum": cfg.train.grad_accum, "tokens_per_step": tokens,
        "step_time_s": step_s, "step_times_s": times, "setup_s": setup_s,
        "tokens_per_s_per_device": tokens / step_s / w.size,
        "peak_mem_gib": max(r["peak_mem_gib"] for r in records),
        "peak_mem_estimate_gib": mem_est,
        "sa_fraction": records[-1]["sa_fraction"], "loss": records[-1]["loss"],
        "timed_steps": len(times),
    }
    if cuda:
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(w.device) / 2**30
    if flops:
        per_device = flops["total"] * packs_per_step / step_s / w.size / 1e12
        result.update({"flops_per_pack": flops, "tflops_per_device": per_device,
                       "fraction_of_matmul_ceiling": per_device / MATMUL_CEILING_TFLOPS,
                       "flops_per_token": flops["per_token"]})
    if sync_info is not None:
        result["host_syncs"] = sync_info
    return result


def _launch(args, overrides, nproc: int, part: str) -> dict:
    """Run this script as a torchrun job of ``nproc`` ranks; returns rank 0's result."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           os.path.abspath(__file__), "--worker-out", part, "--config", args.config,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--docs", str(args.docs),
           "--data", args.data, "--time-budget-s", str(args.time_budget_s)]
    if args.device:
        cmd += ["--device", args.device]
    if args.count_syncs:
        cmd.append("--count-syncs")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd + overrides, env=env, cwd=ROOT)
    if proc.returncode != 0 or not os.path.exists(part):
        return {"devices": nproc, "error": f"torchrun exited with status {proc.returncode}"}
    with open(part) as f:
        return json.load(f)


def _table(rows) -> str:
    lines = ["| devices | dp x cp | fsdp | step s | tokens/s/device | scaling | peak GiB (est.) | TFLOP/s/device | of 787 |",
             "|---|---|---|---|---|---|---|---|---|"]
    one = next((r for r in rows if r.get("devices") == 1 and "error" not in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['devices']} | | | failed: {r['error']} | | | | | |")
            continue
        scaling = f"{r['tokens_per_s_per_device'] / one['tokens_per_s_per_device']:.0%}" if one else "-"
        tf = r.get("tflops_per_device")
        tf_s = "-" if tf is None else f"{tf:.0f}"
        frac = "-" if tf is None else f"{r['fraction_of_matmul_ceiling']:.0%}"
        lines.append(
            f"| {r['devices']} | {r['dp']} x {r['cp']} | {'yes' if r['fsdp'] else 'no'} | {r['step_time_s']:.2f} | "
            f"{r['tokens_per_s_per_device']:,.0f} | {scaling} | {r['peak_mem_gib']:.1f} "
            f"({r['peak_mem_estimate_gib']['total']:.0f}) | {tf_s} | {frac} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--docs", type=int, default=1, help="equal sequences per fixed pack")
    p.add_argument("--data", choices=("fixed", "config"), default="fixed")
    p.add_argument("--nproc", default="", help="comma-separated device counts, each a torchrun job")
    p.add_argument("--device", default="", help="override train.device (cpu for a plumbing run)")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="stop timing once the next step would pass this many seconds (0: no limit)")
    p.add_argument("--count-syncs", action="store_true",
                   help="count host syncs in the first (untimed) step under CUDA sync debug mode")
    p.add_argument("--name", default="", help="results name (default: train_<config>)")
    p.add_argument("--out", default="", help="also write the JSON and table here")
    p.add_argument("--results-dir", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args(argv)

    if args.worker_out:  # one rank of a --nproc job
        result = worker(args, overrides)
        if int(os.environ.get("RANK", 0)) == 0:
            with open(args.worker_out, "w") as f:
                json.dump(result, f)
        return 0

    from common import environment

    name = args.name or f"train_{os.path.splitext(os.path.basename(args.config))[0]}"
    rows = []
    if args.nproc:
        for n in [int(x) for x in args.nproc.split(",")]:
            print(f"== {n} device(s)", flush=True)
            rows.append(_launch(args, overrides, n, os.path.join(tempfile.mkdtemp(), "part.json")))
    else:
        print("== in-process", flush=True)
        try:
            rows.append(worker(args, overrides))
        except Exception as e:  # report and still write the file: the run happens once, blind
            import traceback

            traceback.print_exc()
            rows.append({"devices": int(os.environ.get("WORLD_SIZE", 1)), "error": f"{type(e).__name__}: {e}"})
    table = _table(rows)
    doc = {"name": name, "config": args.config, "overrides": overrides, "environment": environment(),
           "results": rows, "table": table}
    print("\n" + table)
    dirs = [args.results_dir] + ([args.out] if args.out else [])
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{name}.json"), "w") as f:
            json.dump(doc, f, indent=1)
        with open(os.path.join(d, f"{name}.md"), "w") as f:
            f.write(f"# {name}\n\n`{args.config}` {' '.join(overrides)}\n\n{table}\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
