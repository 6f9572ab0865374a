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
decode step only when some sequence crosses a page boundary. Between those, a decode step is device
work only: write the new token's K/V through the block table, bump ``cache_seqlens``.

The routing decision of each (layer, sequence), taken at the first prefill, is kept here and reused
for every later chunk and decode step. Beam search, cropping (assisted decoding) and batch
reordering are not supported and raise.
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
        self.lengths_host: Optional[Tensor] = None  # int64 [B] tokens stored per sequence (host)
        self.cache_seqlens: Optional[Tensor] = None  # int32 [B] (device)
        self.use_sparse: Optional[Tensor] = None  # bool [B] (device)
        self.use_sparse_host: Optional[List[bool]] = None
        self._seq_ids: Optional[Tensor] = None
        self._free_steps = 0

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("FluxCache does not support beam search (reorder_cache): pages "
                                  "would be shared between beams; use greedy or sampling")

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("FluxCache cannot be cropped (assisted decoding): evicted "
                                      "SA pages cannot be restored")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.batch is not None:
            raise NotImplementedError("FluxCache cannot repeat a filled batch; expand the inputs "
                                      "before the first forward instead")

    def batch_select_indices(self, indices) -> None:
        if self.batch is not None:
            raise NotImplementedError("FluxCache cannot select from a filled batch")

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
              local_blocks: int, num_heads_k: int, head_dim: int) -> None:
        """Fix the batch, the per-sequence decisions (bool [B], True = SA) and the page geometry."""
        if use_sparse.shape != (batch,) or use_sparse.dtype != torch.bool:
            raise ValueError(f"FluxCacheLayer.start: use_sparse must be bool [{batch}]; got "
                             f"{use_sparse.dtype} {tuple(use_sparse.shape)}")
        self.batch = batch
        self.page_size = block_size
        self.sink_pages = sink_tokens // block_size
        self.local_blocks = local_blocks
        self.use_sparse = use_sparse.detach().clone()
        self.use_sparse_host = [bool(x) for x in use_sparse.tolist()]  # one host read per prefill
        dev = self.device
        # Page 0 only: the first plan() sizes the pool to the prompt (see _grow).
        self.k_pages = torch.empty(1, block_size, num_heads_k, head_dim, dtype=self.dtype, device=dev)
        self.v_pages = torch.empty_like(self.k_pages)
        self._free = torch.zeros(0, dtype=torch.int64)
        self._n_free = 0
        self.block_table_host = torch.zeros(batch, 1, dtype=torch.int32)
        self.block_table = self.block_table_host.to(dev)
        self.lengths_host = torch.zeros(batch, dtype=torch.int64)
        self.cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=dev)
        self._seq_ids = torch.arange(batch, device=dev)
        self._free_steps = 0
        self.is_initialized = True

    def _mapped(self, length: int, sparse: bool) -> List[Range]:
        pages = -(-length // self.page_size)
        if not sparse:
            return [(0, pages)] if pages else []
        window_lo = max(self.sink_pages, pages - self.local_blocks)
        return [r for r in ((0, min(self.sink_pages, pages)), (window_lo, pages)) if r[0] < r[1]]

    def _take(self, n: int) -> Tensor:
        if self._n_free < n:
            self._grow(n - self._n_free)
        self._n_free -= n
        return self._free[self._n_free:self._n_free + n]

    def _give(self, pages: Tensor) -> None:
        n = pages.numel()
        self._free[self._n_free:self._n_free + n] = pages
        self._n_free += n

    def _grow(self, extra: int) -> None:
        old = self.k_pages.shape[0]
        # Sized exactly for the prompt (a pool holding page 0 only); later growth by a quarter keeps
        # reallocation copies amortised while over-allocating at most ~25 %.
        new = old + extra if old == 1 else old + max(extra, old // 4)
        shape = (new - old,) + tuple(self.k_pages.shape[1:])
        self.k_pages = torch.cat([self.k_pages, self.k_pages.new_empty(shape)])
        self.v_pages = torch.cat([self.v_pages, self.v_pages.new_empty(shape)])
        free = torch.empty(new, dtype=torch.int64)
        free[:self._n_free] = self._free[:self._n_free]
        fresh = torch.arange(new - 1, old - 1, -1, dtype=torch.int64)
        free[self._n_free:self._n_free + fresh.numel()] = fresh
        self._free = free
        self._n_free += fresh.numel()

    def plan(self, new_tokens: Sequence[int]) -> None:
        """Map the pages that ``new_tokens[b]`` more tokens need and free the pages SA sequences no
        longer need (host only). Python loops over sequences that change pages, never tokens."""
        old = self.lengths_host
        new = old + torch.as_tensor(new_tokens, dtype=torch.int64)
        ps = self.page_size
        old_pages = (old + ps - 1) // ps
        new_pages = (new + ps - 1) // ps
        changed = (new_pages != old_pages).nonzero().flatten().tolist()
        table = self.block_table_host
        width = int(new_pages.max()) if changed else table.shape[1]
        if width > table.shape[1]:
            table = torch.cat([table, table.new_zeros(self.batch, max(width, 2 * table.shape[1]) - table.shape[1])], 1)
        for b in changed:
            sparse = self.use_sparse_host[b]
            before = self._mapped(int(old[b]), sparse)
            after = self._mapped(int(new[b]), sparse)
            for lo, hi in _ranges_minus(before, after):
                self._give(table[b, lo:hi].to(torch.int64))
                table[b, lo:hi] = 0
            for lo, hi in _ranges_minus(after, before):
                table[b, lo:hi] = self._take(hi - lo).to(torch.int32)
        self.lengths_host = new
        # Single-token appends that cannot reach a new page of any sequence: append_one skips
        # planning for that many steps.
        self._free_steps = int((new_pages * ps - new).min()) if self.batch else 0
        if changed:
            self.block_table_host = table
            self.block_table = table.to(self.device, non_blocking=True)

    def write(self, k: Tensor, v: Tensor, seq: Tensor, pos: Tensor) -> None:
        """Store rows ``k, v [n, Hkv, D]`` at (sequence ``seq[n]``, position ``pos[n]``) (device
        tensors). Rows whose page is not mapped (evicted right away) land in page 0, never read."""
        pos = pos.to(torch.int64)
        page = self.block_table[seq, torch.div(pos, self.page_size, rounding_mode="floor")].to(torch.int64)
        slot = torch.remainder(pos, self.page_size)
        self.k_pages.index_put_((page, slot), k.to(self.k_pages.dtype))
        self.v_pages.index_put_((page, slot), v.to(self.v_pages.dtype))

    def append_varlen(self, k: Tensor, v: Tensor, cu_seqlens: Tensor, counts: Sequence[int]) -> None:
        """Append varlen rows (``counts[b]`` new tokens of sequence b, offsets ``cu_seqlens``)."""
        total = k.shape[0]
        dev = k.device
        seq = torch.repeat_interleave(torch.arange(self.batch, device=dev),
                                      torch.as_tensor(counts, device=dev), output_size=total)
        start = self.cache_seqlens.to(torch.int64)
        pos = start[seq] + torch.arange(total, device=dev) - cu_seqlens.to(torch.int64)[seq]
        self.plan(counts)
        self.write(k, v, seq, pos)
        self.cache_seqlens += torch.as_tensor(counts, dtype=torch.int32, device=dev)

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

    def layer(self, layer_idx: int) -> FluxCacheLayer:
        if self.layer_class_to_replicate is not None:
            while len(self.layers) <= layer_idx:
                self.layers.append(FluxCacheLayer())
        if layer_idx >= len(self.layers):
            raise IndexError(f"FluxCache has {len(self.layers)} layers; the model used layer {layer_idx} "
                             "(build it from the model's config)")
        return self.layers[layer_idx]

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
