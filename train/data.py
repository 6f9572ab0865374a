"""Records, tokenisation and greedy packing into varlen packs.

A record is ``{context, question, answer, task}`` (or a plain document ``{text, task?}``). Its task
maps to one of the five task classes (``TASK_CLASSES``), which select the sparsity target and the
multipliers. Records are tokenised as prompt (chat template when the tokenizer has one, else
``context``, ``question`` and an ``Answer:`` cue) + answer + EOS, and packed greedily in stream
order into packs of at most ``pack_tokens`` tokens: one row, ``cu_seqlens`` marking the sequences.

Each rank reads its own stream (records ``rank, rank + world, ...``), so the data position of a
rank is one integer, the index of the first record of its next pack.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import random
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import synthetic
from .config import TASK_CLASSES, DataConfig

__all__ = ["Pack", "Packer", "byte_tokenizer", "record_source", "task_class", "encode_record"]

_CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def byte_tokenizer():
    """A byte-level tokenizer built in code (no download): ids 0-2 are ``<pad> <s> </s>``, 3-258
    the bytes; with a small chat template so the chat path is exercised too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = _CHAT
    return fast


def task_class(task) -> int:
    """Class index of a record's task: a class name, a synthetic task name, or an index."""
    if isinstance(task, int) and not isinstance(task, bool) and 0 <= task < len(TASK_CLASSES):
        return task
    if task in TASK_CLASSES:
        return TASK_CLASSES.index(task)
    if task in synthetic.TASK_CLASS:
        return TASK_CLASSES.index(synthetic.TASK_CLASS[task])
    raise ValueError(f"unknown task {task!r}: use a class ({', '.join(TASK_CLASSES)}), a class "
                     f"index, or a synthetic task ({', '.join(synthetic.TASKS)})")


def record_source(cfg: DataConfig) -> Callable[[int], dict]:
    """``index -> record`` for the configured source (deterministic in index and seed)."""
    if cfg.source == "synthetic":
        weights = dict(cfg.tasks) or {t: 1.0 for t in synthetic.TASKS}
        return lambda i: synthetic.generate(cfg.seed, i, weights, cfg.min_context_chars,
                                            cfg.max_context_chars)
    if cfg.source.endswith(".parquet"):
        return _Parquet(cfg.source, cfg.seed)
    return _Jsonl(cfg.source, cfg.seed)


def _checked(rec, where: str) -> dict:
    """A record as the packer needs it, or a ValueError naming ``where`` (file and row)."""
    ok = isinstance(rec, dict) and ("text" in rec or all(k in rec for k in ("context", "question", "answer")))
    if not ok:
        raise ValueError(f"{where} needs context, question, answer (and task), or text")
    if rec.get("task") is None and isinstance(rec.get("metadata"), dict):
        rec["task"] = rec["metadata"].get("task")  # the reference data's layout
    if rec.get("task") is None:
        rec["task"] = "continuation" if "text" in rec else None
    try:
        task_class(rec["task"])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return rec


class _Jsonl:
    """Records of a jsonl file, read by byte offset; epoch e visits them in a seeded permutation."""

    def __init__(self, path: str, seed: int):
        self.path, self.seed = path, seed
        self.offsets = []
        with open(path, "rb") as f:
            pos = 0
            for line in f:
                if line.strip():
                    self.offsets.append(pos)
                pos += len(line)
        if not self.offsets:
            raise ValueError(f"{path}: no records")
        self._perm: Tuple[int, List[int]] = (-1, [])

    def __call__(self, index: int) -> dict:
        epoch, k = divmod(index, len(self.offsets))
        if self._perm[0] != epoch:
            order = list(range(len(self.offsets)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._perm = (epoch, order)
        row = self._perm[1][k]
        with open(self.path, "rb") as f:
            f.seek(self.offsets[row])
            line = f.readline()
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}: record {row + 1} is not JSON: {e}") from None
        return _checked(rec, f"{self.path}: record {row + 1}")


class _Parquet:
    """Records of a parquet file (columns context, question, answer, task; or text; a struct
    column ``metadata`` with ``task`` also works).

    Memory stays at one row group: epoch e visits the row groups in a seeded order and the rows of
    each group in a seeded order (a block shuffle), so a record index maps to (group, row) by
    arithmetic and consecutive records come from the group in memory."""

    def __init__(self, path: str, seed: int):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError("data.source=*.parquet needs pyarrow (pip install pyarrow)") from e
        self.path, self.seed = path, seed
        try:
            self.file = pq.ParquetFile(path)
        except OSError as e:
            raise ValueError(f"{path}: cannot read as parquet: {e}") from None
        meta = self.file.metadata
        self.group_rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.total = sum(self.group_rows)
        if not self.total:
            raise ValueError(f"{path}: no records")
        names = set(self.file.schema_arrow.names)
        self.columns = [c for c in ("context", "question", "answer", "task", "text", "metadata") if c in names]
        self._epoch = (-1, [], [])  # (epoch, group order, start row of each visited group)
        self._group = (-1, None, None)  # (group, its rows as dicts, row order)

    def _order(self, epoch: int):
        if self._epoch[0] != epoch:
            groups = list(range(len(self.group_rows)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(groups)
            starts, n = [], 0
            for g in groups:
                starts.append(n)
                n += self.group_rows[g]
            self._epoch = (epoch, groups, starts)
        return self._epoch[1], self._epoch[2]

    def __call__(self, index: int) -> dict:
        epoch, k = divmod(index, self.total)
        groups, starts = self._order(epoch)
        pos = bisect.bisect_right(starts, k) - 1
        g, j = groups[pos], k - starts[pos]
        if self._group[0] != (epoch, g):
            rows = self.file.read_row_group(g, columns=self.columns).to_pylist()
            order = list(range(len(rows)))
            random.Random((self.seed * 1_000_003 + epoch) * 7919 + g).shuffle(order)
            self._group = ((epoch, g), rows, order)
        row = self._group[2][j]
        rec = {key: v for key, v in self._group[1][row].items() if v is not None}
        return _checked(rec, f"{self.path}: row group {g} row {row}")


def encode_record(tok, rec: dict, chat_template: bool) -> Tuple[List[int], List[int]]:
    """``(prompt_ids, answer_ids)``; a plain document is all prompt, with EOS as its answer."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if "text" in rec:
        return _encode(tok, rec["text"], add_bos=True), eos
    user = f"{rec['context']}\n\n{rec['question']}"
    if chat_template and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                       add_generation_prompt=True)
        prompt = _encode(tok, text, add_bos=False)
    else:
        prompt = _encode(tok, user + "\nAnswer: ", add_bos=True)
    return prompt, _encode(tok, rec["answer"], add_bos=False) + eos


def _encode(tok, text: str, add_bos: bool) -> List[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if add_bos and tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id] + ids
    return ids


@dataclasses.dataclass
class Pack:
    """One micro-batch: a row of ``T`` tokens holding ``n`` sequences.

    ``labels[j]`` is the token that position j predicts (the next token of its own sequence), -100
    where there is none or it is not trained on; ``position_ids`` restart at each sequence. A pack
    padded to a multiple of the context-parallel degree ends with one extra pad sequence (in
    ``cu_seqlens``, not in ``tasks``; no labels), so the ``len(tasks)`` real sequences come first."""

    input_ids: Tensor  # int64 [T]
    labels: Tensor  # int64 [T]
    position_ids: Tensor  # int64 [T]
    cu_seqlens: Tensor  # int32 [n + 1] (n + 2 with the pad sequence)
    max_seqlen: int
    tasks: Tensor  # int64 [n], class indices
    labelled: int = 0  # labels != -100, counted on the host
    real_tokens: int = 0  # tokens of the n real sequences

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device) -> "Pack":
        """The tensors on ``device``; to CUDA from pinned memory without blocking the host (a
        pageable copy would wait for the queued work of the previous step)."""
        device = torch.device(device)
        cuda = device.type == "cuda"

        def move(t: Tensor) -> Tensor:
            return t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)
        return dataclasses.replace(self, **{f.name: move(getattr(self, f.name)) for f in
                                            dataclasses.fields(self) if isinstance(getattr(self, f.name), Tensor)})


def make_pack(items: List[Tuple[List[int], List[int], int]], loss_on: str, multiple: int = 1,
              pad_id: int = 0) -> Pack:
    """``items``: ``(prompt_ids, answer_ids, class)`` per sequence; a pad sequence of ``pad_id``
    brings the length to a multiple of ``multiple`` when needed."""
    ids, labels, pos, cu = [], [], [], [0]
    for prompt, answer, _ in items:
        seq = prompt + answer
        trained = [loss_on == "all" or j >= len(prompt) for j in range(len(seq))]
        ids += seq
        labels += [seq[j + 1] if trained[j + 1] else -100 for j in range(len(seq) - 1)] + [-100]
        pos += range(len(seq))
        cu.append(cu[-1] + len(seq))
    real = cu[-1]
    pad = -real % multiple
    if pad:
        ids += [pad_id] * pad
        labels += [-100] * pad
        pos += range(pad)
        cu.append(real + pad)
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    return Pack(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                torch.tensor(pos, dtype=torch.long), torch.tensor(cu, dtype=torch.int32),
                max(lengths), torch.tensor([c for _, _, c in items], dtype=torch.long),
                labelled=sum(y != -100 for y in labels), real_tokens=real)


class Packer:
    """Greedy packer over one rank's record stream: take records in order while they fit the
    budget; the first that does not fit starts the next pack. Records longer than the budget are
    skipped (counted in ``dropped``)."""

    def __init__(self, source: Callable[[int], dict], tok, cfg: DataConfig, rank: int = 0,
                 world: int = 1, cursor: int = 0, multiple: int = 1):
        self.source, self.tok, self.cfg = source, tok, cfg
        self.rank, self.world = rank, world
        self.multiple = multiple  # packs are padded to a multiple of this (the context-parallel degree)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.cursor = cursor  # index in this rank's stream of the next pack's first record
        self.dropped = 0
        self._ahead: Optional[Tuple[int, tuple]] = None

    def _item(self, k: int) -> tuple:
        if self._ahead is not None and self._ahead[0] == k:
            return self._ahead[1]
        rec = self.source(k * self.world + self.rank)
        prompt, answer = encode_record(self.tok, rec, self.cfg.chat_template)
        item = (prompt, answer, task_class(rec["task"]))
        self._ahead = (k, item)
        return item

    def next_pack(self) -> Pack:
        budget, items, used, skipped = self.cfg.pack_tokens, [], 0, 0
        while True:
            item = self._item(self.cursor)
            n = len(item[0]) + len(item[1])
            if n > budget:
                self.cursor += 1
                self.dropped += 1
                skipped += 1
                if skipped >= 1000:
                    raise ValueError(f"data: 1000 records in a row are longer than data.pack_tokens "
                                     f"({budget}); raise it or shorten the records")
                continue
            if used + n > budget:
                break
            items.append(item)
            used += n
            self.cursor += 1
        return make_pack(items, self.cfg.loss_on, self.multiple, self.pad_id)

    def state_dict(self) -> Dict[str, int]:
        return {"cursor": self.cursor, "dropped": self.dropped, "rank": self.rank, "world": self.world}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if (state["rank"], state["world"]) != (self.rank, self.world):
            raise ValueError(f"data position saved by rank {state['rank']} of {state['world']}; this "
                             f"is rank {self.rank} of {self.world} (resume with the same world size)")
        self.cursor, self.dropped = state["cursor"], state["dropped"]
