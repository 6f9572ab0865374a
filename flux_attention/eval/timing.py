"""Wall-clock timing of prefill and decode, and its summary per (length, mode).

Every example of the suite is timed where it runs: its prompt's prefill (one forward, plus the
last position's logits, which is what ``generate`` computes) and its greedy decode steps. Medians
over the examples of a (length, mode) cell make the numbers robust to a busy machine; modes are
interleaved per example, so a slow spell hits all of them alike.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Dict, List, Sequence

import torch

__all__ = ["timed", "speed_summary"]


class _Span:
    seconds: float = 0.0


@contextlib.contextmanager
def timed(device: torch.device):
    """``with timed(device) as t: ...`` then ``t.seconds``; on CUDA the device is synchronised on
    both sides, so queued kernels count where they belong."""
    span = _Span()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield span
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        span.seconds = time.perf_counter() - start


def _median(values: Sequence[float]):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def speed_summary(results) -> Dict[int, Dict[str, dict]]:
    """``{length: {mode: {prefill_s, decode_ms, kv_saved, sa_fraction, prompt_tokens, n}}}``:
    medians of prefill seconds and decode milliseconds per token, means of the KV saved and the SA
    fraction, over the examples of each cell."""
    cells: Dict[int, Dict[str, List]] = {}
    for r in results:
        cells.setdefault(r.length, {}).setdefault(r.mode, []).append(r)
    out: Dict[int, Dict[str, dict]] = {}
    for length in sorted(cells):
        out[length] = {}
        for mode, rows in cells[length].items():
            decode = _median([r.decode_s_per_token for r in rows])
            out[length][mode] = {
                "prefill_s": _median([r.prefill_s for r in rows]),
                "decode_ms": None if decode is None else 1000 * decode,
                "kv_saved": sum(r.kv_saved for r in rows) / len(rows),
                "sa_fraction": sum(r.sa_fraction for r in rows) / len(rows),
                "prompt_tokens": sum(r.prompt_tokens for r in rows) / len(rows),
                "n": len(rows),
            }
    return out


def sweep(model, tok, lengths: Sequence[int], modes: Sequence[str], task: str = "summary",
          decode_tokens: int = 8, seed: int = 1234, chat_template: bool = True,
          progress: bool = True) -> Dict[int, Dict[str, dict]]:
    """Prefill and decode time of one synthetic prompt per length (``task``), per mode: where the
    suite's short prompts hide it, this shows how the attention share, and so what sparse layers
    save, grows with length. Returns ``{length: {mode: {prefill_s, decode_ms, sa_fraction,
    kv_saved, prompt_tokens}}}``; each mode runs once untimed first at the shortest length."""
    from tqdm import tqdm

    from flux_attention import FluxCache, hf

    from .suite import _cache_kw, forced, synthetic_examples

    device = next(model.parameters()).device
    kw = _cache_kw(model)
    body, head = model.get_decoder(), model.get_output_embeddings()

    @torch.inference_mode()
    def run(prompt: List[int], mode: str) -> dict:
        with forced(model, mode):
            cache = FluxCache(model.config)
            ids = torch.tensor([prompt], device=device)
            with timed(device) as pre:
                hidden = body(input_ids=ids, use_cache=True, **{kw: cache}).last_hidden_state
                nxt = head(hidden[:, -1:]).argmax(-1)
            use_sparse = hf.routing_report(model).use_sparse[:, 0]
            with timed(device) as dec:
                for _ in range(decode_tokens):
                    out = model(input_ids=nxt, use_cache=True, logits_to_keep=1, **{kw: cache})
                    nxt = out.logits.argmax(-1)
            saved = cache.memory_report()["saved_fraction"]
        return {"prefill_s": pre.seconds, "decode_ms": 1000 * dec.seconds / max(1, decode_tokens),
                "sa_fraction": use_sparse.float().mean().item(), "kv_saved": saved,
                "prompt_tokens": len(prompt)}

    prompts = {L: synthetic_examples(tok, [task], [L], 1, seed=seed, chat_template=chat_template)[0].prompt
               for L in lengths}
    for mode in modes:
        run(prompts[min(lengths)], mode)
    out: Dict[int, Dict[str, dict]] = {}
    bar = tqdm(total=len(lengths) * len(modes), desc="speed", disable=not progress, dynamic_ncols=True)
    for L in sorted(lengths):
        out[L] = {}
        for mode in modes:
            bar.set_postfix_str(f"{L} tokens {mode}", refresh=False)
            out[L][mode] = run(prompts[L], mode)
            bar.update(1)
    bar.close()
    return out
