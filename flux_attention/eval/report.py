"""Summaries of suite results: the printed tables, ``report.md``, ``results.json`` and the plots
(``routing_heatmap.png``: layers x tasks SA fraction of Flux; ``speed.png``: prefill and decode
time per length and mode; ``training.png`` when a training metrics file is given)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Dict, List, Optional, Sequence

from .suite import MODE_NAMES, ExampleResult, task_group
from .timing import speed_summary

__all__ = ["summarize", "format_tables", "write_report"]

_GROUPS = ("retrieval", "holistic", "other")
_GROUP_NAMES = {"retrieval": "retrieval-heavy", "holistic": "holistic", "other": "other"}


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _cell(rows: List[ExampleResult]) -> dict:
    nll = sum(r.prompt_nll_sum for r in rows)
    count = sum(r.prompt_nll_count for r in rows)
    return {
        "n": len(rows),
        "match": _mean(r.match for r in rows),
        "token_acc": _mean(r.token_acc for r in rows),
        "answer_nll": _mean(r.answer_nll for r in rows),
        "ppl": math.exp(nll / count) if count else None,
        "sa_fraction": _mean(r.sa_fraction for r in rows),
        "kv_saved": _mean(r.kv_saved for r in rows),
    }


def summarize(results: Sequence[ExampleResult], meta: Optional[dict] = None,
              sweep: Optional[Dict[int, Dict[str, dict]]] = None) -> dict:
    """A JSON-able summary: per task and mode, per task group (retrieval-heavy / holistic) and
    mode, overall per mode, Flux's SA fraction per layer and task, speed per length and mode (of
    the suite's examples, and of ``sweep``, :func:`~flux_attention.eval.timing.sweep`'s result),
    and every example's scores."""
    if not results:
        raise ValueError("summarize: no results")
    modes = list(dict.fromkeys(r.mode for r in results))
    tasks = list(dict.fromkeys(r.task for r in results))
    by = lambda pred: [r for r in results if pred(r)]  # noqa: E731
    per_task = {t: {"group": task_group(t), **{m: _cell(by(lambda r: r.task == t and r.mode == m))
                                                for m in modes}} for t in tasks}
    groups = {}
    for g in _GROUPS:
        members = [t for t in tasks if per_task[t]["group"] == g]
        if members:
            # Mean over the group's tasks (each task weighs the same, whatever its sample count).
            groups[g] = {m: {k: _mean(per_task[t][m][k] for t in members if per_task[t][m][k] is not None)
                             for k in ("match", "token_acc", "sa_fraction", "kv_saved")} for m in modes}
            groups[g]["tasks"] = members
            groups[g]["n"] = sum(per_task[t][modes[0]]["n"] for t in members)
    overall = {m: _cell(by(lambda r: r.mode == m)) for m in modes}
    layers = {}
    if "flux" in modes:
        for t in tasks:
            rows = by(lambda r: r.task == t and r.mode == "flux")
            n_layers = len(rows[0].use_sparse)
            layers[t] = [_mean(r.use_sparse[i] for r in rows) for i in range(n_layers)]
    return {
        "meta": dict(meta or {}),
        "modes": modes,
        "tasks": per_task,
        "groups": groups,
        "overall": overall,
        "flux_sa_per_layer": layers,
        "speed": {str(k): v for k, v in speed_summary(results).items()},
        "sweep": {str(k): v for k, v in (sweep or {}).items()},
        "examples": [dataclasses.asdict(r) for r in results],
    }


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _table(header: List[str], rows: List[List[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    def fmt(r):  # first column left-aligned, numbers right-aligned
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def format_tables(summary: dict) -> str:
    """The accuracy table (per task, then per group and overall), the speed tables and Flux's
    routing by layer, as text."""
    return "\n\n".join(_blocks(summary, markdown=False))


def _blocks(summary: dict, markdown: bool) -> List[str]:
    modes = summary["modes"]
    names = [MODE_NAMES[m] for m in modes]
    header = ["task", "n"] + [f"match {n}" for n in names] + [f"tok.acc {n}" for n in names] \
        + [f"ppl {n}" for n in names]
    if "flux" in modes:
        header.append("SA frac Flux")
    rows = []

    def row(label, n, cells, ppl=True):
        r = [label, str(n)] + [_pct(cells[m]["match"]) for m in modes] \
            + [_pct(cells[m]["token_acc"]) for m in modes] \
            + [_num(cells[m].get("ppl")) if ppl else "" for m in modes]
        if "flux" in modes:
            r.append(_pct(cells["flux"]["sa_fraction"]))
        return r

    for t, cells in summary["tasks"].items():
        rows.append(row(t, cells[modes[0]]["n"], cells))
    for g, cells in summary["groups"].items():
        rows.append(row(f"[{_GROUP_NAMES[g]}]", cells["n"], cells, ppl=False))
    rows.append(row("[all]", summary["overall"][modes[0]]["n"], summary["overall"]))
    out = [_table(header, rows, markdown)]

    sp_header = ["length", "mode", "prompt tok", "prefill s", "decode ms/tok", "SA frac", "KV saved"]
    sp_rows = []
    for length, cells in summary["speed"].items():
        for m in modes:
            c = cells.get(m)
            if c is None:
                continue
            sp_rows.append([length, MODE_NAMES[m], f"{c['prompt_tokens']:.0f}",
                            _num(c["prefill_s"], "{:.3f}"), _num(c["decode_ms"], "{:.1f}"),
                            _pct(c["sa_fraction"]), _pct(c["kv_saved"])])
    out.append(_table(sp_header, sp_rows, markdown))
    if summary["sweep"]:
        out.append(_sweep_table(summary, markdown))
    if summary["flux_sa_per_layer"] and not markdown:
        out.append(routing_map(summary))
    return out


def _sweep_table(summary: dict, markdown: bool) -> str:
    header = ["length", "mode", "prompt tok", "prefill s", "vs all-FA", "decode ms/tok", "vs all-FA",
              "SA frac", "KV saved"]
    rows = []
    for length, cells in summary["sweep"].items():
        base = cells.get("fa")
        for m, c in cells.items():
            ratio = lambda k: "-" if base is None or not c[k] else f"{base[k] / c[k]:.2f}x"  # noqa: E731
            rows.append([length, MODE_NAMES[m], str(c["prompt_tokens"]), f"{c['prefill_s']:.3f}",
                         ratio("prefill_s"), f"{c['decode_ms']:.1f}", ratio("decode_ms"),
                         _pct(c["sa_fraction"]), _pct(c["kv_saved"])])
    title = "" if markdown else "Speed by prompt length (one prompt per length)\n"
    return title + _table(header, rows, markdown)


def routing_map(summary: dict) -> str:
    """Flux's decisions per layer as text, one row per task: ``.`` = always FA, ``#`` = always SA,
    a digit d = SA in about d/10 of the task's sequences."""
    layers = summary["flux_sa_per_layer"]
    width = max(len(t) for t in layers)
    n = len(next(iter(layers.values())))
    ruler = "".join(f"{i:<10}" for i in range(0, n, 10))[:n]  # 0, 10, 20 ... above their layers
    lines = ["Flux routing by layer (. = FA, # = SA, digit = SA in that many tenths of the sequences)",
             f"{'layer':<{width}}  {ruler}"]
    for task, fr in layers.items():
        cells = "".join("." if f == 0 else "#" if f == 1 else str(min(9, max(1, round(10 * f)))) for f in fr)
        lines.append(f"{task:<{width}}  {cells}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    return plt


def plot_routing_heatmap(summary: dict, path: str) -> bool:
    """Flux's SA fraction per (layer, task) as an image; False when Flux was not evaluated."""
    layers = summary["flux_sa_per_layer"]
    if not layers:
        return False
    plt = _plt()
    tasks = list(layers)
    n_layers = len(next(iter(layers.values())))
    grid = [[layers[t][i] for t in tasks] for i in range(n_layers)]
    fig, ax = plt.subplots(figsize=(1.3 * len(tasks) + 2.5, 0.22 * n_layers + 1.8))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(len(tasks)), [f"{t}\n({summary['tasks'][t]['group']})" for t in tasks],
                  rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title("Flux: share of sequences routed to sparse attention")
    fig.colorbar(im, ax=ax, label="SA fraction")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_speed(summary: dict, path: str) -> None:
    """Prefill time and decode time per token against prompt length, one line per mode, from the
    speed sweep when there is one; else the suite's medians as bars, grouped by length."""
    plt = _plt()
    if summary["sweep"]:
        _plot_sweep(plt, summary, path)
        return
    modes, speed = summary["modes"], summary["speed"]
    lengths = list(speed)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(modes)
    for ax, key, label in ((axes[0], "prefill_s", "prefill (s, median)"),
                           (axes[1], "decode_ms", "decode (ms / token, median)")):
        for j, m in enumerate(modes):
            xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(lengths))]
            ys = [(speed[L].get(m) or {}).get(key) or 0.0 for L in lengths]
            bars = ax.bar(xs, ys, width, label=MODE_NAMES[m])
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(lengths)), [f"{L} tok" for L in lengths])
        ax.set_ylabel(label)
        ax.set_xlabel("target prompt length")
    axes[0].legend(fontsize=8)
    meta = summary["meta"]
    fig.suptitle(f"{meta.get('model', '')} on {meta.get('device', '')}".strip(), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_sweep(plt, summary: dict, path: str) -> None:
    sweep = summary["sweep"]
    lengths = [int(L) for L in sweep]
    modes = list(dict.fromkeys(m for cells in sweep.values() for m in cells))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "prefill_s", "prefill (s)"),
                           (axes[1], "decode_ms", "decode (ms / token)")):
        for m in modes:
            pts = [(int(L), cells[m][key]) for L, cells in sweep.items() if m in cells]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=MODE_NAMES[m])
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(L) for L in lengths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    meta = summary["meta"]
    fig.suptitle(f"{meta.get('model', '')} on {meta.get('device', '')}".strip(), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(metrics_file: str, path: str) -> bool:
    """Loss and SA fraction per task class over the training steps (the last line of a step
    wins, as after a resume); False when the file has no steps."""
    steps: Dict[int, dict] = {}
    with open(metrics_file) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                steps[rec["step"]] = rec
    if not steps:
        return False
    plt = _plt()
    xs = sorted(steps)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(xs, [steps[s]["lm_loss"] for s in xs], lw=0.8, label="LM loss (answer tokens)")
    axes[0].plot(xs, [steps[s]["reg_loss"] for s in xs], lw=0.8, label="sparsity term")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=8)
    classes = sorted({c for s in xs for c in steps[s]["sa_fraction_per_task"]})
    for c in classes:
        pts = [(s, steps[s]["sa_fraction_per_task"][c]) for s in xs if c in steps[s]["sa_fraction_per_task"]]
        # Each step holds one or two classes: a running mean over the class's own steps reads better.
        run, acc = [], []
        for _, v in pts:
            acc.append(v)
            run.append(sum(acc[-10:]) / len(acc[-10:]))
        axes[1].plot([p[0] for p in pts], run, lw=1.0, label=c)
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("SA fraction (training, last 10 steps)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(summary: dict, out_dir: str, title: str = "Flux Attention evaluation",
                 preamble: str = "", metrics_file: Optional[str] = None) -> List[str]:
    """Write ``report.md``, ``results.json``, ``speed.png``, ``routing_heatmap.png`` (when Flux was
    evaluated) and ``training.png`` (when ``metrics_file`` is given) into ``out_dir``; returns the
    paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    written.append(path)
    plots = []
    path = os.path.join(out_dir, "speed.png")
    plot_speed(summary, path)
    written.append(path)
    plots.append(("Speed", "speed.png"))
    path = os.path.join(out_dir, "routing_heatmap.png")
    if plot_routing_heatmap(summary, path):
        written.append(path)
        plots.append(("Routing (Flux, SA fraction per layer and task)", "routing_heatmap.png"))
    if metrics_file is not None:
        path = os.path.join(out_dir, "training.png")
        if plot_training(metrics_file, path):
            written.append(path)
            plots.append(("Training", "training.png"))

    meta = summary["meta"]
    lines = [f"# {title}", ""]
    if preamble:
        lines += [preamble.strip(), ""]
    lines += ["| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in meta.items()]
    acc, speed, *more = _blocks(summary, markdown=True)
    lines += ["", "## Accuracy, perplexity, routing", "", _METRICS_NOTE, "", acc, ""]
    if summary["flux_sa_per_layer"]:
        lines += ["```", routing_map(summary), "```", ""]
    lines += ["## Speed", "", _SPEED_NOTE, "", speed, ""]
    for block in more:
        lines += [_SWEEP_NOTE, "", block, ""]
    for caption, file in plots:
        lines += [f"### {caption}", "", f"![{caption}]({file})", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    written.append(path)
    return written


_METRICS_NOTE = (
    "*match*: the answer (every variable, for variable tracking) occurs in the greedy generation "
    "(up to the answer's length + slack tokens; RULER's string match). *tok.acc*: share of answer "
    "tokens that are the argmax under teacher forcing. *ppl*: perplexity of the prompts (held-out "
    "generated text) under each mode's routing. *SA frac*: share of (layer, sequence) decisions "
    "Flux sent to sparse attention. Group rows average their tasks, [all] all examples.")
_SWEEP_NOTE = (
    "By prompt length: one synthetic prompt per length, prefill once and a few greedy decode steps "
    "per mode; *vs all-FA* is all-FA's time over the mode's (above 1 = faster).")
_SPEED_NOTE = (
    "Medians over the examples of each length. *prefill*: one forward over the prompt (plus the "
    "last position's logits); *decode*: per greedy step; *KV saved*: KV-cache bytes held against a "
    "dense cache after generation (pages are whole blocks, so all-FA can show a small negative "
    "number).")
