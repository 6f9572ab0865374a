"""FluxCache: a transformers ``Cache`` that keeps, per (layer, sequence), only the KV that layer's
routing decision can still read.

Layout. Each layer owns a page pool ``k_pages / v_pages [num_pages, page_size, Hkv, D]`` with
``page_size = block_size`` of the streaming rule, an int32 ``block_table [B, max_pages]`` (logical
page i of sequence b -> physical page) and int32 ``cache_seqlens [B]``: exactly what the
``decode_attention`` op reads. Sequences are stored unpadded (token p of sequence b sits at logical
position p whatever the padding of the batch), so a left-padded batch decodes like each sequence
alone.

Eviction. A sequence routed to full attention (FA) keeps every page. A sequence routed to sparse
attention (SA) keeps only its sink pages and the ``local_blocks`` pages of the window around its
newest token: the decode rule for position p reads blocks ``< sink_tokens / block_size`` and blocks
``p // block_size - local_blocks + 1 .. p // block_size`` only, and later tokens only move the window
forward, so an evicted page is never needed again and decoding after an SA prefill equals
``sparse_attention`` over the whole sequence. An SA sequence thus holds at most
``sink_tokens + local_blocks * block_size`` tokens in that layer. Freed pages go back to the
layer's free list; physical page 0 is never handed out and stands in for every unmapped logical
page (the ops never read those, the CPU op only checks they name a real page).

Host work (page planning) happens where the host already knows the lengths: at prefill (lengths
come from the attention mask, decisions from the router: one host read each per layer) and at a
decode step only when some sequence crosses into a page that is not mapped yet. Between those, a
decode step is device work only, planned once per step for all layers (:class:`_DecodePlan`): the
layers share one ``cache_seqlens`` tensor and one stacked block table, both updated in place; the
first layer of a step records the new token's position, and each layer then writes its new K and V
rows with one :func:`~flux_attention.ops.append_kv` through its row of the table.
:meth:`FluxCache.reserve` maps the pages of the next tokens ahead of time, so the steps that
follow plan nothing on the host, grow no pool and reallocate no table: what capturing decode steps
in a CUDA graph needs (:class:`~flux_attention.decode_loop.StaticDecodeLoop`).

The routing decision of each (layer, sequence), taken at the first prefill, is kept here and reused
for every later chunk and decode step. ``batch_select_indices`` / ``batch_repeat_interleave`` copy
the selected sequences' pages (a sequence may be selected several times). Beam search and cropping
(assisted decoding) are not supported and raise.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .ops import append_kv

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as e:  # pragma: no cover - transformers is a hard requirement of this module
    raise ImportError("flux_attention.cache needs transformers (pip install transformers)") from e

__all__ = ["FluxCache", "FluxCacheLayer"]

Range = Tuple[int, int]


def _to_device(host: Tensor, device) -> Tensor:
    """A host tensor on ``device`` without waiting for the kernels queued there: CUDA copies from
    pageable memory may synchronise with the stream, so they go through pinned memory (the
    caching host allocator keeps the buffer until the copy has run)."""
    if torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _ranges_minus(a: Sequence[Range], b: Sequence[Range]) -> List[Range]:
    """Logical pages in the ranges ``a`` but not in ``b`` (half-open ranges, at most a few each)."""
    out = list(a)
    for lo_b, hi_b in b:
        nxt = []
        for lo, hi in out:
            if hi <= lo_b or hi_b <= lo:
                nxt.append((lo, hi))
                continue
            if lo < lo_b:
                nxt.append((lo, lo_b))
            if hi_b < hi:
                nxt.append((hi_b, hi))
        out = nxt
    return [(lo, hi) for lo, hi in out if lo < hi]


class FluxCacheLayer(CacheLayerMixin):
    """One layer of a :class:`FluxCache` (see the module docstring for the layout)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, **kwargs):
        super().__init__()
        self.reset()

    # -- transformers' CacheLayerMixin interface ------------------------------------------------

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        """Called by the attention module before attention. Storage happens in the flux attention
        function, once the routing decision is known; here we only count columns and check that
        the flux attention function consumed the previous call."""
        if not self._armed:
            raise RuntimeError(
                "FluxCache.update was called by an attention layer that flux attention did not "
                "prepare: use the model with attn_implementation='flux' and "
                "flux_attention.attach_router(model, ...) before passing a FluxCache")
        if self._awaiting:
            raise RuntimeError(
                "FluxCache: the previous update of this layer was never consumed by flux attention "
                "(was attn_implementation switched away from 'flux' during generation?)")
        if self.device is None:
            self.lazy_initialization(key_states, value_states)
        self._armed = False
        self._awaiting = True
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def get_mask_sizes(self, query_length: int, *args) -> Tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self, *args) -> int:
        """Columns seen so far, padding included: what transformers sizes masks and positions by."""
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.device: Optional[torch.device] = None
        self.dtype: Optional[torch.dtype] = None
        self.seen = 0
        self._armed = False
        self._awaiting = False
        self.batch: Optional[int] = None
        self.page_size = 0
        self.sink_pages = 0
        self.local_blocks = 0
        self.k_pages: Optional[Tensor] = None
        self.v_pages: Optional[Tensor] = None
        self._free: Optional[Tensor] = None  # int64 stack of free physical pages (host)
        self._n_free = 0
        self.block_table_host: Optional[Tensor] = None  # int32 [B, W] (host)
        self.block_table: Optional[Tensor] = None  # int32 [B, W] (device)
        self.lengths_host = None  # int64 [B] tokens stored per sequence (host; see the property)
        self._horizon: Optional[Tensor] = None  # int64 [B] lengths whose pages are mapped ahead (host)
        self._mapped_len: Optional[Tensor] = None  # int64 [B] lengths the mapping was made for (host)
        self._initial_reserve = 0  # FluxCache.reserve before the first prefill
        self.cache_seqlens: Optional[Tensor] = None  # int32 [B] (device)
        self.use_sparse: Optional[Tensor] = None  # bool [B] (device)
        self.use_sparse_host: Optional[List[bool]] = None
        self._free_steps = 0  # single-token steps before any sequence needs a page not mapped
        self._flat: Optional[tuple] = None  # (k_pages, v_pages, and their flat views), see _flat_pools
        self._plan: Optional["_DecodePlan"] = None  # the FluxCache decode plan this layer is in
        self._plan_row = -1

    @property
    def lengths_host(self) -> Optional[Tensor]:
        """int64 ``[B]``: tokens stored per sequence (host). Decode steps count into a Python int,
        folded in here when read, so a step costs no host tensor op per layer."""
        if self._pending:
            self._lengths = self._lengths + self._pending
            self._pending = 0
        return self._lengths

    @lengths_host.setter
    def lengths_host(self, value: Optional[Tensor]) -> None:
        self._lengths = value
        self._pending = 0

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("FluxCache does not support beam search (reorder_cache): pages "
                                  "would be shared between beams; use greedy or sampling")

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("FluxCache cannot be cropped (assisted decoding): evicted "
                                      "SA pages cannot be restored")

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every sequence ``repeats`` times in place (b0 b0 b1 b1 ...), pages copied."""
        if self.started:
            self._select([b for b in range(self.batch) for _ in range(repeats)])

    def batch_select_indices(self, indices) -> None:
        """Keep the sequences ``indices`` (in that order; repeats allowed), pages copied."""
        if self.started:
            self._select([int(i) for i in torch.as_tensor(indices).flatten().tolist()])

    def offload(self):
        pass

    def prefetch(self):
        pass

    # -- used by flux_attention.hf -------------------------------------------------------------

    def arm(self) -> None:
        self._armed = True

    def consumed(self) -> None:
        self._awaiting = False

    @property
    def started(self) -> bool:
        """Whether a prefill has been stored (and a routing decision taken) in this layer."""
        return self.batch is not None

    def start(self, batch: int, use_sparse: Tensor, *, block_size: int, sink_tokens: int,
              local_blocks: int, num_heads_k: int, head_dim: int,
              use_sparse_host: Optional[List[bool]] = None) -> None:
        """Fix the batch, the per-sequence decisions (bool [B], True = SA) and the page geometry.
        ``use_sparse_host``: the same decisions when the host knows them (forced routing), which
        spares reading them back from the device (a sync per layer)."""
        if use_sparse.shape != (batch,) or use_sparse.dtype != torch.bool:
            raise ValueError(f"FluxCacheLayer.start: use_sparse must be bool [{batch}]; got "
                             f"{use_sparse.dtype} {tuple(use_sparse.shape)}")
        self.batch = batch
        self.page_size = block_size
        self.sink_pages = sink_tokens // block_size
        self.local_blocks = local_blocks
        self.use_sparse = use_sparse.detach().clone()
        if use_sparse_host is None:
            use_sparse_host = use_sparse.tolist()  # one host read per layer and prefill
        self.use_sparse_host = [bool(x) for x in use_sparse_host]
        dev = self.device
        # Page 0 only: the first plan() sizes the pool to the prompt (see _grow).
        self._flat = None
        self.k_pages = torch.empty(1, block_size, num_heads_k, head_dim, dtype=self.dtype, device=dev)
        self.v_pages = torch.empty_like(self.k_pages)
        self._free = torch.zeros(0, dtype=torch.int64)
        self._n_free = 0
        self.block_table_host = torch.zeros(batch, 1, dtype=torch.int32)
        self.block_table = torch.zeros(batch, 1, dtype=torch.int32, device=dev)
        self.lengths_host = torch.zeros(batch, dtype=torch.int64)
        self._horizon = torch.zeros(batch, dtype=torch.int64)
        self._mapped_len = torch.zeros(batch, dtype=torch.int64)
        self.cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=dev)
        self._free_steps = 0
        self.is_initialized = True

    def _mapped(self, length: int, sparse: bool, until: int = 0) -> List[Range]:
        """Logical page ranges that every length in ``[length, max(length, until)]`` can read: an
        FA sequence all its pages; an SA sequence its sink pages and the window from the newest
        token at ``length`` on (``until`` > length: pages reserved ahead, none evicted early)."""
        pages = -(-max(length, until) // self.page_size)
        if not sparse:
            return [(0, pages)] if pages else []
        window_lo = max(self.sink_pages, -(-length // self.page_size) - self.local_blocks)
        return [r for r in ((0, min(self.sink_pages, pages)), (window_lo, pages)) if r[0] < r[1]]

    def _take(self, n: int, exact: bool = False) -> Tensor:
        if self._n_free < n:
            self._grow(n - self._n_free, exact)
        self._n_free -= n
        return self._free[self._n_free:self._n_free + n]

    def _give(self, pages: Tensor) -> None:
        n = pages.numel()
        self._free[self._n_free:self._n_free + n] = pages
        self._n_free += n

    def _grow(self, extra: int, exact: bool = False) -> None:
        old = self.k_pages.shape[0]
        # The first growth sizes the pool exactly for the prompt (a pool holding page 0 only), and
        # so does `exact` (reserve: the caller knows what it needs); later growth by a quarter
        # keeps reallocation copies amortised while over-allocating at most ~25 %.
        new = old + extra if (old == 1 or exact) else old + max(extra, old // 4)
        shape = (new - old,) + tuple(self.k_pages.shape[1:])
        self._flat = None  # must not keep the old pools alive
        self.k_pages = torch.cat([self.k_pages, self.k_pages.new_empty(shape)])
        self.v_pages = torch.cat([self.v_pages, self.v_pages.new_empty(shape)])
        free = torch.empty(new, dtype=torch.int64)
        free[:self._n_free] = self._free[:self._n_free]
        # Ascending on the stack, so one _take hands out consecutive ascending pages: a prompt's
        # pages are then one contiguous run of the pool, written by one copy (_contiguous_runs).
        fresh = torch.arange(old, new, dtype=torch.int64)
        free[self._n_free:self._n_free + fresh.numel()] = fresh
        self._free = free
        self._n_free += fresh.numel()

    def _spans(self, lengths: Tensor, horizon: Tensor) -> Tuple[Tensor, Tensor]:
        """(pages holding ``lengths``, pages mapped up to ``max(lengths, horizon)``) per sequence."""
        ps = self.page_size
        return (lengths + ps - 1) // ps, (torch.maximum(lengths, horizon) + ps - 1) // ps

    def _remap(self, new: Tensor, horizon: Tensor, exact: bool = False) -> None:
        """Move to ``new`` stored lengths with pages mapped up to ``horizon`` (host only): map the
        pages that became readable, free those no later token can read. Python loops over the
        sequences whose pages change, never over tokens."""
        # The mapping was computed at `_mapped_len` (decode steps since then only counted tokens),
        # so what is mapped now is _mapped(_mapped_len, horizon), whatever the lengths are.
        old, old_horizon = self._mapped_len, self._horizon
        lo0, hi0 = self._spans(old, old_horizon)
        lo1, hi1 = self._spans(new, horizon)
        changed = ((lo0 != lo1) | (hi0 != hi1)).nonzero().flatten().tolist()
        table = self.block_table_host
        width = int(hi1.max()) if self.batch else 0
        if width > table.shape[1]:
            grown = width if exact else max(width, 2 * table.shape[1])
            table = torch.cat([table, table.new_zeros(self.batch, grown - table.shape[1])], 1)
        moves = []
        for b in changed:
            sparse = self.use_sparse_host[b]
            before = self._mapped(int(old[b]), sparse, int(old_horizon[b]))
            after = self._mapped(int(new[b]), sparse, int(horizon[b]))
            for lo, hi in _ranges_minus(before, after):
                self._give(table[b, lo:hi].to(torch.int64))
                table[b, lo:hi] = 0
            moves.append((b, _ranges_minus(after, before)))
        needed = sum(hi - lo for _, ranges in moves for lo, hi in ranges)
        if needed > self._n_free:
            self._grow(needed - self._n_free, exact)  # once, before handing pages out
        for b, ranges in moves:
            for lo, hi in ranges:
                table[b, lo:hi] = self._take(hi - lo).to(torch.int32)
        self.lengths_host = new
        self._mapped_len = new
        self._horizon = horizon
        self._free_steps = int((hi1 * self.page_size - new).min()) if self.batch else 0
        if changed:
            self.block_table_host = table
            self._publish_table()

    def _publish_table(self) -> None:
        """Bring the device block table up to date with the host one: in place, inside the decode
        plan's stacked table when this layer is in one (kernels and CUDA graphs keep pointing at
        the same memory), else as a new tensor."""
        if self._plan is not None:
            self._plan.publish(self)
        else:
            self.block_table = _to_device(self.block_table_host, self.device)

    def plan(self, new_tokens: Sequence[int]) -> None:
        """Map the pages that ``new_tokens[b]`` more tokens need and free the pages SA sequences no
        longer need (host only)."""
        self._remap(self.lengths_host + torch.as_tensor(new_tokens, dtype=torch.int64), self._horizon)

    def reserve(self, tokens: int) -> None:
        """Map now the pages of ``tokens`` more tokens per sequence (pools grow once, exactly)."""
        lengths = self.lengths_host
        self._remap(lengths, torch.maximum(self._horizon, lengths + tokens), exact=True)

    def _host_step(self) -> None:
        """Host side of one single-token step for every sequence: a counter, or page planning when
        some sequence reaches a page that is not mapped."""
        if self._free_steps > 0:
            self._free_steps -= 1
            self._pending += 1
        else:
            self.plan([1] * self.batch)

    def write(self, k: Tensor, v: Tensor, seq: Tensor, pos: Tensor) -> None:
        """Store rows ``k, v [n, Hkv, D]`` at (sequence ``seq[n]``, position ``pos[n]``) (device
        tensors). Rows whose page is not mapped (evicted right away) land in page 0, never read."""
        pos = pos.to(torch.int64)
        page = self.block_table[seq, torch.div(pos, self.page_size, rounding_mode="floor")].to(torch.int64)
        slot = torch.remainder(pos, self.page_size)
        self.k_pages.index_put_((page, slot), k.to(self.k_pages.dtype))
        self.v_pages.index_put_((page, slot), v.to(self.v_pages.dtype))

    def _flat_pools(self) -> Tuple[Tensor, Tensor]:
        """``[pages * page_size, Hkv, D]`` views of the pools, remade only when a pool is replaced."""
        if self._flat is None or self._flat[0] is not self.k_pages or self._flat[1] is not self.v_pages:
            self._flat = (self.k_pages, self.v_pages, self.k_pages.flatten(0, 1), self.v_pages.flatten(0, 1))
        return self._flat[2], self._flat[3]

    def _contiguous_runs(self, old: Tensor, counts: Sequence[int]) -> Optional[List[Tuple[int, int, int]]]:
        """(first row, first flat slot, rows) per sequence of an append where every sequence's new
        rows land in consecutive physical pages (a prompt into fresh pages: see _grow); None when
        some sequence's pages are not one ascending run. Host only."""
        ps, runs, row = self.page_size, [], 0
        table = self.block_table_host
        for b, n in enumerate(counts):
            n = int(n)
            if n:
                first = int(old[b])
                pages = table[b, first // ps:(first + n + ps - 1) // ps].to(torch.int64)
                if not bool((pages > 0).all()) or (
                        pages.numel() > 1 and not bool((pages[1:] - pages[:-1] == 1).all())):
                    return None  # page 0 is the never-read sink of evicted rows
                runs.append((row, int(pages[0]) * ps + first % ps, n))
            row += n
        return runs

    def append_varlen(self, k: Tensor, v: Tensor, cu_seqlens: Tensor, counts: Sequence[int]) -> None:
        """Append varlen rows (``counts[b]`` new tokens of sequence b, offsets ``cu_seqlens``)."""
        if self._plan is not None:
            raise RuntimeError("FluxCacheLayer.append_varlen inside a decode plan; FluxCache."
                               "end_decode() must run first")
        total = k.shape[0]
        dev = k.device
        # Device-side lengths from cu_seqlens (no host-to-device copy of `counts`: it would wait
        # for the queued kernels); `counts` drives the host page planning only.
        cu = cu_seqlens.to(torch.int64)
        lens = cu[1:] - cu[:-1]
        old = self.lengths_host
        new = old + torch.as_tensor(counts, dtype=torch.int64)
        horizon = self._horizon
        if self._initial_reserve:
            horizon = torch.maximum(horizon, new + self._initial_reserve)
            self._initial_reserve = 0
        self._remap(new, horizon)
        kept = self._kept_rows(old, counts)
        runs = self._contiguous_runs(old, counts) if kept is None else None
        if runs is not None:
            # Every row kept, each sequence's rows one run of the pool: plain copies at memory
            # bandwidth (index_put_ with (page, slot) indices ran at ~0.5 TB/s on a 128K prompt).
            flat_k, flat_v = self._flat_pools()
            for row, slot, n in runs:  # copy_ casts to the pool's dtype
                flat_k.narrow(0, slot, n).copy_(k.narrow(0, row, n))
                flat_v.narrow(0, slot, n).copy_(v.narrow(0, row, n))
            self.cache_seqlens += lens.to(torch.int32)
            return
        seq = torch.repeat_interleave(torch.arange(self.batch, device=dev), lens, output_size=total)
        start = self.cache_seqlens.to(torch.int64)
        pos = start[seq] + torch.arange(total, device=dev) - cu[seq]
        if kept is not None:  # SA sequences: only the rows whose pages stay mapped are written
            idx = torch.cat([torch.arange(a, z) for a, z in kept]) if kept else torch.zeros(0, dtype=torch.int64)
            idx = _to_device(idx, dev)
            k, v, seq, pos = k.index_select(0, idx), v.index_select(0, idx), seq[idx], pos[idx]
        self.write(k, v, seq, pos)
        self.cache_seqlens += lens.to(torch.int32)

    def append_one(self, k: Tensor, v: Tensor) -> None:
        """Append one token to every sequence: ``k, v [B, Hkv, D]``. No host read: the rows go
        through :func:`~flux_attention.ops.append_kv` at positions ``cache_seqlens`` (device)."""
        if self._free_steps > 0:
            self._free_steps -= 1
            self.lengths_host += 1
        else:
            self.plan([1] * self.batch)
        append_kv(self.k_pages, self.v_pages, k.to(self.k_pages.dtype), v.to(self.v_pages.dtype),
                  self.cache_seqlens, block_table=self.block_table)
        self.cache_seqlens += 1

    def _kept_rows(self, old: Tensor, counts: Sequence[int]) -> Optional[List[Range]]:
        """Row ranges of an append (sequence after sequence, ``counts[b]`` rows each, positions
        from ``old[b]`` on) whose pages are mapped after it; None: every row (no SA sequence).
        An SA prefill of L tokens thus writes sink + window rows, not L."""
        if not any(self.use_sparse_host):
            return None
        ps, kept, row = self.page_size, [], 0
        for b, n in enumerate(counts):
            n = int(n)
            first, end = int(old[b]), int(old[b]) + n
            if not self.use_sparse_host[b]:
                kept.append((row, row + n))
            else:
                for lo, hi in self._mapped(end, True, int(self._horizon[b])):
                    a, z = max(first, lo * ps), min(end, hi * ps)
                    if a < z:
                        kept.append((row + a - first, row + z - first))
            row += n
        return kept

    def _select(self, idx: List[int]) -> None:
        """Keep sequences ``idx`` (repeats allowed): the pages they map are copied into a new,
        exactly sized pool (old pools are freed as the new ones take their place)."""
        if self._plan is not None:
            raise RuntimeError("FluxCacheLayer batch selection inside a decode plan; FluxCache."
                               "end_decode() must run first")
        if not idx:
            raise ValueError("FluxCache.batch_select_indices: select at least one sequence")
        bad = [i for i in idx if not 0 <= i < self.batch]
        if bad:
            raise IndexError(f"FluxCache.batch_select_indices: index {bad[0]} is out of range for "
                             f"a batch of {self.batch} sequences")
        table = self.block_table_host[idx]
        mapped = table != 0
        count = int(mapped.sum())
        src = torch.zeros(count + 1, dtype=torch.int64)  # new page p + 1 <- old page src[p + 1]
        src[1:] = table[mapped].to(torch.int64)
        new_table = torch.zeros_like(table)
        new_table[mapped] = torch.arange(1, count + 1, dtype=torch.int32)
        src = _to_device(src, self.device)
        self._flat = None  # must not keep the old pools alive
        self.k_pages = self.k_pages.index_select(0, src)
        self.v_pages = self.v_pages.index_select(0, src)
        rows = torch.tensor(idx, dtype=torch.int64)
        rows_dev = _to_device(rows, self.device)
        self.batch = len(idx)
        self._free = torch.zeros(0, dtype=torch.int64)
        self._n_free = 0
        self.block_table_host = new_table
        self.block_table = _to_device(new_table, self.device)
        lengths, horizon = self.lengths_host[rows], self._horizon[rows]
        self.lengths_host, self._horizon, self._mapped_len = lengths, horizon, self._mapped_len[rows]
        self.cache_seqlens = self.cache_seqlens.index_select(0, rows_dev)
        self.use_sparse = self.use_sparse.index_select(0, rows_dev)
        self.use_sparse_host = [self.use_sparse_host[i] for i in idx]
        hi = self._spans(lengths, horizon)[1]
        self._free_steps = int((hi * self.page_size - lengths).min())

    def gather_past(self, k_new: Tensor, v_new: Tensor, cu_new: Tensor,
                    counts: Sequence[int]) -> Tuple[Tensor, Tensor, Tensor, int]:
        """Varlen K/V of every stored position followed by the new rows, per sequence, for a
        prefill chunk after the first: ``(k, v, cu_seqlens_k, max_seqlen_k)``. Evicted positions
        of SA sequences come back as whatever page 0 holds; the streaming rule never reads them."""
        dev = k_new.device
        old = self.lengths_host
        total_old = int(old.sum())
        lens = old + torch.as_tensor(counts, dtype=torch.int64)
        cu_k = torch.zeros(self.batch + 1, dtype=torch.int64)
        cu_k[1:] = torch.cumsum(lens, 0)
        old_dev = old.to(dev)
        seq_old = torch.repeat_interleave(torch.arange(self.batch, device=dev), old_dev, output_size=total_old)
        cu_old = torch.zeros(self.batch + 1, dtype=torch.int64, device=dev)
        cu_old[1:] = torch.cumsum(old_dev, 0)
        pos_old = torch.arange(total_old, device=dev) - cu_old[seq_old]
        page = self.block_table[seq_old, torch.div(pos_old, self.page_size, rounding_mode="floor")].to(torch.int64)
        slot = torch.remainder(pos_old, self.page_size)
        total_new = k_new.shape[0]
        seq_new = torch.repeat_interleave(torch.arange(self.batch, device=dev),
                                          torch.as_tensor(counts, device=dev), output_size=total_new)
        cu_k_dev = cu_k.to(dev)
        dst_old = cu_k_dev[seq_old] + pos_old
        dst_new = cu_k_dev[seq_new] + old_dev[seq_new] + torch.arange(total_new, device=dev) - cu_new.to(torch.int64)[seq_new]
        shape = (int(cu_k[-1]),) + tuple(k_new.shape[1:])
        k = k_new.new_empty(shape).index_copy(0, dst_old, self.k_pages[page, slot].to(k_new.dtype))
        v = v_new.new_empty(shape).index_copy(0, dst_old, self.v_pages[page, slot].to(v_new.dtype))
        k = k.index_copy(0, dst_new, k_new)
        v = v.index_copy(0, dst_new, v_new)
        return k, v, cu_k.to(device=dev, dtype=torch.int32), int(lens.max()) if self.batch else 0

    def tokens_held(self) -> Tensor:
        """int64 [B]: tokens whose K/V this layer still holds for each sequence, counted from the
        pages mapped in its block table."""
        if not self.started:
            return torch.zeros(0, dtype=torch.int64)
        table = self.block_table_host
        starts = torch.arange(table.shape[1], dtype=torch.int64) * self.page_size
        in_page = (self.lengths_host[:, None] - starts[None, :]).clamp(0, self.page_size)
        return (in_page * (table != 0)).sum(1)

    def pages_in_use(self) -> int:
        return 0 if not self.started else self.k_pages.shape[0] - 1 - self._n_free


class _DecodePlan:
    """What every layer of a :class:`FluxCache` shares during single-token decode steps, so that a
    step's host work and index arithmetic happen once per step rather than once per layer.

    All started layers hold the same tokens (one per sequence per step) and the same page size, so
    they share one ``cache_seqlens`` tensor; their block tables are rows of one stacked int32
    ``tables [L, B, W]`` tensor (each layer's ``block_table`` is a view of its row). The first layer
    to append in a step (any layer order) runs :meth:`_begin_step`: host bookkeeping for every layer
    (page planning only at page boundaries) and, on the device, every layer's flat write slot
    ``page * page_size + offset`` in one gather into a preallocated ``slots [L, B]``, then
    ``cache_seqlens += 1``. Every tensor is updated in place, so a CUDA graph captured over a step
    stays valid for as long as no host planning reallocates a table (see ``FluxCache.reserve``).
    """

    def __init__(self, layers: List[FluxCacheLayer]):
        if not layers:
            raise RuntimeError("FluxCache: a decode step before any prefill (no layer holds tokens)")
        first = layers[0]
        lengths = first.lengths_host
        for l in layers[1:]:
            if l.batch != first.batch or l.page_size != first.page_size or l.device != first.device:
                raise RuntimeError(
                    f"FluxCache: layers differ in batch, block_size or device ({first.batch}, "
                    f"{first.page_size}, {first.device} vs {l.batch}, {l.page_size}, {l.device}); "
                    "one cache serves one model whose routers share a RouterConfig")
            if not torch.equal(l.lengths_host, lengths):
                raise RuntimeError("FluxCache: a decode step with layers holding different numbers of "
                                   "tokens (a forward that skipped layers?)")
        self.layers = layers
        self.page_size = first.page_size
        n, b, dev = len(layers), first.batch, first.device
        width = max(l.block_table_host.shape[1] for l in layers)
        self.tables = torch.zeros(n, b, width, dtype=torch.int32, device=dev)
        self.seqlens = first.cache_seqlens.clone()
        for row, l in enumerate(layers):
            l._plan, l._plan_row = self, row
            l.cache_seqlens = self.seqlens
            self.publish(l)
        self._pos = torch.empty(b, dtype=torch.int32, device=dev)  # the step's new token position
        self.steps = 0  # steps begun
        self.appended = [0] * n  # steps each layer has appended

    def publish(self, layer: FluxCacheLayer) -> None:
        host = layer.block_table_host
        if host.shape[1] > self.tables.shape[2]:
            # Wider pages than any layer had: a new stacked table (host planning time only; never
            # within reserved steps, so never under a captured graph).
            wider = self.tables.new_zeros(self.tables.shape[0], self.tables.shape[1], host.shape[1])
            wider[:, :, :self.tables.shape[2]] = self.tables
            self.tables = wider
            for l in self.layers:
                l.block_table = self.tables[l._plan_row]
        self.tables[layer._plan_row, :, :host.shape[1]].copy_(_to_device(host, self.tables.device))
        layer.block_table = self.tables[layer._plan_row]

    def _begin_step(self) -> None:
        for l in self.layers:
            l._host_step()
        self._pos.copy_(self.seqlens)
        self.seqlens.add_(1)

    def append(self, layer: FluxCacheLayer, k: Tensor, v: Tensor) -> None:
        row = layer._plan_row
        done = self.appended[row]
        if done == self.steps:
            self._begin_step()
            self.steps += 1
        elif done != self.steps - 1:
            raise RuntimeError(f"FluxCache: a layer appended its decode step {done + 1} while others "
                               f"are at step {self.steps} (a forward that skipped layers?)")
        self.appended[row] = done + 1
        # One kernel writes the K and V rows at (page of _pos in this layer's table, offset). A
        # page the table does not map reads as page 0, the pool's never-read scratch page.
        append_kv(layer.k_pages, layer.v_pages, k.to(layer.k_pages.dtype), v.to(layer.v_pages.dtype), self._pos,
                  block_table=layer.block_table)

    def advance_host(self, steps: int) -> None:
        """Host bookkeeping of ``steps`` steps that ran on the device only (CUDA graph replays)."""
        if self.appended != [self.steps] * len(self.appended):
            raise RuntimeError("FluxCache.advance_host in the middle of a decode step")
        short = [l for l in self.layers if l._free_steps < steps]
        if short:
            raise RuntimeError(
                f"FluxCache: {steps} replayed steps exceed the pages reserved ahead "
                f"({min(l._free_steps for l in short)} steps left); call FluxCache.reserve first")
        for l in self.layers:
            l._free_steps -= steps
            l._pending += steps
            l.seen += steps
        self.steps += steps
        self.appended = [self.steps] * len(self.appended)

    def dissolve(self) -> None:
        """Give every layer its own device tensors back (before a prefill chunk or a batch
        selection, which change lengths per layer)."""
        for l in self.layers:
            l.block_table = _to_device(l.block_table_host, l.device)
            l.cache_seqlens = self.seqlens.clone()
            l._plan, l._plan_row = None, -1
        self.layers = []


class FluxCache(Cache):
    """KV cache for ``attn_implementation="flux"``: per (layer, sequence) routing decisions, SA
    sequences evicted down to sink + window, a paged layout read by ``decode_attention``.

    Args:
        config: the model config (its text config's ``num_hidden_layers`` sizes the cache); when
            omitted, layers are created as the model first uses them.

    >>> cache = FluxCache(model.config)
    >>> out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
    >>> cache.memory_report()["saved_fraction"]
    """

    def __init__(self, config=None, *, num_layers: Optional[int] = None):
        if num_layers is None and config is not None:
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            num_layers = text.num_hidden_layers
        if num_layers is not None:
            super().__init__(layers=[FluxCacheLayer() for _ in range(num_layers)])
        else:
            super().__init__(layer_class_to_replicate=FluxCacheLayer)
        self._plan: Optional[_DecodePlan] = None
        self._reserve_tokens = 0

    def layer(self, layer_idx: int) -> FluxCacheLayer:
        if self.layer_class_to_replicate is not None:
            while len(self.layers) <= layer_idx:
                layer = FluxCacheLayer()
                layer._initial_reserve = self._reserve_tokens
                self.layers.append(layer)
        if layer_idx >= len(self.layers):
            raise IndexError(f"FluxCache has {len(self.layers)} layers; the model used layer {layer_idx} "
                             "(build it from the model's config)")
        return self.layers[layer_idx]

    def _started(self) -> List[FluxCacheLayer]:
        return [l for l in self.layers if isinstance(l, FluxCacheLayer) and l.started]

    # -- batch and capacity --------------------------------------------------------------------

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` more tokens per sequence in every layer, ahead of time.

        Before the first prefill, the prefill sizes the page pools for the prompt plus ``tokens``;
        after it, the pages are mapped now (each pool grows once, by exactly what it needs). Until
        those tokens are appended, decode steps plan nothing on the host, grow no pool and
        reallocate no table, which is what replaying a captured CUDA graph needs. SA sequences
        keep their old window pages until the reserved tokens are used (at most ``tokens`` more
        tokens held per sequence and layer); eviction resumes after.
        """
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            raise ValueError(f"FluxCache.reserve: tokens must be a non-negative int; got {tokens!r}")
        started = self._started()
        if not started:
            self._reserve_tokens = max(self._reserve_tokens, tokens)
            for l in self.layers:
                l._initial_reserve = self._reserve_tokens
            return
        for l in started:
            l.reserve(tokens)

    def batch_select_indices(self, indices) -> None:
        """Keep the sequences ``indices`` (in that order; a sequence may appear several times) in
        every layer. Each selected sequence gets its own copy of its pages; decisions, lengths and
        reservations follow it. Costs one copy of the selected pages, once."""
        self.end_decode()
        idx = torch.as_tensor(indices).flatten().tolist()  # one host read
        for l in self._started():
            l._select([int(i) for i in idx])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every sequence ``repeats`` times (b0 b0 b1 b1 ...), as ``generate`` expects."""
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            raise ValueError(f"FluxCache.batch_repeat_interleave: repeats must be a positive int; "
                             f"got {repeats!r}")
        self.end_decode()
        for l in self._started():
            l.batch_repeat_interleave(repeats)

    def reset(self) -> None:
        self.end_decode()
        self._reserve_tokens = 0
        super().reset()

    # -- used by flux_attention.hf and flux_attention.decode_loop ------------------------------

    def append_decode(self, layer_idx: int, k: Tensor, v: Tensor) -> None:
        """Store one new token per sequence (``k, v [B, Hkv, D]``) in layer ``layer_idx``: device
        work only (the first layer of a step plans the step for all layers)."""
        layer = self.layers[layer_idx]
        plan = self._plan
        if plan is None or layer._plan is not plan:
            self.end_decode()
            plan = self._plan = _DecodePlan(self._started())
        plan.append(layer, k, v)

    def end_decode(self) -> None:
        """Leave decode steps (before a prefill chunk or a batch change): layers get their own
        device tensors back. The next decode step plans again."""
        if self._plan is not None:
            self._plan.dissolve()
            self._plan = None

    def advance_host(self, steps: int) -> None:
        """Account on the host for ``steps`` decode steps that ran on the device only (replays
        of a captured step; see :class:`~flux_attention.decode_loop.StaticDecodeLoop`). Needs the
        pages of those steps reserved (:meth:`reserve`)."""
        if self._plan is None:
            raise RuntimeError("FluxCache.advance_host: no decode step has run on this cache")
        self._plan.advance_host(steps)

    def decisions(self) -> Dict[int, List[bool]]:
        """``{layer: [use_sparse per sequence]}`` for the layers that have been prefilled."""
        return {i: list(l.use_sparse_host) for i, l in enumerate(self.layers) if l.started}

    def memory_report(self) -> dict:
        """What the cache holds against a dense cache of the same tokens, measured from the pages.

        Returns a dict: ``layers`` (per layer: ``tokens_held`` and ``tokens_total`` per sequence,
        ``use_sparse``, ``pages_in_use``, ``bytes_held``, ``bytes_dense``), ``bytes_held`` (K and V
        of the mapped pages, all layers), ``bytes_dense`` (what a dense cache would store for the
        same sequences), ``bytes_allocated`` (the page pools, free pages included) and
        ``saved_fraction = 1 - bytes_held / bytes_dense``.
        """
        layers = []
        held = dense = allocated = 0
        for idx, l in enumerate(self.layers):
            if not l.started:
                continue
            per_token = 2 * l.k_pages[0, 0].numel() * l.k_pages.element_size()
            tokens = l.tokens_held()
            page_bytes = per_token * l.page_size
            entry = {
                "layer": idx,
                "use_sparse": list(l.use_sparse_host),
                "tokens_held": tokens.tolist(),
                "tokens_total": l.lengths_host.tolist(),
                "pages_in_use": l.pages_in_use(),
                "bytes_held": l.pages_in_use() * page_bytes,
                "bytes_dense": int(l.lengths_host.sum()) * per_token,
            }
            layers.append(entry)
            held += entry["bytes_held"]
            dense += entry["bytes_dense"]
            allocated += l.k_pages.shape[0] * page_bytes
        return {
            "layers": layers,
            "bytes_held": held,
            "bytes_dense": dense,
            "bytes_allocated": allocated,
            "saved_fraction": (1.0 - held / dense) if dense else 0.0,
        }
