"""Synthetic long-context tasks, generated from a seed (no download).

Retrieval-heavy (the answer is a few tokens hidden somewhere in a long context, so attention must
reach far back): ``passkey``, ``multikey_needle``, ``kv_retrieval``, ``variable_tracking``.
Holistic (the answer depends on the whole context, or on its local structure): ``summary`` (the
lead sentence of every passage) and ``continuation`` (a document that cycles through paragraphs,
continued). Filler is generated prose from a small word list.

Record ``i`` of a generator depends only on ``(seed, i)``, so any rank can produce any record and a
data position is just an index.
"""

from __future__ import annotations

import random
from typing import Callable, Dict, List

__all__ = ["TASKS", "TASK_CLASS", "generate"]

_NOUNS = ("river", "garden", "engine", "lantern", "harbor", "violin", "orchard", "signal", "market",
          "glacier", "meadow", "archive", "compass", "village", "tower", "canal", "forest", "pilot",
          "painter", "farmer", "teacher", "sailor", "doctor", "council", "library", "bridge")
_VERBS = ("watched", "repaired", "followed", "painted", "visited", "described", "carried", "measured",
          "crossed", "opened", "remembered", "studied", "praised", "ignored", "built", "found")
_ADJS = ("quiet", "distant", "golden", "narrow", "ancient", "bright", "hidden", "careful", "small",
         "northern", "patient", "crowded", "silver", "early", "broad", "gentle")


def _sentence(rng: random.Random) -> str:
    c = rng.choice
    return f"The {c(_ADJS)} {c(_NOUNS)} {c(_VERBS)} the {c(_ADJS)} {c(_NOUNS)} near the {c(_NOUNS)}."


def _filler(rng: random.Random, chars: int) -> List[str]:
    out, n = [], 0
    while n < chars:
        s = _sentence(rng)
        out.append(s)
        n += len(s) + 1
    return out


def _insert(rng: random.Random, sentences: List[str], needles: List[str]) -> str:
    for needle in needles:
        sentences.insert(rng.randint(0, len(sentences)), needle)
    return " ".join(sentences)


def _number(rng: random.Random, digits: int = 6) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _key(rng: random.Random) -> str:
    return "-".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(4))
                    for _ in range(3))


def passkey(rng, chars):
    key = _number(rng, 5)
    context = _insert(rng, _filler(rng, chars), [f"The pass key is {key}. Remember it. {key} is the pass key."])
    return context, "What is the pass key?", key


def multikey_needle(rng, chars):
    keys = list(dict.fromkeys(_key(rng) for _ in range(rng.randint(3, 6))))
    values = [_number(rng, 7) for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    pick = rng.randrange(len(keys))
    context = _insert(rng, _filler(rng, chars), needles)
    return context, f"What is the special magic number for {keys[pick]}?", values[pick]


def kv_retrieval(rng, chars):
    pairs, seen = [], set()
    while len(pairs) * 34 < chars or len(pairs) < 2:
        k = _key(rng)
        if k not in seen:  # a repeated key would make the question ambiguous
            seen.add(k)
            pairs.append((k, _key(rng)))
    pick = rng.randrange(len(pairs))
    body = ", ".join(f'"{k}": "{v}"' for k, v in pairs)
    return ("JSON data:\n{" + body + "}", f'What is the value of key "{pairs[pick][0]}" in the JSON '
            "data above?", pairs[pick][1])


def variable_tracking(rng, chars):
    value = _number(rng, 5)
    names = rng.sample([f"{a}{b}" for a in "ABCDEFGHJKLMNPQRSTUVWXYZ" for b in "ABCDEFGHJKLMNPQRSTUVWXYZ"],
                       rng.randint(3, 6) * 2)
    chain, decoys = names[: len(names) // 2], names[len(names) // 2:]
    needles = [f"VAR {chain[0]} = {value}."]
    needles += [f"VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, len(chain))]
    others = [v for v in (_number(rng, 5) for _ in range(2 * len(decoys))) if v != value]
    needles += [f"VAR {d} = {v}." for d, v in zip(decoys, others)]
    sentences = _filler(rng, chars)
    # The chain must appear in order, so insert at sorted random positions.
    spots = sorted(rng.randint(0, len(sentences)) for _ in needles[: len(chain)])
    for j, pos in reversed(list(enumerate(spots))):
        sentences.insert(pos, needles[j])
    context = _insert(rng, sentences, needles[len(chain):])
    return (context, f"Find all variables that are assigned the value {value}, directly or through "
            "other variables. List them in order.", " ".join(chain))


def summary(rng, chars):
    n = rng.randint(3, 6)
    leads, passages = [], []
    for i in range(n):
        lead = f"Report {i + 1}: the {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} " \
               f"{_number(rng, 3)} {rng.choice(_NOUNS)}s."
        leads.append(lead)
        passages.append(" ".join([lead] + _filler(rng, chars // n)))
    context = "\n\n".join(passages)
    return (context, "You are given several news passages. Write a one-page summary of all news "
            "(the lead sentence of each report, in order).", " ".join(leads))


def continuation(rng, chars):
    paragraphs = [" ".join(_filler(rng, rng.randint(80, 200))) for _ in range(rng.randint(2, 4))]
    text, i = [], 0
    while sum(len(p) + 2 for p in text) < chars or i < len(paragraphs):
        text.append(paragraphs[i % len(paragraphs)])
        i += 1
    return "\n\n".join(text), "Continue the text with its next paragraph.", paragraphs[i % len(paragraphs)]


# Task -> class index of TASK_CLASSES (DESIGN.md section 1): retrieval tasks are QA (single-hop,
# except variable tracking, which follows a chain); summary is summarisation; continuation is
# completion, the class the reference calls code (its code task completes a given text).
TASKS: Dict[str, Callable] = {
    "passkey": passkey, "multikey_needle": multikey_needle, "kv_retrieval": kv_retrieval,
    "variable_tracking": variable_tracking, "summary": summary, "continuation": continuation,
}
TASK_CLASS = {"passkey": "single_qa", "multikey_needle": "single_qa", "kv_retrieval": "single_qa",
              "variable_tracking": "multi_hop_qa", "summary": "summarization", "continuation": "code"}


def generate(seed: int, index: int, weights: Dict[str, float], min_chars: int, max_chars: int) -> dict:
    """Record ``index`` of the stream ``seed``: ``{context, question, answer, task}``."""
    rng = random.Random(seed * 1_000_003 + index)
    names = sorted(weights)
    task = rng.choices(names, weights=[weights[n] for n in names])[0]
    context, question, answer = TASKS[task](rng, rng.randint(min_chars, max_chars))
    return {"context": context, "question": question, "answer": answer, "task": task}
